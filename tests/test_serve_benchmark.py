"""benchmarks.serve's summary from a run's log (`--from_log`): the last line is read from the
printed rows, so a run cut off after the cells it needs still gives it."""

from benchmarks import serve_report

LOG = """\
engine     docs     mode     clients requests   tok/s  ttft50  ttft90   itl50   e2e50 compiles
continuous start-up compiles {'compose': 1, 'put': 1, 'prefill': 26} in 79 s
continuous profiles closed        64       64   350.4    2.11    3.62   0.147   11.40        0
continuous profiles cart 1         8       64    60.0    1.00    2.00   0.100    5.00        0
continuous profiles cart 1        64       64   106.9    3.51   29.70   0.439   31.18        0
continuous profiles icl 1         64       64     2.0  100.00  200.00   0.400  300.00        0
continuous profiles icl 4   skipped: over the window
bars continuous: short_alone_s=1.200, flood_ratio=1.500
static     profiles cart 1        64       64    40.0    3.51   29.70   0.439   31.18        3
"""


def test_the_summary_of_a_log_reads_its_rows(tmp_path, capsys):
    path = tmp_path / "serve.log"
    path.write_text(LOG)
    results, bars, sets, clients = serve_report.from_log(str(path))
    assert clients == 64 and sets == ["profiles"] and len(results) == 5
    assert results["continuous", "profiles", "cart 1", 8].tokens_per_s == 60.0
    serve_report.summary(results, bars, sets, clients)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "bars continuous: short_alone_s=1.200, flood_ratio=1.500"
    assert out[-1] == ("cartridge_vs_icl_throughput=53.450 ttft_p50_s=3.510 "
                       "continuous_vs_static=2.673")
