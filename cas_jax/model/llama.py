"""A pure-functional Llama-family decoder (Llama 2/3, SmolLM, Mistral, Qwen2, Qwen3).

`LlamaDecoder(config)` is this module as a `decoder.Decoder` (and `decoder.CompressibleKV`), the
contract every other part runs models through; `as_decoder` gives it for a ModelConfig.

Params are a plain dict of arrays; per-layer weights are stacked on a leading layer axis L so
the layers run under `jax.lax.scan`:

  embed        [V, D]
  final_norm   [D]
  lm_head      [D, V]          only when the embeddings are untied
  layers/
    attn_norm  [L, D]          mlp_norm  [L, D]
    q          [L, D, H*Dh]    k, v      [L, D, K*Dh]     o   [L, H*Dh, D]
    q_bias     [L, H*Dh]       k_bias, v_bias [L, K*Dh]   (Qwen2, Llama attention_bias)
    o_bias     [L, D]          (Llama attention_bias)
    q_norm     [L, Dh]         k_norm    [L, Dh]          (Qwen3)
    gate, up   [L, D, F]       down      [L, F, D]

Letters: B batch, T query tokens, S key slots, L layers, D hidden, H query heads, K kv heads,
G = H // K query heads per kv head, Dh head dim, F MLP width, V vocab, P prefix tokens.

Position convention: `positions[b, t]` is the RoPE position of token t in row b. A negative
position marks padding: the token is never attended to and its outputs are meaningless.
Keys in caches and prefixes are stored after RoPE, so they are never rotated again. A query at
position p attends to cache/token keys whose position is in [0, p] (and within the sliding
window, if any) and to every prefix slot whose mask is True. Callers put query positions after
the prefix: with n valid prefix tokens the first query token has position n.

KV cache (dict):  k, v [L, B, S, K, Dh];  pos [B, S] int32 (-1 = empty slot);  index [] int32,
the slot where the next tokens are written (all rows write at the same slot: left padding).

Unrolled form (`unroll_layers`, used by the sampler's decode loop): params["layers"], the cache's
k and v and the prefix's k and v are tuples of L per-layer entries instead of arrays stacked on
L. `forward` then runs the layers as a Python loop and writes each layer's new K/V into its
cache array before attending over it, so XLA:CPU neither copies a layer's weights out of the
stack nor the cache around the write (measured: a decode step 145-155 -> 110-125 ms, batch 16).
Prefix (dict):    k, v [L, B, P, K, Dh] after RoPE;  mask [B, P] bool (False = unused slot);
                  optional start [B] int32 (where the caller puts the queries, read by
                  `decoder.num_prefix_tokens`, not here) and logit_scale, logit_bias [B, P]
                  float32: a prefix slot's attention logit is logit * scale + bias
                  (`attention.Geometry`; absent = 1 and 0).
                  A batch axis of 1 (k, v [L, 1, P, K, Dh], mask [1, P]) is one prefix shared by
                  every row: attention reads it once for all rows and it is never copied B times
                  (less memory; on XLA:CPU the batch-free contraction is slower per row than
                  per-row copies for long prefixes, so the evaluator composes per row).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cas_jax.model.config import ModelConfig
from cas_jax.model.decoder import Decoder

Params = dict[str, Any]
KVCache = dict[str, jax.Array]
Prefix = dict[str, jax.Array]

_NEG = -1e30


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies [Dh/2] with linear or llama3 scaling applied (float64 numpy)."""
    dh = config.head_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, dh, 2, dtype=np.float64) / dh))
    if config.rope_llama3 is not None:
        factor, lo, hi, orig = config.rope_llama3
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > orig / lo, inv / factor, inv)
        smooth = (orig / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < orig / hi) & ~(wavelen > orig / lo)
        inv = np.where(medium, smoothed, scaled)
    return inv / config.rope_linear_factor


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotates x [B, T, N, Dh] by positions [B, T] (HF "rotate_half" layout)."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)[None, None]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    w = weight.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + weight.shape)
    return (xf * w).astype(x.dtype)


def key_visibility(q_pos: jax.Array, k_pos: jax.Array, window: int | None) -> jax.Array:
    """[B, T, S] bool: query at q_pos [B, T] may see key at k_pos [B, S] (causal, no padding)."""
    qp = q_pos[:, :, None]
    kp = k_pos[:, None, :]
    visible = (kp >= 0) & (kp <= qp)
    if window is not None:
        visible &= qp - kp < window
    return visible


