"""The main job, end to end: self-study -> CAS cartridges -> evaluation table.

  python -m experiments.pipeline            # `make demo`: SmolLM2-135M + 8 Factbook sections

1. synthesise self-study conversations about every document (resumable dataset; by default span
   conversations built from each document's own lines, see `cas_jax.training.spans`);
2. train one cartridge per document jointly with distractor cartridges (CAS), paged through the
   budget manager;
3. write multiple-choice questions from the documents' structured Factbook fields and evaluate
   closed-book, ICL, the oracle cartridge, retrieval-selected cartridges and RAG on them;
   `--baselines` adds naive composition of cartridges trained in isolation.
Every stage resumes from what is already complete in --out. Larger runs are flags away
(--documents, --conversations_per_doc, --steps, --tokens_per_doc); every `PipelineConfig`
setting is a flag (`CONFIG`).
"""

import json
import os
import time

from absl import app, flags

from cas_jax import config_flags
from cas_jax.documents import corpus, retrieval
from cas_jax.evaluation import evaluate, questions as questions_lib
from cas_jax.evaluation.results import format_table, write_report
from cas_jax.model import loading, rendering
from cas_jax.studies import pipeline
from cas_jax.training import distractors, losses
from cas_jax.training.train_collection import GRAD_SCOPES, INITS

# Geography sections of eight test profiles (cas_jax.studies.splits): 414-771-token documents whose
# fields (area, coastline, elevation extremes, land use, ...) the generated questions ask about.
DEMO_DOCUMENTS = tuple(f"{p}-geography" for p in ("ws", "ti", "mj", "ly", "mo", "wa", "ne", "tw"))
FLAGS = flags.FLAGS
flags.DEFINE_string("model", "", "HF folder or GGUF file; empty = embedded SmolLM2-135M-Instruct.")
flags.DEFINE_string("collection", "factbook_sections", "'factbook_sections' (a document per "
                    "profile section), 'factbook' (whole profiles) or a folder of files.")
flags.DEFINE_list("documents", list(DEMO_DOCUMENTS), "Document ids of --collection.")
flags.DEFINE_string("out", "runs/demo", "Output folder (resumed if present).")
flags.DEFINE_integer("questions_per_doc", 6, "Multiple-choice questions per document (a "
                     "geography section holds up to 13 question fields).")
flags.DEFINE_integer("max_new_tokens", 24, "Greedy generation length of the evaluation "
                     "(acc (gen), free match); 0 = no generation.")
flags.DEFINE_bool("show_generation", False, "Show the acc (gen) column (multiple choice by "
                  "greedy generation) in the table; near 0 for every method, ICL included, "
                  "with the 135M default model, so left out by default (results.json holds "
                  "it either way).")
flags.DEFINE_bool("baselines", False, "Also train cartridges in isolation (evaluated as a "
                  "naive composition) and one monolithic cartridge for the collection "
                  "(roughly triples the training time).")
flags.DEFINE_integer("compose_k", 3, "Other cartridges in the composed row (0 = no row).")
CONFIG = config_flags.define(
    pipeline.PipelineConfig(), skip=pipeline.DERIVED,
    names={**{path: name for name, path in pipeline.FLAT.items()},
           "collection.distractors.kind": "schedule"},
    helps={"collection.tokens_per_doc": "Cartridge tokens P per document.",
           "collection.distractors.k_max": "Most distractor cartridges per example.",
           "collection.steps": "CAS training steps.",
           "collection.batch_size": "Conversations per training step.",
           "collection.seq_len": "Training sequence length (tokens).",
           "train.lr": "Adam learning rate.",
           "collection.init": "Cartridge initialisation (train_collection.initialise_store).",
           "seed": "Seed for synthesis, training and questions.",
           "train.geometry": "Composition geometry of the CAS training rows "
                             "(attention.Geometry spec: serial or parallel, optionally "
                             "',temperature=T,scale=S,count_power=C').",
           "collection.read_geometry": "Composition geometry kept in every CAS cartridge and "
                                       "used by evaluation, chat and the server ('none' = "
                                       "--geometry).",
           "collection.distractors.kind": "How CAS training draws k (distractors module doc).",
           "collection.distractors.p_iso": "Mixed schedule: share of rows read alone.",
           "collection.distractors.quiet": "Share of quiet CAS steps (distilled toward the "
                                           "model with no cartridge).",
           "collection.router": "With a routing --geometry (relevance > 0): the retriever "
                                "that routes each composed training row by its "
                                "conversation's first exchange (cas_jax.training.routing)."},
    choices={"collection.init": INITS, "collection.grad_scope": GRAD_SCOPES,
             "collection.router": retrieval.RETRIEVER_KINDS,
             "collection.distractors.kind": distractors.SCHEDULES,
             "synthesis.format": rendering.FORMATS, "train.loss": losses.LOSS_KINDS,
             "train.schedule": ("constant", "cosine")})
