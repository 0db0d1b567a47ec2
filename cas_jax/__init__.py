"""cas_jax: Cartridges and Cartridges at Scale in JAX. See README.md for the public API."""