def attend(q: jax.Array, blocks: list[tuple]) -> jax.Array:
    """Grouped-query attention over several key/value blocks sharing one softmax.

    q [B, T, H, Dh]; each block is (k, v [B or 1, S_i, K, Dh], visible [B or 1, T, S_i]) or
    that plus (logit_scale, logit_bias [B or 1, S_i]), which reshape the block's logits as
    logit * scale + bias -> [B, T, H, Dh] (a block with batch 1 is shared by every row).
    Blocks (prefix, cache, new tokens) are never concatenated: only their scores are, which are
    small, so a long cache is read once and not copied. Softmax in float32; rows with no visible
    key give a uniform average (never NaN).
    """
    b, t, h, dh = q.shape
    kh = blocks[0][0].shape[2]
    g = h // kh
    # Queries as [B, K, T*G, Dh]: every (kv head) is one plain matmul over T*G query rows,
    # 2-3x faster on XLA:CPU than contracting with separate t and g axes. A block with batch 1
    # shared by B > 1 rows is contracted without a batch axis (no broadcast copy of its keys).
    q = q.reshape(b, t, kh, g, dh).transpose(0, 2, 1, 3, 4).reshape(b, kh, t * g, dh)

    def shared(x):
        return x.shape[0] == 1 and b > 1

    scores = []
    for k, _, visible, *affine in blocks:
        k = k.astype(q.dtype)
        s = (jnp.einsum("bkqd,skd->bkqs", q, k[0], preferred_element_type=jnp.float32)
             if shared(k) else
             jnp.einsum("bkqd,bskd->bkqs", q, k, preferred_element_type=jnp.float32))
        s = s.reshape(b, kh, t, g, k.shape[1]) * (1.0 / math.sqrt(dh))
        if affine:
            scale, bias = affine
            s = s * scale[:, None, None, None, :] + bias[:, None, None, None, :]
        scores.append(jnp.where(visible[:, None, :, None, :], s, _NEG))
    probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)
    probs = probs.reshape(b, kh, t * g, probs.shape[-1])
    out = 0
    start = 0
    for k, v, *_ in blocks:
        p = probs[..., start:start + k.shape[1]].astype(q.dtype)
        v = v.astype(q.dtype)
        out = out + (jnp.einsum("bkqs,skd->bkqd", p, v[0], preferred_element_type=jnp.float32)
                     if shared(v) else
                     jnp.einsum("bkqs,bskd->bkqd", p, v, preferred_element_type=jnp.float32))
        start += k.shape[1]
    out = out.astype(q.dtype).reshape(b, kh, t, g, dh).transpose(0, 2, 1, 3, 4)
    return out.reshape(b, t, h, dh)


def linear(x, w, b=None):
    """x [B, T, D] @ w [D, F] (+ b [F]) -> [B, T, F]."""
    y = jnp.einsum("btd,df->btf", x, w)
    return y if b is None else y + b[None, None]


def _project(config: ModelConfig, inv_freq, x, positions, lp):
    """A layer's queries [B, T, H, Dh], keys (both after RoPE) and values [B, T, K, Dh]."""
    b, t, _ = x.shape
    h = rms_norm(x, lp["attn_norm"], config.rms_norm_eps)
    q = linear(h, lp["q"], lp.get("q_bias")).reshape(b, t, config.num_heads, config.head_dim)
    k = linear(h, lp["k"], lp.get("k_bias")).reshape(b, t, config.num_kv_heads, config.head_dim)
    v = linear(h, lp["v"], lp.get("v_bias")).reshape(b, t, config.num_kv_heads, config.head_dim)
    if config.qk_norm:
        q = rms_norm(q, lp["q_norm"], config.rms_norm_eps)
        k = rms_norm(k, lp["k_norm"], config.rms_norm_eps)
    return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v


