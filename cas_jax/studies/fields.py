"""Accuracy by question field: where a method stands against another, field by field.

A study's questions carry the Factbook field they ask about (`Question.field`: forest,
coastline, ...). `field_table` groups each method's multiple-choice records by it, so a gap
between two methods (the oracle cartridge and ICL, say) shows which kinds of facts it lies in:
a recipe change can then be aimed at them and checked on dev.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from cas_jax.evaluation.questions import Question


def field_table(questions: Sequence[Question], results: Mapping[str, dict]
                ) -> dict[str, dict[str, np.ndarray]]:
    """field -> method -> per-question correctness (0/1) of `results` [method -> eval object]
    on the multiple-choice questions of that field. A record whose question is not among
    `questions` is refused (results of another study)."""
    field_of = {(q.doc_id, q.question): q.field for q in questions}
    table: dict[str, dict[str, list[float]]] = {}
    for method, obj in results.items():
        for r in obj["records"]:
            if r["kind"] != "mc":
                continue
            key = (r["doc_id"], r["question"])
            if key not in field_of:
                raise ValueError(f"{method}: a record asks {r['question']!r} of {r['doc_id']}, "
                                 "which is not one of the study's questions")
            table.setdefault(field_of[key] or "(no field)", {}).setdefault(method, []).append(
                float(r["correct_ll"]))
    return {f: {m: np.asarray(v) for m, v in by.items()} for f, by in table.items()}


def format_fields(table: Mapping[str, Mapping[str, np.ndarray]], methods: Sequence[str],
                  gap: tuple[str, str] | None = None) -> str:
    """A markdown table: per field its question count and each method's accuracy; with `gap`
    = (a, b), also a minus b, and the fields sorted by it (largest first)."""
    head = "| field | questions | " + " | ".join(methods)
    head += f" | {gap[0]} minus {gap[1]} |" if gap else " |"
    lines = [head, "|---" * (len(methods) + 2 + bool(gap)) + "|"]

    def acc(field, m):
        x = table[field].get(m)
        return float(x.mean()) if x is not None and len(x) else float("nan")

    fields = sorted(table)
    if gap:
        fields.sort(key=lambda f: -(acc(f, gap[0]) - acc(f, gap[1])))
    for f in fields:
        n = max(len(x) for x in table[f].values())
        row = f"| {f} | {n} | " + " | ".join(f"{acc(f, m):.2f}" for m in methods)
        row += f" | {acc(f, gap[0]) - acc(f, gap[1]):+.2f} |" if gap else " |"
        lines.append(row)
    return "\n".join(lines)
