"""The Cartridge pytree: a small trained KV cache for one document.

Layout (token axis before head axis everywhere in cas_jax):
  keys:   [num_layers, num_tokens, num_kv_heads, head_dim]   keys stored *after* RoPE
  values: [num_layers, num_tokens, num_kv_heads, head_dim]

Position convention: cartridge token t was rotated with position t (0-based) when the cartridge
was initialised; keys are never re-rotated. When cartridges are composed, their tokens are laid
out one after another and the queries start at position = total number of active prefix tokens
(see `attention.compose`).

The first `num_frozen` tokens (default 1: the attention sink) are never updated by training; the
optimizer masks them (see `train.make_optimizer`).

Metadata is static (pytree aux data), so jit and tree_map see only the two arrays.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class CartridgeMeta:
    """Static facts about a cartridge.

    model_fingerprint: `ModelConfig.fingerprint()` + tokenizer hash of the model it was made for.
    doc_id: the source document id ("" for a collection-wide cartridge).
    num_frozen: leading tokens that training never changes (the attention sink).
    init: how it was initialised ("first_tokens", "random_tokens", "random_vectors").
    """

    model_fingerprint: str
    doc_id: str = ""
    num_frozen: int = 1
    init: str = "first_tokens"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CartridgeMeta":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Cartridge:
    """keys/values: [num_layers, num_tokens, num_kv_heads, head_dim]; meta is static."""

    keys: jax.Array
    values: jax.Array
    meta: CartridgeMeta = dataclasses.field(metadata=dict(static=True))

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[1]

    @property
    def nbytes(self) -> int:
        return int(self.keys.size * self.keys.dtype.itemsize * 2)

    def trainable_mask(self) -> "Cartridge":
        """A Cartridge of bools (same structure) marking the entries training may change."""
        tok = np.arange(self.num_tokens) >= self.meta.num_frozen
        m = np.broadcast_to(tok[None, :, None, None], self.keys.shape)
        return Cartridge(keys=jnp.asarray(m), values=jnp.asarray(m), meta=self.meta)

    def replace(self, **kw) -> "Cartridge":
        return dataclasses.replace(self, **kw)


class CartridgeMismatchError(ValueError):
    """A cartridge was made for a different model (fingerprint or shape mismatch)."""


def check_compatible(cartridge: Cartridge, model_fingerprint: str, num_layers: int,
                     num_kv_heads: int, head_dim: int, name: str = "cartridge") -> None:
    """Raises CartridgeMismatchError naming `name` if the cartridge does not fit the model."""
    if cartridge.meta.model_fingerprint != model_fingerprint:
        raise CartridgeMismatchError(
            f"{name}: made for model {cartridge.meta.model_fingerprint}, "
            f"but the loaded model is {model_fingerprint}")
    want = (num_layers, num_kv_heads, head_dim)
    got = (cartridge.keys.shape[0], cartridge.keys.shape[2], cartridge.keys.shape[3])
    if cartridge.keys.ndim != 4 or got != want or cartridge.values.shape != cartridge.keys.shape:
        raise CartridgeMismatchError(
            f"{name}: keys/values shaped {tuple(cartridge.keys.shape)}/"
            f"{tuple(cartridge.values.shape)}, expected [layers={want[0]}, tokens, "
            f"kv_heads={want[1]}, head_dim={want[2]}]")
