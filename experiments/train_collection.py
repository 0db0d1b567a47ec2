"""Trains one cartridge per document of a collection with dynamic distractor mixing (CAS).

  python -m experiments.train_collection --data runs/selfstudy --store runs/cas_store \
      --collection factbook --tokens_per_doc 128 --distractors 3 --budget_bytes 200000000

--data is a self-study dataset (experiments.synthesize) over the documents to train; their
cartridges live in --store (created with first-P-token initialisation on the first run; a rerun
resumes from the last checkpoint). --distractors 0 trains every cartridge in isolation (the
naive-composition baseline); --monolithic trains one cartridge for all documents (the monolithic
baseline, P = documents x --tokens_per_doc). Progress goes to stdout, metrics to <store>/metrics.jsonl.

Several processes: the same command with --coordinator=HOST:PORT --num_processes=N
--process_id=I on each (or `experiments.launch_local`); --batch is the global batch and every
process pages through its own budget of --budget_bytes; each cartridge has one writer (see
`cas_jax.training.train_collection`).
"""

import dataclasses
import json
import os
import time

from absl import app, flags

from cas_jax import distributed
from cas_jax.cartridges import attention
from cas_jax.documents import corpus, retrieval
from cas_jax.model import loading
from cas_jax.studies import pipeline
from cas_jax.training import dataset, train
from cas_jax.training.distractors import SCHEDULES, DistractorSchedule
from cas_jax.training.train_collection import GRAD_SCOPES, INITS, CollectionConfig, train_collection

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "", "HF folder or GGUF file; empty = embedded SmolLM2-135M-Instruct.")
flags.DEFINE_string("data", None, "Self-study dataset folder (from experiments.synthesize).")
flags.DEFINE_string("store", None, "Cartridge store folder (created or resumed).")
flags.DEFINE_string("collection", "factbook", "'factbook', 'factbook_sections' or a folder: the "
                    "documents' texts, used to initialise their cartridges.")
flags.DEFINE_enum("init", "first_tokens", INITS,
                  "Cartridge initialisation (train_collection.initialise_store).")
flags.DEFINE_integer("tokens_per_doc", 128, "Cartridge tokens P per document.")
flags.DEFINE_integer("distractors", 3, "Most distractor cartridges per example (k_max).")
flags.DEFINE_enum("schedule", "uniform", SCHEDULES, "How k is drawn: per step (fixed, "
                  "uniform, ramp) or per row (mixed: alone with probability --p_iso, else "
                  "k ~ U{1..k_max}).")
flags.DEFINE_float("p_iso", 0.0, "Mixed schedule: share of rows that read their cartridge alone.")
flags.DEFINE_float("quiet", 0.0, "Share of quiet steps: rows read only other documents' "
                   "cartridges and are distilled toward the model with none.")
flags.DEFINE_string("geometry", str(attention.DEFAULT_GEOMETRY),
                    "Composition geometry of the training rows (attention.Geometry spec).")
flags.DEFINE_string("read_geometry", "", "Composition geometry kept in every cartridge, the "
                    "one evaluation, chat and the server compose it by; empty = --geometry "
                    "(issue 24's choice: serial training, read "
                    "parallel,count_power=0.5,relevance=4,relevance_floor=1).")
flags.DEFINE_enum("router", "bm25", list(retrieval.RETRIEVER_KINDS), "With a routing "
                  "--geometry (relevance > 0): the retriever that routes each composed row by "
                  "its conversation's first exchange (cas_jax.training.routing).")
flags.DEFINE_integer("ramp_steps", 100, "Steps for the 'ramp' schedule to reach k_max.")
flags.DEFINE_enum("grad_scope", "target", GRAD_SCOPES, "Which active cartridges get updates.")
flags.DEFINE_integer("budget_bytes", 1 << 30, "Device bytes for resident cartridges + Adam.")
flags.DEFINE_integer("steps", 100, "Optimisation steps.")
flags.DEFINE_integer("batch", 4, "Conversations per step.")
flags.DEFINE_integer("seq_len", 512, "Tokens per conversation (longer ones are truncated).")
flags.DEFINE_float("lr", 2e-2, "Adam learning rate.")
flags.DEFINE_integer("checkpoint_every", 50, "Steps between checkpoints.")
flags.DEFINE_integer("seed", 0, "Data order and distractor draws.")
flags.DEFINE_bool("prefetch", True, "Prefetch the next step's cartridges in the background.")
flags.DEFINE_bool("monolithic", False, "Baseline: train ONE cartridge (id 'monolithic') of "
                  "documents x tokens_per_doc tokens on every document's conversations, no "
                  "distractors.")
distributed.define_flags()
flags.mark_flags_as_required(["data", "store"])


def main(argv):
    del argv
    distributed.initialize_from_flags()
    model = loading.load_model(FLAGS.model or None)
    ids = list(dataset.doc_ids(FLAGS.data))
    docs = corpus.load_collection(FLAGS.collection, ids)
    texts, cartridge_of = docs.texts, None
    tokens, k_max = FLAGS.tokens_per_doc, FLAGS.distractors
    if FLAGS.monolithic:
        texts, cartridge_of, tokens = pipeline.monolithic_inputs(model, docs, tokens,
                                                                 FLAGS.seq_len)
        k_max = 0
    cfg = CollectionConfig(
        tokens_per_doc=tokens, init=FLAGS.init, batch_size=FLAGS.batch, seq_len=FLAGS.seq_len,
        steps=FLAGS.steps, distractors=DistractorSchedule(
            k_max, FLAGS.schedule if k_max else "uniform", FLAGS.ramp_steps,
            p_iso=FLAGS.p_iso, quiet=FLAGS.quiet if k_max else 0.0),
        grad_scope=FLAGS.grad_scope, budget_bytes=FLAGS.budget_bytes,
        checkpoint_every=FLAGS.checkpoint_every, prefetch=FLAGS.prefetch, seed=FLAGS.seed)
    try:
        geometry = attention.Geometry.parse(FLAGS.geometry)
        read = attention.Geometry.parse(FLAGS.read_geometry) if FLAGS.read_geometry else None
    except ValueError as e:
        raise app.UsageError(f"--geometry / --read_geometry: {e}")
    cfg = dataclasses.replace(cfg, read_geometry=read, router=FLAGS.router)
    tcfg = train.TrainConfig(lr=FLAGS.lr, total_steps=FLAGS.steps, geometry=geometry)
    if distributed.is_primary():
        os.makedirs(FLAGS.store, exist_ok=True)
    metrics_path = os.path.join(FLAGS.store, "metrics.jsonl")
    print(f"{len(ids)} documents, P={cfg.tokens_per_doc}, k_max={cfg.distractors.k_max} "
          f"({cfg.distractors.kind}), budget {cfg.budget_bytes / 2**20:.0f} MiB", flush=True)

    def report(r):
        print(f"step {r.step}/{r.total_steps} loss {r.loss:.4f} {r.tokens_per_s:.0f} tok/s "
              f"io-wait {100 * r.io_wait_share:.1f}% resident {r.resident_mb:.0f} MiB "
              f"ETA {time.strftime('%H:%M:%S', time.gmtime(r.eta_s))}", flush=True)
        if distributed.is_primary():
            with open(metrics_path, "a") as f:
                f.write(json.dumps(dataclasses.asdict(r)) + "\n")

    summary = train_collection(model, FLAGS.data, FLAGS.store, cfg, tcfg, texts=texts,
                               cartridge_of=cartridge_of, on_report=report)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    app.run(main)
