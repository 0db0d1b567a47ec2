"""benchmarks.decode_rows: its numpy baseline computes the decoder's prefix attention, and its
step timing runs the continuous engine's own kernel."""

import numpy as np

from benchmarks import decode_rows


def test_the_numpy_baseline_is_the_decoders_prefix_attention():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 3, 1, 6, 8), np.float32)  # L=2, R=3, H=6 over K=2
    k = rng.standard_normal((2, 3, 5, 2, 8), np.float32)
    v = rng.standard_normal((2, 3, 5, 2, 8), np.float32)
    want = np.asarray(decode_rows.xla_attention(q, k, v))
    got = decode_rows.numpy_attention(q, *decode_rows.numpy_layout(k, v))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # and differs when a row's keys change: the rows are not mixed up
    k2 = k.copy()
    k2[:, 1] = rng.standard_normal(k2[:, 1].shape)
    got2 = decode_rows.numpy_attention(q, *decode_rows.numpy_layout(k2, v))
    np.testing.assert_allclose(got2[:, [0, 2]], want[:, [0, 2]], rtol=1e-5, atol=1e-5)
    assert not np.allclose(got2[:, 1], want[:, 1], atol=1e-3)


def test_the_step_timing_runs_the_engines_kernel(tiny):
    for prefix_tokens in (0, 4):
        seconds = decode_rows.time_step(tiny, rows=2, slots=8, prefix_tokens=prefix_tokens,
                                        steps=2)
        assert 0 < seconds < 60


def test_importing_it_defines_no_flags():
    from absl import flags
    assert "steps" not in flags.FLAGS or flags.FLAGS["steps"].help != "Timed steps per cell " \
        "(after one untimed)."
