"""Training under a routing geometry: rows are routed by their first exchange, as readers are."""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest

from cas_jax.cartridges import attention
from cas_jax.cartridges.store import CartridgeStore
from cas_jax.documents import retrieval
from cas_jax.training import dataset, routing, train, train_collection as tc
from cas_jax.training.collection_plan import StepPlanner, host_batch
from cas_jax.training.distractors import DistractorSchedule
from conftest import tiny_model, write_conversations

DOCS = ["a", "b", "c", "d", "e", "f"]
WORDS = {"a": "apple", "b": "banana", "c": "cherry", "d": "durian", "e": "elder", "f": "fig"}
TEXTS = {d: f"Fruit notes. The {w} grows here; {w} trees, {w} harvests." for d, w in WORDS.items()}
ROUTED = attention.Geometry.parse("parallel,count_power=0.5,relevance=4,relevance_floor=1")
P = 6


def _messages(doc: str, i: int) -> str:
    # The first turn names a field every document shares; the answer names the document.
    return json.dumps([{"role": "user", "content": f"What does the document say about item {i}?"},
                       {"role": "assistant", "content": f"The {WORDS[doc]} of item {i}."},
                       {"role": "user", "content": "And the apple?"}])


def _dataset(path, vocab: int) -> str:
    return write_conversations(path, DOCS, vocab, np.random.default_rng(0), messages=_messages,
                               seed_family="spans")


def test_first_exchange_is_the_first_user_turn_and_its_answer():
    assert routing.first_exchange(_messages("c", 3)) == \
        "What does the document say about item 3?\nThe cherry of item 3."
    assert routing.first_exchange(json.dumps([{"role": "user", "content": "q"}])) == "q"
    with pytest.raises(ValueError, match="without a user turn"):
        routing.first_exchange(json.dumps([{"role": "assistant", "content": "x"}]))


def test_rows_are_routed_by_their_first_exchange_as_a_reader_routes(tmp_path):
    data = _dataset(tmp_path / "data", 64)
    router = routing.row_router(ROUTED, DOCS, composes=True, kind="bm25", texts=TEXTS)
    planner = StepPlanner(data, list(DOCS), {d: d for d in DOCS}, tuple(DOCS), batch_size=4,
                          seq_len=16, seed=0, length_bucket=8,
                          schedule=DistractorSchedule(3, "fixed"), router=router)
    reader = retrieval.Router(retrieval.BM25Retriever(TEXTS), DOCS, keep=None)
    source = dataset.ConversationSource(data)
    by_index = {source[i].conversation_index: source[i] for i in range(len(source))}
    routed_away = 0
    for step in range(3):
        planned = planner.plan(step)
        batch = host_batch(planned.batch, planned.plan, slice(0, 4), router)
        assert "route_scores" not in batch and batch["cartridge_bias"].shape == (4, 4)
        for row in range(4):
            conv = by_index[int(planned.batch["conversation_index"][row])]
            ids = [planned.plan.doc_ids[s] for s in batch["selection"][row]]
            want = reader.biases(routing.first_exchange(conv.messages), ids, 4.0, 1.0)
            np.testing.assert_allclose(batch["cartridge_bias"][row], want, atol=1e-5)
            own = ids.index(conv.doc_id)
            assert batch["cartridge_bias"][row, own] == 0.0  # its answer names its document
            routed_away += int(np.sum(batch["cartridge_bias"][row] < -1.0))
    assert routed_away > 0
    # Without distractors, or without routing, nothing is scored (a row of one cartridge gets
    # bias 0 in `train.batch_prefix`).
    assert routing.row_router(ROUTED, DOCS, composes=False, kind="bm25", texts=None) is None
    assert routing.row_router(attention.PARALLEL, DOCS, True, "bm25", None) is None
    silent = dataclasses.replace(by_index[0], messages=json.dumps(
        [{"role": "assistant", "content": "x"}]))
    with pytest.raises(ValueError, match="conversation 0 of document 'a': .*without a user"):
        router.scores(silent)


@pytest.mark.slow
def test_training_under_a_routing_geometry_uses_the_routing(tmp_path):
    model = tiny_model(vocab_size=64, max_position_embeddings=8192)
    data = _dataset(tmp_path / "data", 64)
    cfg = tc.CollectionConfig(tokens_per_doc=P, batch_size=2, seq_len=16, steps=2,
                              distractors=DistractorSchedule(2, "fixed"), checkpoint_every=2,
                              grad_scope="all")
    stores = {}
    for name, spec in (("routed", str(ROUTED)), ("unrouted", "parallel,count_power=0.5")):
        root = str(tmp_path / name)
        tc.train_collection(model, data, root, cfg, train.TrainConfig(
            lr=5e-2, geometry=attention.Geometry.parse(spec)), texts=TEXTS)
        stores[name] = CartridgeStore(root + "/cartridges", model.fingerprint)
    differs = [d for d in DOCS if not np.array_equal(
        stores["routed"].load_cartridge(d).keys, stores["unrouted"].load_cartridge(d).keys)]
    assert differs, "the routing biases changed no update"
    # A resumed run routes by the documents its store records (no texts passed).
    more = tc.train_collection(model, data, str(tmp_path / "routed"),
                               dataclasses.replace(cfg, steps=3),
                               train.TrainConfig(lr=5e-2, geometry=ROUTED))
    assert more["steps"] == 3


def test_a_routing_geometry_without_documents_is_refused_by_name(tmp_path):
    model = tiny_model(vocab_size=64, max_position_embeddings=8192)
    data = _dataset(tmp_path / "data", 64)
    root = str(tmp_path / "s")
    cfg = tc.CollectionConfig(tokens_per_doc=P, batch_size=2, seq_len=16, steps=1,
                              distractors=DistractorSchedule(2, "fixed"))
    tc.train_collection(model, data, root, cfg, train.TrainConfig(), texts=TEXTS)
    # A store from before stores recorded their documents, resumed under routing:
    shutil.rmtree(os.path.join(root, "cartridges", "documents"))
    with pytest.raises(ValueError, match="no text for \\['a'"):
        tc.train_collection(model, data, root, dataclasses.replace(cfg, steps=2),
                            train.TrainConfig(geometry=ROUTED))


def test_one_cartridge_rows_train_alike_under_a_routing_geometry():
    """A row of one cartridge is routed by nothing: its prefix under the routing geometry is
    the one under the same geometry without routing (no cartridge_bias needed)."""
    model = tiny_model(vocab_size=64, max_position_embeddings=8192)
    cfg = model.config
    keys = jax.random.normal(jax.random.PRNGKey(0),
                             (1, cfg.num_layers, P, cfg.num_kv_heads, cfg.head_dim))
    batch = {"tokens": np.zeros((3, 5), np.int32)}
    routed = train.batch_prefix(keys, keys, batch, ROUTED)
    plain = train.batch_prefix(keys, keys, batch,
                               attention.Geometry.parse("parallel,count_power=0.5"))
    for key in plain:
        np.testing.assert_array_equal(np.asarray(routed[key]), np.asarray(plain[key]))
    selection = dict(batch, selection=np.zeros((3, 1), np.int32),
                     selected=np.ones((3, 1), bool))
    np.testing.assert_array_equal(
        np.asarray(train.batch_prefix(keys, keys, selection, ROUTED)["logit_bias"]),
        np.asarray(routed["logit_bias"]))
