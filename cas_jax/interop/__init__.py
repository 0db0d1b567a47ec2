"""Cartridges in and out of other projects' files: the PyTorch reference and Tokasaurus
(`reference_format`), Hugging Face PEFT (`peft_format`), a vLLM prefix (`vllm_format`), what
they share (`common`), and the library functions that convert and move cartridges between
those files and cas_jax stores (`convert`).

May import: `cas_jax.model`, `cas_jax.cartridges`, `cas_jax.training` (the optimizer state
the collection trainer resumes from) and the top-level utilities.
"""
