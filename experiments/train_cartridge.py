"""Trains one cartridge by context distillation on every conversation of a self-study dataset.

With a dataset about several documents this is one monolithic cartridge for all of them.

  python -m experiments.train_cartridge --data runs/selfstudy --document fr --tokens 512 \
      --steps 200 --batch 8 --output_dir runs/cartridge_fr

--document names the text the cartridge is initialised from: a document id of --collection
(as in `experiments.synthesize`), or a path to a text file. For `first_tokens` the cartridge is the
KV cache of the first --tokens tokens of that document's block in the one rendering
(`cas_jax.model.rendering`), exactly where the teacher saw its chunks; token 0 is the frozen
attention sink.

Several processes (`cas_jax.distributed`; README "Scaling out"): the same command with
--coordinator=HOST:PORT --num_processes=N --process_id=I on each (or `experiments.launch_local`);
--batch is the global batch, each process reads its share of every batch, and process 0 writes
metrics.jsonl and cartridge/ while all of them write the Orbax checkpoints together.

Writes to --output_dir: metrics.jsonl (one line per report), checkpoints/ (Orbax; rerunning the
same command resumes a killed run), and cartridge/, the trained cartridge as a plain directory
(`store.load_cartridge`) that `experiments.chat --cartridges` loads.
"""

import dataclasses
import json
import os
import time

import jax
from absl import app, flags, logging

from cas_jax import distributed
from cas_jax.cartridges import cartridge as cart_lib, store
from cas_jax.documents import corpus
from cas_jax.model import loading, rendering
from cas_jax.training import dataset, train as train_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "", "HF folder or GGUF file; empty = embedded SmolLM2-135M-Instruct.")
flags.DEFINE_string("data", None, "Self-study dataset folder written by experiments.synthesize.")
flags.DEFINE_string("collection", "factbook", "'factbook' or a folder of .txt/.md/.json files.")
flags.DEFINE_string("document", None, "Document id in --collection, or a text file path: the "
                    "text the cartridge is initialised from (and its doc_id).")
flags.DEFINE_integer("tokens", 512, "Cartridge tokens P.")
flags.DEFINE_enum("init", "first_tokens", ["first_tokens", "random_tokens", "random_vectors"],
                  "Cartridge initialisation.")
flags.DEFINE_float("lr", 2e-2, "Peak learning rate (Adam).")
flags.DEFINE_enum("schedule", "constant", ["constant", "cosine"], "Learning-rate schedule.")
flags.DEFINE_integer("warmup_steps", 0, "Linear warmup steps.")
flags.DEFINE_float("clip_norm", 1.0, "Global-norm gradient clipping (<= 0: off).")
flags.DEFINE_enum("loss", "distillation", ["distillation", "next_token"], "Training loss.")
flags.DEFINE_float("topk_mass", None, "Keep the teacher's best tokens up to this mass (0.99 in "
                   "the reference); default: all k.")
flags.DEFINE_integer("steps", 100, "Training steps.")
flags.DEFINE_integer("batch", 8, "Global batch size (conversations per step).")
flags.DEFINE_integer("seq_len", 1024, "Conversation tokens per row (longer ones are truncated).")
flags.DEFINE_integer("num_devices", 0, "Devices of the data-parallel mesh; 0 = all.")
flags.DEFINE_integer("save_every", 50, "Checkpoint every this many steps.")
flags.DEFINE_integer("log_every", 10, "Report every this many steps.")
flags.DEFINE_boolean("remat", False, "Recompute decoder layers in the backward pass.")
flags.DEFINE_integer("seed", 0, "Data order and random initialisations.")
flags.DEFINE_string("output_dir", "runs/cartridge", "Output folder (created; resumed if present).")
distributed.define_flags()
flags.mark_flags_as_required(["data", "document"])


def _document() -> tuple[str, str, str]:
    """(doc_id, title, text) of --document."""
    if os.path.isfile(FLAGS.document):
        with open(FLAGS.document, encoding="utf-8") as f:
            text = f.read()
        stem = os.path.splitext(os.path.basename(FLAGS.document))[0]
        return stem, stem, text
    try:
        docs = corpus.load_collection(FLAGS.collection, [FLAGS.document])
    except (KeyError, ValueError):
        docs = {}
    if FLAGS.document not in docs:
        raise app.UsageError(f"--document {FLAGS.document!r} is neither a file nor a document "
                             f"of collection {FLAGS.collection!r}")
    doc = docs[FLAGS.document]
    return doc.doc_id, doc.title, doc.text


