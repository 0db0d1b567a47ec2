"""Cartridge training: frozen sink and model, learning, multi-device parity, kill and resume.

Run as a script (`python tests/test_train.py OUT.npz NUM_DEVICES`), this file writes one short
training run's losses and cartridge to OUT.npz; the multi-device test runs it in a subprocess
with 8 host devices.
"""

import os
import subprocess
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cas_jax.cartridges import cartridge as cart_lib
from cas_jax.model import llama as model_lib
from cas_jax.model.config import ModelConfig
from cas_jax.training import dataset, losses, train as train_lib

CONFIG = ModelConfig(model_type="llama", vocab_size=61, hidden_size=32, intermediate_size=48,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                     max_position_embeddings=512)
SEQ, TOPK, DOC_LEN = 24, 8, 48
TRAIN = train_lib.TrainConfig(lr=0.05, logits_chunk=8)


def _params():
    """Random params with weights scaled up so that the output depends on the context."""
    params = model_lib.init_params(CONFIG, jax.random.PRNGKey(0))
    return jax.tree_util.tree_map_with_path(
        lambda p, x: x if "norm" in jax.tree_util.keystr(p) else 10 * x, params)


DOC = np.random.default_rng(0).integers(0, CONFIG.vocab_size, DOC_LEN).astype(np.int32)


