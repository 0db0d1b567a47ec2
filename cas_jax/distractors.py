"""Dynamic distractor mixing: which cartridges each training example sees besides its own.

Every training row reads its document's cartridge (the target) together with k distractor
cartridges of other documents, in a random order, so that the target learns to answer while
composed with others. k is drawn per step from a schedule:

  fixed    k = k_max every step
  uniform  k ~ U{0, ..., k_max} per step
  ramp     k ~ U{0, ..., cap(step)}, cap growing linearly from 0 to k_max over ramp_steps

All rows of a step share k (so a step's work is uniform); distractors are drawn per row, without
replacement, never the target. Draws come from a numpy Generator seeded by (seed, step), so a
resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SCHEDULES = ("fixed", "uniform", "ramp")


@dataclasses.dataclass(frozen=True)
class DistractorSchedule:
    k_max: int = 3
    kind: str = "uniform"
    ramp_steps: int = 100

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"distractor schedule {self.kind!r}: expected one of {SCHEDULES}")
        if self.k_max < 0:
            raise ValueError(f"k_max must be >= 0, got {self.k_max}")

    def cap(self, step: int) -> int:
        """The most distractors step `step` may draw."""
        if self.kind == "ramp":
            return int(round(self.k_max * min(1.0, step / max(self.ramp_steps, 1))))
        return self.k_max

    def draw_k(self, step: int, rng: np.random.Generator) -> int:
        if self.kind == "fixed":
            return self.k_max
        return int(rng.integers(0, self.cap(step) + 1))


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """The cartridges one step uses.

    doc_ids: the step's distinct cartridges; slot i of the step bank holds doc_ids[i].
    selection [B, C] int32: bank slots each row reads, in order; selected [B, C] bool.
    targets [B] int32: the bank slot of each row's own document.
    """

    doc_ids: tuple[str, ...]
    selection: np.ndarray
    selected: np.ndarray
    targets: np.ndarray


def plan_step(target_ids: list[str], all_ids: tuple[str, ...], schedule: DistractorSchedule,
              step: int, seed: int) -> StepPlan:
    """Draws k and each row's distractors and order; C = 1 + schedule.k_max slots per row."""
    rng = np.random.default_rng([seed, step])
    k = min(schedule.draw_k(step, rng), len(all_ids) - 1)
    slots: dict[str, int] = {}
    b, c = len(target_ids), 1 + schedule.k_max
    selection = np.zeros((b, c), np.int32)
    selected = np.zeros((b, c), bool)
    targets = np.zeros((b,), np.int32)
    for row, target in enumerate(target_ids):
        if target not in all_ids:
            raise KeyError(f"target document {target!r} is not in the collection")
        others = [d for d in all_ids if d != target]
        chosen = [others[i] for i in rng.choice(len(others), size=k, replace=False)]
        order = [target] + chosen
        rng.shuffle(order)
        for j, doc in enumerate(order):
            selection[row, j] = slots.setdefault(doc, len(slots))
            selected[row, j] = True
        targets[row] = slots[target]
    return StepPlan(tuple(slots), selection, selected, targets)
