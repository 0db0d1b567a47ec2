"""Batched, jitted generation with a preallocated KV cache.

Prompts are LEFT-padded to a common length so every row writes its next token into the same
cache slot; padding tokens get position -1 (never attended). A row's first prompt token has
position n_prefix[b] (the number of valid prefix tokens of that row), so generation continues
after any cartridges in `prefix`.

To avoid recompiling for every new shape, the prompt length, the batch size, the cache size and
the output length are rounded up to buckets (`bucket`); temperature, top-p, the real number of new
tokens, the stop ids and the repetition controls (`SamplingParams`) are traced values.

Repetition controls count only the tokens generated in this call, never the prompt or the
prefix: in self-study the prompt/prefix holds the document chunk, and the model must stay free
to quote it.

The model runs through `decoder.Decoder`: `config` is a ModelConfig (cas_jax's own decoder) or
any other Decoder, whose params are then its own pytree.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cas_jax.model import decoder as decoder_lib, llama as model_lib
from cas_jax.model.config import ModelConfig
from cas_jax.model.decoder import Decoder

MAX_STOP_IDS = 8
MAX_NGRAM = 8  # largest no_repeat_ngram_size; the n-gram ban is traced up to this n


def bucket(n: int, minimum: int = 16) -> int:
    """Rounds n up to a power of two (at least `minimum`) up to 256, past that to a multiple of
    256: few distinct shapes, and at most 1.5x padding once shapes are large enough to matter."""
    n = max(n, minimum)
    if n > 256:
        return -(-n // 256) * 256
    return 1 << (n - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_p 1.0 disables nucleus filtering.

    Repetition controls (applied to the logits before temperature, top-p and greedy argmax) see
    only the tokens generated so far in this call, not the prompt or the prefix:
      repetition_penalty: > 0; a generated token's logit is divided by it if positive, multiplied
        by it otherwise (transformers). 1.0 disables it.
      frequency_penalty, presence_penalty: logit -= frequency_penalty * count + presence_penalty
        * (count > 0), count = times the token was generated (OpenAI). 0.0 disables them.
      no_repeat_ngram_size: n in [0, MAX_NGRAM]; a token that would complete an n-gram already
        generated is banned (transformers). 0 disables it.
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    stop_ids: tuple[int, ...] = ()
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    no_repeat_ngram_size: int = 0


def sample_logits(logits: jax.Array, rng: jax.Array, temperature: jax.Array, top_p: jax.Array
                  ) -> jax.Array:
    """logits [B, V] -> token ids [B]. Greedy where temperature <= 0, else sampling at that
    temperature, restricted to the top-p nucleus when top_p < 1.

    Branches with `lax.cond`, so greedy decoding never pays for the vocabulary sort (hundreds of
    ms per step at batch 16 on CPU).
    """
    def greedy(_):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def full(_):
        scaled = logits / jnp.maximum(temperature, 1e-6)
        return jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)

    def nucleus(_):
        scaled = logits / jnp.maximum(temperature, 1e-6)
        order = jnp.argsort(-scaled, axis=-1)
        sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        sorted_logits = jnp.where(mass_before < top_p, sorted_logits, -jnp.inf)
        choice = jax.random.categorical(rng, sorted_logits, axis=-1)
        return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)

    def sample(_):
        return jax.lax.cond(top_p < 1.0, nucleus, full, None)

    return jax.lax.cond(temperature > 0, sample, greedy, None)


def penalize_logits(logits: jax.Array, counts: jax.Array, out: jax.Array, step: jax.Array,
                    penalties: tuple[jax.Array, ...]) -> jax.Array:
    """logits [B, V] f32 -> logits with the repetition controls applied.

    counts [B, V] int32: times each token was generated so far; out [B, N] int32: generated
    tokens, out[:, :step] valid; penalties: (repetition, frequency, presence) f32 scalars and
    no_repeat_ngram_size int32 scalar (`SamplingParams`). Each control sits behind a `lax.cond`,
    so at its neutral value it costs nothing but the predicate.
    """
    rep, freq, pres, ngram = penalties

    def count_penalties(x):
        seen = counts > 0
        x = jnp.where(seen, jnp.where(x > 0, x / rep, x * rep), x)
        return x - freq * counts.astype(x.dtype) - pres * seen.astype(x.dtype)

    def ban_ngrams(x):
        # Row b bans out[b, j] (j < step) when the n-1 tokens before j equal the last n-1
        # generated tokens, out[b, step-n+1 .. step-1].
        j = jnp.arange(out.shape[1])[None]
        match = jnp.broadcast_to(j < step, out.shape)
        for d in range(1, MAX_NGRAM):
            before_j = jnp.roll(out, d, axis=1)  # [:, j] = out[:, j - d], valid for j >= d
            last = jax.lax.dynamic_slice_in_dim(out, jnp.maximum(step - d, 0), 1, axis=1)
            match &= (d >= ngram) | ((j >= d) & (before_j == last))
        rows = jnp.broadcast_to(jnp.arange(out.shape[0])[:, None], out.shape)
        banned = jnp.where(match, out, x.shape[1])  # out-of-range index: dropped
        return x.at[rows, banned].set(-jnp.inf, mode="drop")

    active = (rep != 1.0) | (freq != 0.0) | (pres != 0.0)
    logits = jax.lax.cond(active, count_penalties, lambda x: x, logits)
    return jax.lax.cond(ngram > 0, ban_ngrams, lambda x: x, logits)


@functools.partial(jax.jit, static_argnames=("config", "cache_size", "out_len"),
                   donate_argnames=())
def _generate(params, tokens, positions, prefix, rng, temperature, top_p, max_new, stop_ids,
              penalties, *, config: ModelConfig | Decoder, cache_size: int, out_len: int):
    """tokens/positions [B, Tp] left-padded; penalties as in `penalize_logits`; returns (new
    tokens [B, out_len], lengths [B])."""
    b = tokens.shape[0]
    decoder = model_lib.as_decoder(config)
    dtype = decoder_lib.kv_dtype(params)
    # Prefill without the (empty) cache, so its attention spans the prompt only, then write
    # the prompt's K/V into slots [0, Tp) of a fresh cache.
    # Only the last position's logits are needed: [B, Tp, V] would dwarf everything else.
    hidden, kv = decoder.forward(params, tokens, positions, None, prefix)
    last_logits = decoder.logits(params, hidden[:, -1])
    cache = model_lib.init_cache(config, b, cache_size, dtype)
    cache = {"k": cache["k"].at[:, :, :tokens.shape[1]].set(kv["k"].astype(dtype)),
             "v": cache["v"].at[:, :, :tokens.shape[1]].set(kv["v"].astype(dtype)),
             "pos": cache["pos"].at[:, :tokens.shape[1]].set(jnp.maximum(positions, -1)),
             "index": jnp.int32(tokens.shape[1])}
    last_pos = jnp.max(positions, axis=1)
    rows = jnp.arange(b)
    counts = jnp.zeros(last_logits.shape, jnp.int32)
    out = jnp.zeros((b, out_len), jnp.int32)
    rng, sub = jax.random.split(rng)
    # Nothing generated yet: the controls are applied for consistency but change nothing.
    first = sample_logits(penalize_logits(last_logits, counts, out, jnp.int32(0), penalties),
                          sub, temperature, top_p)

    def is_stop(tok):
        return jnp.any(tok[:, None] == stop_ids[None, :], axis=1)

    # The decode loop runs on the decoder's decode layout, made once here, outside the loop
    # (cas_jax's own: the layers unrolled, model doc).
    if hasattr(decoder, "decode_layout"):
        params, cache, prefix = decoder.decode_layout(params, cache, prefix)
    out = out.at[:, 0].set(first)
    counts = counts.at[rows, first].add(1)
    done = is_stop(first) | (max_new <= 1)
    lengths = jnp.ones((b,), jnp.int32)

    def cond(state):
        step, _, _, _, _, done, _, _ = state
        return (step < jnp.minimum(max_new, out_len)) & ~jnp.all(done)

    def body(state):
        step, cache, out, counts, tok, done, lengths, rng = state
        pos = (last_pos + step)[:, None]
        hidden, cache = decoder.forward(params, tok[:, None], pos, cache, prefix)
        logits = penalize_logits(decoder.logits(params, hidden)[:, 0], counts, out, step,
                                 penalties)
        rng, sub = jax.random.split(rng)
        nxt = sample_logits(logits, sub, temperature, top_p)
        nxt = jnp.where(done, 0, nxt)
        out = out.at[:, step].set(nxt)
        counts = counts.at[rows, nxt].add((~done).astype(jnp.int32))
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | is_stop(nxt)
        return step + 1, cache, out, counts, nxt, done, lengths, rng

    state = (jnp.int32(1), cache, out, counts, first, done, lengths, rng)
    _, _, out, _, _, _, lengths, _ = jax.lax.while_loop(cond, body, state)
    return out, lengths


def compiled_programs() -> int:
    """How many programs the jitted generation has compiled so far (one per bucketed shape,
    config and prefix layout): what a caller checks to see that a change of values did not
    recompile."""
    return _generate._cache_size()


def left_pad(prompts: list[list[int]], length: int, n_prefix: np.ndarray, pad_id: int = 0
             ) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads prompts to `length`; positions count from n_prefix[b], padding gets -1."""
    b = len(prompts)
    tokens = np.full((b, length), pad_id, np.int32)
    positions = np.full((b, length), -1, np.int32)
    for i, p in enumerate(prompts):
        n = len(p)
        tokens[i, length - n:] = p
        positions[i, length - n:] = n_prefix[i] + np.arange(n)
    return tokens, positions


