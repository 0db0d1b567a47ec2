"""The collection methods' composed sets (`cas_jax.studies.cas_study`)."""

import pytest

from cas_jax.evaluation.questions import Question
from cas_jax.studies import cas_study
from cas_jax.training import distractors

IDS = [f"d{i}" for i in range(10)]
QS = [Question(doc_id=IDS[i % 10], question=f"q{i}", gold="x") for i in range(30)]


@pytest.mark.parametrize("position", distractors.POSITIONS)
def test_composed_sets_hold_the_true_cartridge_once_among_k_others(position):
    sets = distractors.composed_sets(QS, IDS, 3, seed=0, position=position)
    for q, s in zip(QS, sets):
        assert len(s) == len(set(s)) == 4 and s.count(q.doc_id) == 1
        assert set(s) <= set(IDS)
        if position == "first":
            assert s[0] == q.doc_id
        if position == "last":
            assert s[-1] == q.doc_id
    assert sets == distractors.composed_sets(QS, IDS, 3, seed=0, position=position)


def test_positions_reorder_the_same_draws_and_random_varies_the_place():
    by = {p: distractors.composed_sets(QS, IDS, 3, seed=1, position=p)
          for p in distractors.POSITIONS}
    for a, b, c in zip(by["first"], by["last"], by["random"]):
        assert set(a) == set(b) == set(c)
    places = {s.index(q.doc_id) for q, s in zip(QS, by["random"])}
    assert len(places) > 1
    assert distractors.composed_sets(QS, IDS, 3, seed=2) != by["random"]
    with pytest.raises(ValueError, match="more than 10 documents"):
        distractors.composed_sets(QS, IDS, 10, seed=0)
    with pytest.raises(ValueError, match="position"):
        distractors.composed_sets(QS, IDS, 1, seed=0, position="middle")


def test_recall_reads_retrieval_hits_only():
    assert cas_study.recall({"records": [{"retrieval_hit": None}]}) is None
    assert cas_study.recall({"records": [{"retrieval_hit": True}, {"retrieval_hit": False},
                                         {"retrieval_hit": None}]}) == 0.5


def _result(correct, prompt_tokens=20.0, cartridge_tokens=0.0, gold_nll=1.0):
    return {"summary": {"prompt_tokens": prompt_tokens, "cartridge_tokens": cartridge_tokens,
                        "gold_nll": gold_nll},
            "records": [{"kind": "mc", "correct_ll": c} for c in correct]}


