"""Training cartridges: self-study data and the two trainers.

Holds the losses (`losses`), self-study synthesis (`synthesis`, its teacher `teacher`, `spans`)
and its data report (`selfstudy_data`), the dataset on disk and its pipeline (`dataset`),
distractor mixing (`distractors`), hooks that observe a trainer (`hooks`), the
single-cartridge trainer (`train`) and the collection trainer (`train_collection`) with its
parts: step planning (`collection_plan`), paging (`collection_paging`), the jitted step
(`collection_step`), the crash-safe commit protocol (`pending_store`), reporting
(`collection_report`) and the cartridges at step 0 (`collection_init`).

May import: `cas_jax.model`, `cas_jax.documents`, `cas_jax.cartridges` and the top-level
utilities (`cas_jax.distributed`, `cas_jax.progress`, `cas_jax.config_flags`).
"""
