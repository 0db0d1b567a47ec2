"""Evaluation: questions and how a method answers them.

Holds the Factbook questions (`questions`), one prompt and answer reading for every method
(`prompts`), the batched forwards of the frozen model (`scoring`), retrieval for RAG and for
choosing cartridges (`retrieval`), the retrievers, RAG chunks and routing scores an evaluator
keeps for its collection (`lookup`), a method's metrics (`results`) and the evaluation of a
question file under closed book, ICL, RAG and cartridges (`evaluate`).

May import: `cas_jax.model`, `cas_jax.documents`, `cas_jax.cartridges` and the top-level
utilities.
"""
