"""Cartridge initialisation from the document's own KV, compressed to P positions.

SnapKV-style selection (Li et al., 2024, as cas_jax reads it): prefill the whole document
block, score every key by the attention the document's own queries pay it, and keep, per layer
and kv head, the P - 1 best-scored positions (after max-pooling the scores along the sequence,
so a kept key keeps its neighbours' chance too) plus token 0, the attention sink.

Scores: for each layer, kv head and key j, the attention probability that the queries of the
observation window give key j, summed over the window's queries and the head group's query
heads, divided by the number of window queries that can see j (causal), so late keys are not
penalised for being visible to fewer queries. The window is the last `window` tokens (SnapKV),
or the whole document (None, the default: a cartridge must serve any question, not one).

Positions: the kept keys are moved to cartridge positions 0..P-1 in their original order
(for RoPE, rotated by new - old: rotations compose), so the cartridge keeps cas_jax's convention
(token t at position t; queries start at P).

The model runs through the contract (`cas_jax.model.decoder`): its forward gives the K/V, and
the optional `CompressibleKV` methods give the queries and move the kept keys, so a
researcher's own decoder gets this init too.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from cas_jax.cartridges.cartridge import Cartridge, CartridgeMeta, check_frozen
from cas_jax.model import llama as model_lib
from cas_jax.model.config import ModelConfig
from cas_jax.model.decoder import CompressibleKV, Decoder


def compressible(config: ModelConfig | Decoder) -> CompressibleKV:
    """The decoder `config` stands for, if the init can compress its K/V (it needs the
    optional `CompressibleKV` methods besides `Decoder`)."""
    decoder = model_lib.as_decoder(config)
    if not isinstance(decoder, CompressibleKV):
        raise TypeError(f"{type(decoder).__name__} lacks queries/move_keys "
                        "(cas_jax.model.decoder.CompressibleKV): the document_kv init cannot "
                        "score its keys; use the first_tokens init")
    return decoder


@functools.partial(jax.jit, static_argnames=("config", "window"))
def key_scores(params, tokens: jax.Array, *, config: ModelConfig | Decoder,
               window: int | None = None):
    """tokens [T] -> (keys, values [L, T, K, Dh] as the decoder keeps them, scores [L, K, T]
    float32), through the model contract (any `Decoder` that is also `CompressibleKV`)."""
    decoder = compressible(config)
    t = tokens.shape[0]
    w = t if window is None else min(window, t)
    positions = jnp.arange(t, dtype=jnp.int32)[None]
    _, kv = decoder.forward(params, tokens[None], positions)
    queries = decoder.queries(params, tokens[None], positions)[:, 0, t - w:]  # [L, w, H, Dh]
    keys, values = kv["k"][:, 0], kv["v"][:, 0]  # [L, T, K, Dh]
    kh, dh = keys.shape[2], keys.shape[3]
    g = queries.shape[2] // kh
    qpos = jnp.arange(t - w, t)[:, None]
    visible = jnp.arange(t)[None, :] <= qpos  # [w, T]
    seen = jnp.maximum(visible.sum(0), 1).astype(jnp.float32)  # [T]

    def one(qk):  # one layer: [K, T]
        q, k = qk
        s = jnp.einsum("wkgd,tkd->kgwt", q.reshape(w, kh, g, dh).astype(jnp.float32),
                       k.astype(jnp.float32)) / math.sqrt(dh)
        p = jax.nn.softmax(jnp.where(visible[None, None], s, -1e30), axis=-1)
        return p.sum(axis=(1, 2)) / seen[None]

    return keys, values, jax.lax.map(one, (queries, keys))


def select_positions(scores: np.ndarray, num_tokens: int, pool: int = 7) -> np.ndarray:
    """scores [L, K, T] -> kept positions [L, K, P] int32, ascending, position 0 first."""
    n_layers, kh, t = scores.shape
    if not 1 <= num_tokens <= t:
        raise ValueError(f"cannot keep {num_tokens} of {t} positions")
    pad = pool // 2
    padded = np.pad(scores, ((0, 0), (0, 0), (pad, pad)), constant_values=-np.inf)
    pooled = np.max(np.stack([padded[..., i:i + t] for i in range(pool)]), axis=0)
    pooled[..., 0] = np.inf  # the sink is always kept
    keep = np.argsort(-pooled, axis=-1, kind="stable")[..., :num_tokens]
    return np.sort(keep, axis=-1).astype(np.int32)


def init_from_document_kv(config: ModelConfig | Decoder, params, token_ids, num_tokens: int, *,
                          fingerprint: str, doc_id: str = "", num_frozen: int = 1,
                          window: int | None = None, pool: int = 7) -> Cartridge:
    """A P-token cartridge holding the document's most-attended K/V (module doc).

    token_ids [T] int: the document block's tokens (T >= P; T == P gives `init_from_tokens`).
    config: a ModelConfig or any `Decoder` that is also `CompressibleKV`.
    """
    check_frozen(num_tokens, num_frozen)
    decoder = compressible(config)
    ids = np.asarray(token_ids, np.int32).reshape(-1)
    keys, values, scores = key_scores(params, jnp.asarray(ids), config=config, window=window)
    keep = select_positions(np.asarray(scores), num_tokens, pool)  # [L, K, P]
    idx = jnp.asarray(keep.transpose(0, 2, 1))  # [L, P, K]
    k = jnp.take_along_axis(keys, idx[..., None], axis=1)
    v = jnp.take_along_axis(values, idx[..., None], axis=1)
    delta = jnp.arange(num_tokens, dtype=jnp.int32)[None, :, None] - idx
    k = decoder.move_keys(k, delta)
    return Cartridge(k, v, CartridgeMeta(fingerprint, doc_id, num_frozen, "document_kv"))
