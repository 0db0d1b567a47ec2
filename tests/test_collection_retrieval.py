"""Retrieval over a whole collection (issue 25 item 3) on the tiny model: trained and initial
cartridges, paging on a budget, the substitution check and the resumable run."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import optax
import pytest

from cas_jax.cartridges.store import CartridgeNotFoundError, CartridgeStore
from cas_jax.documents import retrieval
from cas_jax.evaluation import evaluate
from cas_jax.evaluation.questions import Question
from cas_jax.studies import collection_cartridges as cc, collection_retrieval as cr
from cas_jax.training import collection_init
from conftest import FICTION, assert_bitwise_equal, tiny_model

P = 8
DOCS = FICTION
QS = [Question("zo", "What is the capital of Zorbania?", "Quillton",
               options=("Paris", "Quillton", "Tokyo", "Rome"), answer=1),
      Question("zo", "What is the national animal of Zorbania?", "marsh heron",
               options=("marsh heron", "lion", "eagle"), answer=0),
      Question("ve", "What is the highest point of Vexland?", "Mount Brel",
               options=("Mount Brel", "Everest", "Kilimanjaro"), answer=0),
      Question("ve", "What is the currency of Vexland?", "vex crown",
               options=("euro", "vex crown"), answer=1)]
GOLD = ["zo", "ve"]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _trained_store(root, model, geometry="serial") -> CartridgeStore:
    """The question documents' "trained" cartridges: their initial ones, perturbed."""
    store = CartridgeStore(root, model.fingerprint)
    rng = np.random.default_rng(0)
    for d in GOLD:
        c = collection_init.initial_cartridge(model, d, DOCS[d].text, P, geometry=geometry)
        noise = rng.standard_normal(c.keys.shape).astype(c.keys.dtype)
        store.save(d, c.replace(keys=c.keys + noise, values=c.values - noise), None, step=7)
    return store


def _cartridges(tmp_path, model) -> cc.CollectionCartridges:
    trained = _trained_store(str(tmp_path / "cas" / "cartridges"), model)
    settings = cc.trained_settings(cc.open_store(str(tmp_path / "cas")), GOLD)
    return cc.CollectionCartridges(model, DOCS.texts, trained, str(tmp_path / "initial"),
                                   settings)


def test_initial_cartridge_is_what_initialise_store_saves(tmp_path, model):
    store = CartridgeStore(str(tmp_path / "s"), model.fingerprint)
    collection_init.initialise_store(store, model, {"ta": DOCS["ta"].text}, P,
                                     optax.adam(1e-2), geometry="parallel")
    made = collection_init.initial_cartridge(model, "ta", DOCS["ta"].text, P,
                                             geometry="parallel")
    assert_bitwise_equal(made, store.load_cartridge("ta"))
    assert made.meta == store.load_cartridge("ta").meta and made.meta.geometry == "parallel"
    assert store.documents() == {"ta": DOCS["ta"].text}  # what a routing reader scores


def test_trained_where_the_store_has_one_else_initial(tmp_path, model):
    cart = _cartridges(tmp_path, model)
    assert cart.settings == cc.InitialSettings(P, 1, "first_tokens", "serial")
    assert not cart.is_initial("zo") and cart.is_initial("ta")
    assert cart.is_initial(cc.initial_id("zo"))
    with pytest.raises(CartridgeNotFoundError, match="ensure_initial"):
        cart.load("ta")
    assert cart.ensure_initial(["zo", "ta", cc.initial_id("zo"), "ta"]) == 2
    assert cart.ensure_initial(["ta"]) == 0
    trained, _, step = cart.load("zo")
    initial, _, _ = cart.load(cc.initial_id("zo"))
    assert step == 7 and not np.array_equal(trained.keys, initial.keys)
    assert_bitwise_equal(initial,
                         collection_init.initial_cartridge(model, "zo", DOCS["zo"].text, P))
    assert cart.nbytes("ta") == cart.load("ta")[0].nbytes == cart.nbytes("zo")
    with pytest.raises(TypeError):
        cart.save("ta", initial)


def test_trained_settings_refuse_cartridges_of_two_geometries(tmp_path, model):
    store = _trained_store(str(tmp_path / "a"), model)
    c = collection_init.initial_cartridge(model, "ta", DOCS["ta"].text, P, geometry="parallel")
    store.save("ta", c)
    assert cc.trained_settings(store, GOLD).geometry == "serial"
    with pytest.raises(ValueError, match="different composition geometries"):
        cc.trained_settings(store, GOLD + ["ta"])
    with pytest.raises(FileNotFoundError):
        cc.open_store(str(tmp_path / "nowhere"))


