"""The quality study: closed book, ICL, RAG and trained oracle cartridges on held-out questions.

  python -m benchmarks.quality                      # the default study (test profiles)
  python -m benchmarks.quality --split=dev --profiles=4 --out=runs/quality_dev   # tuning
  benchmarks/cas_claims.sh   # --epochs=3 --cas ... --reuse=REC --reuse_eval=REC,CAS_REC

Documents are `factbook_sections` sections (--sections) of the first --profiles profiles of
the --split (`cas_jax.studies.splits`: tune on dev, report on test). Questions: every Factbook
question field of those profiles, multiple choice and free answer, addressed to the section
holding the field. Stages resume from --out (`cas_jax.studies.study_runs`): self-study (+ a
held-out set), baselines, cartridge training with a learning curve, report (report.md,
report.json, curve.png). Evaluations recorded by other studies of the same questions are
reused from --reuse (those that read no cartridges) and --reuse_eval (all, where their stamps
match). Every setting of `cas_jax.studies.quality_config.QualityConfig` is a flag (`define_flags`).
Last line: `icl_gap=X recovered_acc=Y recovered_nll=Z compression=C`.
"""

import dataclasses
import functools

from absl import app, flags

from cas_jax import config_flags
from cas_jax.documents import retrieval
from cas_jax.model import loading, rendering
from cas_jax.studies import pipeline, quality_config, study_runs
from cas_jax.training import distractors, losses, synthesis
from cas_jax.training.train_collection import GRAD_SCOPES, INITS

P = "study.pipeline."
NO_FLAG = (*pipeline.DERIVED, "collection.distractors", "collection.grad_scope", "top_k",
           "synthesis.family_weights")
"""Pipeline fields with no flag: the derived ones, the isolated cartridges' distractor settings
(they have none; the CAS cartridges' are --cas_*), the pipeline's retrieval k (--rag_top_k is
the study's) and the family weights (--family_weights, "family=weight" pairs)."""
SKIP = tuple(P + path for path in NO_FLAG)

NAMES = {**{P + path: name for name, path in pipeline.FLAT.items()
            if not any(path == s or path.startswith(s + ".") for s in NO_FLAG)},
         P + "collection.tokens_per_doc": "tokens",
         **{f"cas_recipe.{f}": f"cas_{f}" for f in ("steps", "distractors", "schedule",
                                                   "ramp_steps", "grad_scope", "p_iso",
                                                   "quiet", "naive")}}
"""Flag names: the pipeline's flat names (`pipeline.FLAT`, --tokens for P), its other fields
by path (--train.schedule), the study's fields by name (--heldout_per_doc), and the
collection recipe's as --cas_* (but --monolithic, --compose_k, --positions, --positions_k,
--retrieval_k, --retrievers)."""
SECTIONS = {"study": "", "study.pipeline": "", "cas_recipe": ""}

