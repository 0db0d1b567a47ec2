"""Cartridges: trained KV-cache prefixes, and everything that holds, stores or composes them.

Holds the pytree (`cartridge`), composing a set of them into one attention prefix (`attention`:
`Geometry`, `CartridgeBank`, `compose`), one cartridge on disk (`files`), a store of many
(`store`), the budget manager that pages them between a store and devices (`budget`) and
initialisation from the document's own compressed KV (`kv_compression`).

May import: `cas_jax.model`.
"""
