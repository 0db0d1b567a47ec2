from __future__ import annotations

import pytest

from cas_jax.documents.corpus import load_factbook
from cas_jax.evaluation.questions import field_values
from cas_jax.documents.retrieval import BM25Retriever, DenseRetriever, make_retriever

SMALL = ["pc", "nf", "ck", "wf"]  # short profiles keep dense indexing fast on CPU


@pytest.fixture(scope="module")
def factbook():
    return load_factbook()


@pytest.fixture(scope="module")
def dense_small(factbook):
    return make_retriever("dense", factbook.subset(SMALL).texts)


def test_bm25_ranks_the_country_named_by_its_capital_first(factbook):
    retriever = make_retriever("bm25", factbook.texts)
    assert isinstance(retriever, BM25Retriever)
    for capital, doc_id in [("Paris", "fr"), ("Tokyo", "ja"), ("Berlin", "gm"), ("Nairobi", "ke")]:
        assert retriever.search(f"Which country has {capital} as its capital?", 3)[0][0] == doc_id
    capitals = field_values("capital")
    hits = sum(retriever.search(f"Which country has {c} as its capital?", 1)[0][0] == doc_id
               for doc_id, c in capitals.items())
    assert hits >= 0.9 * len(capitals)


def test_bm25_results_are_sorted_and_clipped():
    retriever = BM25Retriever({"a": "red apples and green pears", "b": "blue sky", "c": "red red red car"})
    results = retriever.search("red car", 10)
    assert [doc_id for doc_id, _ in results] == ["c", "a", "b"]
    assert results[0][1] > results[1][1] > 0 and results[2][1] == 0
    assert retriever.search("zebra", 2) == [("a", 0.0), ("b", 0.0)]


def test_dense_ranks_the_country_named_by_its_capital_first(dense_small):
    assert isinstance(dense_small, DenseRetriever)
    capitals = field_values("capital")
    for doc_id in SMALL:
        results = dense_small.search(f"Which place has {capitals[doc_id]} as its capital?", 5)
        assert results[0][0] == doc_id, (capitals[doc_id], results)
        scores = [s for _, s in results]
        assert scores == sorted(scores, reverse=True) and all(-1.0 <= s <= 1.0 for s in scores)
        assert sorted(d for d, _ in results) == sorted(SMALL)


def test_dense_finds_a_passage_past_the_model_length_limit():
    filler = " ".join(["the committee reviewed quarterly budget spreadsheets and filed reports"] * 40)
    retriever = DenseRetriever({
        "budget": filler + " Penguins waddle across the Antarctic ice to reach the sea.",
        "kitchen": "Slice the onions, fry them in butter, then add the tomatoes and simmer.",
    })
    assert retriever.search("penguins on Antarctic ice", 1)[0][0] == "budget"


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="unknown retriever kind 'tfidf'"):
        make_retriever("tfidf", {"a": "x"})
    with pytest.raises(ValueError, match="empty"):
        BM25Retriever({})
    with pytest.raises(ValueError, match="k must be a positive int"):
        BM25Retriever({"a": "some words"}).search("words", 0)
