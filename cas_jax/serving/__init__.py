"""Serving: an OpenAI-compatible HTTP server for a model reading cartridges.

Holds the server (`server`), its wire format (`api`), the engines' shared parts (`engine`),
the continuous-batching engine (`continuous`: its jitted `kernels` with per-row sampling
(`row_sampling`), KV `pool` and `prefill`, long prompts in chunks) and the static one
(`static`), the served cartridges (`cartridges`), request messages as prompt tokens (`prompt`)
and text out token by token (`text`).

May import: `cas_jax.model`, `cas_jax.documents`, `cas_jax.cartridges` and the top-level
utilities.
"""
