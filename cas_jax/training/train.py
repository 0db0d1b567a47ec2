"""Training cartridges: optimizer, TrainState, the jitted sharded train step, checkpointed loop.

Batch (a dict of numpy arrays, one row per conversation; `dataset.make_train_iterator` yields it):
  tokens            [B, T] int32    the student's input: the conversation WITHOUT the document
  length            [B] int32       valid tokens of each row; tokens t >= length are padding
  loss_mask         [B, T] bool     True at t iff token t+1 is an assistant token (False on padding
                                    and at t = T-1)
  teacher_ids       [B, T, k] int32   the teacher's top-k for token t+1, read at position t
  teacher_logprobs  [B, T, k] float32 (best first; any values where loss_mask is False)
  selection         [B, C] int32    optional, multi-cartridge training: bank slots per row
  selected          [B, C] bool     optional, False = unused selection slot
Other keys (doc_index, ...) are ignored. The prediction at position t targets token t+1 (see
`losses`). Positions are computed here: token t < length[b] of row b gets position
n_prefix[b] + t, where n_prefix[b] is the number of visible prefix (cartridge) tokens of the row,
and padding gets -1 (never attended). Without `selection` the state must hold one cartridge and
every row reads it.

TrainState (a pytree; every leaf replicated over the mesh):
  step          [] int32
  cartridges    {"frozen":    {"keys", "values": [N, L, F, K, Dh]},
                 "trainable": {"keys", "values": [N, L, P - F, K, Dh]}}
                N cartridges of P tokens, each split on the token axis at F = num_frozen (the
                attention sink): token order is frozen tokens, then trainable ones.
  opt_state     state of `make_optimizer`: Adam moments for the "trainable" leaves only.
Gradients are taken w.r.t. `cartridges` only; the model params are a separate, non-differentiated
argument. The model runs through `decoder.Decoder`: `config` is a ModelConfig (cas_jax's own
decoder) or any other Decoder, whose params are then its own pytree. The optimizer gives the
"frozen" leaves zero updates (`optax.set_to_zero` under `optax.multi_transform`), so the sink
never changes.

Sharding: a 1-D `Mesh` with axis "data"; batch arrays are sharded on their leading (batch) axis,
the cartridges, optimizer state and model params are replicated. The mean loss is over the global
batch, so any device count computes the same loss. Across processes (`cas_jax.distributed`) the
mesh spans every process's devices; each process feeds only its rows of the global batch
(`device_batch`), so N processes compute what one process with all the devices would.

Checkpoints (Orbax `CheckpointManager`, one step directory each): "state" (the TrainState) and
"data" (the data iterator's `get_state()`, JSON). `train` resumes from the latest one.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cas_jax import progress
from cas_jax.cartridges.attention import (DEFAULT_GEOMETRY, CartridgeBank, Geometry, compose,
                                          num_prefix_tokens)
from cas_jax.cartridges.cartridge import Cartridge
from cas_jax.model import llama as model_lib
from cas_jax.model.config import ModelConfig
from cas_jax.model.decoder import Decoder
from cas_jax.training import dataset, losses
from cas_jax.training.hooks import Hooks, StepInfo

DATA_AXIS = "data"
BATCH_KEYS = ("tokens", "length", "loss_mask", "teacher_ids", "teacher_logprobs", "selection",
              "selected", "cartridge_bias")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (static: hashable, used as a jit static argument).

    lr: peak learning rate (the reference uses 2e-2). schedule: "constant" or "cosine" (decays
    to final_lr_fraction * lr at total_steps); both warm up linearly over warmup_steps.
    clip_norm: global-norm gradient clipping of the trainable leaves (None = off).
    loss: "distillation" or "next_token" (see `losses`); topk_mass: keep the teacher's best
    tokens up to this mass (None = all k). logits_chunk: tokens per chunk of the chunked loss.
    remat: recompute each decoder layer in the backward pass (less memory, more compute).
    geometry: how the cartridges of a row stand before its conversation (`attention.Geometry`;
    evaluation and serving must read them the same way).
    """

    lr: float = 2e-2
    schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 1000
    final_lr_fraction: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float | None = 1.0
    loss: str = losses.DISTILLATION
    topk_mass: float | None = None
    logits_chunk: int = 256
    remat: bool = False
    geometry: Geometry = DEFAULT_GEOMETRY


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """step [] int32; cartridges {frozen, trainable} (module doc); opt_state (optax)."""

    step: jax.Array
    cartridges: dict[str, dict[str, jax.Array]]
    opt_state: Any


