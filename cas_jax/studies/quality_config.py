"""The quality study's settings as one nested config, `QualityConfig`: `benchmarks.quality`
defines its flags from it (`cas_jax.config_flags`), and `resolve` turns it into what the stages
of `cas_jax.studies.study_runs` read once the material (how many documents) is known.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from cas_jax.studies.pipeline import PipelineConfig
from cas_jax.studies.study import StudyConfig
from cas_jax.studies.study_runs import CollectionRecipe, epoch_steps, steps_for
from cas_jax.training import synthesis

FREE_ANSWER_TOKENS = 24
"""Greedy generation length when the questions include free answers (`max_new_tokens` -1)."""


@dataclasses.dataclass(frozen=True)
class QualityConfig:
    """A quality study: its material (`split`, `profiles`, `sections`, `kinds`:
    `study_runs.factbook_questions`), the study's config with the isolated cartridges' recipe
    (`study`), and the collection methods' recipe (`cas_recipe`, run when `cas` is set).

    Sizes that follow from the material are left open until `resolve`: `study.pipeline.steps`
    0 trains the isolated cartridges `epochs` passes over the training conversations;
    `cas_recipe.steps` 0 trains the CAS cartridges `cas_epochs` passes (0: as many steps as
    the isolated ones); `study.eval_every` -1 records a curve point once per epoch;
    `study.max_new_tokens` -1 generates `FREE_ANSWER_TOKENS` when `kinds` has free answers and
    nothing otherwise (multiple choice is scored by option log-likelihood).

    Defaults: the recorded recipe (BUILD_NOTES.md, `benchmarks/results/CLAIMS.md`): span
    conversations, P=64, 6 epochs (chosen on dev), 319 multiple-choice questions on the
    Geography sections of 26 test profiles."""

    study: StudyConfig = StudyConfig(PipelineConfig(distractors=0, steps=0), heldout_per_doc=2,
                                     eval_every=-1, max_new_tokens=-1)
    cas_recipe: CollectionRecipe = CollectionRecipe(steps=0)
    split: Literal["dev", "test"] = "test"
    profiles: int = 26
    sections: tuple[str, ...] = ("geography",)
    kinds: tuple[str, ...] = ("mc",)
    epochs: float = 6.0
    cas: bool = False
    cas_epochs: float = 0.0


def resolve(config: QualityConfig, n_docs: int
            ) -> tuple[StudyConfig, CollectionRecipe | None]:
    """The study's config and collection recipe (None without `cas`) as the stages read them,
    for a study of `n_docs` documents (the sizes the class doc leaves open)."""
    s, p = config.study, config.study.pipeline
    one_epoch = epoch_steps(n_docs, p.conversations_per_doc, p.batch)
    steps = p.steps or steps_for(config.epochs, one_epoch)
    generate = FREE_ANSWER_TOKENS if "free" in config.kinds else 0
    cfg = dataclasses.replace(
        s, pipeline=dataclasses.replace(p, steps=steps),
        eval_every=one_epoch if s.eval_every < 0 else s.eval_every,
        max_new_tokens=generate if s.max_new_tokens < 0 else s.max_new_tokens)
    if not config.cas:
        return cfg, None
    r = config.cas_recipe
    cas_steps = r.steps or (steps_for(config.cas_epochs, one_epoch) if config.cas_epochs
                            else steps)
    return cfg, dataclasses.replace(r, steps=cas_steps)


def family_weights(spec: str) -> tuple[float, ...]:
    """Self-study family weights (`synthesis.FAMILIES` order) from "family=weight" pairs, comma
    separated ("spans=1,question=1"); unlisted families get 0. Raises ValueError naming
    unknown families."""
    pairs = dict(p.partition("=")[::2] for p in spec.split(",") if p)
    bad = sorted(f for f in pairs if f not in synthesis.FAMILIES)
    if bad:
        raise ValueError(f"unknown families {bad}; expected {synthesis.FAMILIES}")
    return tuple(float(pairs.get(f, 0.0)) for f in synthesis.FAMILIES)
