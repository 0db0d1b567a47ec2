"""Studies: the measurements the project reports, built from every other part.

Holds the quality study (`study`: do trained cartridges recover ICL's gain; `study_runs`: its
stages end to end; `fields`: accuracy by question field), the collection methods of Cartridges at Scale (`cas_study`), how well
cartridges compose (`composition`), the end-to-end stages shared with `experiments.pipeline`
(`pipeline`) and the fixed dev/test split of the Factbook profiles (`splits`).

May import: any other subpackage (`model`, `documents`, `cartridges`, `training`,
`evaluation`, `interop`) and the top-level utilities; not `cas_jax.serving`.
"""
