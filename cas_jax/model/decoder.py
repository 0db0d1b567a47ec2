"""The one contract cas_jax needs from a model: `Decoder`.

The trainers (`train`, and `train_collection` through its step), the scoring and prefilling of
the evaluator (`scoring`), the sampler (`sampling`), self-study synthesis (its agents, prefill
and teacher: `synthesis`, `teacher`), cartridge initialisation (`cartridge.init_*`, through
`model.prefill_kv`; the `document_kv` init also needs `CompressibleKV`) and the server's
engines (`serving.kernels`: prefill, chunked prefill, decode steps and logits, composed
cartridges as the prefix; `serving.static` through the sampler) run a model only through this
protocol. Every one of them takes it where it takes a model `config`: a `ModelConfig`
stands for cas_jax's own decoder (`model.as_decoder` wraps it in `model.LlamaDecoder`); any
other object is used as the decoder itself. So a researcher's own JAX decoder (Flax NNX,
Equinox, plain functions) gets cartridges trained, composed, scored and sampled, and self-study
data synthesised, by passing it as `config`, e.g.
`train.train(state, params, data, config=my_decoder, ...)`, or as `LoadedModel.config`.

The arrays the decoder reads and writes (letters as in `model`: B batch, T tokens, S cache
slots, P prefix slots, L layers, K kv heads, Dh head dim, D hidden, V vocab):

  positions [B, T] int32   where each token stands; negative = padding (never attended, its
                           outputs are ignored). cas_jax puts the queries after the prefix
                           (`num_prefix_tokens`).
  prefix    {k, v: [L, B or 1, P, K, Dh], mask: [B or 1, P] bool (False = slot not seen)}
            placed before every row's tokens, every visible slot attended by every query.
            Optional entries: "start" (cas_jax's, ignore it) and "logit_scale", "logit_bias"
            [B, P] float32: a prefix slot's attention logit becomes logit * scale + bias
            (`attention.Geometry`; a decoder that ignores them supports only the identity
            geometry, the default). A batch axis of 1 is one prefix shared by every row.
            Gradients flow into k and v (the cartridges being trained).
  cache     {k, v: [L, B, S, K, Dh], pos: [B, S] int32 (-1 = empty), index: [] int32},
            built by cas_jax (`model.init_cache`); a query at position p sees the cache's and
            this call's keys at positions in [0, p].
K and V are whatever the decoder keeps per token (cas_jax's keys are after RoPE): a cartridge
is the K/V that `forward` returns for some tokens, trained further, and is read back as is.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp


@runtime_checkable
class Decoder(Protocol):
    """A causal decoder cas_jax can train cartridges for, score with and sample from.

    Static: hashable and compared by value (it is a static `jax.jit` argument and a cache key),
    e.g. a frozen dataclass. Its params are a separate pytree, passed to every call.
    Config facts (read to shape cartridges and caches and to check lengths):
      num_layers, num_kv_heads, head_dim  the K/V layout [L, ..., K, Dh];
      vocab_size                          the logits' width V;
      max_position_embeddings             the longest position range it may be run on.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int

    def forward(self, params: Any, tokens: jax.Array, positions: jax.Array,
                cache: dict | None = None, prefix: dict | None = None, *,
                remat: bool = False) -> tuple[jax.Array, dict]:
        """tokens, positions [B, T] -> (final hidden states [B, T, D], K/V).

        Without `cache` the K/V is this call's {k, v: [L, B, T, K, Dh]}; with one, it is the
        cache with this call's K/V written at slots [index, index + T), their positions in
        `pos` (-1 for padding) and `index` advanced by T. `remat` asks to recompute
        activations in the backward pass (a memory hint; it may be ignored).
        """

    def logits(self, params: Any, hidden: jax.Array) -> jax.Array:
        """hidden [..., D] -> float32 logits [..., V]."""


# Optional: `decode_layout(params, cache, prefix) -> (params, cache, prefix)`, the arrays the
# sampler's decode loop and the server's decode steps pass to `forward` instead (cas_jax's own
# decoder splits its layer stacks there, `model.unroll_layers`); without it the arrays are
# passed as they are. The server keeps its KV pool in this layout, so there a cache's and a
# prefix's k and v must stay per layer: one [L, ...] array or a tuple of L arrays.


@runtime_checkable
class CompressibleKV(Protocol):
    """Optional, besides `Decoder`: what the `document_kv` init (`kv_compression`) needs to
    score a document's keys by the attention its own queries pay them and to keep the best P of
    them as a cartridge. Without these the init refuses the decoder (`first_tokens` needs none).
    """

    def queries(self, params: Any, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        """tokens, positions [B, T] -> every layer's attention queries [L, B, T, H, Dh] (H
        query heads, a multiple of K; query head h reads kv head h // (H // K)), in the keys'
        space: softmax(q . k / sqrt(Dh)) over the visible keys is the layer's attention."""

    def move_keys(self, keys: jax.Array, delta: jax.Array) -> jax.Array:
        """keys [L, N, K, Dh] as `forward` returns them -> the same keys moved by delta
        [L, N, K] int32 positions (for RoPE, rotated by delta; a decoder whose keys hold no
        position returns them as they are)."""


def kv_dtype(params: Any):
    """The dtype cas_jax keeps caches in: that of the params' first leaf (for cas_jax's own
    params, the embeddings)."""
    return jax.tree.leaves(params)[0].dtype


def num_prefix_tokens(prefix: dict | None, batch: int) -> jax.Array:
    """[B] int32: visible prefix tokens per row, i.e. where each row's query positions start."""
    if prefix is None:
        return jnp.zeros((batch,), jnp.int32)
    start = prefix.get("start")
    if start is None:  # a hand-made prefix: serial, after its visible tokens
        start = jnp.sum(prefix["mask"], axis=1).astype(jnp.int32)
    # A shared prefix (batch 1) gives every row the same count.
    return jnp.broadcast_to(start, (batch,))
