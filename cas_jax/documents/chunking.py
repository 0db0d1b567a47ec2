"""Token spans inside one document: random chunks for self-study, a partition for RAG.

Pure functions over a document's token count; the caller tokenizes and slices
`tokens[start:end]`. Spans are half-open `[start, end)` token offsets and never leave the
document they were drawn for, so a chunk never crosses a document boundary.
"""

from __future__ import annotations

import numpy as np


def sample_chunk(num_tokens: int, rng: np.random.Generator, min_len: int = 512,
                 max_len: int = 1024) -> tuple[int, int]:
    """A random span `(start, end)` of a `num_tokens`-token document.

    Its length is drawn uniformly from `[min_len, max_len]` (both inclusive); a document no
    longer than that length is returned whole, `(0, num_tokens)`. The start is uniform over
    the positions where the span fits. Defaults follow the Cartridges self-study reference
    (512-1024 tokens).
    """
    _check_count("num_tokens", num_tokens, minimum=1)
    _check_count("min_len", min_len, minimum=1)
    _check_count("max_len", max_len, minimum=1)
    if min_len > max_len:
        raise ValueError(f"min_len ({min_len}) must be <= max_len ({max_len})")
    length = int(rng.integers(min_len, max_len + 1))
    if length >= num_tokens:
        return 0, num_tokens
    start = int(rng.integers(0, num_tokens - length + 1))
    return start, start + length


def split_chunks(num_tokens: int, chunk_len: int) -> list[tuple[int, int]]:
    """Contiguous spans of `chunk_len` tokens covering `[0, num_tokens)`; the last may be shorter.

    An empty document (`num_tokens == 0`) has no chunks.
    """
    _check_count("num_tokens", num_tokens, minimum=0)
    _check_count("chunk_len", chunk_len, minimum=1)
    return [(start, min(start + chunk_len, num_tokens)) for start in range(0, num_tokens, chunk_len)]


def _check_count(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int token count, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
