from __future__ import annotations

import numpy as np
import pytest

from cas_jax.documents.chunking import sample_chunk, split_chunks


def test_sample_chunk_spans_inside_document_and_within_length_bounds():
    rng = np.random.default_rng(0)
    lengths, starts = set(), set()
    for _ in range(500):
        start, end = sample_chunk(5000, rng, min_len=512, max_len=1024)
        assert 0 <= start < end <= 5000
        assert 512 <= end - start <= 1024
        lengths.add(end - start)
        starts.add(start)
    assert min(lengths) < 600 and max(lengths) > 950  # the whole length range is drawn
    assert len(starts) > 100


def test_sample_chunk_reaches_both_document_ends():
    rng = np.random.default_rng(1)
    spans = [sample_chunk(20, rng, min_len=4, max_len=4) for _ in range(400)]
    assert {s for s, _ in spans} == set(range(17))
    assert max(e for _, e in spans) == 20


def test_short_document_is_returned_whole():
    rng = np.random.default_rng(0)
    assert sample_chunk(300, rng) == (0, 300)
    assert sample_chunk(1, rng, min_len=1, max_len=1) == (0, 1)


def test_sample_chunk_is_reproducible_with_seed():
    a = [sample_chunk(10_000, np.random.default_rng(7)) for _ in range(3)]
    b = [sample_chunk(10_000, np.random.default_rng(7)) for _ in range(3)]
    assert a == b


@pytest.mark.parametrize("kwargs, error", [
    (dict(num_tokens=0), ValueError),
    (dict(num_tokens=100, min_len=0), ValueError),
    (dict(num_tokens=100, min_len=20, max_len=10), ValueError),
    (dict(num_tokens=100.0), TypeError),
    (dict(num_tokens=True), TypeError),
])
def test_sample_chunk_rejects_bad_arguments(kwargs, error):
    with pytest.raises(error, match="num_tokens|min_len|max_len"):
        sample_chunk(rng=np.random.default_rng(0), **kwargs)


def test_split_chunks_is_a_contiguous_partition():
    spans = split_chunks(1000, 300)
    assert spans == [(0, 300), (300, 600), (600, 900), (900, 1000)]
    assert split_chunks(600, 300) == [(0, 300), (300, 600)]
    assert split_chunks(5, 300) == [(0, 5)]
    assert split_chunks(0, 300) == []


def test_split_chunks_rejects_bad_arguments():
    with pytest.raises(ValueError, match="chunk_len"):
        split_chunks(100, 0)
    with pytest.raises(ValueError, match="num_tokens"):
        split_chunks(-1, 10)