class DataIterator(Protocol):
    """What `train` reads batches from: a checkpointable iterator (grain's DatasetIterator)."""

    def __next__(self) -> dict[str, np.ndarray]: ...

    def get_state(self) -> dict: ...

    def set_state(self, state: dict) -> None: ...


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup over cfg.warmup_steps, then constant or cosine decay to total_steps."""
    if cfg.schedule == "constant":
        if cfg.warmup_steps == 0:
            return optax.constant_schedule(cfg.lr)
        return optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, cfg.lr, cfg.warmup_steps, max(cfg.total_steps, cfg.warmup_steps + 1),
            end_value=cfg.lr * cfg.final_lr_fraction)
    raise ValueError(f"unknown schedule {cfg.schedule!r}, expected 'constant' or 'cosine'")


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Adam (+ global-norm clipping) on the "trainable" leaves; zero updates on "frozen" ones."""
    adam = optax.adam(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    if cfg.clip_norm is not None:
        adam = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adam)
    return optax.multi_transform({"trainable": adam, "frozen": optax.set_to_zero()},
                                 {"frozen": "frozen", "trainable": "trainable"})


def split_cartridges(keys: jax.Array, values: jax.Array, num_frozen: int) -> dict:
    """keys/values [N, L, P, K, Dh] -> the TrainState `cartridges` dict (token split at F)."""
    return {"frozen": {"keys": keys[:, :, :num_frozen], "values": values[:, :, :num_frozen]},
            "trainable": {"keys": keys[:, :, num_frozen:], "values": values[:, :, num_frozen:]}}


def merge_cartridges(cartridges: dict) -> tuple[jax.Array, jax.Array]:
    """The TrainState `cartridges` dict -> keys, values [N, L, P, K, Dh]."""
    f, t = cartridges["frozen"], cartridges["trainable"]
    return (jnp.concatenate([f["keys"], t["keys"]], axis=2),
            jnp.concatenate([f["values"], t["values"]], axis=2))


def init_train_state(cartridges: Sequence[Cartridge], train_config: TrainConfig) -> TrainState:
    """A TrainState at step 0 for N cartridges of equal shape and num_frozen (bank order)."""
    if not cartridges:
        raise ValueError("init_train_state: need at least one cartridge")
    first = cartridges[0]
    for c in cartridges[1:]:
        if c.keys.shape != first.keys.shape or c.meta.num_frozen != first.meta.num_frozen:
            raise ValueError(f"cartridge {c.meta.doc_id!r} is {tuple(c.keys.shape)} with "
                             f"num_frozen={c.meta.num_frozen}; {first.meta.doc_id!r} is "
                             f"{tuple(first.keys.shape)} with {first.meta.num_frozen}")
    keys = jnp.stack([jnp.asarray(c.keys) for c in cartridges])
    values = jnp.stack([jnp.asarray(c.values) for c in cartridges])
    parts = split_cartridges(keys, values, first.meta.num_frozen)
    return TrainState(step=jnp.zeros((), jnp.int32), cartridges=parts,
                      opt_state=make_optimizer(train_config).init(parts))


def cartridges_from_state(state: TrainState, metas: Sequence) -> list[Cartridge]:
    """The trained cartridges (host numpy arrays), one per CartridgeMeta in bank order."""
    keys, values = jax.device_get(merge_cartridges(state.cartridges))
    return [Cartridge(keys=np.asarray(keys[i]), values=np.asarray(values[i]), meta=m)
            for i, m in enumerate(metas)]


def batch_prefix(keys: jax.Array, values: jax.Array, batch: dict,
                 geometry: Geometry = DEFAULT_GEOMETRY) -> dict:
    """The `model.forward` prefix for a batch: composed from the bank by `selection`, or the
    single cartridge (N = 1) broadcast to every row, both laid out by `geometry`. A routing
    geometry reads the batch's cartridge_bias [B, C] (`training.routing`); a row of one
    cartridge is routed by nothing, so without it every bias is 0 there."""
    n, n_layers, p, kh, dh = keys.shape
    b = batch["tokens"].shape[0]
    bank = CartridgeBank(keys, values, jnp.full((n,), p, jnp.int32))
    if "selection" in batch:
        bias = batch.get("cartridge_bias")
        if bias is None and geometry.relevance > 0 and batch["selection"].shape[1] == 1:
            bias = jnp.zeros(batch["selection"].shape, jnp.float32)
        return compose(bank, batch["selection"], batch["selected"], geometry, bias)
    if n != 1:
        raise ValueError(f"a batch without `selection` needs exactly one cartridge, got {n}")
    if geometry.reshapes_logits:  # one cartridge per row, read as a composed set of one
        zeros = jnp.zeros((b, 1), jnp.float32) if geometry.relevance > 0 else None
        return compose(bank, jnp.zeros((b, 1), jnp.int32), jnp.ones((b, 1), bool), geometry,
                       zeros)
    shape = (n_layers, b, p, kh, dh)
    return {"k": jnp.broadcast_to(keys[0][:, None], shape),
            "v": jnp.broadcast_to(values[0][:, None], shape),
            "mask": jnp.ones((b, p), bool), "start": jnp.full((b,), p, jnp.int32)}