def layer(config: ModelConfig, inv_freq, x, positions, lp, pre, cache_l, cache_pos,
           write_at=None):
    """One decoder layer.

    cache_l: None, or this layer's cache (k, v) [B, S, K, Dh] with cache_pos [B, S] the slots'
    positions. Without `write_at` the cache holds earlier tokens only and the layer returns
    (x_out, (k, v)): this call's keys (after RoPE) and values [B, T, K, Dh], which the caller
    writes into the cache. With `write_at` (a slot index), cache_pos already lists this call's
    positions at that slot: the layer writes its K/V there, attends over the updated cache and
    returns (x_out, updated (k, v) cache).
    """
    b, t, _ = x.shape
    q, k, v = _project(config, inv_freq, x, positions, lp)
    blocks = []
    if pre is not None:
        pk, pv, pmask, *affine = pre
        blocks.append((pk, pv, jnp.broadcast_to(pmask[:, None, :],
                                                (pmask.shape[0], t, pmask.shape[1])), *affine))
    if write_at is not None:
        ck, cv = cache_l
        k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, write_at, 0, 0))
        v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, write_at, 0, 0))
        blocks.append((k, v, key_visibility(positions, cache_pos, config.sliding_window)))
    else:
        if cache_l is not None:
            ck, cv = cache_l
            blocks.append((ck, cv, key_visibility(positions, cache_pos, config.sliding_window)))
        blocks.append((k, v, key_visibility(positions, positions, config.sliding_window)))
    attn = attend(q, blocks)
    attn = attn.reshape(b, t, config.num_heads * config.head_dim)
    x = x + linear(attn, lp["o"], lp.get("o_bias"))

    h = rms_norm(x, lp["mlp_norm"], config.rms_norm_eps)
    gate = jax.nn.silu(linear(h, lp["gate"]))
    x = x + linear(gate * linear(h, lp["up"]), lp["down"])
    return x, (k, v)


def forward(params: Params, tokens: jax.Array, positions: jax.Array,
            kv_cache: KVCache | None = None, prefix: Prefix | None = None, *,
            config: ModelConfig, return_hidden: bool = False, remat: bool = False):
    """Runs the decoder.

    tokens, positions: [B, T] int32 (negative position = padding).
    kv_cache: optional cache (see module doc); the T new tokens' K/V are written at
      `kv_cache["index"]` and the returned cache has index advanced by T.
    prefix: optional K/V placed before every key (cartridges); gradients flow into it.
    Returns (logits [B, T, V] float32, or the final hidden states [B, T, D] if return_hidden,
    and the new KV cache, or when no cache was given a dict {k, v: [L, B, T, K, Dh]} with this
    call's keys (after RoPE) and values).
    """
    inv_freq = rope_inv_freq(config)
    x = params["embed"][tokens]
    if isinstance(params["layers"], (list, tuple)):
        x, new_cache = _layers_unrolled(params["layers"], x, positions, kv_cache, prefix,
                                        config, inv_freq)
        return _head(params, x, new_cache, config, return_hidden)
    index = None if kv_cache is None else kv_cache["index"]
    pre_xs = None if prefix is None else (prefix["k"], prefix["v"]) + tuple(
        jnp.broadcast_to(prefix[name], (config.num_layers,) + prefix[name].shape)
        for name in _prefix_extras(prefix))
    cache_xs = None if kv_cache is None else (kv_cache["k"], kv_cache["v"])
    cache_pos = None if kv_cache is None else kv_cache["pos"]

    def body(x, xs):
        lp, pre, cache_l = xs
        return layer(config, inv_freq, x, positions, lp, pre, cache_l, cache_pos)

    if remat:
        body = jax.checkpoint(body)
    # The cache is read per layer as scan input; only the T new tokens' K/V come out of the
    # scan and are written into the cache once, in place when the caller donates it.
    x, (k_new, v_new) = jax.lax.scan(body, x, (params["layers"], pre_xs, cache_xs))
    if kv_cache is None:
        new_cache = {"k": k_new, "v": v_new}
    else:
        index = kv_cache["index"]
        new_pos = jnp.where(positions >= 0, positions, -1).astype(jnp.int32)
        new_cache = {
            "k": jax.lax.dynamic_update_slice(
                kv_cache["k"], k_new.astype(kv_cache["k"].dtype), (0, 0, index, 0, 0)),
            "v": jax.lax.dynamic_update_slice(
                kv_cache["v"], v_new.astype(kv_cache["v"].dtype), (0, 0, index, 0, 0)),
            "pos": jax.lax.dynamic_update_slice_in_dim(kv_cache["pos"], new_pos, index, axis=1),
            "index": index + tokens.shape[1]}
    return _head(params, x, new_cache, config, return_hidden)


def _prefix_extras(prefix: Prefix) -> tuple[str, ...]:
    """The prefix entries every layer reads besides its k, v: the mask, then the logit
    scale and bias when the prefix has them."""
    return ("mask", "logit_scale", "logit_bias") if "logit_scale" in prefix else ("mask",)


