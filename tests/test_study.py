"""The quality study's statistics: bootstrap intervals and the share of ICL's gain recovered."""

import numpy as np

from cas_jax import study


def test_bootstrap_ci_brackets_the_mean_and_narrows_with_more_questions():
    x = np.random.default_rng(0).random(400) < 0.7
    lo, hi = study.bootstrap_ci(x)
    assert lo < x.mean() < hi and hi - lo < 0.1
    lo8, hi8 = study.bootstrap_ci(x[:40])
    assert hi8 - lo8 > hi - lo
    assert study.bootstrap_ci([1.0] * 10) == (1.0, 1.0)


def test_recovered_gain_and_its_paired_interval():
    assert study.recovered(0.75, 0.5, 0.9) == (0.75 - 0.5) / (0.9 - 0.5)
    assert np.isnan(study.recovered(0.6, 0.5, 0.5))  # ICL no better than closed book
    closed = np.asarray([0.0] * 50 + [1.0] * 50)
    icl = np.ones(100)
    method = np.asarray([0.0] * 25 + [1.0] * 75)  # half of the 50 closed-book misses recovered
    lo, hi = study.paired_recovered_ci(method, closed, icl)
    assert lo < 0.5 < hi and 0.2 < lo and hi < 0.8
