"""Accuracy by question field for a study's recorded methods (`cas_jax.studies.fields`).

    python -m benchmarks.fields --run=benchmarks/results/dev26 \
        --gap=icl,oracle_cartridge_step936

--run is a study folder (its questions.jsonl and eval/<method>.json). Prints one row per
field: its question count and each method's accuracy (--methods, default every method in
eval/), and with --gap=A,B the difference A minus B, the fields sorted by it.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

flags.DEFINE_string("run", None, "Study folder: questions.jsonl and eval/<method>.json.")
flags.DEFINE_list("methods", [], "Methods (eval/<method>.json); empty = all of them.")
flags.DEFINE_list("gap", [], "A,B: also A minus B per field, sorted by it.")
flags.mark_flag_as_required("run")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from cas_jax.evaluation import questions as questions_lib
    from cas_jax.studies import fields

    qs_path = os.path.join(FLAGS.run, "questions.jsonl")
    folder = os.path.join(FLAGS.run, "eval")
    if not os.path.exists(qs_path) or not os.path.isdir(folder):
        raise app.UsageError(f"--run={FLAGS.run}: needs questions.jsonl and eval/")
    recorded = sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".json"))
    methods = FLAGS.methods or recorded
    if len(FLAGS.gap) not in (0, 2):
        raise app.UsageError(f"--gap: expected two methods A,B, got {FLAGS.gap}")
    missing = [m for m in [*methods, *FLAGS.gap] if m not in recorded]
    if missing:
        raise app.UsageError(f"--methods/--gap: {missing} not in {folder} (it has {recorded})")
    wanted = dict.fromkeys([*methods, *FLAGS.gap])
    results = {m: json.load(open(os.path.join(folder, m + ".json"))) for m in wanted}
    table = fields.field_table(questions_lib.read_questions(qs_path), results)
    print(fields.format_fields(table, methods, tuple(FLAGS.gap) if FLAGS.gap else None))


if __name__ == "__main__":
    app.run(main)
