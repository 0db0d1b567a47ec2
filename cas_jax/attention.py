"""Composing a variable set of cartridges into one attention prefix, without recompiling.

Cartridges live in a `CartridgeBank`: fixed-capacity slots, each holding up to P_max tokens:
  keys, values: [N, L, P_max, K, Dh]   (after RoPE; token axis before head axis)
  lengths:      [N] int32              valid tokens of each slot (0 = empty slot)

Each batch row selects its own cartridges by slot index: `selection` [B, C] int32 with
`selected` [B, C] bool (False = unused selection slot). Shapes depend only on (N, P_max, C), so
changing which and how many cartridges are active changes array *values*, not shapes, and the
jitted forward does not recompile.

Composition convention (matches the reference's concatenation):
  * the selected cartridges' tokens are laid out in selection order, C * P_max prefix slots;
  * every cartridge keeps its own keys as trained (each was rotated with positions 0..P-1);
  * only the first active cartridge's token 0 (the attention sink) is visible; the sinks of the
    others are masked, so composing N cartridges shows one sink;
  * query positions start at the number of visible prefix tokens (`num_prefix_tokens`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from cas_jax.cartridge import Cartridge


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CartridgeBank:
    """keys/values [N, L, P_max, K, Dh]; lengths [N] int32."""

    keys: jax.Array
    values: jax.Array
    lengths: jax.Array

    @property
    def capacity(self) -> int:
        return self.keys.shape[0]

    @property
    def max_tokens(self) -> int:
        return self.keys.shape[2]


def bank_from_cartridges(cartridges: list[Cartridge], capacity: int | None = None,
                         max_tokens: int | None = None) -> CartridgeBank:
    """Stacks cartridges into a bank, padding tokens to max_tokens and slots to capacity."""
    if not cartridges:
        raise ValueError("bank_from_cartridges: need at least one cartridge")
    capacity = capacity or len(cartridges)
    max_tokens = max_tokens or max(c.num_tokens for c in cartridges)
    if len(cartridges) > capacity:
        raise ValueError(f"{len(cartridges)} cartridges exceed the bank capacity {capacity}")
    ref = cartridges[0].keys
    shape = (capacity, ref.shape[0], max_tokens, ref.shape[2], ref.shape[3])
    keys = np.zeros(shape, ref.dtype)
    values = np.zeros(shape, ref.dtype)
    lengths = np.zeros((capacity,), np.int32)
    for i, c in enumerate(cartridges):
        if c.num_tokens > max_tokens:
            raise ValueError(f"cartridge {c.meta.doc_id!r} has {c.num_tokens} tokens, bank slots "
                             f"hold {max_tokens}")
        keys[i, :, :c.num_tokens] = np.asarray(c.keys)
        values[i, :, :c.num_tokens] = np.asarray(c.values)
        lengths[i] = c.num_tokens
    return CartridgeBank(jnp.asarray(keys), jnp.asarray(values), jnp.asarray(lengths))


def compose(bank: CartridgeBank, selection: jax.Array, selected: jax.Array) -> dict:
    """The prefix for `model.forward`: {k, v: [L, B, C*P_max, K, Dh], mask: [B, C*P_max]}.

    selection [B, C] int32 slot ids into the bank; selected [B, C] bool. Differentiable in the
    bank's keys/values (gradients land in the selected slots only).
    """
    b, c = selection.shape
    _, n_layers, p, kh, dh = bank.keys.shape
    k = bank.keys[selection]  # [B, C, L, P, K, Dh]
    v = bank.values[selection]
    k = jnp.moveaxis(k, 2, 0).reshape(n_layers, b, c * p, kh, dh)
    v = jnp.moveaxis(v, 2, 0).reshape(n_layers, b, c * p, kh, dh)
    tok = jnp.arange(p)[None, None, :]
    lengths = jnp.where(selected, bank.lengths[selection], 0)
    mask = tok < lengths[:, :, None]  # [B, C, P]
    active = lengths > 0
    first_active = jnp.cumsum(active, axis=1) == 1
    drop_sink = active & ~first_active
    mask = mask & ~((tok == 0) & drop_sink[:, :, None])
    return {"k": k, "v": v, "mask": mask.reshape(b, c * p)}


def compose_in_order(cartridges: list[Cartridge]) -> dict | None:
    """The batch-1 prefix of `cartridges` composed in the order given (None for none): what
    `experiments.chat --cartridges` reads before its prompt."""
    if not cartridges:
        return None
    n = len(cartridges)
    return compose(bank_from_cartridges(cartridges), jnp.arange(n, dtype=jnp.int32)[None],
                   jnp.ones((1, n), bool))


def num_prefix_tokens(prefix: dict | None, batch: int) -> jax.Array:
    """[B] int32: visible prefix tokens per row, i.e. where each row's query positions start."""
    if prefix is None:
        return jnp.zeros((batch,), jnp.int32)
    # A shared prefix (batch 1) gives every row the same count.
    return jnp.broadcast_to(jnp.sum(prefix["mask"], axis=1).astype(jnp.int32), (batch,))


def single_prefix(cartridge: Cartridge, batch: int) -> dict:
    """The prefix for one cartridge shared by every row."""
    k = jnp.broadcast_to(cartridge.keys[:, None], (cartridge.keys.shape[0], batch)
                         + cartridge.keys.shape[1:])
    v = jnp.broadcast_to(cartridge.values[:, None], k.shape)
    return {"k": k, "v": v, "mask": jnp.ones((batch, cartridge.num_tokens), bool)}
