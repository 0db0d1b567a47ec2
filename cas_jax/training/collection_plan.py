"""Step planning for collection training: each step's batch, and which cartridges it reads.

A step takes the next batch of self-study conversations (rows of many documents, cut to the
longest row by `dataset.trim_batch`), maps each row's document to the cartridge it trains
(`cartridge_of`), and draws distractors for every row (`distractors.plan_step`, seeded by
(seed, step), so a resumed run draws what an uninterrupted one would). With several processes
each reads its rows of the global batch; the rows' documents are all-gathered so that every
process draws the same plan.

The plan's cartridges fill a step bank of fixed capacity N = batch * (1 + k_max) slots (so the
jitted step never recompiles); `trainable_slots` says which of them the step may change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from cas_jax import distributed
from cas_jax.training import dataset
from cas_jax.training.distractors import DistractorSchedule, StepPlan, plan_step
from cas_jax.training.routing import RowRouter

GRAD_SCOPES = ("target", "all")


@dataclasses.dataclass(frozen=True)
class PlannedStep:
    """data_state: the data iterator's state before this step's batch (resuming from it
    replays the step). batch: this process's rows. plan: the global `distractors.StepPlan`."""

    data_state: dict
    batch: dict
    plan: StepPlan


def resolve_cartridges(data_dir: str, cartridge_of: Mapping[str, str] | None
                       ) -> tuple[list[str], Mapping[str, str], tuple[str, ...]]:
    """(the data's document ids in index order, document -> cartridge id, the sorted cartridge
    ids); cartridge_of None maps every document to its own cartridge. A document with
    conversations but no cartridge is an error naming it."""
    data_ids = dataset.doc_ids(data_dir)
    if cartridge_of is None:
        cartridge_of = {d: d for d in data_ids}
    unmapped = [d for d in data_ids if d not in cartridge_of]
    if unmapped:
        raise ValueError(f"{data_dir}: documents {unmapped[:5]} have conversations but no "
                         "cartridge in cartridge_of")
    return data_ids, cartridge_of, tuple(sorted({cartridge_of[d] for d in data_ids}))


class StepPlanner:
    """Plans steps in order from an endless, checkpointable iterator over `data_dir`."""

    def __init__(self, data_dir: str, data_ids: list[str], cartridge_of: Mapping[str, str],
                 all_ids: tuple[str, ...], *, batch_size: int, seq_len: int, seed: int,
                 length_bucket: int, schedule: DistractorSchedule,
                 router: RowRouter | None = None):
        self.data = dataset.make_train_iterator(
            data_dir, batch_size, seq_len, seed, num_epochs=None, drop_remainder=True,
            route=None if router is None else router.scores)
        self.data_ids, self.cartridge_of, self.all_ids = data_ids, cartridge_of, all_ids
        self.seed, self.length_bucket, self.schedule = seed, length_bucket, schedule

    def plan(self, at_step: int) -> PlannedStep:
        """Reads the next batch and plans it as step `at_step`."""
        state = self.data.get_state()
        batch = dataset.trim_batch(next(self.data), self.length_bucket)
        doc_index = distributed.allgather_rows(np.asarray(batch["doc_index"]))
        targets = [self.cartridge_of[self.data_ids[i]] for i in doc_index]
        return PlannedStep(state, batch, plan_step(targets, self.all_ids, self.schedule,
                                                   at_step, self.seed))


def trainable_slots(plan: StepPlan, capacity: int, grad_scope: str) -> np.ndarray:
    """[capacity] bool: the bank slots the step updates. "target": the rows' own cartridges
    (none on a quiet step: then every active slot); "all": every active slot."""
    trainable = np.zeros((capacity,), bool)
    if grad_scope == "target" and not plan.quiet:
        trainable[np.unique(plan.targets)] = True
    else:
        trainable[:len(plan.doc_ids)] = True
    return trainable


def host_batch(batch: dict, plan: StepPlan, rows: slice, router: RowRouter | None = None
               ) -> dict:
    """This process's rows of the batch with their bank selection, and with `router` (a
    routing geometry's) their cartridge_bias."""
    out = {k: v for k, v in batch.items() if k != "route_scores"}
    out.update(selection=plan.selection[rows], selected=plan.selected[rows])
    if router is not None:
        out["cartridge_bias"] = router.biases(batch["route_scores"], plan.doc_ids,
                                              out["selection"], out["selected"])
    return out
