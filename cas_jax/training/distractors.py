"""Dynamic distractor mixing: which cartridges each training example sees besides its own.

Every training row reads its document's cartridge (the target) together with k distractor
cartridges of other documents, in a random order, so that the target learns to answer while
composed with others. k comes from a schedule:

  fixed    k = k_max every step
  uniform  k ~ U{0, ..., k_max} per step
  ramp     k ~ U{0, ..., cap(step)}, cap growing linearly from 0 to k_max over ramp_steps
  mixed    per ROW, as deployment composes: alone (k = 0) with probability p_iso, else
           k ~ U{1, ..., k_max}

fixed, uniform and ramp give all rows of a step the same k and C = 1 + k_max selection slots;
mixed gives each row its own k and C = the step's largest 1 + k rounded up to a power of two
(at most 1 + k_max), so a step of isolated rows pays for one cartridge, not k_max + 1.

Quiet steps (`quiet` > 0, a share of steps): every row reads 1..k_max cartridges of OTHER
documents and none of its own (`StepPlan.quiet`); the trainer distils it toward the model with
no cartridge at all, so a cartridge learns to stay silent off its document.

Distractors are drawn per row, without replacement, never the target. Draws come from a numpy
Generator seeded by (seed, step), so a resumed run draws exactly what an uninterrupted one
would (the quiet and per-row draws happen only when those options are on, so the other
schedules draw as they always did).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

SCHEDULES = ("fixed", "uniform", "ramp", "mixed")


@dataclasses.dataclass(frozen=True)
class DistractorSchedule:
    k_max: int = 3
    kind: str = "uniform"
    ramp_steps: int = 100
    p_iso: float = 0.0  # mixed: share of rows that read their cartridge alone
    quiet: float = 0.0  # share of quiet steps (module doc)

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"distractor schedule {self.kind!r}: expected one of {SCHEDULES}")
        if self.k_max < 0:
            raise ValueError(f"k_max must be >= 0, got {self.k_max}")
        if not (0.0 <= self.p_iso <= 1.0 and 0.0 <= self.quiet <= 1.0):
            raise ValueError(f"p_iso and quiet are shares in [0, 1], got {self.p_iso} and "
                             f"{self.quiet}")
        if self.kind == "mixed" and self.k_max < 1 and self.p_iso < 1.0:
            raise ValueError("the mixed schedule needs k_max >= 1 (or p_iso = 1)")
        if self.quiet > 0 and self.k_max < 1:
            raise ValueError("quiet steps need k_max >= 1: a quiet row reads 1..k_max "
                             "cartridges of other documents")

    def cap(self, step: int) -> int:
        """The most distractors step `step` may draw."""
        if self.kind == "ramp":
            return int(round(self.k_max * min(1.0, step / max(self.ramp_steps, 1))))
        return self.k_max

    def draw_k(self, step: int, rng: np.random.Generator) -> int:
        """The step's k (fixed, uniform, ramp) or one row's k (mixed)."""
        if self.kind == "fixed":
            return self.k_max
        if self.kind == "mixed":
            if rng.random() < self.p_iso:
                return 0
            return int(rng.integers(1, self.k_max + 1))
        return int(rng.integers(0, self.cap(step) + 1))

    @property
    def max_slots(self) -> int:
        """C at most: selection slots a row may need."""
        return 1 + self.k_max


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """The cartridges one step uses.

    doc_ids: the step's distinct cartridges; slot i of the step bank holds doc_ids[i].
    selection [B, C] int32: bank slots each row reads, in order; selected [B, C] bool.
    targets [B] int32: the bank slot of each row's own document (-1 on a quiet step).
    quiet: the rows read other documents' cartridges only (module doc).
    """

    doc_ids: tuple[str, ...]
    selection: np.ndarray
    selected: np.ndarray
    targets: np.ndarray
    quiet: bool = False


def _width(ks: list[int], schedule: DistractorSchedule, quiet: bool) -> int:
    """C of a step whose rows read ks[r] others (plus their own unless quiet)."""
    if schedule.kind != "mixed" and not quiet:
        return schedule.max_slots
    need = max(ks) + (0 if quiet else 1)
    return min(1 << (need - 1).bit_length(), schedule.max_slots)


def plan_step(target_ids: list[str], all_ids: tuple[str, ...], schedule: DistractorSchedule,
              step: int, seed: int) -> StepPlan:
    """Draws each row's distractors and order (k per step or per row, `schedule`)."""
    rng = np.random.default_rng([seed, step])
    quiet = schedule.quiet > 0 and rng.random() < schedule.quiet
    b = len(target_ids)
    if quiet:
        ks = [int(rng.integers(1, schedule.k_max + 1)) for _ in range(b)]
    elif schedule.kind == "mixed":
        ks = [schedule.draw_k(step, rng) for _ in range(b)]
    else:
        ks = [schedule.draw_k(step, rng)] * b
    ks = [min(k, len(all_ids) - 1) for k in ks]
    c = _width(ks, schedule, quiet)
    slots: dict[str, int] = {}
    selection = np.zeros((b, c), np.int32)
    selected = np.zeros((b, c), bool)
    targets = np.full((b,), -1, np.int32)
    for row, (target, k) in enumerate(zip(target_ids, ks)):
        if target not in all_ids:
            raise KeyError(f"target document {target!r} is not in the collection")
        others = [d for d in all_ids if d != target]
        chosen = [others[i] for i in rng.choice(len(others), size=k, replace=False)]
        order = chosen if quiet else [target] + chosen
        rng.shuffle(order)
        for j, doc in enumerate(order):
            selection[row, j] = slots.setdefault(doc, len(slots))
            selected[row, j] = True
        if not quiet:
            targets[row] = slots[target]
    return StepPlan(tuple(slots), selection, selected, targets, quiet)


# ----------------------------------------------------------------------------- evaluation

POSITIONS = ("first", "last", "random")


def composed_sets(questions: Sequence, doc_ids: Sequence[str], k: int, seed: int,
                  position: str = "random") -> list[list[str]]:
    """Per question (anything with a doc_id): its document and k others drawn without
    replacement, in `position` order (the true cartridge first, last, or at a random place).
    The drawn others depend only on (seed, question index, k), not on `position`; evaluation
    reads the same sets for every cartridge source and geometry."""
    if position not in POSITIONS:
        raise ValueError(f"position {position!r}: expected one of {POSITIONS}")
    ids = sorted(doc_ids)
    if k >= len(ids):
        raise ValueError(f"composing {k} other cartridges needs more than {len(ids)} documents")
    sets = []
    for i, q in enumerate(questions):
        rng = np.random.default_rng([seed, i, k])
        others = [d for d in ids if d != q.doc_id]
        drawn = [others[j] for j in rng.choice(len(others), k, replace=False)]
        if position == "first":
            sets.append([q.doc_id] + drawn)
        elif position == "last":
            sets.append(drawn + [q.doc_id])
        else:
            at = int(np.random.default_rng([seed, i, k, 1]).integers(k + 1))
            sets.append(drawn[:at] + [q.doc_id] + drawn[at:])
    return sets
