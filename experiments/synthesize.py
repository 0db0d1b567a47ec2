"""Self-study synthesis: writes shard `--shard_index` of `--shard_count` of a dataset.

  python -m experiments.synthesize --collection factbook --documents fr,gm \
      --conversations_per_doc 64 --output runs/selfstudy

Rerunning the same command resumes a killed run. Every process of a multi-process run uses the
same flags except --shard_index; `dataset.make_train_iterator(--output, ...)` reads the result.
With the multi-process flags (--coordinator/--num_processes/--process_id, or --distributed;
`cas_jax.distributed`) process I writes shard I of N, and the union of the shards is what one
process writes with --shard_count=1.
"""

from absl import app, flags

import jax

from cas_jax import distributed
from cas_jax.documents import corpus
from cas_jax.model import loading
from cas_jax.training import synthesis

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "", "HF folder or GGUF file; empty = embedded SmolLM2-135M-Instruct.")
flags.DEFINE_string("collection", "factbook", "'factbook', 'factbook_sections' or a folder of "
                    ".txt/.md/.json files.")
flags.DEFINE_string("documents", "", "Comma-separated doc ids; empty = fr,gm,ja for the "
                    "Factbook, every document of a folder.")
flags.DEFINE_integer("conversations_per_doc", 16, "Conversations synthesised per document.")
flags.DEFINE_integer("chunk_min", 512, "Shortest chunk, in tokens.")
flags.DEFINE_integer("chunk_max", 1024, "Longest chunk, in tokens.")
flags.DEFINE_integer("max_user_tokens", 512, "Most tokens of a user message (agent A).")
flags.DEFINE_integer("max_answer_tokens", 1024, "Most tokens of an answer (agent B).")
flags.DEFINE_integer("rounds", 1, "User/assistant exchanges per conversation.")
flags.DEFINE_string("family_weights", "", "Seed-family weights as family=weight pairs, e.g. "
                    "question=2,creative=0; unlisted families weigh 1.")
flags.DEFINE_integer("batch_size", 16, "Conversations generated together (one file each batch).")
flags.DEFINE_integer("topk", 20, "Teacher log-probabilities kept per answer token.")
flags.DEFINE_string("output", "runs/selfstudy", "Dataset folder (created; resumed if present).")
flags.DEFINE_integer("shard_index", 0, "This process's shard.")
flags.DEFINE_integer("shard_count", 1, "Number of shards (processes).")
flags.DEFINE_integer("seed", 0, "Seed of every chunk, seed prompt and sample.")

distributed.define_flags()

DEFAULT_FACTBOOK_DOCS = ("fr", "gm", "ja")


def _collection() -> corpus.Collection:
    ids = [d for d in FLAGS.documents.split(",") if d]
    if FLAGS.collection == "factbook":
        return corpus.load_factbook(documents=ids or DEFAULT_FACTBOOK_DOCS)
    return corpus.load_collection(FLAGS.collection, ids or None)


def _family_weights() -> tuple[float, ...] | None:
    if not FLAGS.family_weights:
        return None
    pairs = dict(p.partition("=")[::2] for p in FLAGS.family_weights.split(","))
    bad = sorted(f for f, w in pairs.items() if f not in synthesis.FAMILIES or not w)
    if bad:
        raise app.UsageError(f"--family_weights: expected family=weight pairs for families "
                             f"{synthesis.FAMILIES}, got {bad}")
    return tuple(float(pairs.get(f, 1.0)) for f in synthesis.FAMILIES)


def _report(shard: str):
    def report(p: synthesis.Progress) -> None:
        minutes, seconds = divmod(int(p.eta_s), 60)
        print(f"[{shard}] {p.conversations_done}/{p.conversations_total} conversations, "
              f"{p.rate()}, ETA {minutes // 60}h{minutes % 60:02d}m"
              f"{seconds:02d}s", flush=True)
    return report


def main(argv):
    del argv
    shard_index, shard_count = FLAGS.shard_index, FLAGS.shard_count
    if distributed.initialize_from_flags():
        if (FLAGS["shard_index"].present or FLAGS["shard_count"].present) and (
                (shard_index, shard_count) != (jax.process_index(), jax.process_count())):
            raise app.UsageError(
                f"--shard_index={shard_index} --shard_count={shard_count} contradict process "
                f"{jax.process_index()} of {jax.process_count()}; leave them out in a "
                "multi-process run")
        shard_index, shard_count = jax.process_index(), jax.process_count()
    model = loading.load_model(FLAGS.model or None)
    docs = _collection()
    config = synthesis.SynthesisConfig(
        chunk_min=FLAGS.chunk_min, chunk_max=FLAGS.chunk_max,
        max_user_tokens=FLAGS.max_user_tokens, max_answer_tokens=FLAGS.max_answer_tokens,
        rounds=FLAGS.rounds, topk=FLAGS.topk, family_weights=_family_weights())
    study = synthesis.SelfStudy(model, docs, config)
    items = synthesis.work_items(docs.ids, FLAGS.conversations_per_doc, FLAGS.seed)
    shard = f"shard {shard_index}/{shard_count}"
    print(f"[{shard}] {len(docs)} documents, {len(items)} conversations in all -> "
          f"{FLAGS.output}", flush=True)
    writer = synthesis.run_shard(study, items, FLAGS.output, batch_size=FLAGS.batch_size,
                                 shard_index=shard_index, shard_count=shard_count,
                                 on_batch=_report(shard))
    print(f"[{shard}] done: {writer.conversations_done} conversations in "
          f"{writer.batches_done} files, manifest {writer.manifest_path}", flush=True)


if __name__ == "__main__":
    app.run(main)
