"""What the evaluator looks up in a collection: its retrievers, its RAG chunks and the
document scores that relevance routing biases composed cartridges by.

Everything is built on first use and kept for the collection's lifetime: a retriever per
(kind, what it indexes), the chunks once, and each question's scores against every document
once per router, so the composed sets and retrieval rows of one study share one search.
"""

from __future__ import annotations

from collections.abc import Sequence

from cas_jax.documents import chunking
from cas_jax.documents.corpus import Collection
from cas_jax.documents import retrieval
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
        self._routers: dict[str, retrieval.Router] = {}

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

    def router(self, kind: str) -> retrieval.Router:
        """The `kind` router over the documents (each question searched once, then kept)."""
        if kind not in self._routers:
            self._routers[kind] = retrieval.Router(  # a study's questions: keep them all
                self.retriever(kind, "docs"), self.collection.ids, keep=None)
        return self._routers[kind]

    def relevance_biases(self, relevance: float, router: str, questions: Sequence[Question],
                         entries: list[list[str]], floor: float = 0.0) -> list[list[float]]:
        """Per question, its composed documents' logit biases under relevance r and floor f
        (`retrieval.relevance_biases` of the router's scores for the question text)."""
        route = self.router(router)
        return [route.biases(q.question, e, relevance, floor)
                for q, e in zip(questions, entries)]
