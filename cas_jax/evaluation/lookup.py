"""What the evaluator looks up in a collection: its retrievers, its RAG chunks and the
document scores that relevance routing biases composed cartridges by.

Everything is built on first use and kept for the collection's lifetime: a retriever per
(kind, what it indexes), the chunks once, and each question's scores against every document
once per router, so the composed sets and retrieval rows of one study share one search.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cas_jax.documents import chunking
from cas_jax.documents.corpus import Collection
from cas_jax.evaluation import retrieval
from cas_jax.evaluation.questions import Question

INDEXES = ("docs", "chunks")


class CollectionIndex:
    """Retrieval over `collection`: whole documents ("docs") or `chunk_tokens`-token chunks
    ("chunks", ids "doc_id#i"), with BM25 or dense retrievers (`retrieval.make_retriever`;
    dense embeddings cached under `cache_dir` when given)."""

    def __init__(self, collection: Collection, tokenizer, chunk_tokens: int,
                 cache_dir: str | None = None):
        self.collection = collection
        self.tokenizer = tokenizer
        self.chunk_tokens = chunk_tokens
        self.cache_dir = cache_dir
        self._retrievers: dict[tuple[str, str], retrieval.Retriever] = {}
        self._chunks: dict[str, tuple[str, str]] | None = None
        self._doc_scores: dict[tuple[str, str], dict[str, float]] = {}

    def retriever(self, kind: str, over: str) -> retrieval.Retriever:
        if over not in INDEXES:
            raise ValueError(f"a retriever indexes one of {INDEXES}, not {over!r}")
        if (kind, over) not in self._retrievers:
            texts = (self.collection.texts if over == "docs"
                     else {i: text for i, (_, text) in self.chunks().items()})
            self._retrievers[kind, over] = retrieval.make_retriever(
                kind, texts, cache_dir=self.cache_dir)
        return self._retrievers[kind, over]

    def chunks(self) -> dict[str, tuple[str, str]]:
        """chunk id "doc_id#i" -> (document title, chunk text), `chunk_tokens` tokens each."""
        if self._chunks is None:
            self._chunks = {}
            for doc_id, doc in self.collection.items():
                ids = self.tokenizer.encode(doc.text, add_special_tokens=False)
                for i, (s, e) in enumerate(chunking.split_chunks(len(ids), self.chunk_tokens)):
                    self._chunks[f"{doc_id}#{i}"] = (doc.title, self.tokenizer.decode(ids[s:e]))
        return self._chunks

    def doc_scores(self, router: str, question: str) -> dict[str, float]:
        """Every document's `router` score for the question text (searched once, then kept)."""
        if (router, question) not in self._doc_scores:
            index = self.retriever(router, "docs")
            self._doc_scores[router, question] = dict(
                index.search(question, len(self.collection)))
        return self._doc_scores[router, question]

    def relevance_biases(self, relevance: float, router: str, questions: Sequence[Question],
                         entries: list[list[str]]) -> list[list[float]]:
        """Per question, its composed documents' logit biases under relevance r:
        -r * (best - score) / (best - worst) of the router's scores of the question against
        the documents (0 for the best, -r for the worst; 0 for all when they tie)."""
        out = []
        for q, e in zip(questions, entries):
            scores = self.doc_scores(router, q.question)
            s = np.asarray([scores[d] for d in e], np.float64)
            spread = s.max() - s.min() if len(s) else 0.0
            out.append([0.0] * len(e) if spread <= 0
                       else (-relevance * (s.max() - s) / spread).tolist())
        return out
