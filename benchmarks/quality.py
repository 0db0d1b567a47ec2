"""The quality study: closed book, ICL, RAG and trained oracle cartridges on held-out questions.

  python -m benchmarks.quality                      # the default study (test profiles)
  python -m benchmarks.quality --split=dev --profiles=4 --out=runs/quality_dev   # tuning

Documents are `factbook_sections` sections (--sections) of the first --profiles profiles of
the --split (`cas_jax.studies.splits`: tune on dev, report on test). Questions: every Factbook
question field of those profiles, multiple choice and free answer, addressed to the section
holding the field. Stages resume from --out (`cas_jax.studies.study_runs`): self-study (+ a
held-out set), baselines,
cartridge training with a learning curve, report (report.md, report.json, curve.png).
Last line: `icl_gap=X recovered_acc=Y recovered_nll=Z compression=C`.
"""

from absl import app, flags

from cas_jax.cartridges import attention
from cas_jax.model import loading
from cas_jax.studies import pipeline, study, study_runs
from cas_jax.training import synthesis

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "runs/quality", "Output folder (resumed if present).")
flags.DEFINE_string("model", "", "HF folder or GGUF file; empty = embedded SmolLM2-135M-Instruct.")
flags.DEFINE_enum("split", "test", ["dev", "test"], "Profiles to draw documents from.")
flags.DEFINE_integer("profiles", 26, "Profiles (from the start of the split); the default gives "
                     "319 multiple-choice questions on 26 Geography sections (up to 13 fields each).")
flags.DEFINE_list("sections", ["geography"],
                  "Section slugs to use as documents (those holding question fields: geography, "
                  "government, people_and_society, communications, transportation).")
flags.DEFINE_list("kinds", ["mc"], "Question kinds (mc, free). Free answers are scored by "
                  "greedy generation, which the 135M model rarely gets verbatim, so the "
                  "default study uses multiple choice (accuracy and gold NLL).")
flags.DEFINE_integer("conversations_per_doc", 24, "Training conversations per document.")
flags.DEFINE_integer("heldout_per_doc", 2, "Held-out conversations per document (other seed).")
flags.DEFINE_string("family_weights", "spans=1",
                    "Self-study family weights as family=weight pairs; unlisted families get 0. "
                    f"Families: {','.join(synthesis.FAMILIES)}.")
D = pipeline.PipelineConfig()
flags.DEFINE_integer("span_turns", D.span_turns, "Exchanges per span conversation.")
flags.DEFINE_integer("chunk_min", D.chunk_min, "Shortest self-study chunk (tokens).")
flags.DEFINE_integer("chunk_max", D.chunk_max, "Longest self-study chunk (tokens).")
flags.DEFINE_integer("max_user_tokens", D.max_user_tokens, "Most tokens of a generated user turn.")
flags.DEFINE_integer("max_answer_tokens", D.max_answer_tokens, "Most tokens of a generated answer.")
flags.DEFINE_integer("no_repeat_ngram_size", D.no_repeat_ngram_size, "Agents' no-repeat n-gram size (0 = off).")
flags.DEFINE_float("repetition_penalty", 1.0, "Agents' repetition penalty (1 = off).")
flags.DEFINE_integer("synthesis_batch", D.synthesis_batch, "Conversations generated together.")
flags.DEFINE_integer("tokens", D.tokens_per_doc, "Cartridge tokens P per document.")
flags.DEFINE_enum("init", D.init, ["first_tokens", "document_kv"],
                  "Cartridge initialisation (train_collection.initialise_store).")
flags.DEFINE_integer("steps", 0, "Training steps (all documents together, in isolation); "
                     "0 = --epochs passes over the training conversations.")
flags.DEFINE_float("epochs", 6.0, "Passes over the training conversations when --steps=0 "
                   "(chosen on dev, benchmarks/results/dev_epochs: the best of 3-6 epochs, "
                   "accuracy 0.663/0.760/0.760/0.779).")
flags.DEFINE_integer("batch", D.batch, "Conversations per step.")
flags.DEFINE_integer("seq_len", D.seq_len, "Training sequence length.")
flags.DEFINE_float("lr", D.lr, "Adam learning rate.")
flags.DEFINE_integer("eval_every", -1, "Learning-curve interval in steps (0 = start and end, "
                     "-1 = once per epoch).")
flags.DEFINE_integer("max_new_tokens", -1, "Greedy generation length (free-answer match, and "
                     "multiple choice by generation). -1: 24 when --kinds has free answers, else "
                     "0 (multiple choice is scored by option log-likelihood without it).")
flags.DEFINE_integer("rag_top_k", 2, "RAG chunks per question.")
flags.DEFINE_integer("seed", 0, "Seed of questions, synthesis and training.")
flags.DEFINE_string("reuse", "", "Another study folder (same questions) whose held-out data "
                    "and baseline results this run reuses, and its self-study data too when "
                    "the synthesis flags are the same (ablations).")
flags.DEFINE_bool("cas", False, "Also the collection methods (issue 12, "
                  "`cas_jax.studies.cas_study`): CAS oracle and composed, naive composed, "
                  "monolithic, retrieval + CAS, RAG.")
flags.DEFINE_float("cas_epochs", 0.0, "CAS training length in epochs of the self-study data "
                   "(0: --epochs, the isolated cartridges' length).")
flags.DEFINE_bool("cas_naive", True, "With --cas: also the naive composition rows (they read "
                  "the isolated cartridges, trained first if they are not).")
flags.DEFINE_integer("cas_distractors", 3, "k_max of CAS training.")
flags.DEFINE_enum("cas_schedule", "uniform", ["fixed", "uniform", "ramp", "mixed"],
                  "How CAS training draws k: per step (fixed, uniform, ramp) or per row "
                  "(mixed: alone with probability --cas_p_iso, else k ~ U{1..k_max}).")
