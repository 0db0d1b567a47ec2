"""Reporting for the collection trainer: running loss, throughput, paging, hooks, summary.

One `Reporter` per `train_collection` call. After each step it fires the hooks that are due
(`hooks.StepInfo` with the step's `hooks.PagingInfo`) and, every `log_every` steps and at the
last, calls `on_report` with a `CollectionReport` (loss: the mean since the previous report).
Its `loss` is what a checkpoint records and the summary's final loss: the mean of the losses
since the last report (of all steps of this call without `on_report`), else the last one
recorded.
"""

from __future__ import annotations

import dataclasses
import resource
import time
from collections.abc import Callable

import numpy as np

from cas_jax.cartridges.budget import BudgetManager
from cas_jax.training.collection_paging import PagedBank
from cas_jax.training.hooks import Hooks, PagingInfo, StepInfo


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


class Reporter:
    """Tracks one call's steps; see the module doc. start_step: the step it resumes from;
    last_loss: the loss the last checkpoint recorded (nan for a fresh run)."""

    def __init__(self, manager: BudgetManager, total_steps: int, start_step: int,
                 last_loss: float, log_every: int,
                 on_report: Callable[[CollectionReport], None] | None, hooks: Hooks | None):
        self.manager, self.total_steps, self.start = manager, total_steps, start_step
        self.last_loss, self.log_every = last_loss, log_every
        self.on_report, self.hooks = on_report, hooks
        self.t_start = self.t_last = time.perf_counter()
        self.wait_last = 0.0
        self.losses: list[float] = []
        self.tokens = 0

    @property
    def loss(self) -> float:
        return float(np.mean(self.losses)) if self.losses else self.last_loss

    def record(self, metrics: dict, tokens: int) -> float:
        """Takes a step's metrics and valid tokens; returns its loss."""
        self.losses.append(float(metrics["loss"]))
        self.tokens += tokens
        return self.losses[-1]

    def after_step(self, step: int, metrics: dict, tokens: int, bank: PagedBank,
                   updated: tuple[str, ...], commit_s: float) -> None:
        """Fires the hooks due at `step`, then `on_report` if a report is due."""
        if self.hooks is not None:
            self.hooks.fire(step, lambda: StepInfo.of(
                step, self.total_steps, metrics, self.t_start, tokens=tokens,
                paging=PagingInfo(tuple(bank.doc_ids), updated, bank.resident_bytes,
                                  bank.pinned_bytes, self.manager.stats, commit_s)))
        if self.on_report is not None and (step % self.log_every == 0
                                           or step == self.total_steps):
            self._report(step)

    def _report(self, step: int) -> None:
        now = time.perf_counter()
        stats = self.manager.stats
        dt = max(now - self.t_last, 1e-9)
        self.on_report(CollectionReport(
            step=step, total_steps=self.total_steps, loss=float(np.mean(self.losses)),
            tokens_per_s=self.tokens / dt,
            io_wait_share=(stats.acquire_wait_s - self.wait_last) / dt,
            resident_mb=self.manager.resident_bytes / 2**20,
            eta_s=(now - self.t_start) / (step - self.start) * (self.total_steps - step),
            hits=stats.hits + stats.prefetch_hits, misses=stats.misses))
        self.t_last, self.wait_last, self.tokens = now, stats.acquire_wait_s, 0
        self.last_loss, self.losses = float(np.mean(self.losses)), []

    def summary(self, step: int) -> dict:
        """The summary `train_collection` returns (steps, final loss, paging stats, io wait
        share, peak RSS); call after the manager is closed."""
        stats = self.manager.stats
        wall = time.perf_counter() - self.t_start
        return {"steps": step, "final_loss": self.loss,
                "wall_s": wall, "io_wait_share": stats.acquire_wait_s / max(wall, 1e-9),
                "bytes_paged_in": stats.bytes_in, "bytes_read": stats.bytes_read,
                "read_s": stats.read_s, "bytes_written": stats.bytes_written,
                "hits": stats.hits, "prefetch_hits": stats.prefetch_hits,
                "misses": stats.misses, "evictions": stats.evictions,
                "paging": dataclasses.asdict(stats),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
