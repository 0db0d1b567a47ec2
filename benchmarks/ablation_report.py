"""One table for a set of quality-study runs on the same questions, each against a base run.

  python -m benchmarks.ablation_report --base=runs/abl_base \\
      --runs=runs/abl_lr5e-2,runs/abl_init_document_kv,runs/abl_sweep/p128

Per run: its learning curve (held-out distillation loss / gold NLL / accuracy at each curve
step), its final oracle-cartridge accuracy with the 95% bootstrap CI, and the paired difference
from the base (accuracy and gold NLL, run minus base, with 95% CIs over the same questions
resampled jointly). Runs that are not finished (no report.json) are listed as such. Writes the
markdown to --out when given. Last line: `runs=N finished=M`.
"""

import json
import os

import numpy as np
from absl import app, flags

from cas_jax.studies import study

FLAGS = flags.FLAGS
flags.DEFINE_string("base", "runs/abl_base", "The run every other run is compared with.")
flags.DEFINE_list("runs", [], "Other runs (folders of `benchmarks.quality`).")
flags.DEFINE_string("out", "", "Also write the table to this markdown file.")


def _load(run_dir: str):
    """(curve points, per-question (correct, gold NLL) of the final oracle cartridge) or None
    when the run has no report yet."""
    if not os.path.exists(os.path.join(run_dir, "report.json")):
        return None
    with open(os.path.join(run_dir, "config.json")) as f:
        steps = json.load(f)["config"]["pipeline"]["steps"]  # as run (--steps=0 derives them)
    with open(os.path.join(run_dir, "curve.jsonl")) as f:
        curve = [json.loads(line) for line in f if line.strip()]
    path = os.path.join(run_dir, "eval", f"oracle_cartridge_step{steps}.json")
    with open(path) as f:
        records = json.load(f)["records"]
    scores = {(r["doc_id"], r["question"]): (float(r["correct_ll"]), float(r["gold_nll"]))
              for r in records}
    if len(scores) != len(records):
        raise ValueError(f"{path}: questions repeat (the same document and text twice)")
    return curve, scores


def main(argv):
    del argv
    base = _load(FLAGS.base)
    if base is None:
        raise app.UsageError(f"--base={FLAGS.base}: no report.json there (run not finished)")
    lines = ["| run | curve: step held-out loss / gold NLL / accuracy | accuracy [95% CI] "
             "| vs base: accuracy [95% CI] | vs base: gold NLL [95% CI] |", "|---|---|---|---|---|"]
    finished = 0
    for run_dir in [FLAGS.base, *FLAGS.runs]:
        got = _load(run_dir)
        name = os.path.relpath(run_dir, os.path.dirname(FLAGS.base.rstrip("/")))
        if got is None:
            lines.append(f"| {name} | not finished | | | |")
            continue
        finished += 1
        curve, scores = got
        if set(scores) != set(base[1]):
            raise app.UsageError(f"{run_dir}: its questions differ from --base={FLAGS.base}'s")
        ids = list(base[1])  # the base's question order, as its report resamples them
        acc = np.asarray([scores[i][0] for i in ids])
        lo, hi = study.bootstrap_ci(acc)
        points = "; ".join(f"{p['step']}: {p['heldout_loss']:.3f} / {p['gold_nll']:.3f} / "
                           f"{p['accuracy']:.3f}" for p in curve)
        if run_dir == FLAGS.base:
            vs_acc = vs_nll = "(base)"
        else:
            vs_acc = study.format_diff(study.paired_diff_ci([base[1][i][0] for i in ids], acc))
            vs_nll = study.format_diff(study.paired_diff_ci([base[1][i][1] for i in ids],
                                                            [scores[i][1] for i in ids]))
        lines.append(f"| {name} | {points} | {acc.mean():.3f} [{lo:.3f}, {hi:.3f}] | {vs_acc} "
                     f"| {vs_nll} |")
    table = "\n".join(lines)
    print(table)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            f.write(table + "\n")
    print(f"runs={1 + len(FLAGS.runs)} finished={finished}")


if __name__ == "__main__":
    app.run(main)
