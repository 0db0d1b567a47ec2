"""Accuracy against compression: cartridge tokens P swept, every method on the same questions.

  python -m benchmarks.compression_sweep [--tokens 64,128,256] [--documents tb,vi] ...

For each P, CAS cartridges are trained for every document (same self-study data, same steps)
and evaluated as oracle and retrieval-selected cartridges; closed book, ICL and RAG do not depend
on P and are evaluated once. Compression = mean document tokens / P. Writes
<out>/sweep.json, <out>/sweep.md and <out>/sweep.png (accuracy vs compression, log x axis).
The defaults fit a 2-core CPU in well under an hour; the paper-scale sweep is
`--tokens 64,128,256,512,1024,2048 --conversations_per_doc 64 --steps 400`.
Last line: `best_cartridge_accuracy=X icl_accuracy=Y` (X over the sweep, oracle cartridges).
"""

import json
import os

import numpy as np
from absl import app, flags

from cas_jax import corpus, evaluate, loading, pipeline, questions as questions_lib

FLAGS = flags.FLAGS
flags.DEFINE_list("tokens", ["64", "128", "256"], "Cartridge tokens P per document to sweep.")
flags.DEFINE_list("documents", ["tb", "vi"], "Factbook document ids.")
flags.DEFINE_string("out", "runs/compression_sweep", "Output folder (stages resume).")
flags.DEFINE_integer("conversations_per_doc", 8, "Self-study conversations per document.")
flags.DEFINE_integer("steps", 16, "CAS training steps per P.")
flags.DEFINE_integer("questions_per_doc", 6, "Multiple-choice questions per document.")
flags.DEFINE_integer("distractors", 1, "Most distractor cartridges per example.")


def _plot(rows, flat, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    methods = sorted({r["method"] for r in rows})
    for i, method in enumerate(methods):
        pts = sorted((r["compression"], r["accuracy"]) for r in rows if r["method"] == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method,
                color=f"C{i}")
    for i, (name, acc) in enumerate(flat.items(), start=len(methods)):
        ax.axhline(acc, linestyle="--", linewidth=1, label=name, color=f"C{i % 10}")
    ax.set_xscale("log")
    ax.set_xlabel("compression (document tokens / cartridge tokens)")
    ax.set_ylabel("multiple-choice accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv):
    del argv
    out = FLAGS.out
    os.makedirs(out, exist_ok=True)
    cfg = pipeline.PipelineConfig(conversations_per_doc=FLAGS.conversations_per_doc,
                                  steps=FLAGS.steps, distractors=FLAGS.distractors)
    model = loading.load_model()
    docs = corpus.load_factbook(documents=FLAGS.documents)
    doc_tokens = np.mean([len(model.tokenizer(docs[d].text)["input_ids"]) for d in docs.ids])
    data_dir = pipeline.synthesize(
        model, docs, os.path.join(out, "selfstudy"), cfg,
        on_batch=lambda pr: print(f"synthesis {pr.conversations_done}/{pr.conversations_total} "
                                  f"conversations, ETA {pr.eta_s:.0f}s", flush=True))
    qs = questions_lib.generate_factbook_questions(list(docs.ids), FLAGS.questions_per_doc,
                                                   cfg.seed)
    ev = evaluate.Evaluator(model, docs, evaluate.EvalConfig(max_new_tokens=0))
    def report(r):
        print(f"{r.method}: accuracy {r.accuracy:.3f} in {r.seconds:.0f}s", flush=True)

    flat_results = pipeline.evaluate_baselines(ev, qs, cfg.top_k, on_result=report)
    flat = {r.method: r.accuracy for r in flat_results}
    rows, results = [], list(flat_results)
    for p in map(int, FLAGS.tokens):
        store, _ = pipeline.train_cartridges(
            model, docs, data_dir, os.path.join(out, f"cas_p{p}"), cfg, tokens_per_doc=p,
            on_report=lambda r, p=p: print(f"P={p} step {r.step}/{r.total_steps} "
                                           f"loss {r.loss:.4f}", flush=True))
        for r in pipeline.evaluate_cartridges(ev, qs, pipeline.StoreSource(store), f"p{p}",
                                              cfg.top_k, on_result=report):
            method = r.method.replace(f"_p{p}", "")
            rows.append({"method": method, "tokens": p, "compression": doc_tokens / p,
                         "accuracy": r.accuracy, "kv_bytes": r.kv_bytes,
                         "prompt_tokens": r.prompt_tokens})
            results.append(r)
    table = ["| method | P | compression | accuracy | KV bytes/question |", "|---|---|---|---|---|"]
    table += [f"| {r['method']} | {r['tokens']} | {r['compression']:.1f}x | {r['accuracy']:.3f} |"
              f" {r['kv_bytes']:.0f} |" for r in rows]
    table += [f"| {name} | - | 1x | {acc:.3f} | - |" for name, acc in flat.items()]
    text = "\n".join(table)
    print(text)
    with open(os.path.join(out, "sweep.md"), "w") as f:
        f.write(text + "\n\n" + evaluate.format_table(results) + "\n")
    with open(os.path.join(out, "sweep.json"), "w") as f:
        json.dump({"doc_tokens": doc_tokens, "rows": rows, "flat": flat}, f, indent=1)
    _plot(rows, flat, os.path.join(out, "sweep.png"))
    best = max(r["accuracy"] for r in rows if r["method"].startswith("oracle"))
    print(f"plot: {os.path.join(out, 'sweep.png')}")
    print(f"best_cartridge_accuracy={best:.3f} icl_accuracy={flat['icl']:.3f}")


if __name__ == "__main__":
    app.run(main)