def _initial_cartridge(model: loading.LoadedModel) -> cart_lib.Cartridge:
    doc_id, title, text = _document()
    framed = rendering.rendering_for(model.tokenizer).document(
        rendering.titled(title, text))
    common = dict(fingerprint=model.fingerprint, doc_id=doc_id)
    key = jax.random.PRNGKey(FLAGS.seed)
    if FLAGS.init == "first_tokens":
        return cart_lib.init_from_tokens(model.config, model.params, framed,
                                         num_tokens=FLAGS.tokens, **common)
    if FLAGS.init == "random_tokens":
        return cart_lib.init_random_tokens(model.config, model.params, FLAGS.tokens, key,
                                           **common)
    return cart_lib.init_random_vectors(model.config, model.params, FLAGS.tokens, key,
                                        framed[:FLAGS.tokens], **common)


def _check_dataset(model: loading.LoadedModel) -> None:
    made_for = dataset.read_manifests(FLAGS.data)[0]["run"].get("model")
    if made_for is not None and made_for != model.fingerprint:
        raise app.UsageError(f"{FLAGS.data} was synthesised with model {made_for}, but "
                             f"--model is {model.fingerprint}")


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:  # Orbax logs every checkpoint step at INFO.
        logging.set_verbosity(logging.WARNING)
    distributed.initialize_from_flags()
    model = loading.load_model(FLAGS.model or None)
    _check_dataset(model)
    mesh = train_lib.make_mesh(FLAGS.num_devices or None)
    if FLAGS.batch % mesh.size:
        raise app.UsageError(f"--batch {FLAGS.batch} is not a multiple of {mesh.size} devices")
    cfg = train_lib.TrainConfig(
        lr=FLAGS.lr, schedule=FLAGS.schedule, warmup_steps=FLAGS.warmup_steps,
        total_steps=FLAGS.steps, clip_norm=FLAGS.clip_norm if FLAGS.clip_norm > 0 else None,
        loss=FLAGS.loss, topk_mass=FLAGS.topk_mass, remat=FLAGS.remat)
    initial = _initial_cartridge(model)
    print(f"cartridge {initial.meta.doc_id!r}: {initial.num_tokens} tokens ({FLAGS.init}), "
          f"{initial.nbytes / 2**20:.1f} MiB; {mesh.size} device(s) in "
          f"{jax.process_count()} process(es)", flush=True)
    data = dataset.make_train_iterator(FLAGS.data, FLAGS.batch, FLAGS.seq_len, FLAGS.seed,
                                       num_epochs=None, drop_remainder=True)
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    metrics_path = os.path.join(FLAGS.output_dir, "metrics.jsonl")

    def report(r: train_lib.StepReport) -> None:
        eta = time.strftime("%H:%M:%S", time.gmtime(r.eta_s))
        print(f"step {r.step}/{r.total_steps}  loss {r.loss:.4f}  grad_norm {r.grad_norm:.3g}  "
              f"lr {r.learning_rate:.2e}  {r.tokens_per_s:.0f} tok/s  ETA {eta}", flush=True)
        if distributed.is_primary():
            with open(metrics_path, "a") as f:
                f.write(json.dumps(dict(dataclasses.asdict(r), time=time.time())) + "\n")

    state = train_lib.train(
        train_lib.init_train_state([initial], cfg), model.params, data, config=model.config,
        train_config=cfg, mesh=mesh, num_steps=FLAGS.steps,
        checkpoint_dir=os.path.abspath(os.path.join(FLAGS.output_dir, "checkpoints")),
        save_every=FLAGS.save_every, log_every=FLAGS.log_every, on_report=report)
    (trained,) = train_lib.cartridges_from_state(state, [initial.meta])
    out = os.path.join(FLAGS.output_dir, "cartridge")
    if distributed.is_primary():
        store.save_cartridge(out, trained, step=int(state.step), overwrite=True)
        print(f"saved {out}", flush=True)
    distributed.barrier("cartridge-saved")


if __name__ == "__main__":
    app.run(main)