HELPS = {
    "split": "Profiles to draw documents from.",
    "profiles": "Profiles (from the start of the split); the default gives 319 multiple-choice "
                "questions on 26 Geography sections (up to 13 fields each).",
    "sections": "Section slugs to use as documents (those holding question fields: geography, "
                "government, people_and_society, communications, transportation).",
    "kinds": "Question kinds (mc, free). Free answers are scored by greedy generation, which "
             "the 135M model rarely gets verbatim, so the default study uses multiple choice "
             "(accuracy and gold NLL).",
    P + "conversations_per_doc": "Training conversations per document.",
    "study.heldout_per_doc": "Held-out conversations per document (other seed).",
    P + "synthesis.span_turns": "Exchanges per span conversation.",
    P + "synthesis.chunk_min": "Shortest self-study chunk (tokens).",
    P + "synthesis.chunk_max": "Longest self-study chunk (tokens).",
    P + "synthesis.max_user_tokens": "Most tokens of a generated user turn.",
    P + "synthesis.max_answer_tokens": "Most tokens of a generated answer.",
    P + "synthesis.no_repeat_ngram_size": "Agents' no-repeat n-gram size (0 = off).",
    P + "synthesis.repetition_penalty": "Agents' repetition penalty (1 = off).",
    P + "synthesis_batch": "Conversations generated together.",
    P + "collection.tokens_per_doc": "Cartridge tokens P per document.",
    P + "collection.init": "Cartridge initialisation (train_collection.initialise_store).",
    P + "collection.steps": "Training steps (all documents together, in isolation); 0 = "
                            "--epochs passes over the training conversations.",
    "epochs": "Passes over the training conversations when --steps=0 (chosen on dev, "
              "benchmarks/results/dev_epochs: the best of 3-6 epochs, accuracy "
              "0.663/0.760/0.760/0.779).",
    P + "collection.batch_size": "Conversations per step.",
    P + "collection.seq_len": "Training sequence length.",
    P + "train.lr": "Adam learning rate.",
    "study.eval_every": "Learning-curve interval in steps (0 = start and end, -1 = once per "
                        "epoch).",
    "study.max_new_tokens": "Greedy generation length (free-answer match, and multiple choice "
                            "by generation). -1: 24 when --kinds has free answers, else 0 "
                            "(multiple choice is scored by option log-likelihood without it).",
    "study.rag_top_k": "RAG chunks per question.",
    P + "seed": "Seed of questions, synthesis and training.",
    P + "train.geometry": "Composition geometry of the training rows "
                          "(attention.Geometry: serial, parallel, optionally "
                          "',temperature=T,scale=S,count_power=C,relevance=R,...'; a routing "
                          "one routes each row by --collection.router).",
    P + "collection.read_geometry": "Composition geometry the cartridges are read by "
                                    "(evaluation; kept in each CAS cartridge); 'none' = the "
                                    "training one. Recorded rows read under serial (results/"
                                    "quality_cas*) are reused only with 'serial' here.",
    P + "collection.router": "With a routing --geometry (relevance > 0): the "
                             "retriever that routes each composed training row by its "
                             "conversation's first exchange (cas_jax.training.routing).",
    "cas": "Also the collection methods (issue 12, `cas_jax.studies.cas_study`): CAS oracle "
           "and composed, naive composed, monolithic, retrieval + CAS, RAG.",
    "cas_epochs": "CAS training length in epochs of the self-study data (0: --epochs, the "
                  "isolated cartridges' length).",
    "cas_recipe.steps": "CAS training steps (0: from --cas_epochs).",
    "cas_recipe.naive": "With --cas: also the naive composition rows (they read the isolated "
                        "cartridges, trained first if they are not).",
    "cas_recipe.distractors": "k_max of CAS training.",
    "cas_recipe.schedule": "How CAS training draws k: per step (fixed, uniform, ramp) or per "
                           "row (mixed: alone with probability --cas_p_iso, else k ~ "
                           "U{1..k_max}).",
    "cas_recipe.p_iso": "Mixed schedule: share of rows read alone.",
    "cas_recipe.quiet": "Share of quiet CAS steps: rows read only other documents' cartridges "
                        "and are distilled toward the model with none.",
    "cas_recipe.ramp_steps": "Steps for the 'ramp' schedule to reach k_max.",
    "cas_recipe.grad_scope": "CAS training: which active cartridges get updates.",
    "cas_recipe.compose_k": "Other cartridges composed with the true one.",
    "cas_recipe.positions": "Where the true cartridge stands among --positions_k others.",
    "cas_recipe.positions_k": "Composition size of the position comparison.",
    "cas_recipe.retrieval_k": "k of retrieval + CAS and of RAG.",
    "cas_recipe.retrievers": "Retrievers of retrieval + CAS and RAG.",
    "cas_recipe.monolithic": "With --cas: also train and evaluate the monolithic baseline "
                             "(n_docs x P tokens; slow: its prefix is the whole budget).",
}
CHOICES = {P + "collection.init": INITS, P + "collection.router": retrieval.RETRIEVER_KINDS,
           P + "synthesis.format": rendering.FORMATS, P + "train.loss": losses.LOSS_KINDS, P + "train.schedule": ("constant", "cosine"),
           "cas_recipe.schedule": distractors.SCHEDULES, "cas_recipe.grad_scope": GRAD_SCOPES}


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> config_flags.ConfigFlags:
    """Defines the launcher's flags in `flag_values`: one per `QualityConfig` field (NAMES,
    SKIP), and the run's folders, model and family weights. Returns what builds the config
    back (`config`)."""
    def string(name, default, text):
        flags.DEFINE_string(name, default, text, flag_values=flag_values)

    string("out", "runs/quality", "Output folder (resumed if present).")
    string("model", "", "HF folder or GGUF file; empty = embedded SmolLM2-135M-Instruct.")
    string("family_weights", "spans=1", "Self-study family weights as family=weight pairs; "
           f"unlisted families get 0. Families: {','.join(synthesis.FAMILIES)}.")
    string("reuse", "", "Another study folder (same questions) whose held-out data and "
           "baseline results this run reuses, and its self-study data too when the synthesis "
           "flags are the same (ablations).")
    flags.DEFINE_list("reuse_eval", [], "Recorded study folders (or eval/<method>.json files) "
                      "of the same questions whose evaluations this run reuses, in this order, "
                      "when --out has none: each is recorded into --out/eval with its stamp "
                      "checked (a result read from cartridges trained otherwise is an error); "
                      "with the isolated oracle comes its study's curve.jsonl.",
                      flag_values=flag_values)
    return config_flags.define(quality_config.QualityConfig(), names=NAMES, sections=SECTIONS,
                               helps=HELPS, choices=CHOICES, skip=SKIP,
                               flag_values=flag_values)


def config(flag_set: config_flags.ConfigFlags) -> quality_config.QualityConfig:
    """The parsed `QualityConfig`, --family_weights in place. Raises app.UsageError naming
    the flags a config refuses."""
    try:
        cfg = flag_set.value()
        weights = quality_config.family_weights(flag_set.flag_values.family_weights)
    except config_flags.ConfigError as e:
        raise app.UsageError(str(e)) from e
    except ValueError as e:
        raise app.UsageError(f"--family_weights: {e}") from e
    return dataclasses.replace(cfg, study=dataclasses.replace(
        cfg.study, pipeline=dataclasses.replace(cfg.study.pipeline, family_weights=weights)))


def main(argv, flag_set: config_flags.ConfigFlags):
    del argv
    cfg, fv = config(flag_set), flag_set.flag_values
    model = loading.load_model(fv.model or None)
    profiles, qs, docs = study_runs.factbook_questions(cfg.split, cfg.profiles, cfg.sections,
                                                       cfg.kinds, cfg.study.pipeline.seed)
    study_cfg, recipe = quality_config.resolve(cfg, len(docs))
    run = study_runs.QualityRun(
        out=fv.out, config=study_cfg, questions=qs, docs=docs, profiles=profiles,
        kinds=cfg.kinds, split=cfg.split, record=fv.flag_values_dict(), reuse=fv.reuse,
        collection=recipe, reuse_eval=tuple(fv.reuse_eval))
    try:
        study_runs.run_quality_study(model, run)
    except study_runs.ReuseError as e:
        raise app.UsageError(f"--reuse/--reuse_eval: {e}") from e


if __name__ == "__main__":
    app.run(functools.partial(main, flag_set=define_flags()))
