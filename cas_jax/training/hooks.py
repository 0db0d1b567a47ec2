"""Hooks: callbacks that observe a trainer every N steps (as levanter's `Trainer.add_hook`).

    hooks = Hooks()
    hooks.add_hook(lambda info: print(info.step, info.loss), every=10)
    train.train(..., hooks=hooks)                        # the single-cartridge trainer
    train_collection.train_collection(..., hooks=hooks)  # the collection trainer

A hook added with `every=N` is called after every step whose number (steps completed, counted
from 0 at the start of training, so the first step is 1) is a multiple of N, with that step's
`StepInfo`. The trainer builds the StepInfo only when some hook is due, so hooks due rarely
cost nothing on other steps; building it fetches the step's metrics from the device. Hooks
observe: they must not change what they are given.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax


@dataclasses.dataclass(frozen=True)
class PagingInfo:
    """What the collection trainer's paging did in one step.

    acquired: the step's cartridges (pinned while it ran), in bank order.
    updated: those the step changed and handed back to the budget manager.
    peak_resident_bytes: `BudgetManager.resident_bytes`, the larger of its values right after
      the acquire and after the updates.
    pinned_bytes: `BudgetManager.pinned_bytes` right after the acquire.
    stats: the manager's `PagingStats` after the step (counters since the manager started,
      i.e. since this call of `train_collection` began).
    commit_s: seconds spent promoting pending cartridges into the main store, in all
      checkpoints of this call so far (the flush before each is `stats.flush_s`).
    """

    acquired: tuple[str, ...]
    updated: tuple[str, ...]
    peak_resident_bytes: int
    pinned_bytes: int
    stats: Any  # budget.PagingStats
    commit_s: float


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """One step, as a hook sees it.

    step: steps completed (the step just taken is step `step`, counting from 1).
    total_steps: the step training runs to.
    loss: this step's loss (not a running mean).
    metrics: this step's metrics as floats (loss, loss_tokens, grad_norm, ...).
    elapsed_s: seconds since this call of the trainer started its loop.
    tokens: the collection trainer: valid (unpadded) conversation tokens of this step's global
      batch as fed by this process; None from the single trainer.
    paging: the collection trainer's paging for this step (`PagingInfo`); None otherwise.
    """

    step: int
    total_steps: int
    loss: float
    metrics: Mapping[str, float]
    elapsed_s: float
    tokens: int | None = None
    paging: PagingInfo | None = None

    @classmethod
    def of(cls, step: int, total_steps: int, metrics: Mapping[str, Any], t0: float,
           **extra) -> "StepInfo":
        """From a step's metrics (device or host arrays) and the loop's start time."""
        host = {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}
        return cls(step=step, total_steps=total_steps, loss=host["loss"], metrics=host,
                   elapsed_s=time.perf_counter() - t0, **extra)


Hook = Callable[[StepInfo], None]


class Hooks:
    """The callbacks a trainer calls; see the module doc."""

    def __init__(self):
        self._hooks: list[tuple[Hook, int]] = []

    def add_hook(self, fn: Hook, every: int = 1) -> Hook:
        """Calls `fn(info)` after every step whose number is a multiple of `every`; returns
        `fn` (so it also serves as a decorator factory's target)."""
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self._hooks.append((fn, int(every)))
        return fn

    def due(self, step: int) -> bool:
        """Whether any hook runs after step `step`."""
        return any(step % every == 0 for _, every in self._hooks)

    def fire(self, step: int, info: StepInfo | Callable[[], StepInfo]) -> None:
        """Calls the hooks due after step `step` with `info` (or what `info()` returns, called
        only when some hook is due), in the order they were added."""
        due = [fn for fn, every in self._hooks if step % every == 0]
        if not due:
            return
        if callable(info):
            info = info()
        for fn in due:
            fn(info)

    def __len__(self) -> int:
        return len(self._hooks)
