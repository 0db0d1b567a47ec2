"""Evaluates a question file under one or more context methods and prints a table.

  python -m experiments.evaluate --questions runs/q.jsonl --make_questions 5 \
      --documents fr,gm,ja,ch --method closed_book,icl,rag --out_dir runs/eval

  python -m experiments.evaluate --questions runs/q.jsonl --cartridge_dir runs/store \
      --method oracle_cartridge --method retrieval_cartridges --top_k 2

  python -m experiments.evaluate --questions runs/q.jsonl --cartridge_dir runs/store \
      --collection factbook_sections --method composed_cartridges --compose_k 3

Methods: closed_book, icl, rag, oracle_cartridge, retrieval_cartridges, monolithic_cartridge
(the cartridge `--monolithic_id` of the cartridge source for every question),
composed_cartridges (each question's own cartridge plus --compose_k others drawn from
--documents, seeded by --seed, in a random order). Cartridges are composed by --geometry
(default: the geometry they were trained under). Cartridge methods read `--cartridge_dir`: a CartridgeStore root (it holds STORE.json) or a folder of cartridge
directories named by document id. The table goes to stdout and `--out_dir` (report.md,
results.json); the last line is `accuracy=X prompt_tokens=Y` of the last method given.
"""

import os

from absl import app, flags

from cas_jax.cartridges import attention, store
from cas_jax.documents import corpus
from cas_jax.evaluation import evaluate, questions as questions_lib
from cas_jax.evaluation.results import EvalResult, format_table, write_report
from cas_jax.model import loading
from cas_jax.training import distractors

FLAGS = flags.FLAGS
flags.DEFINE_string("questions", None, "JSONL question file (written first with --make_questions).")
flags.DEFINE_integer("make_questions", 0, "If > 0, first write this many Factbook questions per "
                     "document to --questions.")
flags.DEFINE_list("question_kinds", ["mc"], "Kinds for --make_questions: mc, free.")
flags.DEFINE_integer("seed", 0, "Seed of --make_questions.")
flags.DEFINE_multi_string("method", ["closed_book"], "Methods, repeated or comma-separated.")
flags.DEFINE_string("model", "", "HF folder or GGUF file; empty = embedded SmolLM2-135M-Instruct.")
flags.DEFINE_string("collection", "factbook", "'factbook', 'factbook_sections' (one document "
                    "per profile section, e.g. fr-geography) or a folder of .txt/.md/.json files.")
flags.DEFINE_list("documents", [], "Document ids; empty = those the questions ask about "
                  "(Factbook; fr,gm,ja with --make_questions) or the whole folder.")
flags.DEFINE_string("cartridge_dir", "", "CartridgeStore root or folder of cartridge dirs.")
flags.DEFINE_string("cartridge_name", "", "Label added to cartridge method names, e.g. 'cas'.")
flags.DEFINE_string("monolithic_id", "monolithic", "Cartridge id of monolithic_cartridge.")
flags.DEFINE_enum("retriever", "bm25", ["bm25", "dense"], "Retriever of rag and "
                  "retrieval_cartridges.")
flags.DEFINE_integer("top_k", 3, "Chunks (rag) or documents (retrieval_cartridges) retrieved.")
flags.DEFINE_integer("slots", 0, "Composition slots of retrieval_cartridges; 0 = top_k.")
flags.DEFINE_integer("window", 0, "Tokens per question (context + query + answer); 0 = model's.")
flags.DEFINE_integer("max_new_tokens", 24, "Greedy generation length; 0 = no generation.")
flags.DEFINE_enum("option_score", "mean", list(evaluate.OPTION_SCORES),
                  "Option log-likelihood: mean or sum over its tokens.")
flags.DEFINE_integer("chunk_tokens", 256, "RAG chunk length in tokens.")
flags.DEFINE_integer("rows_per_call", 16, "Rows per jitted forward.")
flags.DEFINE_string("out_dir", "runs/eval", "Where report.md and results.json go.")
flags.DEFINE_integer("compose_k", 3, "composed_cartridges: other cartridges per question.")
flags.DEFINE_string("geometry", "", "Composition geometry (attention.Geometry spec, e.g. "
                    "'parallel'); empty = the one the cartridges were trained under.")

METHODS = ("closed_book", "icl", "rag", "oracle_cartridge", "retrieval_cartridges",
           "monolithic_cartridge", "composed_cartridges")
DEFAULT_FACTBOOK_DOCS = ("fr", "gm", "ja")


class DirectorySource:
    """Cartridges by id from a CartridgeStore root or a folder of cartridge directories."""

    def __init__(self, root: str, model_fingerprint: str):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"--cartridge_dir {root}: no such folder")
        self.fingerprint = model_fingerprint
        self.store = (store.CartridgeStore(root, model_fingerprint)
                      if os.path.exists(os.path.join(root, "STORE.json")) else None)
        self.root = root

    def get(self, doc_id: str):
        if self.store is not None:
            return self.store.load_cartridge(doc_id)
        return store.load_cartridge(os.path.join(self.root, doc_id), self.fingerprint)