def test_groups_hold_at_most_the_budget_and_keep_the_question_order():
    entries = [["a", "b"], ["b", "c"], ["d"], ["a", "e"], ["e"], ["f", "g", "h"]]
    groups = cc.plan_groups(entries, 3)
    assert sum(groups, []) == list(range(len(entries)))
    assert all(len({i for q in g for i in entries[q]}) <= 3 for g in groups)
    assert groups == [[0, 1], [2, 3, 4], [5]]
    with pytest.raises(ValueError, match="more than the 2"):
        cc.plan_groups(entries, 2)


def test_substitution_keeps_the_gold_document_trained():
    sets = cr.substituted([["ve", "zo", "ta"], ["zo"]], QS[:2])
    assert sets == [[cc.initial_id("ve"), "zo", cc.initial_id("ta")], ["zo"]]


def test_paged_evaluation_scores_as_one_unpaged_bank(tmp_path, model):
    cart = _cartridges(tmp_path, model)
    entries = [["zo", "ta", "pl"], ["zo", "qu"], [cc.initial_id("ve"), "ri", "zo"], ["ve"]]
    cart.ensure_initial([i for e in entries for i in e])
    ev = evaluate.Evaluator(model, DOCS, evaluate.EvalConfig(max_new_tokens=0))
    extra = [{"retrieval_hit": q.doc_id in e} for q, e in zip(QS, entries)]
    paged, paging = cc.paged_cartridges(ev, QS, entries, cart, "paged", budget_share=0.5,
                                        extra=extra)
    table = {id(q): e for q, e in zip(QS, entries)}
    whole = ev.cartridges(QS, {i: cart.load(i)[0] for e in entries for i in e},
                          lambda q: table[id(q)], "whole", slots=3)
    for a, b in zip(paged.records, whole.records):
        np.testing.assert_allclose(a["option_logprobs"], b["option_logprobs"], atol=1e-5)
        assert a["cartridge_tokens"] == b["cartridge_tokens"]
    assert [r["initial_cartridges"] for r in paged.records] == [2, 1, 2, 0]
    assert paged.retrieval_recall == 0.75
    # 7 distinct cartridges, half of them = 3 (the largest set), so several groups page.
    assert paging["used_cartridges"] == 7 and paging["capacity"] == 3
    assert paging["budget_bytes"] == 3 * cart.nbytes("zo") and paging["groups"] > 1
    assert paging["bytes_read"] >= 7 * cart.nbytes("zo")
    assert 0 <= paging["hit_rate"] <= 1 and paging["hits"] + paging["prefetch_hits"] > 0


def test_dense_embeddings_are_read_back_from_the_cache(tmp_path):
    texts = {"a": "penguins walk on the antarctic ice", "b": "onions fry in butter"}
    first = retrieval.DenseRetriever(texts, cache_dir=tmp_path)
    (path,) = tmp_path.glob("dense_*.npy")
    assert first.search("penguins on ice", 1)[0][0] == "a"
    np.save(path, -np.load(path))  # a reader of the cache now ranks the other way round
    again = retrieval.DenseRetriever(texts, cache_dir=tmp_path)
    assert again.search("penguins on ice", 1)[0][0] == "b"
    other = retrieval.embedding_cache_path(tmp_path, ["penguins walk"])
    assert other != path and not other.exists()


