"""CAS collection training: distractor plans, paging through the budget, exact resume."""

import numpy as np
import pytest
import jax

from cas_jax.cartridges import cartridge as cart_lib
from cas_jax.cartridges.store import CartridgeStore
from cas_jax.model import llama as model_lib
from cas_jax.model.loading import LoadedModel
from cas_jax.training import dataset, train, train_collection as tc
from cas_jax.training.distractors import DistractorSchedule, plan_step
from conftest import tiny_config, write_conversations

CFG = tiny_config(vocab_size=64, max_position_embeddings=8192)
DOCS = ["a", "b", "c", "d", "e", "f", "g", "h"]
P = 6


def test_plan_never_picks_the_target_and_respects_k():
    ids = tuple(DOCS)
    for step in range(30):
        plan = plan_step(["a", "c", "a"], ids, DistractorSchedule(3, "uniform"), step, seed=1)
        for row in range(3):
            chosen = [plan.doc_ids[s] for s, on in zip(plan.selection[row], plan.selected[row])
                      if on]
            target = plan.doc_ids[plan.targets[row]]
            assert target == ["a", "c", "a"][row]
            assert chosen.count(target) == 1 and len(set(chosen)) == len(chosen)
            assert len(chosen) <= 4
    ramp = DistractorSchedule(4, "ramp", ramp_steps=10)
    assert [ramp.cap(s) for s in (0, 5, 10, 50)] == [0, 2, 4, 4]
    plan = plan_step(["b"], ids, DistractorSchedule(2, "fixed"), 0, seed=0)
    assert plan.selected.sum() == 3


def _dataset(path, rng, k=3):
    """24 conversations of DOCS with random teacher top-k of width k."""
    write_conversations(path, DOCS, CFG.vocab_size, rng, k=k)


@pytest.fixture
def setup(tmp_path):
    params = model_lib.init_params(CFG, jax.random.PRNGKey(0))
    model = LoadedModel(CFG, params, None, "tiny-model", "")
    rng = np.random.default_rng(0)
    _dataset(tmp_path / "data", rng)
    tcfg = train.TrainConfig(lr=5e-2)
    return model, str(tmp_path / "data"), tcfg


def _init_store(root, model, tcfg):
    store = CartridgeStore(root + "/cartridges", model.fingerprint)
    opt = train.make_optimizer(tcfg)
    for i, d in enumerate(DOCS):
        c = jax.device_get(cart_lib.init_random_tokens(
            CFG, model.params, P, jax.random.PRNGKey(i), fingerprint=model.fingerprint,
            doc_id=d))
        store.save(d, c, jax.device_get(opt.init(tc.single_parts(c))), step=0)
    return store


def _all(root, model):
    store = CartridgeStore(root + "/cartridges", model.fingerprint)
    return {d: store.load(d, read_opt_state=False)[0] for d in DOCS}


def _cfg(**kw):
    # Budget for ~5 cartridges + Adam state out of the step's up to 2 * 3 slots: forces paging.
    per = 3 * 2 * CFG.num_layers * P * CFG.num_kv_heads * CFG.head_dim * 4
    base = dict(tokens_per_doc=P, batch_size=2, seq_len=16, steps=6,
                distractors=DistractorSchedule(2, "uniform"), budget_bytes=int(per * 6.5),
                checkpoint_every=2, log_every=1)
    base.update(kw)
    return tc.CollectionConfig(**base)


@pytest.mark.slow
def test_killed_run_resumes_with_no_update_lost_or_repeated(setup, tmp_path):
    model, data, tcfg = setup
    straight, killed = str(tmp_path / "s"), str(tmp_path / "k")
    _init_store(straight, model, tcfg)
    _init_store(killed, model, tcfg)
    reports = []
    tc.train_collection(model, data, straight, _cfg(), tcfg, on_report=reports.append)
    assert [r.step for r in reports] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(r.loss) for r in reports)
    out = tc.train_collection(model, data, killed, _cfg(), tcfg, stop_after=3)
    assert out == {"stopped_at": 3}
    summary = tc.train_collection(model, data, killed, _cfg(), tcfg)
    assert summary["steps"] == 6 and summary["evictions"] > 0
    a, b = _all(straight, model), _all(killed, model)
    for d in DOCS:
        np.testing.assert_array_equal(np.asarray(a[d].keys), np.asarray(b[d].keys))
        np.testing.assert_array_equal(np.asarray(a[d].values), np.asarray(b[d].values))
    _init_store(str(tmp_path / "fresh"), model, tcfg)
    init = _all(str(tmp_path / "fresh"), model)
    changed = [d for d in DOCS if not np.array_equal(a[d].keys, init[d].keys)]
    assert changed, "training changed no cartridge"
    for d in changed:  # the sink never moves
        np.testing.assert_array_equal(a[d].keys[:, :1], init[d].keys[:, :1])


