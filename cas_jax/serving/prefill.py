"""Prompts into K/V for the continuous engine (`serving_continuous`).

A prompt of up to `ServeConfig.prefill_chunk` tokens is prefilled in one call, together with up
to prefill_rows - 1 others of its prompt bucket (`prefill_group`). A longer one is prefilled in
chunks of prefill_chunk tokens, one chunk per engine iteration, so the running rows decode
between its chunks (`LongPrefill`): each chunk attends to the request's composed cartridges
(under the engine's geometry, as a whole prompt does) and to the earlier chunks' K/V, which
wait in a buffer of the request's own until its last chunk. The last chunk gives the first
token; the whole prompt's K/V then goes into a pool row as a short prompt's does. A buffer has
a power-of-two number of slots (`Shapes.buffer`) and every chunk the same C tokens, so the chunk
kernel compiles once per buffer bucket and cartridge presence, and whole prompts only up to
prefill_chunk tokens: the prompt shapes stay few. Chunked and whole prefill differ only in the
order of float sums (the softmax also runs over the buffer's empty slots, which weigh 0).
"""

from __future__ import annotations

import jax
import numpy as np

from cas_jax.serving.kernels import CHUNK, Kernels
from cas_jax.serving.row_sampling import row_arrays, rows_tuple
from cas_jax.serving.pool import Job, Shapes


def row_values(rows: list[tuple[int, Job]], n: int) -> dict[str, np.ndarray]:
    """Per-row sampling arrays [n] with each (row, job)'s values."""
    arrays = row_arrays(n)
    for r, job in rows:
        p = job.params
        arrays["temperature"][r], arrays["top_p"][r] = p.temperature, p.top_p
        arrays["frequency"][r], arrays["presence"][r] = p.frequency_penalty, p.presence_penalty
        arrays["seed"][r], arrays["draw"][r] = job.seed, len(job.tokens)
    return arrays


def prefill_group(kernels: Kernels, shapes: Shapes, jobs: list[Job], prefill, n: int,
                  composed: list[dict]) -> tuple:
    """Keys and values of the jobs' prompts (one prompt bucket; padded to the call's n rows by
    repeating the last): per row, its pieces [L, CHUNK, K, Dh]; and their first tokens,
    logprobs and top alternatives (host arrays)."""
    t = shapes.prompt(len(jobs[0].prompt))
    tokens = np.zeros((n, t), np.int32)
    positions = np.full((n, t), -1, np.int32)
    last = np.zeros((n,), np.int32)
    for i, job in enumerate(jobs):
        m = len(job.prompt)
        tokens[i, :m] = job.prompt
        positions[i, :m] = job.start + np.arange(m)
        last[i] = m - 1
    padded = composed + composed[-1:] * (n - len(jobs))
    rows = row_values(list(enumerate(jobs)), n)
    k, v, *first = prefill(
        kernels.params, tokens, positions, tuple(padded) if jobs[0].infos else None,
        last, rows_tuple(rows, any(j.params.top_logprobs for j in jobs)))
    return k, v, *jax.device_get(first)


class LongPrefill:
    """A prompt longer than prefill_chunk, prefilled chunk by chunk (module doc); `composed`
    is its cartridges' prefix (one row of `attention.compose`)."""

    def __init__(self, kernels: Kernels, shapes: Shapes, job: Job, composed: dict):
        self.job, self.composed, self.params = job, composed, kernels.params
        self.key = shapes.chunk_key(job)
        self.size = shapes.chunk
        self.buffer: dict | None = kernels.empty_buffer(self.key[2])
        self.done_tokens = 0
        self.keys: list[tuple] = []  # each chunk's C / CHUNK pieces [L, CHUNK, K, Dh]
        self.values: list[tuple] = []
        self.first: tuple | None = None  # token, logprob, top ids, top logprobs, once done

    @property
    def done(self) -> bool:
        return self.first is not None

    def run(self, chunk) -> None:
        """Prefills the next chunk with `chunk`, the compiled kernel of `key`."""
        job, c, at = self.job, self.size, self.done_tokens
        part = job.prompt[at:at + c]
        tokens = np.zeros((1, c), np.int32)
        positions = np.full((1, c), -1, np.int32)
        tokens[0, :len(part)] = part
        positions[0, :len(part)] = job.start + at + np.arange(len(part))
        rows = rows_tuple(row_values([(0, job)], 1), bool(job.params.top_logprobs))
        self.buffer, k, v, *first = chunk(
            self.params, self.buffer, self.composed if job.infos else None, tokens, positions,
            np.int32(at), np.int32(len(part) - 1), rows)
        self.keys.append(k)
        self.values.append(v)
        self.done_tokens += len(part)
        if self.done_tokens == len(job.prompt):
            self.buffer = None
            self.first = tuple(a[0] for a in jax.device_get(first))

    def piece(self, c: int) -> tuple[jax.Array, jax.Array]:
        """Keys, values [L, CHUNK, K, Dh] of the prompt's tokens c*CHUNK .. (`Pool.place`)."""
        per = self.size // CHUNK
        return self.keys[c // per][c % per], self.values[c // per][c % per]