def test_claims_compare_on_the_same_questions_against_each_bar():
    n = 40
    ones, zeros = [1.0] * n, [0.0] * n
    half = [1.0] * (n // 2) + [0.0] * (n // 2)
    results = {
        "oracle_cartridge": _result(ones), "naive_composed_k3": _result(half),
        "cas_oracle": _result(ones), "cas_composed_k3": _result(ones[:-1] + [0.0]),
        "monolithic": _result(ones, cartridge_tokens=640),
        "retrieval_cas_bm25_k1": _result(half, cartridge_tokens=64),
        "retrieval_cas_bm25_k2": _result(ones, cartridge_tokens=128),
        "rag_bm25_k2": _result(half, prompt_tokens=500), "rag_dense_k1": _result(zeros),
    }
    rows = {r["claim"]: r for r in cas_study.claims(results, k=3)}
    assert rows["naive collapse"]["diff"] == pytest.approx(-0.5) and rows["naive collapse"]["met"]
    assert rows["CAS composes"]["diff"] == pytest.approx(-1 / n) and rows["CAS composes"]["met"]
    lo, hi = rows["CAS composes"]["diff_ci"]
    assert lo <= -1 / n <= hi
    assert rows["CAS vs monolithic"]["diff"] == 0.0 and not rows["CAS vs monolithic"]["met"]
    rvr = rows["retrieval vs RAG"]  # the best of each family, tokens = prompt + cartridge
    assert (rvr["method"], rvr["reference"]) == ("retrieval_cas_bm25_k2", "rag_bm25_k2")
    assert rvr["token_ratio"] == pytest.approx(500 / 148) and rvr["met"]
    table = cas_study.format_claims(list(rows.values()))
    assert "| CAS vs monolithic |" in table and "| NO |" in table
    del results["monolithic"]
    assert "CAS vs monolithic" not in {r["claim"] for r in cas_study.claims(results)}


def test_each_collection_method_names_the_cartridges_it_reads():
    assert cas_study.cartridges_read("cas_oracle") == "cas"
    assert cas_study.cartridges_read("cas_composed_k3_true_first") == "cas"
    assert cas_study.cartridges_read("retrieval_cas_dense_k2") == "cas"
    assert cas_study.cartridges_read("naive_composed_k7") == "naive"
    assert cas_study.cartridges_read("monolithic") == "monolithic"
    assert cas_study.cartridges_read("rag_bm25_k4") is None


def test_composition_rows_pair_each_run_with_its_own_oracle_and_the_first_run():
    n = 40
    ones, half = [1.0] * n, [1.0] * (n // 2) + [0.0] * (n // 2)
    quarter = [1.0] * (n // 4) + [0.0] * (n - n // 4)
    rows = cas_study.composition_rows([
        ("uniform", _result(ones), _result(ones[:-2] + [0.0, 0.0], gold_nll=1.5)),
        ("none", _result(ones), _result(quarter))])
    assert [r["run"] for r in rows] == ["uniform", "none"]
    assert rows[0]["composed_minus_oracle"][0] == pytest.approx(-2 / n)
    assert rows[0]["composed_vs_first"] == (0.0, 0.0, 0.0)
    assert rows[1]["composed_minus_oracle"][0] == pytest.approx(-0.75)
    assert rows[1]["composed_vs_first"][0] == pytest.approx(0.25 - (n - 2) / n)
    lo, hi = rows[1]["composed_ci"]
    assert lo <= 0.25 <= hi and rows[0]["composed_nll"] == 1.5
    table = cas_study.format_composition_rows(rows, k=3)
    assert "composed k=3 accuracy" in table and "| none | 1.000 [1.000, 1.000] | 0.250" in table
    with pytest.raises(ValueError, match="same non-empty questions"):
        cas_study.composition_rows([("a", _result(ones), _result(half[:-1]))])


class _FakeEvaluator:
    """Stands in for `evaluate.Evaluator`: records which cartridge source each method read."""

    def __init__(self):
        self.collection = type("C", (), {"ids": IDS})()
        self.read = {}

    def _result(self, name, source):
        self.read[name] = source
        return type("R", (), {"summary": lambda s: {"n": 1}, "records": []})()

    def oracle_cartridge(self, qs, source, name):
        return self._result(name, source)

    def cartridges(self, qs, source, lookup, name, slots, capacity):
        return self._result(name, source)


def test_collection_methods_leave_out_the_rows_of_a_missing_source(tmp_path):
    ev = _FakeEvaluator()
    rows = cas_study.collection_methods(ev, QS, str(tmp_path / "a"), cas="CAS", naive=None,
                                        monolithic=None, tokens=8, n_docs=10, compose_k=[3],
                                        positions=[], retrievers=[])
    assert [name for name, _, _ in rows] == ["cas_oracle", "cas_composed_k3"]
    assert set(ev.read.values()) == {"CAS"}
    ev = _FakeEvaluator()
    rows = cas_study.collection_methods(ev, QS, str(tmp_path / "b"), cas="CAS", naive="NAIVE",
                                        monolithic=None, tokens=8, n_docs=10, compose_k=[3],
                                        positions=[], retrievers=[])
    assert [name for name, _, _ in rows] == ["cas_oracle", "cas_composed_k3", "naive_composed_k3"]
    assert ev.read["naive_composed_k3"] == "NAIVE" and rows[2][2] == 4 * 8
