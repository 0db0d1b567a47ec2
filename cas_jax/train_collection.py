"""Cartridges at Scale: one cartridge per document, trained jointly with distractor cartridges.

Each step takes a batch of self-study conversations (rows of many documents), draws distractors
for every row (`distractors.plan_step`), pages the step's cartridges and their optimizer state in
through the `BudgetManager` (the next step's are prefetched while this one runs), stacks them
into a step bank of fixed capacity N = batch * (1 + k_max) slots (so the jitted step never
recompiles), takes one optimisation step and hands the changed cartridges back to the manager,
which writes them to the store when it evicts them or at a checkpoint.

Per-cartridge optimizer state: every cartridge has its own Adam state (`optimizer.init` of its
`split_cartridges` parts, with its own step count); the step applies the optimizer vmapped over
the bank slots, so paging a cartridge out and back in resumes its optimizer exactly. Clipping is
per cartridge. The sink token is frozen by the optimizer (see `train.make_optimizer`).

Gradient scope: "target" (default) updates only the cartridges that are some row's own
document (distractor slots are wrapped in stop_gradient and their state is left untouched);
"all" updates every active cartridge, distractors included.

Crash safety: between checkpoints, write-backs go to a pending store (`<store>/../pending`); a
checkpoint flushes the manager, records the step and the data iterator state, then promotes the
pending cartridges into the main store. A run killed between checkpoints discards the pending
cartridges and resumes from the last checkpoint with the data iterator rewound to it, so every
cartridge update is applied exactly once.

Several processes (`cas_jax.distributed`): the step runs on the global mesh, each process
feeding its rows of the global batch; the rows' documents are all-gathered so that every process
draws the same distractor plan and holds the same step bank. Every process pages through its
own BudgetManager and spills evictions to its own pending store (`pending-<process>`), so no
process reads what another is writing. The shared main store has one writer per cartridge, its
owner (`distributed.owner`, CRC-32 of the id modulo the process count): a checkpoint flushes
every process, then each owner promotes its cartridges from its own pending store, then every
process empties its pending store; process 0 alone creates the store, writes
`collection_run.json` and initialises missing cartridges. Barriers separate the phases, and the
run state's "committing" flag makes a crash at any point resume as in one process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cas_jax import cartridge as cart_lib, dataset, distributed, kv_compression, progress
from cas_jax import rendering, train
from cas_jax.budget import BudgetManager
from cas_jax.cartridge import Cartridge
from cas_jax.distractors import DistractorSchedule, plan_step
from cas_jax.loading import LoadedModel
from cas_jax.store import CartridgeStore, cached_opt_template

GRAD_SCOPES = ("target", "all")
RUN_STATE = "collection_run.json"


@dataclasses.dataclass(frozen=True)
class CollectionConfig:
    """tokens_per_doc: P of every document's cartridge. init: how missing cartridges start
    (`initialise_store`). length_bucket: batches are cut to their longest row rounded up to
    this many tokens (`dataset.trim_batch`; 0 pads to seq_len). budget_bytes: device bytes for
    resident cartridges + optimizer state. checkpoint_every: steps between checkpoints. io_threads:
    the budget manager's reader threads."""

    tokens_per_doc: int = 128
    init: str = "first_tokens"
    batch_size: int = 4
    seq_len: int = 512
    length_bucket: int = dataset.LENGTH_BUCKET
    steps: int = 100
    distractors: DistractorSchedule = DistractorSchedule()
    grad_scope: str = "target"
    budget_bytes: int = 1 << 30
    checkpoint_every: int = 50
    prefetch: bool = True
    io_threads: int = 1
    seed: int = 0
    log_every: int = 5

    def __post_init__(self):
        if self.grad_scope not in GRAD_SCOPES:
            raise ValueError(f"grad_scope {self.grad_scope!r}: expected one of {GRAD_SCOPES}")


