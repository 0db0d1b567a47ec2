"""Cartridges at Scale: one cartridge per document, trained jointly with distractor cartridges.

Each step takes a batch of self-study conversations (rows of many documents) and draws
distractors for every row (`collection_plan`), pages the step's cartridges and their optimizer
state in through the `BudgetManager` (the next step's are prefetched while this one runs) and
stacks them into a step bank of fixed capacity N = batch * (1 + k_max) slots, so the jitted
step never recompiles (`collection_paging`), takes one optimisation step (`collection_step`)
and hands the changed cartridges back to the manager, which writes them to the store when it
evicts them or at a checkpoint. Checkpoints follow the crash-safe commit protocol of
`pending_store`; reports, hooks (`hooks`) and the summary come from
`collection_report`. Missing cartridges are created by `collection_init.initialise_store`.

Per-cartridge optimizer state: every cartridge has its own Adam state (`optimizer.init` of its
`single_parts`, with its own step count); the step applies the optimizer vmapped over the bank
slots, so paging a cartridge out and back in resumes its optimizer exactly. Clipping is per
cartridge. The sink token is frozen by the optimizer (see `train.make_optimizer`).

Gradient scope: "target" (default) updates only the cartridges that are some row's own
document (distractor slots are wrapped in stop_gradient and their state is left untouched);
"all" updates every active cartridge, distractors included.

Crash safety (`pending_store`): between checkpoints, write-backs go to a pending store
(`<store>/../pending`); a checkpoint flushes the manager, records the step and the data
iterator state, then promotes the pending cartridges into the main store. A run killed between
checkpoints discards the pending cartridges and resumes from the last checkpoint with the data
iterator rewound to it, so every cartridge update is applied exactly once.

Several processes (`cas_jax.distributed`): the step runs on the global mesh, each process
feeding its rows of the global batch; the rows' documents are all-gathered so that every process
draws the same distractor plan and holds the same step bank. Every process pages through its
own BudgetManager and spills evictions to its own pending store; the shared main store has one
writer per cartridge, its owner (see `pending_store`). Process 0 alone creates the store,
writes `collection_run.json` and initialises missing cartridges.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import numpy as np

from cas_jax import distributed, progress
from cas_jax.cartridges.attention import Geometry
from cas_jax.cartridges.budget import BudgetManager
from cas_jax.model.loading import LoadedModel
from cas_jax.training import dataset, routing, train
from cas_jax.training.collection_init import (INITS, document_tokens, initialise_store,
                                              opt_template_fn, single_parts)
from cas_jax.training.collection_paging import bank_arrays, page_in, page_out
from cas_jax.training.collection_plan import (GRAD_SCOPES, StepPlanner, host_batch,
                                              resolve_cartridges, trainable_slots)
from cas_jax.training.collection_report import CollectionReport, Reporter
from cas_jax.training.collection_step import make_collection_step
from cas_jax.training.distractors import DistractorSchedule
from cas_jax.training.hooks import Hooks
from cas_jax.training.pending_store import RUN_STATE, CommitProtocol, PendingStore, open_run_stores

# The names this module has always offered, now defined by the modules of its parts.
__all__ = ["GRAD_SCOPES", "INITS", "RUN_STATE", "CollectionConfig", "CollectionReport",
           "PendingStore", "document_tokens", "initialise_store", "make_collection_step",
           "opt_template_fn", "single_parts", "train_collection"]


@dataclasses.dataclass(frozen=True)
class CollectionConfig:
    """tokens_per_doc: P of every document's cartridge. init: how missing cartridges start
    (`initialise_store`). length_bucket: batches are cut to their longest row rounded up to
    this many tokens (`dataset.trim_batch`; 0 pads to seq_len). budget_bytes: device bytes for
    resident cartridges + optimizer state. checkpoint_every: steps between checkpoints. io_threads:
    the budget manager's reader threads. read_geometry: the composition geometry recorded in
    each cartridge (`CartridgeMeta.geometry`), the one every reader composes it by (evaluation,
    chat, the server, exports); None = the geometry training composes its rows by
    (`TrainConfig.geometry`). Issue 24 chose cartridges trained under serial and read under
    parallel,count_power=0.5,relevance=4,relevance_floor=1 (`pipeline.READ_GEOMETRY`): routing
    scores each cartridge's document, which the store records (`CartridgeStore.documents`).
    router: the retriever ("bm25" or "dense") that routes composed training rows when
    `TrainConfig.geometry` routes by relevance (`training.routing`: each row by its
    conversation's first exchange, over the documents of `texts` or, on a resumed run, the
    ones the store records)."""

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
    read_geometry: Geometry | None = None
    router: str = "bm25"

    def __post_init__(self):
        if self.grad_scope not in GRAD_SCOPES:
            raise ValueError(f"grad_scope {self.grad_scope!r}: expected one of {GRAD_SCOPES}")


def _initialise_missing(main, model: LoadedModel, store_dir: str, cfg: CollectionConfig,
                        train_config: train.TrainConfig, optimizer, all_ids, texts) -> None:
    """Creates (on process 0) the cartridges the main store lacks, from `texts`."""
    missing = [d for d in all_ids if not main.exists(d)]
    if missing and (texts is None or any(d not in texts for d in missing)):
        raise ValueError(f"{store_dir}: no cartridge yet for {missing[:5]}... and no document "
                         "text given to initialise them")
    if missing and jax.process_index() == 0:
        initialise_store(main, model, {d: texts[d] for d in missing}, cfg.tokens_per_doc,
                         optimizer, init=cfg.init,
                         geometry=str(cfg.read_geometry or train_config.geometry))
    distributed.barrier("cas-store-initialised")


def train_collection(model: LoadedModel, data_dir: str, store_dir: str, cfg: CollectionConfig,
                     train_config: train.TrainConfig, *, texts: dict[str, str] | None = None,
                     cartridge_of: Mapping[str, str] | None = None, mesh=None,
                     on_report: Callable[[CollectionReport], None] | None = None,
                     stop_after: int | None = None, hooks: Hooks | None = None) -> dict:
    """Trains every document's cartridge in `store_dir` on the self-study data in `data_dir`.

    texts: document texts used to initialise missing cartridges (first P tokens), keyed by
      cartridge id; needed on the first run.
    cartridge_of: which cartridge each document's conversations train, by document id
      (default: its own). Mapping every document to one id with no distractors trains the
      monolithic baseline: one cartridge for the whole collection on the same data.
    hooks: callbacks after the steps they are due at (`hooks`; their StepInfo carries
      the step's paging).
    Resumes from `<store_dir>/collection_run.json` when present. `stop_after` ends the run
    after that many steps of this call without a final checkpoint (simulates a kill).
    Returns a summary dict (steps, final loss, paging stats, io wait share, peak RSS).
    """
    mesh = mesh or train.make_mesh()
    optimizer = train.make_optimizer(train_config)
    template = opt_template_fn(optimizer)
    main, view = open_run_stores(store_dir, model.fingerprint)
    data_ids, cartridge_of, all_ids = resolve_cartridges(data_dir, cartridge_of)
    _initialise_missing(main, model, store_dir, cfg, train_config, optimizer, all_ids, texts)
    composes = cfg.distractors.k_max > 0 or cfg.distractors.quiet > 0
    routes = train_config.geometry.relevance > 0 and composes
    router = routing.row_router(
        train_config.geometry, all_ids, composes, kind=cfg.router,
        texts=texts if texts is not None or not routes else main.documents())
    planner = StepPlanner(data_dir, data_ids, cartridge_of, all_ids, batch_size=cfg.batch_size,
                          seq_len=cfg.seq_len, seed=cfg.seed, length_bucket=cfg.length_bucket,
                          schedule=cfg.distractors, router=router)
    commit = CommitProtocol(store_dir, view, template)
    run = commit.resume()
    step, last_loss = 0, float("nan")
    if run is not None:
        step = int(run["step"])
        last_loss = float(run.get("loss", last_loss))
        planner.data.set_state(run["data"])
    step_fn = make_collection_step(model, train_config, optimizer, mesh)
    rep = train.replicated(mesh)
    manager = BudgetManager(view, cfg.budget_bytes, opt_template=template, sharding=rep,
                            io_threads=cfg.io_threads)
    reporter = Reporter(manager, cfg.steps, step, last_loss, cfg.log_every, on_report, hooks)
    try:
        step = _run_steps(cfg, step, stop_after, planner, manager, commit, reporter, step_fn,
                          jax.device_put(model.params, rep), mesh, router)
    finally:
        # Also on a simulated kill: what this flushes lands in the pending store, which the
        # next run discards, exactly as after a real kill.
        manager.close()
    return {"stopped_at": step} if step < cfg.steps else reporter.summary(step)


def _run_steps(cfg: CollectionConfig, step: int, stop_after: int | None, planner: StepPlanner,
               manager: BudgetManager, commit: CommitProtocol, reporter: Reporter, step_fn,
               params, mesh, router: routing.RowRouter | None = None) -> int:
    """The training loop from `step`; returns the step it stopped at (cfg.steps, or earlier
    after `stop_after` steps)."""
    capacity = cfg.batch_size * cfg.distractors.max_slots
    rep = train.replicated(mesh)
    rows = distributed.local_rows(cfg.batch_size)
    start = step
    current = planner.plan(step)
    with progress.bar(cfg.steps, "collection training", "step", initial=step) as pbar:
        while step < cfg.steps:
            if stop_after is not None and step - start >= stop_after:
                return step
            plan = current.plan
            bank = page_in(manager, list(plan.doc_ids))
            following = None
            if step + 1 < cfg.steps:
                following = planner.plan(step + 1)
                if cfg.prefetch:
                    manager.prefetch(following.plan.doc_ids)
            parts, opt_state = bank_arrays(bank, capacity)
            trainable = trainable_slots(plan, capacity, cfg.grad_scope)
            parts, opt_state, metrics = step_fn(
                parts, opt_state, jax.device_put(trainable, rep), params,
                train.device_batch(host_batch(current.batch, plan, rows, router), mesh), plan.quiet)
            updated = page_out(manager, bank, parts, opt_state, trainable)
            tokens = int(np.sum(current.batch["length"]))
            loss = reporter.record(metrics, tokens)
            step += 1
            pbar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            pbar.update(1)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                next_state = (following.data_state if following is not None
                              else planner.data.get_state())
                commit.checkpoint(manager, step, next_state, reporter.loss)
            reporter.after_step(step, metrics, tokens, bank, updated, commit.commit_s)
            if following is not None:
                current = following
    return step