def batch_positions(length: jax.Array, n_prefix: jax.Array, seq_len: int) -> jax.Array:
    """[B, T] int32: n_prefix[b] + t for t < length[b], else -1 (padding)."""
    t = jnp.arange(seq_len, dtype=jnp.int32)[None]
    return jnp.where(t < length[:, None], n_prefix[:, None] + t, -1)


def closed_book_targets(params: Any, batch: dict, *, config: ModelConfig | Decoder) -> dict:
    """`batch` with its teacher replaced by the frozen model reading NO document: its top-k
    (k = the batch's teacher width) log-probabilities for every token, computed here without
    gradients. The target of quiet rows (`distractors`: a cartridge must not change the
    model's answers off its own document)."""
    tokens = batch["tokens"]
    t = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    positions = jnp.where(t < batch["length"][:, None], t, -1)
    decoder = model_lib.as_decoder(config)
    hidden, _ = decoder.forward(params, tokens, positions)
    logp = jax.nn.log_softmax(jax.lax.stop_gradient(decoder.logits(params, hidden)), axis=-1)
    top_lp, top_ids = jax.lax.top_k(logp, batch["teacher_ids"].shape[-1])
    return dict(batch, teacher_ids=top_ids.astype(jnp.int32), teacher_logprobs=top_lp)


def loss_fn(cartridges: dict, params: Any, batch: dict, *, config: ModelConfig | Decoder,
            train_config: TrainConfig) -> tuple[jax.Array, jax.Array]:
    """(mean loss over masked tokens, number of masked tokens) of the student on `batch`."""
    keys, values = merge_cartridges(cartridges)
    prefix = batch_prefix(keys, values, batch, train_config.geometry)
    tokens = batch["tokens"]
    positions = batch_positions(batch["length"], num_prefix_tokens(prefix, tokens.shape[0]),
                                tokens.shape[1])
    decoder = model_lib.as_decoder(config)
    hidden, _ = decoder.forward(params, tokens, positions, prefix=prefix,
                                remat=train_config.remat)
    if train_config.loss == losses.NEXT_TOKEN:
        targets = {"next_ids": losses.next_token_targets(tokens)}
    else:
        targets = {"teacher_ids": batch["teacher_ids"],
                   "teacher_logprobs": batch["teacher_logprobs"]}
    total, count = losses.masked_loss_from_hidden(
        lambda h: decoder.logits(params, h), hidden, targets,
        batch["loss_mask"], losses.token_loss_fn(train_config.loss, train_config.topk_mass),
        train_config.logits_chunk)
    return total / jnp.maximum(count, 1.0), count


def train_step(state: TrainState, params: Any, batch: dict, *, config: ModelConfig | Decoder,
               train_config: TrainConfig) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimisation step (optimizer: `make_optimizer(train_config)`); returns the new state
    and {loss, grad_norm (before clipping), loss_tokens}."""
    (loss, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.cartridges, params, batch, config=config, train_config=train_config)
    updates, opt_state = make_optimizer(train_config).update(grads, state.opt_state,
                                                             state.cartridges)
    cartridges = optax.apply_updates(state.cartridges, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads["trainable"]),
               "loss_tokens": count}
    return TrainState(state.step + 1, cartridges, opt_state), metrics


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh over the first `num_devices` devices (default all) with axis "data".

    In a multi-process run (`cas_jax.distributed`) `jax.devices()` lists every process's
    devices, process by process, so the mesh is global and must take all of them."""
    devices = jax.devices()
    num_devices = num_devices or len(devices)
    if num_devices > len(devices):
        raise ValueError(f"asked for {num_devices} devices, only {len(devices)} are available")
    if jax.process_count() > 1 and num_devices != len(devices):
        raise ValueError(f"a multi-process run uses all {len(devices)} devices of its "
                         f"{jax.process_count()} processes, not {num_devices}")
    return Mesh(np.asarray(devices[:num_devices]), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis sharded over "data", other axes replicated."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def device_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """The training keys of a host batch (this process's rows), sharded over the mesh."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k]))
            for k in BATCH_KEYS if k in batch}


@functools.lru_cache(maxsize=16)
def make_train_step(config: ModelConfig | Decoder, train_config: TrainConfig,
                    mesh: Mesh) -> Callable:
    """`train_step` jitted: (state, params, batch) -> (state, metrics); the state is donated.

    in/out shardings: state and params replicated, batch sharded over "data", metrics replicated.
    Cached, so repeated calls (e.g. a resumed run) reuse the compiled step.
    """
    step = functools.partial(train_step, config=config, train_config=train_config)
    rep = replicated(mesh)
    return jax.jit(step, in_shardings=(rep, rep, batch_sharding(mesh)),
                   out_shardings=(rep, rep), donate_argnums=0)


def checkpoint_manager(directory: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
    """An Orbax manager for {"state": TrainState, "data": iterator state JSON} checkpoints."""
    return ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_names=("state", "data"))


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState,
                    data: DataIterator) -> None:
    """Saves the state and the data iterator's position at `state.step` (asynchronously)."""
    manager.save(int(state.step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data.get_state())))