class PendingStore:
    """A CartridgeStore view whose writes land in `pending` until `commit` promotes them."""

    def __init__(self, main: CartridgeStore, pending: CartridgeStore):
        self.main, self.pending = main, pending

    def load(self, doc_id, opt_template=None, expected_fingerprint=None, read_opt_state=True):
        src = self.pending if self.pending.exists(doc_id) else self.main
        return src.load(doc_id, opt_template, expected_fingerprint, read_opt_state)

    def save(self, doc_id, cartridge, opt_state=None, step=0):
        self.pending.save(doc_id, cartridge, opt_state, step)

    def commit(self, opt_template, owns: Callable[[str], bool] | None = None) -> int:
        """Promotes the pending cartridges (those `owns` accepts; default all) into the main
        store (hard links, see `CartridgeStore.adopt`) and returns how many; `discard` then
        empties the pending store. Safe to repeat after a crash: a cartridge still pending is
        adopted again, as a new identical version."""
        ids = [d for d in self.pending.list() if owns is None or owns(d)]
        for doc_id in ids:
            self.main.adopt(doc_id, self.pending, opt_template)
        return len(ids)

    def discard(self) -> int:
        ids = self.pending.list()
        for doc_id in ids:
            self.pending.delete(doc_id)
        return len(ids)


def document_tokens(tokenizer, text: str, num_tokens: int | None,
                    format: str = rendering.DEFAULT_FORMAT) -> np.ndarray:
    """The first num_tokens tokens of text's document block (`cas_jax.rendering`), where the
    cartridge will stand; a shorter block is repeated to fill them (None: the whole block)."""
    if not text.strip():
        raise ValueError("cannot initialise a cartridge from an empty document")
    ids = np.asarray(rendering.rendering_for(tokenizer, format).document(text), np.int32)
    return ids if num_tokens is None else np.resize(ids, num_tokens)


def single_parts(c: Cartridge) -> dict:
    """One cartridge's {frozen, trainable} parts (no slot axis), as `train` splits them."""
    parts = train.split_cartridges(c.keys[None], c.values[None], c.meta.num_frozen)
    return jax.tree.map(lambda x: x[0], parts)


def opt_template_fn(optimizer: optax.GradientTransformation) -> Callable[[Cartridge], Any]:
    """What the store restores a cartridge's optimizer state into (shapes only, traced once
    per cartridge shape)."""
    return cached_opt_template(lambda c: optimizer.init(single_parts(c)))


INITS = ("first_tokens", "document_kv")


def initialise_store(store: CartridgeStore, model: LoadedModel, texts: dict[str, str],
                     tokens_per_doc: int, optimizer: optax.GradientTransformation,
                     num_frozen: int = 1, init: str = "first_tokens",
                     geometry: str = "serial") -> list[str]:
    """Saves a fresh cartridge (with fresh optimizer state) for every document the store lacks;
    returns the ids it created. init: "first_tokens" (the K/V of the document block's first P
    tokens, the paper's default) or "document_kv" (`kv_compression`: the whole block's K/V
    compressed to its P most-attended positions; a block shorter than P falls back to
    first_tokens). geometry: the composition geometry training will use, kept in each
    cartridge's meta."""
    if init not in INITS:
        raise ValueError(f"init {init!r}: expected one of {INITS}")
    made = []
    for doc_id, text in texts.items():
        if store.exists(doc_id):
            continue
        common = dict(fingerprint=model.fingerprint, doc_id=doc_id, num_frozen=num_frozen)
        block = document_tokens(model.tokenizer, text, None)
        if init == "document_kv" and len(block) > tokens_per_doc:
            c = kv_compression.init_from_document_kv(model.config, model.params, block,
                                                     tokens_per_doc, **common)
        else:
            c = cart_lib.init_from_tokens(model.config, model.params,
                                          np.resize(block, tokens_per_doc), **common)
        c = jax.device_get(c)
        c = c.replace(meta=dataclasses.replace(c.meta, geometry=geometry))
        store.save(doc_id, c, jax.device_get(optimizer.init(single_parts(c))), step=0)
        made.append(doc_id)
    return made


