"""Relevance routing (`attention.Geometry.relevance`): the evaluator biases each composed
cartridge by its document's retrieval score for the question, on the tiny model."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from cas_jax.cartridges import attention
from cas_jax.evaluation import evaluate
from cas_jax.evaluation.questions import Question
from cas_jax.training import collection_init
from conftest import FICTION

P = 8
DOCS = FICTION.subset(["zo", "ve", "ta", "pl"])
QS = [Question("zo", "What is the capital of Zorbania?", "Quillton",
               options=("Paris", "Quillton", "Tokyo", "Rome"), answer=1),
      Question("ve", "What is the currency of Vexland?", "vex crown",
               options=("euro", "vex crown"), answer=1)]


@pytest.fixture(scope="module")
def setup(tiny):
    cartridges = {d: collection_init.initial_cartridge(tiny, d, DOCS[d].text, P)
                  for d in DOCS.ids}
    return tiny, cartridges


def _evaluator(model, spec: str) -> evaluate.Evaluator:
    return evaluate.Evaluator(model, DOCS, evaluate.EvalConfig(
        max_new_tokens=0, geometry=attention.Geometry.parse(spec)))


def test_biases_put_the_best_scored_document_at_zero_and_the_worst_at_minus_r(setup):
    model, _ = setup
    ev = _evaluator(model, "parallel,relevance=3")
    entries = [["ta", "zo", "pl"], ["ve"], ["zo", "ve"]]
    biases = ev.relevance_biases([QS[0], QS[0], QS[1]], entries)
    assert biases[0][1] == 0.0 and min(biases[0]) == -3.0 and all(-3 <= b <= 0 for b in biases[0])
    assert biases[1] == [0.0]  # one cartridge: nothing to route
    assert biases[2][1] == 0.0 and biases[2][0] == -3.0


def test_each_question_is_scored_once_across_routed_methods(setup):
    """The composed sets and retrieval rows of one study route the same questions: the
    second reading reuses the first's scores instead of searching the collection again."""
    model, _ = setup
    ev = _evaluator(model, "parallel,relevance=2")
    first = ev.relevance_biases(QS, [["zo", "ve", "ta"], ["ve", "pl"]])
    index = ev.index.retriever("bm25", "docs")
    searches = []
    search = index.search
    index.search = lambda query, k: searches.append(query) or search(query, k)
    again = ev.relevance_biases(QS, [["zo", "ve", "ta"], ["ve", "pl"]])
    other = ev.relevance_biases(QS, [["ta", "zo"], ["pl", "ve"]])
    assert searches == [] and again == first
    assert other[0][1] == 0.0 and other[1][1] == 0.0  # each question's document is best


def test_strong_routing_reads_a_composed_set_as_its_best_document_alone(setup):
    """With the question's document first and a huge relevance, the other cartridges get no
    attention: the composed set scores the options as the oracle (parallel: same positions)."""
    model, cartridges = setup
    oracle = _evaluator(model, "parallel").oracle_cartridge(QS, cartridges)
    select = {"zo": ["zo", "ta", "pl"], "ve": ["ve", "pl", "zo"]}
    routed = _evaluator(model, "parallel,relevance=1e4").cartridges(
        QS, cartridges, lambda q: select[q.doc_id])
    plain = _evaluator(model, "parallel").cartridges(QS, cartridges, lambda q: select[q.doc_id])
    for o, r, p in zip(oracle.records, routed.records, plain.records):
        np.testing.assert_allclose(r["option_logprobs"], o["option_logprobs"], atol=2e-3)
        assert not np.allclose(p["option_logprobs"], o["option_logprobs"], atol=2e-3)


def test_a_routing_geometry_needs_the_biases_and_a_known_router(setup):
    _, cartridges = setup
    bank = attention.bank_from_cartridges([cartridges["zo"], cartridges["ve"]])
    with pytest.raises(ValueError, match="routes by relevance"):
        attention.compose(bank, jnp.array([[0, 1]]), jnp.array([[True, True]]),
                          attention.Geometry("serial", relevance=1.0))
    with pytest.raises(ValueError, match="router must be one of"):
        evaluate.EvalConfig(router="tfidf")


def test_a_router_keeps_only_its_last_queries():
    """A server's router sees unbounded queries: it keeps the last `keep` and searches again
    for one it let go, with the same biases."""
    from cas_jax.documents import retrieval

    index = retrieval.make_retriever("bm25", DOCS.texts)
    searches = []
    search = index.search
    index.search = lambda query, k: searches.append(query) or search(query, k)
    router = retrieval.Router(index, DOCS.ids, keep=2)
    first = router.biases(QS[0].question, ["ta", "zo"], 2.0)
    router.biases("Vexland", ["ta", "zo"], 2.0)
    router.biases(QS[0].question, ["ta", "zo"], 2.0)  # still kept
    router.biases("Plinth", ["ta", "zo"], 2.0)  # drops "Vexland", the oldest
    assert router.biases(QS[0].question, ["ta", "zo"], 2.0) == first == [-2.0, 0.0]
    router.biases("Vexland", ["ta", "zo"], 2.0)
    assert searches == [QS[0].question, "Vexland", "Plinth", "Vexland"]


def test_a_relevance_floor_routes_close_scores_less():
    """relevance_floor f: d = (best - score) / max(spread, f * |best|), so a set whose scores
    are all near the best (an unsure retriever) is barely routed; f = 0 is the spread rule."""
    from cas_jax.documents import retrieval
    assert retrieval.relevance_biases([10.0, 9.0], 2.0) == [0.0, -2.0]
    assert np.allclose(retrieval.relevance_biases([10.0, 9.0], 2.0, floor=1.0), [0.0, -0.2])
    assert np.allclose(retrieval.relevance_biases([10.0, 1.0, 0.0], 2.0, floor=1.0),
                       [0.0, -1.8, -2.0])  # spread already >= the best: the spread rule
    assert retrieval.relevance_biases([3.0, 3.0], 2.0, floor=1.0) == [0.0, 0.0]
    assert retrieval.relevance_biases([], 2.0) == []
    g = attention.Geometry.parse("parallel,relevance=2,relevance_floor=1")
    assert g.relevance_floor == 1.0 and attention.Geometry.parse(str(g)) == g
    assert str(attention.Geometry.parse("parallel,relevance=2")) == "parallel,relevance=2"
    with pytest.raises(ValueError, match="relevance_floor must be >= 0"):
        attention.Geometry("parallel", relevance=2, relevance_floor=-1)


def test_the_evaluator_routes_by_the_geometrys_floor(setup):
    model, _ = setup
    entries = [["ta", "zo", "pl"], ["zo", "ve"]]
    spread = _evaluator(model, "parallel,relevance=3").relevance_biases([QS[0], QS[1]], entries)
    ev = _evaluator(model, "parallel,relevance=3,relevance_floor=1")
    floored = ev.relevance_biases([QS[0], QS[1]], entries)
    router = ev.index.router("bm25")
    for q, e, got in zip([QS[0], QS[1]], entries, floored):
        s = router.scores(q.question)[[router.ids.index(i) for i in e]]
        want = -3 * (s.max() - s) / max(s.max() - s.min(), abs(s.max()))
        assert np.allclose(got, want)
    assert all(f >= s for a, b in zip(floored, spread) for f, s in zip(a, b))