def _head(params, x, new_cache, config, return_hidden):
    """The final norm, then logits unless `return_hidden`; paired with the new cache."""
    x = rms_norm(x, params["final_norm"], config.rms_norm_eps)
    if return_hidden:
        return x, new_cache
    return logits_from_hidden(params, x, config), new_cache


def _layers_unrolled(layers, x, positions, kv_cache, prefix, config, inv_freq):
    """The decoder layers of `forward` on unrolled params (module doc), one Python-level call
    per layer -> (hidden [B, T, D], new cache as `forward` returns it)."""
    if kv_cache is not None and not isinstance(kv_cache["k"], (list, tuple)):
        raise ValueError("forward: unrolled params need an unrolled cache (unroll_layers)")
    if prefix is not None and not isinstance(prefix["k"], (list, tuple)):
        raise ValueError("forward: unrolled params need an unrolled prefix (unroll_layers)")
    new_cache = None
    if kv_cache is not None:
        index = kv_cache["index"]
        new_pos = jnp.where(positions >= 0, positions, -1).astype(jnp.int32)
        cache_pos = jax.lax.dynamic_update_slice_in_dim(kv_cache["pos"], new_pos, index, axis=1)
        new_cache = {"k": [], "v": [], "pos": cache_pos, "index": index + positions.shape[1]}
    news = []
    for i, lp in enumerate(layers):
        pre = None if prefix is None else (prefix["k"][i], prefix["v"][i]) + tuple(
            prefix[name] for name in _prefix_extras(prefix))
        if kv_cache is None:
            x, kv = layer(config, inv_freq, x, positions, lp, pre, None, None)
            news.append(kv)
        else:
            x, (ck, cv) = layer(config, inv_freq, x, positions, lp, pre,
                                 (kv_cache["k"][i], kv_cache["v"][i]), cache_pos, write_at=index)
            new_cache["k"].append(ck)
            new_cache["v"].append(cv)
    if kv_cache is None:
        new_cache = {"k": jnp.stack([k for k, _ in news]), "v": jnp.stack([v for _, v in news])}
    else:
        new_cache["k"], new_cache["v"] = tuple(new_cache["k"]), tuple(new_cache["v"])
    return x, new_cache


def unroll_layers(tree: dict) -> dict:
    """Params, a KV cache or a prefix with its per-layer arrays (stacked on a leading L axis)
    split into tuples of L per-layer arrays: the unrolled form `forward` runs as a Python
    loop (module doc). Other entries (embeddings, cache positions, masks) are kept as they are."""
    if "layers" in tree:
        n = jax.tree.leaves(tree["layers"])[0].shape[0]
        return {**tree, "layers": tuple(jax.tree.map(lambda a, i=i: a[i], tree["layers"])
                                        for i in range(n))}
    return {**tree, "k": tuple(tree["k"]), "v": tuple(tree["v"])}


def logits_from_hidden(params: Params, hidden: jax.Array, config: ModelConfig) -> jax.Array:
    """hidden [..., D] -> float32 logits [..., V] (tied or untied head)."""
    if config.tie_embeddings:
        w = params["embed"]
        return jnp.einsum("...d,vd->...v", hidden, w, preferred_element_type=jnp.float32)
    return jnp.einsum("...d,dv->...v", hidden, params["lm_head"],
                      preferred_element_type=jnp.float32)


def layer_queries(params: Params, tokens: jax.Array, positions: jax.Array, *,
                  config: ModelConfig) -> jax.Array:
    """[L, B, T, H, Dh]: every layer's queries (after RoPE) for tokens [B, T] with no prefix."""
    inv_freq = rope_inv_freq(config)

    def body(x, lp):
        q, _, _ = _project(config, inv_freq, x, positions, lp)
        return layer(config, inv_freq, x, positions, lp, None, None, None)[0], q

    return jax.lax.scan(body, params["embed"][tokens], params["layers"])[1]


def move_keys(keys: jax.Array, delta: jax.Array, config: ModelConfig) -> jax.Array:
    """keys [L, N, K, Dh] after RoPE moved by delta [L, N, K] positions (rotations compose)."""
    n_layers, n, kh, dh = keys.shape
    flat = keys.transpose(0, 2, 1, 3).reshape(n_layers, kh * n, 1, dh)
    out = apply_rope(flat, delta.transpose(0, 2, 1).reshape(n_layers, kh * n),
                     rope_inv_freq(config))
    return out.reshape(n_layers, kh, n, dh).transpose(0, 2, 1, 3)