def _slot_mask(mask: jax.Array, leaf: jax.Array) -> jax.Array:
    return mask.reshape(mask.shape + (1,) * (leaf.ndim - 1))


def make_collection_step(model: LoadedModel, train_config: train.TrainConfig,
                         optimizer: optax.GradientTransformation, mesh) -> Callable:
    """(parts [N,...], opt_state [N,...], trainable [N] bool, params, batch, quiet) ->
    (parts, opt_state, metrics), jitted with the batch sharded over "data" and the rest
    replicated; parts and opt_state are donated. Slots with trainable False come back unchanged.
    quiet (static): the batch's teacher is replaced by the model with no document
    (`train.closed_book_targets`), for a quiet step of the distractor schedule.
    """
    def step(parts, opt_state, trainable, params, batch, quiet):
        if quiet:
            batch = train.closed_book_targets(params, batch, config=model.config)

        def loss(p):
            p = jax.tree.map(lambda x: jnp.where(_slot_mask(trainable, x), x,
                                                 jax.lax.stop_gradient(x)), p)
            return train.loss_fn(p, params, batch, config=model.config,
                                 train_config=train_config)

        (value, count), grads = jax.value_and_grad(loss, has_aux=True)(parts)
        updates, new_opt = jax.vmap(optimizer.update)(grads, opt_state, parts)
        new_parts = optax.apply_updates(parts, updates)

        def keep(new, old):
            return jnp.where(_slot_mask(trainable, new), new, old)

        return (jax.tree.map(keep, new_parts, parts), jax.tree.map(keep, new_opt, opt_state),
                {"loss": value, "loss_tokens": count,
                 "grad_norm": optax.global_norm(grads["trainable"])})

    rep = train.replicated(mesh)
    return jax.jit(step, in_shardings=(rep, rep, rep, rep, train.batch_sharding(mesh)),
                   out_shardings=(rep, rep, rep), donate_argnums=(0, 1), static_argnums=(5,))


def _stack(trees: list, capacity: int):
    """Stacks per-cartridge pytrees on a new slot axis, zero-padded to `capacity` slots."""
    pad = capacity - len(trees)
    return jax.tree.map(
        lambda *xs: jnp.concatenate([jnp.stack(xs), jnp.zeros((pad,) + xs[0].shape,
                                                               xs[0].dtype)]) if pad else
        jnp.stack(xs), *trees)


@dataclasses.dataclass
class CollectionReport:
    step: int
    total_steps: int
    loss: float
    tokens_per_s: float
    io_wait_share: float  # share of wall time blocked on paging since the last report
    resident_mb: float
    eta_s: float
    hits: int
    misses: int


def _write_run_state(path: str, state: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f)
    os.replace(tmp, path)