def test_target_scope_leaves_distractors_untouched(setup, tmp_path):
    model, data, tcfg = setup
    root = str(tmp_path / "t")
    _init_store(root, model, tcfg)
    init = _all(root, model)
    cfg = _cfg(steps=1, distractors=DistractorSchedule(2, "fixed"), budget_bytes=1 << 30)
    it = dataset.make_train_iterator(data, 2, 16, 0, num_epochs=None, drop_remainder=True)
    first = next(it)
    targets = {DOCS[i] for i in np.asarray(first["doc_index"])}
    tc.train_collection(model, data, root, cfg, tcfg)
    after = _all(root, model)
    for d in DOCS:
        same = np.array_equal(after[d].keys, init[d].keys)
        assert same == (d not in targets), d


def test_monolithic_mapping_trains_one_cartridge_on_every_document(setup, tmp_path):
    """cartridge_of maps all documents to one id: one cartridge, created from its text, trained
    by every step; a document left out of the mapping is an error naming it."""
    model, data, tcfg = setup
    root = str(tmp_path / "m")
    tok = _ByteTokenizer()
    mono = LoadedModel(CFG, model.params, tok, model.fingerprint, "")
    cfg = _cfg(tokens_per_doc=3 * P, distractors=DistractorSchedule(0, "fixed"),
               budget_bytes=1 << 30, steps=2)
    summary = tc.train_collection(mono, data, root, cfg, tcfg, texts={"all": "abcdefgh" * 4},
                                  cartridge_of={d: "all" for d in DOCS})
    store = CartridgeStore(root + "/cartridges", model.fingerprint)
    assert store.list() == ["all"] and summary["steps"] == 2
    c, _, step = store.load("all", read_opt_state=False)
    assert c.num_tokens == 3 * P and step == 2
    with pytest.raises(ValueError, match="documents \\['h'\\]"):
        tc.train_collection(mono, data, str(tmp_path / "bad"), cfg, tcfg,
                            texts={"all": "abc"}, cartridge_of={d: "all" for d in DOCS[:-1]})


