"""The collection trainer's crash-safe commit protocol: a pending store, promoted at checkpoints.

A run folder (`train_collection`'s `store_dir`):
  cartridges/            the main store (`CartridgeStore`): the cartridges as of the last checkpoint
  pending/               write-backs since then (`pending-<process>` with several processes)
  collection_run.json    {"step", "data" (the data iterator's state), "loss", "committing"}

Between checkpoints the budget manager pages through a `PendingStore`: reads prefer the
pending copy, writes go to the pending store. A checkpoint (`CommitProtocol.checkpoint`)
flushes the manager, writes the run state with "committing" set, then promotes (the pending
cartridges become the main store's live versions by hard links, `CartridgeStore.adopt`),
empties the pending store and clears the flag. A run killed between checkpoints discards the
pending cartridges and resumes from the last checkpoint with the data iterator rewound to it; a
run killed while committing redoes the promotion (`CommitProtocol.resume`). Either way every
cartridge update is applied exactly once.

Several processes (`cas_jax.distributed`): each process spills to its own pending store, so no
process reads what another is writing. The shared main store has one writer per cartridge, its
owner (`distributed.owner`, CRC-32 of the id modulo the process count): a checkpoint flushes
every process, then each owner promotes its cartridges from its own pending store, then every
process empties its pending store; process 0 alone creates the store and writes the run state.
Barriers separate the phases, and the "committing" flag makes a crash at any point resume as
in one process.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import jax

from cas_jax import distributed
from cas_jax.cartridges.budget import BudgetManager
from cas_jax.cartridges.store import CartridgeStore, OptTemplate

RUN_STATE = "collection_run.json"


class PendingStore:
    """A CartridgeStore view whose writes land in `pending` until `commit` promotes them (a
    `store.BackingStore`)."""

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


def open_run_stores(store_dir: str, fingerprint: str) -> tuple[CartridgeStore, PendingStore]:
    """(main store, this process's PendingStore over it) of the run folder `store_dir`; process
    0 creates the folder and the main store, the others wait for it."""
    n_proc, me = jax.process_count(), jax.process_index()
    if me == 0:
        os.makedirs(store_dir, exist_ok=True)
        CartridgeStore(os.path.join(store_dir, "cartridges"), fingerprint)
    distributed.barrier("cas-store-created")
    main = CartridgeStore(os.path.join(store_dir, "cartridges"), fingerprint)
    pending = CartridgeStore(os.path.join(store_dir, "pending" if n_proc == 1
                                          else f"pending-{me:05d}"), fingerprint)
    return main, PendingStore(main, pending)


def write_run_state(path: str, state: dict) -> None:
    """Writes the run state JSON atomically (a temporary file, then a rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f)
    os.replace(tmp, path)


class CommitProtocol:
    """Checkpoints and resumes a collection run (module doc) through its run state file.

    commit_s: seconds spent promoting pending cartridges (`PendingStore.commit`) so far.
    """

    def __init__(self, store_dir: str, view: PendingStore, opt_template: OptTemplate):
        self.path = os.path.join(store_dir, RUN_STATE)
        self.view, self.opt_template = view, opt_template
        n_proc, me = jax.process_count(), jax.process_index()
        self.primary = me == 0
        self.owns = None if n_proc == 1 else (
            lambda doc_id: distributed.owner(doc_id, n_proc) == me)
        self.commit_s = 0.0

    def _promote(self, run: dict) -> None:
        """Phase 2 of a checkpoint (or its redo after a crash): owners promote, all empty
        their pending stores, then the run state drops its "committing" flag."""
        t0 = time.perf_counter()
        self.view.commit(self.opt_template, self.owns)
        self.commit_s += time.perf_counter() - t0
        distributed.barrier(f"cas-promoted-{run['step']}")
        self.view.discard()
        distributed.barrier(f"cas-discarded-{run['step']}")
        if self.primary:
            write_run_state(self.path, dict(run, committing=False))

    def resume(self) -> dict | None:
        """The last checkpoint's run state (None for a fresh run), after finishing an
        interrupted commit or discarding what was pending since that checkpoint."""
        run = None
        if os.path.exists(self.path):
            with open(self.path) as f:
                run = json.load(f)
        distributed.barrier("cas-run-state-read")
        if run is not None and run.get("committing"):
            self._promote(run)
        else:
            self.view.discard()
        return run

    def checkpoint(self, manager: BudgetManager, step: int, data_state: dict,
                   loss: float) -> None:
        """Makes every update so far durable: flush, record the step (with the data state
        that resumes after it), promote."""
        manager.flush()
        distributed.barrier(f"cas-flushed-{step}")
        run = {"step": step, "data": data_state, "committing": True, "loss": loss}
        if self.primary:
            write_run_state(self.path, run)
        distributed.barrier(f"cas-committing-{step}")
        self._promote(run)
