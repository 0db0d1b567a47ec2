"""Accuracy and gold NLL against compression: the quality study repeated for each cartridge size P.

  python -m benchmarks.compression_sweep --tokens=16,32,64,128,256 -- [benchmarks.quality flags]
  python -m benchmarks.compression_sweep --tokens=32,64,128 --reuse=runs/abl_base \\
      --out=runs/sweep_dev -- <runs/abl_base's quality flags>

Each P is one `benchmarks.quality` run (its flags after `--`, plus `--tokens=P`) in
<out>/p<P>. The first P synthesises the self-study data and runs the baselines (closed book,
ICL, RAG); every later P reuses them (`--reuse`), so only cartridge training and evaluation
repeat, on the same questions and the same conversations (`--reuse=DIR`: a finished run is
the base instead, and stands for its own P). Every run resumes from its folder, so
a cut-off sweep resumes too. `--cas` among the quality flags adds the collection methods at
each P.

Writes <out>/sweep.json, sweep.md (every P-dependent method's accuracy with its 95% CI, gold NLL,
gain recovered, compression) and sweep.png (accuracy and gold NLL against compression, log x;
closed book, ICL and RAG as lines). Last line: `best_recovered_acc=X at_compression=C`.
"""

import json
import os
import subprocess
import sys

from absl import app, flags

from cas_jax.studies import study

FLAGS = flags.FLAGS
flags.DEFINE_list("tokens", ["16", "32", "64", "128", "256"], "Cartridge tokens P to sweep.")
flags.DEFINE_string("out", "runs/compression_sweep", "Output folder (every P resumes).")
flags.DEFINE_string("reuse", "", "A finished `benchmarks.quality` run with the same quality flags: "
                    "every P reuses its self-study data and baselines, and it stands for its own "
                    "P when that P is swept. Empty: the first P's run is the base.")


def _tokens_of(run_dir: str) -> int:
    with open(os.path.join(run_dir, "config.json")) as f:
        return int(json.load(f)["flags"]["tokens"])


def main(argv):
    quality_flags = argv[1:]
    for f in quality_flags:
        if f.split("=")[0].lstrip("-") in ("tokens", "out", "reuse"):
            raise app.UsageError(f"{f}: the sweep sets --tokens, --out and --reuse itself")
    try:
        sizes = [int(p) for p in FLAGS.tokens]
    except ValueError:
        raise app.UsageError(f"--tokens={','.join(FLAGS.tokens)}: expected integers") from None
    if not sizes or min(sizes) < 1:
        raise app.UsageError(f"--tokens={','.join(FLAGS.tokens)}: expected positive sizes")
    base = FLAGS.reuse or os.path.join(FLAGS.out, f"p{sizes[0]}")
    if FLAGS.reuse and not os.path.exists(os.path.join(base, "report.json")):
        raise app.UsageError(f"--reuse={base}: no report.json there (a finished quality run "
                             "is needed)")
    os.makedirs(FLAGS.out, exist_ok=True)
    reused_p = _tokens_of(base) if FLAGS.reuse else None
    reports = {}
    for p in sizes:
        run_dir = base if p == reused_p else os.path.join(FLAGS.out, f"p{p}")
        if p != reused_p:
            cmd = [sys.executable, "-m", "benchmarks.quality", *quality_flags, f"--tokens={p}",
                   f"--out={run_dir}"] + ([f"--reuse={base}"] if run_dir != base else [])
            print(f"== P={p}: {' '.join(cmd[2:])}", flush=True)
            subprocess.run(cmd, check=True)
        with open(os.path.join(run_dir, "report.json")) as f:
            reports[p] = json.load(f)
    rows, flat = study.sweep_rows(reports)
    with open(os.path.join(FLAGS.out, "sweep.json"), "w") as f:
        json.dump({"rows": rows, "flat": flat}, f, indent=1)
    table = study.format_sweep(rows, flat)
    with open(os.path.join(FLAGS.out, "sweep.md"), "w") as f:
        f.write(table + "\n")
    study.plot_sweep(rows, flat, os.path.join(FLAGS.out, "sweep.png"))
    print(table)
    best = max((r for r in rows if r["method"] == "oracle_cartridge"),
               key=lambda r: r["recovered_acc"])
    print(f"best_recovered_acc={best['recovered_acc']:.3f} "
          f"at_compression={best['compression']:.1f}")


if __name__ == "__main__":
    app.run(main)