def train_collection(model: LoadedModel, data_dir: str, store_dir: str, cfg: CollectionConfig,
                     train_config: train.TrainConfig, *, texts: dict[str, str] | None = None,
                     cartridge_of: Mapping[str, str] | None = None, mesh=None, on_report: Callable[[CollectionReport], None] | None = None,
                     stop_after: int | None = None) -> dict:
    """Trains every document's cartridge in `store_dir` on the self-study data in `data_dir`.

    texts: document texts used to initialise missing cartridges (first P tokens), keyed by
      cartridge id; needed on the first run.
    cartridge_of: which cartridge each document's conversations train, by document id
      (default: its own). Mapping every document to one id with no distractors trains the
      monolithic baseline: one cartridge for the whole collection on the same data. Resumes from `<store_dir>/collection_run.json` when present. `stop_after` ends
    the run after that many steps of this call without a final checkpoint (simulates a kill).
    Returns a summary dict (steps, final loss, paging stats, io wait share, peak RSS).
    """
    mesh = mesh or train.make_mesh()
    optimizer = train.make_optimizer(train_config)
    template = opt_template_fn(optimizer)
    me, n_proc = jax.process_index(), jax.process_count()
    primary = me == 0
    if primary:
        os.makedirs(store_dir, exist_ok=True)
        CartridgeStore(os.path.join(store_dir, "cartridges"), model.fingerprint)
    distributed.barrier("cas-store-created")
    main = CartridgeStore(os.path.join(store_dir, "cartridges"), model.fingerprint)
    pending = CartridgeStore(os.path.join(store_dir, "pending" if n_proc == 1
                                          else f"pending-{me:05d}"), model.fingerprint)
    view = PendingStore(main, pending)
    owns = None if n_proc == 1 else (lambda doc_id: distributed.owner(doc_id, n_proc) == me)
    data_ids = dataset.doc_ids(data_dir)
    if cartridge_of is None:
        cartridge_of = {d: d for d in data_ids}
    unmapped = [d for d in data_ids if d not in cartridge_of]
    if unmapped:
        raise ValueError(f"{data_dir}: documents {unmapped[:5]} have conversations but no "
                         "cartridge in cartridge_of")
    all_ids = tuple(sorted({cartridge_of[d] for d in data_ids}))
    missing = [d for d in all_ids if not main.exists(d)]
    if missing and (texts is None or any(d not in texts for d in missing)):
        raise ValueError(f"{store_dir}: no cartridge yet for {missing[:5]}... and no document "
                         "text given to initialise them")
    if missing and primary:
        initialise_store(main, model, {d: texts[d] for d in missing}, cfg.tokens_per_doc,
                         optimizer, init=cfg.init, geometry=str(train_config.geometry))
    distributed.barrier("cas-store-initialised")

    run_path = os.path.join(store_dir, RUN_STATE)
    data = dataset.make_train_iterator(data_dir, cfg.batch_size, cfg.seq_len, cfg.seed,
                                       num_epochs=None, drop_remainder=True)
    step = 0
    last_loss = float("nan")

    def promote(run: dict) -> None:
        """Phase 2 of a checkpoint (or its redo after a crash): owners promote, all empty
        their pending stores, then the run state drops its "committing" flag."""
        view.commit(template, owns)
        distributed.barrier(f"cas-promoted-{run['step']}")
        view.discard()
        distributed.barrier(f"cas-discarded-{run['step']}")
        if primary:
            _write_run_state(run_path, dict(run, committing=False))

    run = None
    if os.path.exists(run_path):
        with open(run_path) as f:
            run = json.load(f)
    distributed.barrier("cas-run-state-read")
    if run is not None:
        if run.get("committing"):
            promote(run)
        else:
            view.discard()
        step = int(run["step"])
        last_loss = float(run.get("loss", last_loss))
        data.set_state(run["data"])
    else:
        view.discard()

    capacity = cfg.batch_size * cfg.distractors.max_slots
    step_fn = make_collection_step(model, train_config, optimizer, mesh)
    rep = train.replicated(mesh)
    params = jax.device_put(model.params, rep)
    manager = BudgetManager(view, cfg.budget_bytes, opt_template=template, sharding=rep,
                            io_threads=cfg.io_threads)

    rows = distributed.local_rows(cfg.batch_size)

    def next_plan(at_step: int):
        """(data state before, this process's batch rows, the global step plan)."""
        state = data.get_state()
        batch = dataset.trim_batch(next(data), cfg.length_bucket)
        doc_index = distributed.allgather_rows(np.asarray(batch["doc_index"]))
        targets = [cartridge_of[data_ids[i]] for i in doc_index]
        return state, batch, plan_step(targets, all_ids, cfg.distractors, at_step, cfg.seed)

    def checkpoint(at_step: int, data_state: dict) -> None:
        manager.flush()
        distributed.barrier(f"cas-flushed-{at_step}")
        loss = float(np.mean(losses)) if losses else last_loss
        run = {"step": at_step, "data": data_state, "committing": True, "loss": loss}
        if primary:
            _write_run_state(run_path, run)
        distributed.barrier(f"cas-committing-{at_step}")
        promote(run)

    t_start = t_last = time.perf_counter()
    wait_last = 0.0
    losses: list[float] = []
    tokens = 0
    start = step
    data_state, batch, plan = next_plan(step)
    pbar = progress.bar(cfg.steps, "collection training", "step", initial=step)
    try:
        while step < cfg.steps:
            if stop_after is not None and step - start >= stop_after:
                return {"stopped_at": step}
            doc_ids = list(plan.doc_ids)
            pairs = manager.acquire(doc_ids)
            following = None
            if step + 1 < cfg.steps:
                following = next_plan(step + 1)
                if cfg.prefetch:
                    manager.prefetch(following[2].doc_ids)
            parts = _stack([single_parts(c) for c, _ in pairs], capacity)
            opt_state = _stack([o for _, o in pairs], capacity)
            trainable = np.zeros((capacity,), bool)
            if cfg.grad_scope == "target" and not plan.quiet:
                trainable[np.unique(plan.targets)] = True
            else:
                trainable[:len(doc_ids)] = True
            host_batch = dict(batch, selection=plan.selection[rows],
                              selected=plan.selected[rows])
            parts, opt_state, metrics = step_fn(parts, opt_state,
                                                jax.device_put(trainable, rep), params,
                                                train.device_batch(host_batch, mesh),
                                                plan.quiet)
            keys, values = train.merge_cartridges(parts)
            for slot, (doc_id, (c, _)) in enumerate(zip(doc_ids, pairs)):
                if trainable[slot]:
                    manager.update(doc_id, c.replace(keys=keys[slot], values=values[slot]),
                                   jax.tree.map(lambda x, s=slot: x[s], opt_state))
            manager.release(doc_ids)
            losses.append(float(metrics["loss"]))
            tokens += int(np.sum(batch["length"]))
            step += 1
            pbar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
            pbar.update(1)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                next_state = following[0] if following is not None else data.get_state()
                checkpoint(step, next_state)
            if on_report is not None and (step % cfg.log_every == 0 or step == cfg.steps):
                now = time.perf_counter()
                stats = manager.stats
                dt = max(now - t_last, 1e-9)
                on_report(CollectionReport(
                    step=step, total_steps=cfg.steps, loss=float(np.mean(losses)),
                    tokens_per_s=tokens / dt,
                    io_wait_share=(stats.acquire_wait_s - wait_last) / dt,
                    resident_mb=manager.resident_bytes / 2**20,
                    eta_s=(now - t_start) / (step - start) * (cfg.steps - step),
                    hits=stats.hits + stats.prefetch_hits, misses=stats.misses))
                t_last, wait_last, tokens = now, stats.acquire_wait_s, 0
                last_loss, losses = float(np.mean(losses)), []
            if following is not None:
                data_state, batch, plan = following
    finally:
        # Also on a simulated kill: what this flushes lands in the pending store, which the
        # next run discards, exactly as after a real kill.
        pbar.close()
        manager.close()
    stats = manager.stats
    wall = time.perf_counter() - t_start
    return {"steps": step, "final_loss": last_loss if not losses else float(np.mean(losses)),
            "wall_s": wall, "io_wait_share": stats.acquire_wait_s / max(wall, 1e-9),
            "bytes_paged_in": stats.bytes_in, "bytes_read": stats.bytes_read,
            "read_s": stats.read_s, "bytes_written": stats.bytes_written,
            "hits": stats.hits, "prefetch_hits": stats.prefetch_hits, "misses": stats.misses,
            "evictions": stats.evictions, "paging": dataclasses.asdict(stats),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
