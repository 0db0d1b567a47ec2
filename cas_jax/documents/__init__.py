"""Documents: collections with stable ids (a folder of files, the CIA World Factbook;
`corpus`) and the token spans inside one document (`chunking`: self-study chunks, RAG's
partition).

May import: nothing else of cas_jax.
"""