def test_the_run_reports_every_stage_and_resumes_from_its_folder(tmp_path, model, monkeypatch):
    _trained_store(str(tmp_path / "cas" / "cartridges"), model)
    cfg = cr.CollectionRetrievalConfig(out=str(tmp_path / "out"), store=str(tmp_path / "cas"),
                                       retrievers=("bm25",), top_k=(2,), recall_k=(1, 4),
                                       budget_share=0.5, compose_k=(1,))
    report = cr.run(model, QS, DOCS, cfg)
    assert report["last"]["documents"] == 6 and report["last"]["collection_tokens"] > 50
    assert {"retrieval_cas_minus_rag", "token_ratio", "substitution_retrieval_cas_bm25_k2",
            "substitution_cas_composed_k1"} <= set(report["last"])
    assert report["recall"]["documents"]["bm25"][4] == 1.0  # 2 documents: always found
    assert {r["method"] for r in report["scale"]} == {"retrieval_cas_bm25_k2", "rag_bm25_k2"}
    k2 = json.load(open(tmp_path / "out" / "eval" / "retrieval_cas_bm25_k2.json"))
    assert all(r["cartridges"] == r["retrieved"] for r in k2["records"])
    assert next(r for r in report["scale"] if r["method"] == "retrieval_cas_bm25_k2"
                )["attended"] == k2["summary"]["prompt_tokens"] + 2 * P - 1
    # The scale row pages at the budget; the substitution check holds all its cartridges.
    assert report["stages"]["retrieval_cas_bm25_k2"]["paging"]["budget_share"] < 1.0
    assert report["stages"]["validation_retrieval_cas_bm25_k2"]["paging"]["budget_share"] == 1.0
    swapped = json.load(open(tmp_path / "out" / "validation" / "eval" /
                             "cas_composed_k1_initial_others.json"))
    for r in swapped["records"]:
        assert [i for i in r["cartridges"] if not i.startswith(cc.INITIAL_PREFIX)] == [r["doc_id"]]
    assert (tmp_path / "out" / "report.md").read_text().rstrip().endswith(
        f"substitution_cas_composed_k1={report['last']['substitution_cas_composed_k1']}")
    # Resumed: every stage is read back, nothing is evaluated or searched again.
    monkeypatch.setattr(cc, "paged_cartridges", None)
    monkeypatch.setattr(retrieval, "make_retriever", None)
    monkeypatch.setattr(evaluate.Evaluator, "rag", None)
    assert cr.run(model, QS, DOCS, cfg)["last"] == report["last"]
    with pytest.raises(ValueError, match="budget_share"):
        cr.run(model, QS, DOCS, dataclasses.replace(cfg, budget_share=0.2))


def test_sampled_chunks_take_the_opening_then_chunks_in_document_order():
    block = np.arange(1000, 1200, dtype=np.int32)  # 200 distinct tokens
    got = collection_init.sampled_chunk_tokens(block, 64, "fr-geography")
    assert got.shape == (64,) and got.dtype == np.int32
    assert np.array_equal(got[:16], block[:16])  # the sink and the block's opening
    starts = [int(got[i]) - 1000 for i in range(16, 64, 16)]
    assert starts == sorted(starts) and len(set(starts)) == 3
    for i, s in zip(range(16, 64, 16), starts):  # whole chunks cut at multiples of 16
        assert s % 16 == 0 and s >= 16 and np.array_equal(got[i:i + 16], block[s:s + 16])
    again = collection_init.sampled_chunk_tokens(block, 64, "fr-geography")
    other = collection_init.sampled_chunk_tokens(block, 64, "de-geography")
    assert np.array_equal(got, again) and not np.array_equal(got, other)
    # A last partial chunk is cut to fit; a short block is repeated, as first_tokens does.
    assert np.array_equal(collection_init.sampled_chunk_tokens(block, 40, "x")[:16], block[:16])
    assert collection_init.sampled_chunk_tokens(block, 40, "x").shape == (40,)
    assert np.array_equal(collection_init.sampled_chunk_tokens(block[:50], 64, "x"),
                          np.resize(block[:50], 64))


def test_sampled_chunks_init_is_the_kv_of_those_tokens(tmp_path, model):
    from cas_jax.cartridges import cartridge as cart_lib
    text = DOCS["zo"].text * 3
    c = collection_init.initial_cartridge(model, "zo", text, P, init="sampled_chunks")
    tokens = collection_init.sampled_chunk_tokens(
        collection_init.document_tokens(model.tokenizer, text, None), P, "zo")
    want = cart_lib.init_from_tokens(model.config, model.params, tokens,
                                     fingerprint=model.fingerprint, doc_id="zo")
    np.testing.assert_array_equal(np.asarray(c.keys), np.asarray(want.keys))
    assert c.meta.init == "sampled_chunks"
    # The substitution check's initial cartridges follow the trained ones' init.
    store = CartridgeStore(str(tmp_path / "s"), model.fingerprint)
    collection_init.initialise_store(store, model, {d: DOCS[d].text for d in GOLD}, P,
                                     optax.adam(1e-2), init="sampled_chunks")
    assert cc.trained_settings(store, GOLD).init == "sampled_chunks"
    store.save("ta", collection_init.initial_cartridge(model, "ta", DOCS["ta"].text, P,
                                                       init="document_kv"))
    with pytest.raises(ValueError, match="one init"):
        cc.trained_settings(store, [*GOLD, "ta"])