def _collection(asked: list[str]) -> corpus.Collection:
    if FLAGS.collection in corpus.FACTBOOK_COLLECTIONS:
        return corpus.load_collection(FLAGS.collection, FLAGS.documents or asked)
    return corpus.load_collection(FLAGS.collection, FLAGS.documents or None)


def _run(evaluator: evaluate.Evaluator, method: str, qs, source) -> EvalResult:
    label = f"[{FLAGS.cartridge_name}]" if FLAGS.cartridge_name else ""
    if method == "closed_book":
        return evaluator.closed_book(qs)
    if method == "icl":
        return evaluator.icl(qs)
    if method == "rag":
        return evaluator.rag(qs, FLAGS.top_k, FLAGS.retriever)
    if source is None:
        raise app.UsageError(f"--method {method} needs --cartridge_dir")
    if method == "oracle_cartridge":
        return evaluator.oracle_cartridge(qs, source, name=method + label)
    if method == "composed_cartridges":
        ids = evaluator.collection.ids
        if not 0 <= FLAGS.compose_k < len(ids):
            raise app.UsageError(f"--compose_k={FLAGS.compose_k}: needs 0 <= k < the "
                                 f"{len(ids)} documents of --documents")
        sets = distractors.composed_sets(qs, ids, FLAGS.compose_k, FLAGS.seed, "random")
        table = {id(q): s for q, s in zip(qs, sets)}
        return evaluator.cartridges(qs, source, lambda q: table[id(q)],
                                    f"{method}_k{FLAGS.compose_k}{label}",
                                    slots=FLAGS.compose_k + 1, capacity=len(ids))
    if method == "retrieval_cartridges":
        return evaluator.retrieval_cartridges(
            qs, source, FLAGS.top_k, FLAGS.retriever, FLAGS.slots or None,
            name=f"{method}_{FLAGS.retriever}_k{FLAGS.top_k}{label}")
    return evaluator.cartridges(qs, source, lambda q: [FLAGS.monolithic_id], method + label,
                                slots=1)


def _geometry(source, ids) -> attention.Geometry:
    """--geometry, else the one the source's cartridges of `ids` were trained under."""
    try:
        if FLAGS.geometry:
            return attention.Geometry.parse(FLAGS.geometry)
        if source is None:
            return attention.DEFAULT_GEOMETRY
        found = []
        for d in ids:
            try:
                found.append(source.get(d))
            except (KeyError, FileNotFoundError, store.CartridgeStoreError):
                continue
        return attention.geometry_of([c for c in found if c is not None])
    except ValueError as e:
        raise app.UsageError(f"--geometry: {e}")


def main(argv):
    del argv
    methods = [m for spec in FLAGS.method for m in spec.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise app.UsageError(f"unknown methods {unknown}; expected some of {METHODS}")
    if not FLAGS.questions:
        raise app.UsageError("--questions is required")
    if FLAGS.make_questions:
        if FLAGS.collection not in corpus.FACTBOOK_COLLECTIONS:
            raise app.UsageError("--make_questions needs --collection=factbook or "
                                 "factbook_sections")
        ids = FLAGS.documents or (list(DEFAULT_FACTBOOK_DOCS) if FLAGS.collection == "factbook"
                                  else [f"{d}-geography" for d in DEFAULT_FACTBOOK_DOCS])
        made = questions_lib.generate_factbook_questions(ids, FLAGS.make_questions, FLAGS.seed,
                                                         FLAGS.question_kinds)
        questions_lib.write_questions(FLAGS.questions, made)
        print(f"wrote {len(made)} questions to {FLAGS.questions}", flush=True)
    qs = questions_lib.read_questions(FLAGS.questions)
    docs = _collection(list(dict.fromkeys(q.doc_id for q in qs)))
    model = loading.load_model(FLAGS.model or None)
    source = (DirectorySource(FLAGS.cartridge_dir, model.fingerprint) if FLAGS.cartridge_dir
              else None)
    config = evaluate.EvalConfig(window=FLAGS.window or None, max_new_tokens=FLAGS.max_new_tokens,
                                 option_score=FLAGS.option_score, rows_per_call=FLAGS.rows_per_call,
                                 chunk_tokens=FLAGS.chunk_tokens,
                                 geometry=_geometry(source, docs.ids))
    evaluator = evaluate.Evaluator(model, docs, config)
    print(f"{len(qs)} questions on {len(docs)} documents; methods {', '.join(methods)}",
          flush=True)
    results = []
    for method in methods:
        result = _run(evaluator, method, qs, source)
        results.append(result)
        print(f"{result.method}: accuracy={result.accuracy:.3f} in {result.seconds:.1f}s "
              f"(+{result.compile_s:.1f}s compiling)", flush=True)
    md, js = write_report(results, FLAGS.out_dir)
    print(format_table(results))
    print(f"report: {md} {js}")
    last = results[-1]
    print(f"accuracy={last.accuracy:.4f} prompt_tokens={last.prompt_tokens:.1f}")


if __name__ == "__main__":
    app.run(main)
