"""A fixed dev/test split of the Factbook profiles, so nothing is tuned on reported questions.

The profile ids are shuffled once with a fixed seed: the first `NUM_DEV` are DEV profiles
(rendering choice, recipe search, ablations), the rest are TEST profiles, in that shuffled order
(the quality study takes its documents from the start of the test list). Only profiles with at
least `MIN_FIELDS` of the `SPLIT_FIELDS` question fields are used, which drops the oceans and
other sparse profiles. `SPLIT_FIELDS` are the fields `questions.FIELDS` had when the split was
drawn (session 4): fields added later do not move a profile between dev and test.
"""

from __future__ import annotations

import functools

import numpy as np

from cas_jax.evaluation import questions

SEED = 20261201
NUM_DEV = 40
MIN_FIELDS = 10
SPLIT_FIELDS = ("capital", "total_area", "coastline", "highest_point", "lowest_point",
                "national_holiday", "independence", "national_anthem", "internet_code", "airports",
                "population", "population_growth_rate", "birth_rate", "median_age",
                "life_expectancy")


@functools.lru_cache(maxsize=1)
def _shuffled() -> tuple[str, ...]:
    values = {f: questions.field_values(f) for f in SPLIT_FIELDS}
    ids = sorted({i for v in values.values() for i in v})
    ids = [i for i in ids if sum(i in v for v in values.values()) >= MIN_FIELDS]
    order = np.random.default_rng(SEED).permutation(len(ids))
    return tuple(ids[j] for j in order)


def dev_profiles() -> list[str]:
    """Profile ids for choosing and tuning (never reported as results)."""
    return list(_shuffled()[:NUM_DEV])


def test_profiles() -> list[str]:
    """Profile ids for reported results, in a fixed shuffled order."""
    return list(_shuffled()[NUM_DEV:])
