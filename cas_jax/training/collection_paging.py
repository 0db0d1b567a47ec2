"""Paging for the collection trainer: a step's cartridges from the BudgetManager into the step
bank, and the trained ones back.

`page_in` pins the plan's cartridges (the manager reads missing ones from its store, or takes
them from the prefetch it was given during the previous step); `bank_arrays` stacks them and
their optimizer states into the fixed-capacity step bank; `page_out` hands every trained slot
back to the manager as that cartridge's new version (the manager writes it to its store when it
evicts it or at a checkpoint) and unpins the step's cartridges.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cas_jax.cartridges.budget import BudgetManager
from cas_jax.cartridges.cartridge import Cartridge
from cas_jax.training import train
from cas_jax.training.collection_init import single_parts


@dataclasses.dataclass
class PagedBank:
    """A step's pinned cartridges: doc_ids[i] is bank slot i, pairs[i] its (Cartridge,
    opt_state) on the device. resident_bytes, pinned_bytes: the manager's right after the
    acquire; resident_bytes is raised to the manager's after `page_out`'s updates."""

    doc_ids: list[str]
    pairs: list[tuple[Cartridge, Any]]
    resident_bytes: int
    pinned_bytes: int


def page_in(manager: BudgetManager, doc_ids: list[str]) -> PagedBank:
    """Pins `doc_ids` (`BudgetManager.acquire`)."""
    pairs = manager.acquire(doc_ids)
    return PagedBank(doc_ids, pairs, manager.resident_bytes, manager.pinned_bytes)


def stack(trees: list, capacity: int):
    """Stacks per-cartridge pytrees on a new slot axis, zero-padded to `capacity` slots."""
    pad = capacity - len(trees)
    return jax.tree.map(
        lambda *xs: jnp.concatenate([jnp.stack(xs), jnp.zeros((pad,) + xs[0].shape,
                                                               xs[0].dtype)]) if pad else
        jnp.stack(xs), *trees)


def bank_arrays(bank: PagedBank, capacity: int) -> tuple[dict, Any]:
    """(parts, opt_state) of the step bank: the cartridges' {frozen, trainable} parts and
    optimizer states, stacked on a slot axis of `capacity` slots."""
    return (stack([single_parts(c) for c, _ in bank.pairs], capacity),
            stack([o for _, o in bank.pairs], capacity))


def page_out(manager: BudgetManager, bank: PagedBank, parts: dict, opt_state: Any,
             trainable: np.ndarray) -> tuple[str, ...]:
    """Hands the trained slots back to the manager (`update`), unpins the bank's cartridges
    and returns the ids it updated."""
    keys, values = train.merge_cartridges(parts)
    updated = []
    for slot, (doc_id, (c, _)) in enumerate(zip(bank.doc_ids, bank.pairs)):
        if trainable[slot]:
            manager.update(doc_id, c.replace(keys=keys[slot], values=values[slot]),
                           jax.tree.map(lambda x, s=slot: x[s], opt_state))
            updated.append(doc_id)
    bank.resident_bytes = max(bank.resident_bytes, manager.resident_bytes)
    manager.release(bank.doc_ids)
    return tuple(updated)
