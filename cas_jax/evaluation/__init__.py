"""Evaluation: questions and how a method answers them.

Holds the Factbook questions (`questions`), one prompt and answer reading for every method
(`prompts`), the batched forwards of the frozen model (`scoring`), the retrievers, RAG chunks
and routers an evaluator keeps for its collection (`lookup`, over
`cas_jax.documents.retrieval`), a method's metrics (`results`) and the evaluation of a
question file under closed book, ICL, RAG and cartridges (`evaluate`).

May import: `cas_jax.model`, `cas_jax.documents`, `cas_jax.cartridges` and the top-level
utilities.
"""
