"""Retrieval over the whole Factbook (issue 25 item 3): recall@k, RAG and retrieval + CAS when
the pool is every section (2,538, ~2.07M tokens) rather than the study's 26 documents, with the
cartridges paged through the budget manager, and the check that an untrained initial
cartridge may stand in for a document whose cartridge was never trained
(`cas_jax.studies.collection_retrieval`).

  python -m benchmarks.collection_retrieval --store=runs/compose_test/cas \\
      --out=runs/collection_test

--store is a `benchmarks.quality --cas` run's cas/ folder (or any cartridge store holding the
question documents' trained cartridges); the questions default to the recorded study's
(benchmarks/results/quality/questions.jsonl, 319 multiple-choice questions on 26 Geography
sections) and closed book / ICL are read from its eval/. Every stage resumes from --out.
A dry run: --documents=60 --max_questions=16 --retrievers=bm25.

Cost on the idle 2-core CPU (estimated from parts measured here, not yet run at full scale):
  - dense embeddings: 35.6k 32-word passages of the sections and ~40k of the 256-token chunks,
    at 32 passages per CPU-second (MiniLM, measured) ~10 min each, once (cached in
    --out/embeddings); BM25 indexes all sections in ~1 s;
  - RAG at k=1,2,4 for both retrievers ~65 min (the 26-document study's rows took 194, 553
    and 1,113 s for BM25, 1,358 s for dense k=4: the context length, not the pool, sets it);
  - retrieval + CAS at k=1,2,4 for both ~15 min (~70-130 s a row in the study, up to ~1.6x
    for the smaller scoring batches of paged groups), plus ~0.2 s per initial cartridge:
    BM25 alone retrieves 72 / 129 / 205 distinct sections at k=1 / 2 / 4 over the 319
    questions (at k=4, 182 not question documents; 2.95 MB each on disk, P=64, f32);
  - the substitution check ~25 min (16 cartridge rows with the default --compose_k=1,3).
About 2 h in all; under 2 GB of initial cartridges under --out/initial.
Last line: `documents=N collection_tokens=T retrieval_cas_minus_rag=D token_ratio=R
substitution_<method>=D ...`.
"""

from absl import app, flags

from cas_jax.documents import corpus
from cas_jax.evaluation import questions as questions_lib
from cas_jax.model import loading
from cas_jax.studies import cas_study, collection_retrieval

FLAGS = flags.FLAGS
flags.DEFINE_string("store", None, "Trained CAS cartridges of the question documents: a "
                    "benchmarks.quality --cas run's cas/ folder or a store root.")
flags.DEFINE_string("out", "runs/collection", "Output folder (resumed if present).")
flags.DEFINE_string("questions", "benchmarks/results/quality/questions.jsonl",
                    "Question file (multiple-choice questions are used).")
flags.DEFINE_string("baselines", "benchmarks/results/quality", "Study folder whose eval/ "
                    "holds closed_book and icl for these questions; empty = evaluate them.")
flags.DEFINE_string("model", "", "HF folder or GGUF file; empty = embedded SmolLM2-135M-Instruct.")
flags.DEFINE_integer("documents", 0, "Collection size: 0 = every Factbook section; else the "
                     "question documents plus seeded others (cas_study.collection_ids).")
flags.DEFINE_integer("max_questions", 0, "Use N questions only, evenly spaced through the file "
                     "so that several documents are asked (0 = all).")
flags.DEFINE_list("retrievers", ["bm25", "dense"], "Retrievers.")
flags.DEFINE_list("top_k", ["1", "2", "4"], "k of RAG and retrieval + CAS.")
flags.DEFINE_list("recall_k", ["1", "2", "4", "8", "16"], "k of the recall table.")
flags.DEFINE_float("budget_share", 0.10, "Device budget as a share of the bytes of the "
                   "cartridges a method uses (never below its largest set).")
flags.DEFINE_string("geometry", "", "Composition geometry (attention.Geometry); empty = the "
                    "one the trained cartridges record.")
flags.DEFINE_bool("rag", True, "Also RAG over all chunks of the collection.")
flags.DEFINE_bool("validation", True, "Also the substitution check on the question "
                  "documents (trained vs initial non-gold cartridges).")
flags.DEFINE_list("compose_k", ["1", "3"], "Composed-set sizes of the substitution check.")
flags.DEFINE_integer("seed", 0, "Seed of the collection order and composed sets.")
flags.mark_flag_as_required("store")


def main(argv):
    del argv
    qs = [q for q in questions_lib.read_questions(FLAGS.questions) if q.kind == "mc"]
    if FLAGS.max_questions:
        qs = qs[::max(len(qs) // FLAGS.max_questions, 1)][:FLAGS.max_questions]
    docs = corpus.load_factbook_sections()
    if FLAGS.documents:
        ids = cas_study.collection_ids(sorted({q.doc_id for q in qs}), list(docs.ids),
                                       FLAGS.documents, FLAGS.seed)
        docs = docs.subset(ids)
    cfg = collection_retrieval.CollectionRetrievalConfig(
        out=FLAGS.out, store=FLAGS.store, retrievers=tuple(FLAGS.retrievers),
        top_k=tuple(int(k) for k in FLAGS.top_k),
        recall_k=tuple(int(k) for k in FLAGS.recall_k), budget_share=FLAGS.budget_share,
        geometry=FLAGS.geometry, baselines=FLAGS.baselines, rag=FLAGS.rag,
        validation=FLAGS.validation, compose_k=tuple(int(k) for k in FLAGS.compose_k),
        seed=FLAGS.seed)
    model = loading.load_model(FLAGS.model or None)
    collection_retrieval.run(model, qs, docs, cfg)


if __name__ == "__main__":
    app.run(main)
