"""Per-row sampling inside the serving kernels: temperature, top-p, frequency and presence
penalties and the random stream (seed, draw index) are [R] arrays, so one batch mixes them;
greedy rows never pay for a vocabulary sort. Logprobs (and the top ones, when a row asks) are
the model's, before penalties, temperature and top-p, as OpenAI returns them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cas_jax.serving.engine import MAX_TOP_LOGPROBS


def _sample_rows(x, keys, temperature, top_p):
    """x [R, V] f32 -> tokens [R]: greedy where temperature <= 0, else sampled at the row's
    temperature within its top-p nucleus."""
    greedy = jnp.argmax(x, axis=-1).astype(jnp.int32)

    def sampled(_):
        scaled = x / jnp.maximum(temperature, 1e-6)[:, None]

        def nucleus(s):
            order = jnp.argsort(-s, axis=-1)
            srt = jnp.take_along_axis(s, order, axis=-1)
            probs = jax.nn.softmax(srt, axis=-1)
            keep = (jnp.cumsum(probs, axis=-1) - probs < top_p[:, None]) | (top_p[:, None] >= 1)
            rows = jnp.arange(s.shape[0])[:, None]
            return jnp.full_like(s, -jnp.inf).at[rows, order].set(jnp.where(keep, srt, -jnp.inf))

        scaled = jax.lax.cond(jnp.any((top_p < 1) & (temperature > 0)), nucleus,
                              lambda s: s, scaled)
        drawn = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
        return jnp.where(temperature > 0, drawn, greedy)

    return jax.lax.cond(jnp.any(temperature > 0), sampled, lambda _: greedy, None)


def choose(logits, counts, rows):
    """Next tokens of logits [R, V] for `rows` = (temperature, top_p, frequency, presence
    [R] f32, seed [R] uint32, draw [R] int32, want_top [] bool) -> (tokens [R], logprob [R],
    top ids [R, MAX_TOP_LOGPROBS], top logprobs [R, MAX_TOP_LOGPROBS]); logprobs are the
    model's, before penalties, temperature and top-p."""
    temperature, top_p, freq, pres, seed, draw, want_top = rows
    logp = jax.nn.log_softmax(logits, axis=-1)

    def penalize(x):
        c = counts.astype(x.dtype)
        return x - freq[:, None] * c - pres[:, None] * (counts > 0).astype(x.dtype)

    x = jax.lax.cond(jnp.any((freq != 0) | (pres != 0)), penalize, lambda x: x, logits)
    keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.PRNGKey(s), i))(seed, draw)
    tokens = _sample_rows(x, keys, temperature, top_p)
    lp = jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
    k = MAX_TOP_LOGPROBS
    top_lp, top_ids = jax.lax.cond(
        want_top, lambda: tuple(jax.lax.top_k(logp, k)),
        lambda: (jnp.zeros((logp.shape[0], k), logp.dtype), jnp.zeros((logp.shape[0], k),
                                                                      jnp.int32)))
    return tokens, lp, top_ids.astype(jnp.int32), top_lp


def row_arrays(n: int) -> dict[str, np.ndarray]:
    """Host arrays of per-row sampling values, for `choose` (idle rows: greedy, no penalty)."""
    return {"temperature": np.zeros(n, np.float32), "top_p": np.ones(n, np.float32),
            "frequency": np.zeros(n, np.float32), "presence": np.zeros(n, np.float32),
            "seed": np.zeros(n, np.uint32), "draw": np.zeros(n, np.int32)}


def rows_tuple(arrays: dict[str, np.ndarray], want_top: bool) -> tuple:
    """`choose`'s `rows` argument from `row_arrays`' arrays and whether any row wants top
    logprobs."""
    return (arrays["temperature"], arrays["top_p"], arrays["frequency"], arrays["presence"],
            arrays["seed"], arrays["draw"], np.bool_(want_top))