def restore_checkpoint(manager: ocp.CheckpointManager, template: TrainState,
                       data: DataIterator) -> TrainState | None:
    """The latest checkpoint's state (laid out like `template`), with `data` moved to its
    saved position; None if there is no checkpoint."""
    step = manager.latest_step()
    if step is None:
        return None
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), template)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
    data.set_state(restored["data"])
    return restored["state"]


@dataclasses.dataclass(frozen=True)
class StepReport:
    """What `train` reports every log_every steps (and at the last step); loss is the mean
    over the steps since the previous report."""

    step: int
    total_steps: int
    loss: float
    grad_norm: float
    learning_rate: float
    tokens_per_s: float  # all B*T input tokens, padding included, since the last report
    loss_tokens_per_s: float  # masked (trained) tokens only
    eta_s: float
    elapsed_s: float


def train(state: TrainState, params: Any, data: DataIterator, *, config: ModelConfig | Decoder,
          train_config: TrainConfig, mesh: Mesh, num_steps: int,
          checkpoint_dir: str | None = None, save_every: int = 100, log_every: int = 10,
          on_report: Callable[[StepReport], None] | None = None, length_bucket: int = dataset.LENGTH_BUCKET,
          hooks: Hooks | None = None) -> TrainState:
    """Trains until `state.step == num_steps`, resuming from `checkpoint_dir` if it holds one.

    `state` is the step-0 state (used as the layout template when resuming); it is donated.
    Saves a checkpoint every `save_every` steps and at the end. Raises StopIteration if the
    data ends first. Each batch is cut to its longest row rounded up to `length_bucket`
    tokens (`dataset.trim_batch`; 0 keeps the iterator's width). `hooks` (see `hooks`)
    are called after the steps they are due at.
    """
    rep = replicated(mesh)
    params = jax.device_put(params, rep)
    state = jax.device_put(state, rep)
    manager = None if checkpoint_dir is None else checkpoint_manager(checkpoint_dir)
    if manager is not None:
        restored = restore_checkpoint(manager, state, data)
        state = state if restored is None else restored
    step_fn = make_train_step(config, train_config, mesh)
    schedule = learning_rate_schedule(train_config)
    start = int(state.step)
    t0 = t_last = time.perf_counter()
    tokens = 0
    pending: list[dict] = []
    pbar = progress.bar(num_steps, "training", "step", initial=start)
    try:
        for step in range(start, num_steps):
            batch = device_batch(dataset.trim_batch(next(data), length_bucket), mesh)
            tokens += int(np.prod(batch["tokens"].shape))
            state, metrics = step_fn(state, params, batch)
            done = step + 1
            pbar.update(1)
            if hooks is not None:
                hooks.fire(done, lambda: StepInfo.of(done, num_steps, metrics, t0))
            if on_report is not None:
                pending.append(metrics)
                if done % log_every == 0 or done == num_steps:
                    fetched = jax.device_get(pending)
                    now = time.perf_counter()
                    dt = max(now - t_last, 1e-9)
                    on_report(StepReport(
                        step=done, total_steps=num_steps,
                        loss=float(np.mean([m["loss"] for m in fetched])),
                        grad_norm=float(fetched[-1]["grad_norm"]),
                        learning_rate=float(schedule(done - 1)), tokens_per_s=tokens / dt,
                        loss_tokens_per_s=sum(float(m["loss_tokens"]) for m in fetched) / dt,
                        eta_s=(now - t0) / (done - start) * (num_steps - done),
                        elapsed_s=now - t0))
                    t_last, tokens, pending = now, 0, []
            if manager is not None and (done % save_every == 0 or done == num_steps):
                save_checkpoint(manager, state, data)
    finally:  # a crashed run still completes the checkpoint writes it started
        pbar.close()
        if manager is not None:
            manager.wait_until_finished()
            manager.close()
    return state