def _example(params, seed):
    """One row of the batch format; the teacher reads DOC before the conversation."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(16, SEQ + 1))
    tokens = np.zeros(SEQ, np.int32)
    tokens[:n] = rng.integers(0, CONFIG.vocab_size, n)
    mask = np.zeros(SEQ, bool)
    mask[n // 3:n - 1] = True  # "assistant" tokens n//3+1 .. n-1, predicted from t = n//3 ..
    positions = np.where(np.arange(DOC_LEN + SEQ) < DOC_LEN + n, np.arange(DOC_LEN + SEQ), -1)
    logits, _ = model_lib.forward_jit(params, jnp.asarray(np.concatenate([DOC, tokens])[None]),
                                      jnp.asarray(positions[None]), config=CONFIG)
    lp, ids = jax.lax.top_k(jax.nn.log_softmax(logits[0, DOC_LEN:]), TOPK)
    teacher_ids = np.zeros((SEQ, TOPK), np.int32)
    teacher_logprobs = np.zeros((SEQ, TOPK), np.float32)
    teacher_ids[:n], teacher_logprobs[:n] = ids[:n], lp[:n]
    return {"tokens": tokens, "length": np.int32(n), "loss_mask": mask,
            "teacher_ids": teacher_ids, "teacher_logprobs": teacher_logprobs}


def _stack(examples):
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def _iterator(examples, batch=8):
    """A checkpointable grain iterator over the examples (shuffled, repeated)."""
    ds = grain.MapDataset.source(examples).shuffle(0).repeat(None)
    return iter(ds.to_iter_dataset().batch(batch))


def _state(params, p=8):
    c = cart_lib.init_random_tokens(CONFIG, params, p, jax.random.PRNGKey(1), fingerprint="fp")
    return c, train_lib.init_train_state([c], TRAIN)


@pytest.fixture(scope="module")
def setup():
    params = _params()
    return params, [_example(params, i) for i in range(32)]


def test_only_trainable_cartridge_tokens_change(setup):
    params, examples = setup
    mesh = train_lib.make_mesh(1)
    c, state = _state(params)
    before_params = jax.tree.map(np.array, params)
    step = train_lib.make_train_step(CONFIG, TRAIN, mesh)
    state = jax.device_put(state, train_lib.replicated(mesh))
    device_params = jax.device_put(params, train_lib.replicated(mesh))
    for i in range(3):
        batch = train_lib.device_batch(_stack(examples[8 * i:8 * i + 8]), mesh)
        state, metrics = step(state, device_params, batch)
        assert float(metrics["grad_norm"]) > 0
    assert int(state.step) == 3
    (after,) = train_lib.cartridges_from_state(state, [c.meta])
    for got, init in ((after.keys, c.keys), (after.values, c.values)):
        got, init = np.asarray(got), np.asarray(init)
        np.testing.assert_array_equal(got[:, 0], init[:, 0])  # the sink: bitwise unchanged
        assert (got[:, 1:] != init[:, 1:]).all()
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, device_params),
                 before_params)
    adam = [x for x in jax.tree.leaves(state.opt_state) if x.ndim == 5]
    assert adam and all(x.shape[2] == 7 for x in adam)  # moments for trainable tokens only


@pytest.mark.parametrize("kind", ["distillation", "next_token"])
def test_loss_fn_equals_the_dense_loss_after_the_prefix(setup, kind):
    params, examples = setup
    c, state = _state(params)
    batch = _stack(examples[:4])
    cfg = train_lib.TrainConfig(loss=kind, logits_chunk=5)
    got, count = jax.jit(lambda cs, b: train_lib.loss_fn(cs, params, b, config=CONFIG,
                                                         train_config=cfg))(
        state.cartridges, batch)
    t = np.arange(SEQ)[None]
    positions = np.where(t < batch["length"][:, None], 8 + t, -1)  # after the 8 cartridge tokens
    prefix = {"k": jnp.tile(c.keys[:, None], (1, 4, 1, 1, 1)),
              "v": jnp.tile(c.values[:, None], (1, 4, 1, 1, 1)), "mask": jnp.ones((4, 8), bool)}
    logits, _ = model_lib.forward_jit(params, jnp.asarray(batch["tokens"]),
                                      jnp.asarray(positions), prefix=prefix, config=CONFIG)
    if kind == "distillation":
        want = losses.distillation_loss(logits, batch["teacher_ids"], batch["teacher_logprobs"],
                                        batch["loss_mask"])
    else:
        want = losses.next_token_loss(logits, batch["tokens"], batch["loss_mask"])
    assert int(count) == batch["loss_mask"].sum()
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


@pytest.mark.parametrize("kind", ["distillation", "next_token"])
def test_trimmed_batch_gives_the_same_loss(setup, kind):
    """Cutting the padding columns (dataset.trim_batch) changes the width, not the loss."""
    params, examples = setup
    _, state = _state(params)
    batch = _stack([e for e in examples if e["length"] < SEQ - 2][:4])
    longest = int(batch["length"].max())
    trimmed = dataset.trim_batch(batch, 1)
    assert trimmed["tokens"].shape == (4, longest) and trimmed["teacher_ids"].shape[1] == longest
    assert dataset.trim_batch(batch, 0) is batch
    assert dataset.trim_batch(batch, SEQ)["tokens"].shape[1] == SEQ  # bucket >= width: as is
    np.testing.assert_array_equal(trimmed["length"], batch["length"])
    cfg = train_lib.TrainConfig(loss=kind, logits_chunk=5)
    loss = jax.jit(lambda cs, b: train_lib.loss_fn(cs, params, b, config=CONFIG,
                                                   train_config=cfg))
    (full, n_full), (cut, n_cut) = loss(state.cartridges, batch), loss(state.cartridges, trimmed)
    assert float(n_full) == float(n_cut)
    np.testing.assert_allclose(float(cut), float(full), rtol=1e-5)


def test_learning_rate_schedules():
    warm = train_lib.learning_rate_schedule(train_lib.TrainConfig(lr=0.1, warmup_steps=10))
    assert float(warm(0)) == 0 and float(warm(5)) == pytest.approx(0.05)
    assert float(warm(10)) == float(warm(500)) == pytest.approx(0.1)
    cos = train_lib.learning_rate_schedule(train_lib.TrainConfig(
        lr=0.1, schedule="cosine", warmup_steps=10, total_steps=110, final_lr_fraction=0.1))
    assert float(cos(10)) == pytest.approx(0.1) and float(cos(60)) == pytest.approx(0.055)
    assert float(cos(110)) == pytest.approx(0.01)


def test_multi_cartridge_step_updates_only_selected_cartridges(setup):
    params, examples = setup
    mesh = train_lib.make_mesh(1)
    carts = [cart_lib.init_random_tokens(CONFIG, params, 8, jax.random.PRNGKey(i),
                                         fingerprint="fp", doc_id=f"d{i}") for i in range(3)]
    state = jax.device_put(train_lib.init_train_state(carts, TRAIN),
                           train_lib.replicated(mesh))
    batch = _stack(examples[:8])
    batch["selection"] = np.tile(np.array([[0, 2]], np.int32), (8, 1))
    batch["selected"] = np.tile(np.array([[True, True]]), (8, 1))
    batch["selected"][4:, 1] = False
    step = train_lib.make_train_step(CONFIG, TRAIN, mesh)
    state, _ = step(state, params, train_lib.device_batch(batch, mesh))
    after = train_lib.cartridges_from_state(state, [c.meta for c in carts])
    for i, changed in enumerate([True, False, True]):
        diff = np.asarray(after[i].keys) != np.asarray(carts[i].keys)
        assert diff[:, 1:].all() if changed else not diff.any()
        assert not diff[:, 0].any()


def test_training_lowers_held_out_distillation_loss(setup):
    params, examples = setup
    held_out = _stack([_example(params, 1000 + i) for i in range(16)])
    mesh = train_lib.make_mesh(1)
    _, state = _state(params)
    evaluate = jax.jit(lambda cs: train_lib.loss_fn(cs, params, held_out, config=CONFIG,
                                                    train_config=TRAIN)[0])
    before = float(evaluate(state.cartridges))
    reports = []
    state = train_lib.train(state, params, _iterator(examples), config=CONFIG,
                            train_config=TRAIN, mesh=mesh, num_steps=30, log_every=10,
                            on_report=reports.append)
    after = float(evaluate(state.cartridges))
    assert [r.step for r in reports] == [10, 20, 30]
    assert reports[-1].loss < reports[0].loss and reports[-1].tokens_per_s > 0
    assert after < before - 0.3, (before, after)


def _run(num_devices, steps=3):
    """Losses of `steps` training steps of batch 8 on `num_devices`, and the final cartridge."""
    params = _params()
    examples = [_example(params, i) for i in range(8 * steps)]
    mesh = train_lib.make_mesh(num_devices)
    c, state = _state(params)
    step_losses = []
    state = train_lib.train(state, params, iter([_stack(examples[8 * i:8 * i + 8])
                                                 for i in range(steps)]),
                            config=CONFIG, train_config=TRAIN, mesh=mesh, num_steps=steps,
                            log_every=1, on_report=lambda r: step_losses.append(r.loss))
    (after,) = train_lib.cartridges_from_state(state, [c.meta])
    return np.asarray(step_losses), np.asarray(after.keys), np.asarray(after.values)


@pytest.mark.slow
def test_eight_devices_match_one_device(tmp_path):
    out = tmp_path / "run8.npz"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen([sys.executable, __file__, str(out), "8"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    step_losses, keys, values = _run(1)  # meanwhile, in this process
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log
    got = np.load(out)
    assert int(got["num_devices"]) == 8
    np.testing.assert_allclose(got["losses"], step_losses, rtol=1e-5)
    np.testing.assert_allclose(got["keys"], keys, atol=1e-5)
    np.testing.assert_allclose(got["values"], values, atol=1e-5)


class _Killed(Exception):
    pass


@pytest.mark.slow
def test_resume_after_kill_equals_uninterrupted_run(setup, tmp_path):
    params, examples = setup
    mesh = train_lib.make_mesh(1)
    run = dict(params=params, config=CONFIG, train_config=TRAIN, mesh=mesh, num_steps=7)
    c, state = _state(params)
    straight = train_lib.train(state, data=_iterator(examples), **run)

    def kill_at_step_6(report):
        if report.step == 6:
            raise _Killed

    ckpt = str(tmp_path / "ckpt")
    with pytest.raises(_Killed):
        train_lib.train(_state(params)[1], data=_iterator(examples), checkpoint_dir=ckpt,
                        save_every=2, log_every=1, on_report=kill_at_step_6, **run)
    assert train_lib.checkpoint_manager(ckpt).latest_step() == 4
    reported = []
    resumed = train_lib.train(_state(params)[1], data=_iterator(examples), checkpoint_dir=ckpt,
                              save_every=2, log_every=1,
                              on_report=lambda r: reported.append(r.step), **run)
    assert reported == [5, 6, 7]
    a, b = train_lib.cartridges_from_state(straight, [c.meta])[0], \
        train_lib.cartridges_from_state(resumed, [c.meta])[0]
    np.testing.assert_array_equal(a.keys, b.keys)
    np.testing.assert_array_equal(a.values, b.values)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(straight.opt_state),
                 jax.device_get(resumed.opt_state))


if __name__ == "__main__":
    jax.config.update("jax_numpy_rank_promotion", "raise")
    out_path, n = sys.argv[1], int(sys.argv[2])
    step_losses, keys, values = _run(n)
    np.savez(out_path, losses=step_losses, keys=keys, values=values,
             num_devices=len(jax.devices()))