"""Every PipelineConfig setting (`DERIVED` aside): the flat names of `pipeline.FLAT` (the
distractor schedule as --schedule), the other section fields by path (`--train.schedule`)."""


def _stage(name: str) -> float:
    print(f"\n== {name} ==", flush=True)
    return time.perf_counter()


def _train_report(r):
    print(f"  step {r.step}/{r.total_steps} loss {r.loss:.4f} {r.tokens_per_s:.0f} tok/s "
          f"io-wait {100 * r.io_wait_share:.1f}% ETA {r.eta_s:.0f}s", flush=True)


def _eval_report(r):
    print(f"  {r.method}: accuracy {r.accuracy:.3f}, {r.prompt_tokens:.0f} prompt tokens/q, "
          f"{r.seconds:.0f}s (+{r.compile_s:.0f}s compiling)", flush=True)


def main(argv):
    del argv
    try:
        cfg = CONFIG.value()
    except config_flags.ConfigError as e:
        raise app.UsageError(str(e)) from e
    out = FLAGS.out
    os.makedirs(out, exist_ok=True)
    t_all = time.perf_counter()
    model = loading.load_model(FLAGS.model or None)
    docs = corpus.load_collection(FLAGS.collection, FLAGS.documents)
    print(f"model {model.path} ({model.config.num_layers} layers); documents "
          f"{', '.join(f'{d} ({docs[d].title})' for d in docs.ids)}", flush=True)

    t = _stage("1. self-study synthesis")
    data_dir = pipeline.synthesize(model, docs, os.path.join(out, "selfstudy"), cfg,
                                   on_batch=lambda p: print(
        f"  {p.conversations_done}/{p.conversations_total} conversations, "
        f"{p.rate()}, ETA {p.eta_s:.0f}s", flush=True))
    print(f"  done in {time.perf_counter() - t:.0f}s", flush=True)

    t = _stage("2. CAS training: per-document cartridges with distractors")
    cas, summary = pipeline.train_cartridges(model, docs, data_dir, os.path.join(out, "cas"), cfg,
                                             on_report=_train_report)
    print(f"  done in {time.perf_counter() - t:.0f}s; {json.dumps(summary)}", flush=True)
    sources = {"cas": pipeline.StoreSource(cas)}
    if FLAGS.baselines:
        t = _stage("2b. baseline: cartridges trained in isolation (naive composition)")
        iso, _ = pipeline.train_cartridges(model, docs, data_dir, os.path.join(out, "isolated"),
                                           cfg, distractors=0, on_report=_train_report)
        sources["naive"] = pipeline.StoreSource(iso)
        print(f"  done in {time.perf_counter() - t:.0f}s", flush=True)
        t = _stage(f"2c. baseline: one monolithic cartridge of {len(docs)} x "
                   f"{cfg.collection.tokens_per_doc} tokens")
        mono, _ = pipeline.train_monolithic(model, docs, data_dir,
                                            os.path.join(out, "monolithic"), cfg,
                                            on_report=_train_report)
        print(f"  done in {time.perf_counter() - t:.0f}s", flush=True)

    t = _stage("3. evaluation")
    qs = questions_lib.generate_factbook_questions(list(docs.ids), FLAGS.questions_per_doc,
                                                   cfg.seed)
    questions_lib.write_questions(os.path.join(out, "questions.jsonl"), qs)
    ev = evaluate.Evaluator(model, docs, evaluate.EvalConfig(max_new_tokens=FLAGS.max_new_tokens,
                                                             geometry=pipeline.read_geometry(cfg)))
    results = pipeline.evaluate_baselines(ev, qs, cfg.top_k, on_result=_eval_report)
    for label, source in sources.items():
        results += pipeline.evaluate_cartridges(ev, qs, source, label, cfg.top_k,
                                                compose_k=FLAGS.compose_k, seed=cfg.seed,
                                                on_result=_eval_report)
    if FLAGS.baselines:
        results.append(pipeline.evaluate_monolithic(ev, qs, pipeline.StoreSource(mono)))
        _eval_report(results[-1])
    md, js = write_report(results, os.path.join(out, "report"), FLAGS.show_generation)
    print(f"  done in {time.perf_counter() - t:.0f}s; report {md}, {js}\n", flush=True)
    print(format_table(results, FLAGS.show_generation))
    print(f"\n{len(qs)} questions on {len(docs)} documents; total "
          f"{time.perf_counter() - t_all:.0f}s")


if __name__ == "__main__":
    app.run(main)
