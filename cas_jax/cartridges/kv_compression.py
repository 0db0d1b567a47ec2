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

Positions: the kept keys are re-rotated to cartridge positions 0..P-1 in their original order
(RoPE rotations compose: rotating by new - old), so the cartridge keeps cas_jax's convention
(token t at position t; queries start at P).
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


@functools.partial(jax.jit, static_argnames=("config", "window"))
def key_scores(params, tokens: jax.Array, *, config: ModelConfig, window: int | None = None):
    """tokens [T] -> (keys, values [L, T, K, Dh] after RoPE, scores [L, K, T] float32)."""
    t = tokens.shape[0]
    w = t if window is None else min(window, t)
    positions = jnp.arange(t, dtype=jnp.int32)[None]
    inv_freq = model_lib.rope_inv_freq(config)
    x = params["embed"][tokens[None]]
    kh, g, dh = config.num_kv_heads, config.num_heads // config.num_kv_heads, config.head_dim

    def body(x, lp):
        h = model_lib.rms_norm(x, lp["attn_norm"], config.rms_norm_eps)
        q = model_lib.linear(h, lp["q"], lp.get("q_bias")).reshape(1, t, config.num_heads, dh)
        k = model_lib.linear(h, lp["k"], lp.get("k_bias")).reshape(1, t, kh, dh)
        if config.qk_norm:
            q = model_lib.rms_norm(q, lp["q_norm"], config.rms_norm_eps)
            k = model_lib.rms_norm(k, lp["k_norm"], config.rms_norm_eps)
        q = model_lib.apply_rope(q, positions, inv_freq)[0, t - w:]  # [w, H, Dh]
        k = model_lib.apply_rope(k, positions, inv_freq)[0]  # [T, K, Dh]
        s = jnp.einsum("wkgd,tkd->kgwt", q.reshape(w, kh, g, dh).astype(jnp.float32),
                       k.astype(jnp.float32)) / math.sqrt(dh)
        qpos = jnp.arange(t - w, t)[:, None]
        visible = jnp.arange(t)[None, :] <= qpos  # [w, T]
        p = jax.nn.softmax(jnp.where(visible[None, None], s, -1e30), axis=-1)
        seen = jnp.maximum(visible.sum(0), 1).astype(jnp.float32)  # [T]
        score = p.sum(axis=(1, 2)) / seen[None]  # [K, T]
        x, (kk, vv) = model_lib.layer(config, inv_freq, x, positions, lp, None, None, None)
        return x, (kk[0], vv[0], score)

    _, (keys, values, scores) = jax.lax.scan(body, x, params["layers"])
    return keys, values, scores


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


def _rotate(x: jax.Array, delta: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """x [L, P, K, Dh] rotated by delta [L, P, K] positions (HF rotate-half RoPE layout)."""
    n_layers, p, kh, dh = x.shape
    flat = x.transpose(0, 2, 1, 3).reshape(n_layers, kh * p, 1, dh)
    out = model_lib.apply_rope(flat, delta.transpose(0, 2, 1).reshape(n_layers, kh * p), inv_freq)
    return out.reshape(n_layers, kh, p, dh).transpose(0, 2, 1, 3)


def init_from_document_kv(config: ModelConfig, params, token_ids, num_tokens: int, *,
                          fingerprint: str, doc_id: str = "", num_frozen: int = 1,
                          window: int | None = None, pool: int = 7) -> Cartridge:
    """A P-token cartridge holding the document's most-attended K/V (module doc).

    token_ids [T] int: the document block's tokens (T >= P; T == P gives `init_from_tokens`).
    """
    check_frozen(num_tokens, num_frozen)
    ids = np.asarray(token_ids, np.int32).reshape(-1)
    keys, values, scores = key_scores(params, jnp.asarray(ids), config=config, window=window)
    keep = select_positions(np.asarray(scores), num_tokens, pool)  # [L, K, P]
    idx = jnp.asarray(keep.transpose(0, 2, 1))  # [L, P, K]
    k = jnp.take_along_axis(keys, idx[..., None], axis=1)
    v = jnp.take_along_axis(values, idx[..., None], axis=1)
    delta = jnp.arange(num_tokens, dtype=jnp.int32)[None, :, None] - idx
    k = _rotate(k, delta, model_lib.rope_inv_freq(config))
    return Cartridge(k, v, CartridgeMeta(fingerprint, doc_id, num_frozen, "document_kv"))
