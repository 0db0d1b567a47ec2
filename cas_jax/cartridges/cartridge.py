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

Initialisation (all through `model.prefill_kv`, keys rotated with positions 0..P-1):
  init_from_tokens      K/V of the document's first P tokens (the paper's default and best)
  init_random_tokens    K/V of P tokens drawn uniformly from the vocabulary
  init_random_vectors   Gaussian K/V with the per-(layer, head, dim) mean/std of real K/V
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cas_jax.model import llama as model_lib
from cas_jax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class CartridgeMeta:
    """Static facts about a cartridge.

    model_fingerprint: `ModelConfig.fingerprint()` + tokenizer hash of the model it was made for.
    doc_id: the source document id ("" for a collection-wide cartridge).
    num_frozen: leading tokens that training never changes (the attention sink).
    init: how it was initialised ("first_tokens", "random_tokens", "random_vectors",
      "document_kv", "sampled_chunks").
    geometry: the composition geometry it was trained under (`attention.Geometry` spec;
      "serial" for every cartridge made before geometries were named); readers compose it
      the same way.
    """

    model_fingerprint: str
    doc_id: str = ""
    num_frozen: int = 1
    init: str = "first_tokens"
    geometry: str = "serial"

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


def check_frozen(num_tokens: int, num_frozen: int) -> None:
    """Raises ValueError unless a cartridge of `num_tokens` can freeze its first `num_frozen`
    (at least one trainable token must remain)."""
    if not 0 <= num_frozen < num_tokens:
        raise ValueError(f"a cartridge of {num_tokens} tokens cannot freeze {num_frozen}: "
                         f"need 0 <= num_frozen < num_tokens")


def kv_of_tokens(config: ModelConfig, params: Any, token_ids) -> tuple[jax.Array, jax.Array]:
    """K/V (keys after RoPE) of token_ids [P] at positions 0..P-1: two arrays [L, P, K, Dh]."""
    tokens = jnp.asarray(np.asarray(token_ids, np.int32)[None])
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    k, v = model_lib.prefill_kv(params, tokens, positions, config=config)
    return k[:, 0], v[:, 0]


def init_from_tokens(config: ModelConfig, params: Any, token_ids, *, fingerprint: str,
                     num_tokens: int | None = None, doc_id: str = "",
                     num_frozen: int = 1) -> Cartridge:
    """The paper's default: the K/V of the document's first `num_tokens` tokens.

    token_ids [>= P] int: the document's tokens (all of them when num_tokens is None). Token t
    gets position t, so the cartridge equals the document's own KV cache: a query placed at
    position P sees exactly what it would see with those P tokens in context.
    """
    token_ids = np.asarray(token_ids, np.int32).reshape(-1)
    p = len(token_ids) if num_tokens is None else num_tokens
    if len(token_ids) < p:
        raise ValueError(f"document {doc_id!r} has {len(token_ids)} tokens, fewer than the "
                         f"{p} the cartridge needs")
    check_frozen(p, num_frozen)
    k, v = kv_of_tokens(config, params, token_ids[:p])
    return Cartridge(k, v, CartridgeMeta(fingerprint, doc_id, num_frozen, "first_tokens"))


def init_random_tokens(config: ModelConfig, params: Any, num_tokens: int, key: jax.Array, *,
                       fingerprint: str, doc_id: str = "", num_frozen: int = 1) -> Cartridge:
    """The K/V of `num_tokens` tokens drawn uniformly from the vocabulary (positions 0..P-1)."""
    check_frozen(num_tokens, num_frozen)
    token_ids = jax.random.randint(key, (num_tokens,), 0, config.vocab_size, jnp.int32)
    k, v = kv_of_tokens(config, params, token_ids)
    return Cartridge(k, v, CartridgeMeta(fingerprint, doc_id, num_frozen, "random_tokens"))


def init_random_vectors(config: ModelConfig, params: Any, num_tokens: int, key: jax.Array,
                        reference_tokens, *, fingerprint: str, doc_id: str = "",
                        num_frozen: int = 1) -> Cartridge:
    """Gaussian K/V matched to the model's real K/V statistics.

    The K/V of reference_tokens [R] (2 <= R, prefilled in one forward pass, so e.g. the
    document's first P tokens rather than all of it) give a mean and a standard
    deviation per (layer, kv head, head dim) entry, taken over the R tokens; every cartridge
    entry, the sink included, is drawn independently from that normal distribution.
    """
    check_frozen(num_tokens, num_frozen)
    reference_tokens = np.asarray(reference_tokens, np.int32).reshape(-1)
    if len(reference_tokens) < 2:
        raise ValueError("init_random_vectors needs at least 2 reference tokens for a std")
    real_k, real_v = kv_of_tokens(config, params, reference_tokens)
    shape = (config.num_layers, num_tokens, config.num_kv_heads, config.head_dim)
    key_k, key_v = jax.random.split(key)

    def draw(real, key):
        real = real.astype(jnp.float32)
        mean = jnp.mean(real, axis=1, keepdims=True)
        std = jnp.std(real, axis=1, keepdims=True)
        return (mean + std * jax.random.normal(key, shape, jnp.float32)).astype(real_k.dtype)

    return Cartridge(draw(real_k, key_k), draw(real_v, key_v),
                     CartridgeMeta(fingerprint, doc_id, num_frozen, "random_vectors"))
