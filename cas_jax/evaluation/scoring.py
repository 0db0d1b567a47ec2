"""Batched forwards of the frozen model for evaluation: scoring continuations, greedy answers,
and prefilling contexts into exact K/V.

Rows go through one jitted forward in buckets: row count `rows_per_call` (fewer when the
prefix is long, to bound memory), token length rounded by `sampling.bucket`, padding at
position -1. Prefixes come from a `CartridgeBank` with a fixed slot count per row, so which and
how many cartridges a row uses changes values, not shapes, and never recompiles.

The model runs through `decoder.Decoder`: `LoadedModel.config` may be any Decoder (its
`params` then its own pytree); the tokenizer is read only to decode generated answers.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cas_jax import progress
from cas_jax.cartridges import attention
from cas_jax.cartridges.cartridge import Cartridge, CartridgeMeta
from cas_jax.model import decoder as decoder_lib, llama as model_lib, sampling, tokenizer as tok_lib
from cas_jax.model.loading import LoadedModel


@functools.partial(jax.jit, static_argnames=("config", "num_targets", "geometry"))
def _score_rows(params, bank, selection, selected, bias, tokens, lengths, starts, *,
                config, num_targets: int, geometry: attention.Geometry):
    """Log-probabilities [B, num_targets] of tokens[b, starts[b]:lengths[b]] (0 past the end).

    tokens [B, T] right-padded; lengths, starts [B]; the prefix is compose(bank, selection
    [B, C], selected [B, C], geometry, bias [B, C] or None) (none when bank is None) and
    positions start where the geometry puts them.
    """
    b, t = tokens.shape
    prefix = None if bank is None else attention.compose(bank, selection, selected, geometry,
                                                         bias)
    n_prefix = attention.num_prefix_tokens(prefix, b)
    idx = jnp.arange(t)[None, :]
    positions = jnp.where(idx < lengths[:, None], n_prefix[:, None] + idx, -1)
    decoder = model_lib.as_decoder(config)
    hidden, _ = decoder.forward(params, tokens, positions, None, prefix)
    target_idx = starts[:, None] + jnp.arange(num_targets)[None, :]
    h = jnp.take_along_axis(hidden, jnp.clip(target_idx - 1, 0, t - 1)[..., None], axis=1)
    logp = jax.nn.log_softmax(decoder.logits(params, h), axis=-1)
    targets = jnp.take_along_axis(tokens, jnp.clip(target_idx, 0, t - 1), axis=1)
    lp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.where(target_idx < lengths[:, None], lp, 0.0)


@functools.partial(jax.jit, static_argnames=("config", "visible"), donate_argnames=("cache",))
def _prefill_step(params, tokens, positions, cache, *, config, visible: int):
    """Writes the K/V of tokens [B, c] (positions [B, c], -1 = padding) into the cache.

    Only the first `visible` cache slots (which must cover every key these tokens may see)
    enter the attention, so early chunks of a long context do not pay for the empty tail.
    """
    head = {"k": cache["k"][:, :, :visible], "v": cache["v"][:, :, :visible],
            "pos": cache["pos"][:, :visible], "index": cache["index"]}
    _, head = model_lib.as_decoder(config).forward(params, tokens, positions, head)
    return {"k": cache["k"].at[:, :, :visible].set(head["k"]),
            "v": cache["v"].at[:, :, :visible].set(head["v"]),
            "pos": cache["pos"].at[:, :visible].set(head["pos"]), "index": head["index"]}


def _visible_slots(end: int, size: int, chunk: int) -> int:
    """Cache slots a chunk ending at slot `end` attends over: `end` rounded up to chunk times
    a power of two (few distinct shapes, at most 2x the slots needed), capped at `size`."""
    return min(size, chunk * (1 << (-(-end // chunk) - 1).bit_length()))


def _rows_per_call(rows_per_call: int, prefix_slots: int, prefix_tokens_per_call: int) -> int:
    """Rows per forward: `rows_per_call`, halved until rows * prefix slots fit the cap."""
    b = rows_per_call
    while b > 1 and b * prefix_slots > prefix_tokens_per_call:
        b //= 2
    return b


def _rows(x: np.ndarray | None, rows: list[int]) -> jax.Array | None:
    return None if x is None else jnp.asarray(x[rows])


def score_continuations(model: LoadedModel, prompts: Sequence[list[int]],
                        continuations: Sequence[list[int]], *,
                        bank: attention.CartridgeBank | None = None,
                        selections: Sequence[Sequence[int]] | None = None, slots: int = 1,
                        rows_per_call: int = 16, prefix_tokens_per_call: int = 32768,
                        geometry: attention.Geometry = attention.DEFAULT_GEOMETRY,
                        biases: Sequence[Sequence[float]] | None = None) -> list[np.ndarray]:
    """Per row, the log-probabilities [len(continuation)] of `continuation` after `prompt`.

    With a bank, row i's prefix composes the bank slots `selections[i]` (at most `slots`) by
    `geometry`, which also says where its prompt positions start; `biases[i]` (one per
    selected cartridge) are added to their attention logits (`attention.compose`).
    """
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    n = len(prompts)
    if bank is None:
        sel = on = bias = None
        b = rows_per_call
    else:
        sel, on, bias = attention.selection_arrays(selections, slots, biases)
        b = _rows_per_call(rows_per_call, slots * bank.max_tokens, prefix_tokens_per_call)
    order = sorted(range(n), key=lambda i: len(prompts[i]) + len(continuations[i]))
    out: list[np.ndarray] = [np.zeros(0, np.float32)] * n
    pbar = progress.bar(n, "scoring", "row")
    for start in range(0, n, b):
        rows = order[start:start + b]
        t = sampling.bucket(max(len(prompts[i]) + len(continuations[i]) for i in rows))
        tc = sampling.bucket(max(len(continuations[i]) for i in rows), minimum=8)
        tokens = np.zeros((b, t), np.int32)
        lengths = np.zeros((b,), np.int32)
        starts = np.ones((b,), np.int32)
        for r, i in enumerate(rows):
            if not prompts[i] or not continuations[i]:
                raise ValueError(f"row {i}: prompt and continuation need at least one token")
            seq = list(prompts[i]) + list(continuations[i])
            tokens[r, :len(seq)] = seq
            lengths[r], starts[r] = len(seq), len(prompts[i])
        pad = [rows[0]] * (b - len(rows))
        lp = _score_rows(model.params, bank, _rows(sel, rows + pad), _rows(on, rows + pad),
                         _rows(bias, rows + pad), jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(starts),
                         config=model.config, num_targets=tc, geometry=geometry)
        lp = np.asarray(lp)
        for r, i in enumerate(rows):
            out[i] = lp[r, :len(continuations[i])]
        pbar.update(len(rows))
    pbar.close()
    return out


# One fused gather instead of eager gather + transpose.
_compose = jax.jit(attention.compose, static_argnames=("geometry",))


def generate_answers(model: LoadedModel, prompts: Sequence[list[int]], max_new_tokens: int, *,
                     bank: attention.CartridgeBank | None = None,
                     selections: Sequence[Sequence[int]] | None = None, slots: int = 1,
                     rows_per_call: int = 16, prefix_tokens_per_call: int = 32768,
                     geometry: attention.Geometry = attention.DEFAULT_GEOMETRY,
                     biases: Sequence[Sequence[float]] | None = None) -> list[str]:
    """Greedy replies (decoded, up to the end of turn) to `prompts`, batched as in
    `score_continuations` (cartridges composed by `geometry`, `biases` as there); every call
    gets the same row count, so shapes repeat."""
    stops = tuple(tok_lib.stop_token_ids(model.tokenizer))
    params = sampling.SamplingParams(max_new_tokens=max_new_tokens, stop_ids=stops)
    n = len(prompts)
    if bank is None:
        b = rows_per_call
    else:
        sel, on, bias = attention.selection_arrays(selections, slots, biases)
        b = _rows_per_call(rows_per_call, slots * bank.max_tokens, prefix_tokens_per_call)
    texts = []
    pbar = progress.bar(n, "generating", "answer")
    for start in range(0, n, b):
        rows = list(range(start, min(start + b, n)))
        rows += [rows[-1]] * (b - len(rows))
        prefix = None if bank is None else _compose(bank, _rows(sel, rows), _rows(on, rows),
                                                    geometry=geometry,
                                                    cartridge_bias=_rows(bias, rows))
        out = sampling.generate(model.params, model.config, [prompts[i] for i in rows], params,
                                prefix=prefix)
        for r in range(min(b, n - start)):
            ids = [t for t in out[r] if t not in stops]
            texts.append(model.tokenizer.decode(ids, skip_special_tokens=True).strip())
        pbar.update(min(b, n - start))
    pbar.close()
    return texts


def prefill_contexts(model: LoadedModel, contexts: Sequence[list[int]], names: Sequence[str],
                     chunk_tokens: int = 512, prefix_tokens_per_call: int = 32768,
                     rows_per_call: int = 16) -> list[Cartridge]:
    """The exact K/V of each context's tokens (positions 0..n-1) as a Cartridge named `names[i]`.

    Rows of similar length are prefilled together (shortest first, each call padded to its
    longest), `chunk_tokens` at a time through a KV cache, so attention
    memory is chunk x cache rather than n x n; each chunk attends over the cache slots up to
    its end only (`_visible_slots`), which for a long context about halves attention's work.
    """
    cfg = model.config
    out: list[Cartridge | None] = [None] * len(contexts)
    # Shortest first, each group padded to its own longest: similar lengths share a call.
    order = sorted(range(len(contexts)), key=lambda i: len(contexts[i]))
    start = 0
    pbar = progress.bar(sum(map(len, contexts)), "prefilling contexts", "tok")
    while start < len(order):
        s = -(-sampling.bucket(len(contexts[order[start]])) // chunk_tokens) * chunk_tokens
        b = max(1, min(rows_per_call, prefix_tokens_per_call // s))
        group = order[start:start + b]
        s = -(-sampling.bucket(len(contexts[group[-1]])) // chunk_tokens) * chunk_tokens
        group = group[:max(1, min(b, prefix_tokens_per_call // s))]
        rows = [contexts[i] for i in group]
        tokens, positions = sampling.right_pad(rows, s)
        cache = model_lib.init_cache(cfg, len(rows), s, decoder_lib.kv_dtype(model.params))
        for c0 in range(0, s, chunk_tokens):
            cache = _prefill_step(model.params, jnp.asarray(tokens[:, c0:c0 + chunk_tokens]),
                                  jnp.asarray(positions[:, c0:c0 + chunk_tokens]), cache,
                                  config=cfg,
                                  visible=_visible_slots(c0 + chunk_tokens, s, chunk_tokens))
        k, v = np.asarray(cache["k"]), np.asarray(cache["v"])
        for r, i in enumerate(group):
            meta = CartridgeMeta(model.fingerprint, doc_id=names[i], num_frozen=0)
            out[i] = Cartridge(keys=k[:, r, :len(contexts[i])], values=v[:, r, :len(contexts[i])],
                               meta=meta)
        start += len(group)
        pbar.update(sum(len(contexts[i]) for i in group))
    pbar.close()
    return out
