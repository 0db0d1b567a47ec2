"""The collection methods' composed sets (`cas_jax.cas_study`)."""

import pytest

from cas_jax import cas_study
from cas_jax.questions import Question

IDS = [f"d{i}" for i in range(10)]
QS = [Question(doc_id=IDS[i % 10], question=f"q{i}", gold="x") for i in range(30)]


@pytest.mark.parametrize("position", cas_study.POSITIONS)
def test_composed_sets_hold_the_true_cartridge_once_among_k_others(position):
    sets = cas_study.composed_sets(QS, IDS, 3, seed=0, position=position)
    for q, s in zip(QS, sets):
        assert len(s) == len(set(s)) == 4 and s.count(q.doc_id) == 1
        assert set(s) <= set(IDS)
        if position == "first":
            assert s[0] == q.doc_id
        if position == "last":
            assert s[-1] == q.doc_id
    assert sets == cas_study.composed_sets(QS, IDS, 3, seed=0, position=position)


def test_positions_reorder_the_same_draws_and_random_varies_the_place():
    by = {p: cas_study.composed_sets(QS, IDS, 3, seed=1, position=p)
          for p in cas_study.POSITIONS}
    for a, b, c in zip(by["first"], by["last"], by["random"]):
        assert set(a) == set(b) == set(c)
    places = {s.index(q.doc_id) for q, s in zip(QS, by["random"])}
    assert len(places) > 1
    assert cas_study.composed_sets(QS, IDS, 3, seed=2) != by["random"]
    with pytest.raises(ValueError, match="more than 10 documents"):
        cas_study.composed_sets(QS, IDS, 10, seed=0)
    with pytest.raises(ValueError, match="position"):
        cas_study.composed_sets(QS, IDS, 1, seed=0, position="middle")


def test_recall_reads_retrieval_hits_only():
    assert cas_study.recall({"records": [{"retrieval_hit": None}]}) is None
    assert cas_study.recall({"records": [{"retrieval_hit": True}, {"retrieval_hit": False},
                                         {"retrieval_hit": None}]}) == 0.5