class _ByteTokenizer:
    """Characters as token ids: ids 0-25 are 'a'-'z' (enough for `document_tokens`)."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [(ord(ch) - ord("a")) % CFG.vocab_size for ch in text]}

    def decode(self, ids):
        return "".join(chr(ord("a") + i) for i in ids)


def test_monolithic_inputs_take_every_documents_start_and_respect_the_window(setup):
    from cas_jax.documents.corpus import Collection, Document
    from cas_jax.studies import pipeline

    model, _, _ = setup
    mono = LoadedModel(CFG, model.params, _ByteTokenizer(), model.fingerprint, "")
    docs = Collection([Document("x", "X", "abcdef"), Document("y", "Y", "uvwxyz")])
    texts, cartridge_of, n = pipeline.monolithic_inputs(mono, docs, 3, seq_len=16)
    assert texts == {"monolithic": "abc\n\nuvw"} and n == 6
    assert cartridge_of == {"x": "monolithic", "y": "monolithic"}
    with pytest.raises(ValueError, match="2 documents x 3 tokens.*window"):
        pipeline.monolithic_inputs(mono, docs, 3, seq_len=CFG.max_position_embeddings)


def test_mixed_schedule_draws_k_per_row_and_sizes_the_step_to_it():
    ids = tuple(DOCS)
    schedule = DistractorSchedule(5, "mixed", p_iso=0.5)
    ks, widths = [], set()
    for step in range(200):
        plan = plan_step(["a", "b", "c", "d"], ids, schedule, step, seed=2)
        row_k = plan.selected.sum(axis=1) - 1
        ks += row_k.tolist()
        c = plan.selection.shape[1]
        widths.add(c)
        assert c <= 6 and c >= row_k.max() + 1 and (c & (c - 1) == 0 or c == 6)
        assert not plan.quiet and (plan.targets >= 0).all()
    ks = np.asarray(ks)
    assert 0.42 < np.mean(ks == 0) < 0.58 and set(ks.tolist()) == {0, 1, 2, 3, 4, 5}
    assert widths >= {1, 2, 4}  # a step of isolated rows pays for one slot
    with pytest.raises(ValueError, match="shares in"):
        DistractorSchedule(3, "mixed", p_iso=1.5)


def test_quiet_steps_read_other_documents_only():
    ids = tuple(DOCS)
    schedule = DistractorSchedule(3, "uniform", quiet=0.25)
    quiet = 0
    for step in range(200):
        plan = plan_step(["a", "b"], ids, schedule, step, seed=3)
        if not plan.quiet:
            continue
        quiet += 1
        assert (plan.targets == -1).all()
        for row, own in enumerate(["a", "b"]):
            read = [plan.doc_ids[s] for s, on in zip(plan.selection[row], plan.selected[row])
                    if on]
            assert 1 <= len(read) <= 3 and own not in read
    assert 30 < quiet < 70


def test_quiet_training_makes_cartridges_quieter(setup, tmp_path):
    """Quiet steps distil toward the model with no cartridge: the KL between the model reading
    an unrelated cartridge and the model with none falls. The data's teacher width is the
    whole vocabulary here, so the distillation target is the full closed-book distribution
    (the tiny random model's is nearly flat: a top-3 target would not describe it)."""
    from cas_jax.cartridges import attention
    from cas_jax.studies import composition, pipeline

    model, _, tcfg = setup
    data = str(tmp_path / "full")
    _dataset(data, np.random.default_rng(1), k=CFG.vocab_size)
    root = str(tmp_path / "q")
    store = CartridgeStore(root + "/cartridges", model.fingerprint)
    opt = train.make_optimizer(tcfg)
    for i, d in enumerate(DOCS):  # loud: values far larger than the model's own
        c = cart_lib.init_random_tokens(CFG, model.params, P, jax.random.PRNGKey(i),
                                        fingerprint=model.fingerprint, doc_id=d)
        c = jax.device_get(c.replace(keys=c.keys * 4, values=c.values * 10))
        store.save(d, c, jax.device_get(opt.init(tc.single_parts(c))), step=0)
    source = pipeline.StoreSource(store)
    before = composition.interference(model, data, source, attention.SERIAL, seq_len=16)
    cfg = _cfg(steps=48, distractors=DistractorSchedule(1, "uniform", quiet=1.0),
               budget_bytes=1 << 30)
    tc.train_collection(model, data, root, cfg, train.TrainConfig(lr=0.5))
    after = composition.interference(model, data, pipeline.StoreSource(
        CartridgeStore(root + "/cartridges", model.fingerprint)), attention.SERIAL, seq_len=16)
    assert after < 0.7 * before, (before, after)


def test_cartridges_record_the_geometry_they_are_read_by(tmp_path):
    """Training composes its rows by TrainConfig.geometry; the store's cartridges record
    read_geometry (else that one), which evaluation, chat and the server compose them by."""
    from conftest import tiny_model
    from cas_jax.cartridges.attention import Geometry

    model = tiny_model(vocab_size=64, max_position_embeddings=8192)
    _dataset(tmp_path / "data", np.random.default_rng(0))
    root = str(tmp_path / "store")
    read = "parallel,count_power=0.5"
    cfg = _cfg(steps=1, read_geometry=Geometry.parse(read))
    tc.train_collection(model, str(tmp_path / "data"), root, cfg, train.TrainConfig(),
                        texts={d: f"Document {d} is about the letter {d}." for d in DOCS})
    store = CartridgeStore(root + "/cartridges", model.fingerprint)
    assert {store.load_cartridge(d).meta.geometry for d in DOCS} == {read}
