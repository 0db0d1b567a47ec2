"""Paired differences between two folders' evaluations of the same questions.

    python -m benchmarks.paired --a=benchmarks/results/collection_test \\
        --b=runs/collection_test_route [--methods=retrieval_cas_bm25_k2,...] \\
        [--pairs=rag_dense_k4:retrieval_cas_bm25_k2] [--out=runs/paired.md]

--a and --b are folders holding eval/<method>.json (a study, a collection run, a compose
run's folder). Each row is b minus a, accuracy (multiple-choice, by option log-likelihood)
with a 95% paired bootstrap interval over the questions (`study.paired_diff_ci`).
--methods: methods read on both sides (default: every method both folders hold).
--pairs: A:B, a's method A against b's method B. A row whose two sides hold other
questions, or hold them in another order, is refused with both names. Last line:
`rows=N`.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

flags.DEFINE_string("a", None, "Folder whose eval/ is subtracted.")
flags.DEFINE_string("b", None, "Folder whose eval/ is compared with it.")
flags.DEFINE_list("methods", [], "Methods read on both sides; empty = all they share.")
flags.DEFINE_list("pairs", [], "A:B pairs, a's method A against b's method B.")
flags.DEFINE_string("out", "", "Also write the table here (markdown).")
flags.mark_flags_as_required(["a", "b"])
FLAGS = flags.FLAGS


def _methods(folder: str) -> set[str]:
    d = os.path.join(folder, "eval")
    if not os.path.isdir(d):
        raise app.UsageError(f"{folder}: no eval/ folder of evaluations")
    return {n[:-5] for n in os.listdir(d) if n.endswith(".json")}


def _load(folder: str, method: str) -> dict:
    path = os.path.join(folder, "eval", method + ".json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise app.UsageError(f"{path}: {e}") from None


def main(argv):
    del argv
    from cas_jax.studies import composition, study

    shared = sorted(_methods(FLAGS.a) & _methods(FLAGS.b))
    pairs = [(m, m) for m in (FLAGS.methods or shared)]
    for spec in FLAGS.pairs:
        ma, sep, mb = spec.partition(":")
        if not sep or not ma or not mb:
            raise app.UsageError(f"--pairs: {spec!r} is not A:B")
        pairs.append((ma, mb))
    lines = [f"b = {FLAGS.b} minus a = {FLAGS.a}", "",
             "| a | b | questions | a accuracy | b accuracy | b - a [95% CI] |",
             "|---|---|---|---|---|---|"]
    for ma, mb in pairs:
        try:
            acc_a, acc_b = composition.aligned_accuracy(_load(FLAGS.a, ma), _load(FLAGS.b, mb))
        except ValueError as e:
            raise app.UsageError(f"{ma} vs {mb}: {e}") from None
        diff = study.format_diff(study.paired_diff_ci(acc_a, acc_b))
        lines.append(f"| {ma} | {mb} | {len(acc_a)} | {acc_a.mean():.3f} | {acc_b.mean():.3f} "
                     f"| {diff} |")
    text = "\n".join(lines)
    print(text)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            f.write(text + "\n")
    print(f"rows={len(pairs)}")


if __name__ == "__main__":
    app.run(main)
