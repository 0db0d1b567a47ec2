"""Documents: collections with stable ids (a folder of files, the CIA World Factbook;
`corpus`), the token spans inside one document (`chunking`: self-study chunks, RAG's
partition) and retrieval over texts (`retrieval`: BM25 and dense retrievers, and the router
that scores a composed set's documents for relevance routing).

May import: the top-level utilities.
"""