def init_cache(config: ModelConfig | Decoder, batch: int, size: int, dtype=jnp.float32
               ) -> KVCache:
    """An empty cache of `size` slots per row (for any `Decoder`: it reads the K/V layout)."""
    shape = (config.num_layers, batch, size, config.num_kv_heads, config.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "pos": jnp.full((batch, size), -1, jnp.int32), "index": jnp.zeros((), jnp.int32)}


def param_shapes(config: ModelConfig) -> dict[str, Any]:
    """The params pytree as shape tuples (see module doc)."""
    c = config
    L, D, F = c.num_layers, c.hidden_size, c.intermediate_size
    hq, hk = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    layers = {"attn_norm": (L, D), "mlp_norm": (L, D), "q": (L, D, hq), "k": (L, D, hk),
              "v": (L, D, hk), "o": (L, hq, D), "gate": (L, D, F), "up": (L, D, F),
              "down": (L, F, D)}
    if c.qkv_bias:
        layers.update(q_bias=(L, hq), k_bias=(L, hk), v_bias=(L, hk))
    if c.o_bias:
        layers["o_bias"] = (L, D)
    if c.qk_norm:
        layers.update(q_norm=(L, c.head_dim), k_norm=(L, c.head_dim))
    shapes = {"embed": (c.vocab_size, D), "final_norm": (D,), "layers": layers}
    if not c.tie_embeddings:
        shapes["lm_head"] = (D, c.vocab_size)
    return shapes


def init_params(config: ModelConfig, key: jax.Array, dtype=jnp.float32) -> Params:
    """Random params (normal, std 0.02; norms at 1) for tests and benchmarks."""
    shapes = param_shapes(config)
    leaves, treedef = jax.tree_util.tree_flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(
        shapes, is_leaf=lambda s: isinstance(s, tuple))[0]]
    keys = jax.random.split(key, len(leaves))
    out = []
    for path, shape, k in zip(paths, leaves, keys):
        if "norm" in path:
            out.append(jnp.ones(shape, dtype))
        else:
            out.append((0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


@dataclasses.dataclass(frozen=True)
class LlamaDecoder:
    """cas_jax's own decoder (this module's `forward`) as a `decoder.Decoder`."""

    config: ModelConfig

    num_layers = property(lambda self: self.config.num_layers)
    num_kv_heads = property(lambda self: self.config.num_kv_heads)
    head_dim = property(lambda self: self.config.head_dim)
    vocab_size = property(lambda self: self.config.vocab_size)
    max_position_embeddings = property(lambda self: self.config.max_position_embeddings)

    def forward(self, params, tokens, positions, cache=None, prefix=None, *, remat=False):
        return forward(params, tokens, positions, cache, prefix, config=self.config,
                       return_hidden=True, remat=remat)

    def logits(self, params, hidden):
        return logits_from_hidden(params, hidden, self.config)

    def queries(self, params, tokens, positions):  # decoder.CompressibleKV
        return layer_queries(params, tokens, positions, config=self.config)

    def move_keys(self, keys, delta):  # decoder.CompressibleKV
        return move_keys(keys, delta, self.config)

    def decode_layout(self, params, cache, prefix):
        """The unrolled form (module doc): the sampler's decode loop runs faster on it."""
        return (unroll_layers(params), unroll_layers(cache),
                None if prefix is None else unroll_layers(prefix))


def as_decoder(config: ModelConfig | Decoder) -> Decoder:
    """The decoder a model `config` stands for: cas_jax's own for a ModelConfig, else the
    object itself (any `decoder.Decoder`)."""
    return LlamaDecoder(config) if isinstance(config, ModelConfig) else config


@functools.partial(jax.jit, static_argnames=("config",))
def prefill_kv(params: Params, tokens: jax.Array, positions: jax.Array, *,
               config: ModelConfig | Decoder) -> tuple[jax.Array, jax.Array]:
    """K/V (after RoPE) of `tokens` [B, T]: two arrays [L, B, T, K, Dh] (of any `Decoder`)."""
    _, kv = as_decoder(config).forward(params, tokens, positions)
    return kv["k"], kv["v"]


forward_jit = jax.jit(forward, static_argnames=("config", "return_hidden", "remat"))
"""`forward` jitted with the config (and flags) static."""

prefill_kv_jit = jax.jit(prefill_kv, static_argnames=("config",))
"""`prefill_kv` jitted with the config static."""