def right_pad(rows: Sequence[Sequence[int]], length: int, batch: int | None = None,
              starts: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads token rows to [batch (default len(rows)), length] with token 0; row i's
    positions count from starts[i] (default 0), padding (and extra rows) gets -1."""
    tokens = np.zeros((batch or len(rows), length), np.int32)
    positions = np.full(tokens.shape, -1, np.int32)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
        positions[i, :len(r)] = (0 if starts is None else starts[i]) + np.arange(len(r))
    return tokens, positions


def _pad_rows(x, rows: int, axis: int = 0):
    """x with its last row (along `axis`) repeated until it has `rows` rows."""
    pad = rows - x.shape[axis]
    if pad == 0:
        return x
    last = jax.lax.slice_in_dim(x, x.shape[axis] - 1, x.shape[axis], axis=axis)
    return jnp.concatenate([x, jnp.repeat(last, pad, axis=axis)], axis=axis)


def generate(params, config: ModelConfig | Decoder, prompts: list[list[int]],
             sampling: SamplingParams = SamplingParams(), *, prefix=None, seed: int = 0
             ) -> list[list[int]]:
    """Generates a continuation for each prompt (lists of token ids), batched.

    prefix: optional {k, v: [L, B, P, K, Dh], mask: [B, P]} placed before every row's prompt
      (e.g. `attention.compose` of cartridges); a batch axis of 1 shares one prefix among all
      rows without copying it. Returns, per row, the new tokens up to and
      including the first stop id (or max_new_tokens of them).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    if not 0 <= sampling.no_repeat_ngram_size <= MAX_NGRAM:
        raise ValueError(f"generate: no_repeat_ngram_size must be in [0, {MAX_NGRAM}], got "
                         f"{sampling.no_repeat_ngram_size}")
    if sampling.repetition_penalty <= 0:
        raise ValueError(f"generate: repetition_penalty must be > 0, got "
                         f"{sampling.repetition_penalty}")
    b = len(prompts)
    b_pad = bucket(b, minimum=1)
    tp = bucket(max(len(p) for p in prompts))
    out_len = bucket(sampling.max_new_tokens)
    prefix_len = 0 if prefix is None else prefix["mask"].shape[1]
    cache_size = bucket(tp + out_len)
    if tp + out_len + prefix_len > config.max_position_embeddings:
        raise ValueError(f"generate: prompt ({tp}) + new tokens ({out_len}) + prefix "
                         f"({prefix_len}) exceed the model window "
                         f"{config.max_position_embeddings}")
    shared = prefix is not None and prefix["mask"].shape[0] == 1
    n_prefix = (np.zeros(b, np.int32) if prefix is None
                else np.asarray(decoder_lib.num_prefix_tokens(prefix, prefix["mask"].shape[0])))
    n_prefix = np.repeat(n_prefix, b) if shared else n_prefix[:b]
    rows = list(prompts) + [prompts[-1]] * (b_pad - b)
    n_prefix = np.concatenate([n_prefix, np.repeat(n_prefix[-1:], b_pad - b)])
    tokens, positions = left_pad(rows, tp, n_prefix)
    if prefix is not None and not shared:  # _pad_rows leaves full batches untouched
        prefix = {name: _pad_rows(a, b_pad, axis=1 if name in ("k", "v") else 0)
                  for name, a in prefix.items()}
    stops = list(sampling.stop_ids)[:MAX_STOP_IDS]
    stop_arr = np.full((MAX_STOP_IDS,), -1, np.int32)
    stop_arr[:len(stops)] = stops
    out, lengths = _generate(
        params, jnp.asarray(tokens), jnp.asarray(positions), prefix, jax.random.PRNGKey(seed),
        jnp.float32(sampling.temperature), jnp.float32(sampling.top_p),
        jnp.int32(sampling.max_new_tokens), jnp.asarray(stop_arr),
        (jnp.float32(sampling.repetition_penalty), jnp.float32(sampling.frequency_penalty),
         jnp.float32(sampling.presence_penalty), jnp.int32(sampling.no_repeat_ngram_size)),
        config=config, cache_size=cache_size, out_len=out_len)
    out, lengths = np.asarray(out), np.asarray(lengths)
    return [out[i, :lengths[i]].tolist() for i in range(b)]