flags.DEFINE_float("cas_p_iso", 0.0, "Mixed schedule: share of rows read alone.")
flags.DEFINE_float("cas_quiet", 0.0, "Share of quiet CAS steps: rows read only other "
                   "documents' cartridges and are distilled toward the model with none.")
flags.DEFINE_string("geometry", str(attention.DEFAULT_GEOMETRY),
                    "Composition geometry of training and evaluation (attention.Geometry: "
                    "serial, parallel, optionally ',temperature=T,scale=S,count_power=C').")
flags.DEFINE_integer("cas_ramp_steps", 100, "Steps for the 'ramp' schedule to reach k_max.")
flags.DEFINE_enum("cas_grad_scope", "target", ["target", "all"],
                  "CAS training: which active cartridges get updates.")
flags.DEFINE_list("compose_k", ["1", "3", "7"], "Other cartridges composed with the true one.")
flags.DEFINE_list("positions", ["first", "last", "random"],
                  "Where the true cartridge stands among --positions_k others.")
flags.DEFINE_integer("positions_k", 3, "Composition size of the position comparison.")
flags.DEFINE_list("retrieval_k", ["1", "2", "4"], "k of retrieval + CAS and of RAG.")
flags.DEFINE_list("retrievers", ["bm25", "dense"], "Retrievers of retrieval + CAS and RAG.")
flags.DEFINE_bool("monolithic", True, "With --cas: also train and evaluate the monolithic "
                  "baseline (n_docs x P tokens; slow: its prefix is the whole budget).")
def _weights() -> tuple[float, ...]:
    pairs = dict(p.partition("=")[::2] for p in FLAGS.family_weights.split(",") if p)
    bad = sorted(f for f in pairs if f not in synthesis.FAMILIES)
    if bad:
        raise app.UsageError(f"--family_weights: unknown families {bad}; expected "
                             f"{synthesis.FAMILIES}")
    return tuple(float(pairs.get(f, 0.0)) for f in synthesis.FAMILIES)


def _geometry() -> attention.Geometry:
    try:
        return attention.Geometry.parse(FLAGS.geometry)
    except ValueError as e:
        raise app.UsageError(f"--geometry: {e}")


def _generation_tokens() -> int:
    if FLAGS.max_new_tokens >= 0:
        return FLAGS.max_new_tokens
    return 24 if "free" in FLAGS.kinds else 0


def _collection(one_epoch: int, steps: int) -> study_runs.CollectionRecipe | None:
    if not FLAGS.cas:
        return None
    return study_runs.CollectionRecipe(
        steps=study_runs.steps_for(FLAGS.cas_epochs, one_epoch) if FLAGS.cas_epochs else steps,
        distractors=FLAGS.cas_distractors, schedule=FLAGS.cas_schedule,
        ramp_steps=FLAGS.cas_ramp_steps, grad_scope=FLAGS.cas_grad_scope, p_iso=FLAGS.cas_p_iso,
        quiet=FLAGS.cas_quiet, naive=FLAGS.cas_naive, monolithic=FLAGS.monolithic,
        compose_k=tuple(int(k) for k in FLAGS.compose_k), positions=tuple(FLAGS.positions),
        positions_k=FLAGS.positions_k, retrieval_k=tuple(int(k) for k in FLAGS.retrieval_k),
        retrievers=tuple(FLAGS.retrievers))


def main(argv):
    del argv
    model = loading.load_model(FLAGS.model or None)
    profiles, qs, docs = study_runs.factbook_questions(FLAGS.split, FLAGS.profiles,
                                                       FLAGS.sections, FLAGS.kinds, FLAGS.seed)
    one_epoch = study_runs.epoch_steps(len(docs), FLAGS.conversations_per_doc, FLAGS.batch)
    steps = FLAGS.steps or study_runs.steps_for(FLAGS.epochs, one_epoch)
    cfg = study.StudyConfig(pipeline.PipelineConfig(
        conversations_per_doc=FLAGS.conversations_per_doc, chunk_min=FLAGS.chunk_min,
        chunk_max=FLAGS.chunk_max, max_user_tokens=FLAGS.max_user_tokens,
        max_answer_tokens=FLAGS.max_answer_tokens, synthesis_batch=FLAGS.synthesis_batch,
        tokens_per_doc=FLAGS.tokens, distractors=0, steps=steps, batch=FLAGS.batch,
        seq_len=FLAGS.seq_len, lr=FLAGS.lr, seed=FLAGS.seed, family_weights=_weights(),
        span_turns=FLAGS.span_turns, no_repeat_ngram_size=FLAGS.no_repeat_ngram_size,
        repetition_penalty=FLAGS.repetition_penalty, init=FLAGS.init,
        geometry=_geometry()),
        heldout_per_doc=FLAGS.heldout_per_doc,
        eval_every=one_epoch if FLAGS.eval_every < 0 else FLAGS.eval_every,
        max_new_tokens=_generation_tokens(), rag_top_k=FLAGS.rag_top_k)
    run = study_runs.QualityRun(
        out=FLAGS.out, config=cfg, questions=qs, docs=docs, profiles=profiles,
        kinds=tuple(FLAGS.kinds), split=FLAGS.split, record=FLAGS.flag_values_dict(),
        reuse=FLAGS.reuse, collection=_collection(one_epoch, steps))
    try:
        study_runs.run_quality_study(model, run)
    except study_runs.ReuseError as e:
        raise app.UsageError(f"--reuse={e}") from e


if __name__ == "__main__":
    app.run(main)
