"""Issue 12's distractor ablations, on the questions of `benchmarks.quality --cas` runs.

  python -m benchmarks.cas_schedules --runs=runs/quality_cas,runs/cas_ramp,runs/cas_scope_all \\
      --isolated=benchmarks/results/quality --out=runs/cas_schedules.md

Table 1, schedules: per CAS run (its --cas_schedule and --cas_grad_scope, read from its
config.json), the CAS oracle and the composition with k others (`cas_composed_k{k}`); then the
cartridges trained in isolation (schedule "none": the study's oracle and `naive_composed_k{k}`).
Each with 95% CIs, the composition's paired loss against its own oracle, and its paired
difference to the first run's composition. Table 2, positions (from the first run): the true
cartridge first, last or anywhere among the k others. Runs missing a result are skipped and
named. Last line: `runs=N compared=M`.
"""

import json
import os

from absl import app, flags

from cas_jax.studies import cas_study

FLAGS = flags.FLAGS
flags.DEFINE_list("runs", ["runs/quality_cas"], "`benchmarks.quality --cas` folders; the first "
                  "is the reference (and gives the positions table).")
flags.DEFINE_string("isolated", "benchmarks/results/quality", "The single-cartridge study whose "
                    "isolated cartridges are the 'none' schedule ('' to leave it out).")
flags.DEFINE_integer("k", 3, "Other cartridges in the composition compared.")
flags.DEFINE_string("out", "", "Also write the tables to this markdown file.")


def _read(run_dir: str, name: str) -> dict | None:
    path = os.path.join(run_dir, "eval", f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _config(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "config.json")) as f:
        return json.load(f)


def _label(run_dir: str) -> str:
    flags_ = _config(run_dir)["flags"]
    schedule = flags_["cas_schedule"]
    if schedule == "ramp":
        schedule += f" over {flags_['cas_ramp_steps']} steps"
    epochs = flags_.get("cas_epochs") or flags_["epochs"]
    return f"{schedule}, gradients to {flags_['cas_grad_scope']}, {epochs:g} epochs ({run_dir})"


def main(argv):
    del argv
    k = FLAGS.k
    entries, missing = [], []
    for run in FLAGS.runs:
        pair = _read(run, "cas_oracle"), _read(run, f"cas_composed_k{k}")
        if all(pair):
            entries.append((_label(run), *pair))
        else:
            missing.append(run)
    if FLAGS.isolated:
        steps = _config(FLAGS.isolated)["config"]["pipeline"]["steps"]
        pair = (_read(FLAGS.isolated, f"oracle_cartridge_step{steps}"),
                _read(FLAGS.isolated, f"naive_composed_k{k}"))
        if all(pair):
            entries.append((f"none: trained in isolation ({FLAGS.isolated})", *pair))
        else:
            missing.append(FLAGS.isolated)
    text = (f"Distractor schedules: CAS oracle and composed with k={k} others\n\n"
            + cas_study.format_composition_rows(cas_study.composition_rows(entries), k))
    if FLAGS.runs:
        first = FLAGS.runs[0]
        oracle = _read(first, "cas_oracle")
        positions = [(p, oracle, _read(first, f"cas_composed_k{k}" + ("" if p == "random"
                                                                       else f"_true_{p}")))
                     for p in ("random", "first", "last")]
        positions = [p for p in positions if p[1] is not None and p[2] is not None]
        if positions:
            text += (f"\n\nPosition of the true cartridge among k={k} others ({first})\n\n"
                     + cas_study.format_composition_rows(
                         cas_study.composition_rows(positions), k))
    if missing:
        text += "\n\nNot compared (results missing): " + ", ".join(missing)
    print(text)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            f.write(text + "\n")
    print(f"runs={len(FLAGS.runs) + bool(FLAGS.isolated)} compared={len(entries)}")


if __name__ == "__main__":
    app.run(main)
