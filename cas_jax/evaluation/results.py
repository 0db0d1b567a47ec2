"""One evaluation method's results: metrics over its questions (`EvalResult`, see
`cas_jax.evaluation.evaluate` for what each means), summarised from per-question records, and
written as a markdown table and JSON."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """One method's metrics (see module doc; None where no question of that kind was asked)
    and a record per question."""

    method: str
    num_questions: int
    num_mc: int
    accuracy_ll: float | None
    accuracy_gen: float | None
    free_match: float | None
    gold_nll: float
    prompt_tokens: float
    context_tokens: float
    cartridge_tokens: float
    kv_bytes: float
    truncated: int  # questions whose context was cut to the budget
    truncated_tokens: float  # mean text tokens cut, over those questions
    retrieval_recall: float | None  # share of questions whose own document was retrieved
    seconds: float
    compile_s: float
    compilations: int
    records: tuple[dict[str, Any], ...] = dataclasses.field(repr=False, default=())

    @property
    def latency_s(self) -> float:
        """Seconds per question (batched: wall time over questions)."""
        return self.seconds / max(self.num_questions, 1)

    @property
    def throughput(self) -> float:
        """Questions per second."""
        return self.num_questions / self.seconds if self.seconds > 0 else float("inf")

    @property
    def accuracy(self) -> float:
        """The headline accuracy: accuracy_ll if there are multiple-choice questions, else
        free_match (nan without generation)."""
        if self.accuracy_ll is not None:
            return self.accuracy_ll
        return float("nan") if self.free_match is None else self.free_match

    def summary(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "records"}
        d.update(latency_s=self.latency_s, throughput=self.throughput, accuracy=self.accuracy)
        return d


_COLUMNS = (
    ("method", "method", "{}"), ("questions", "num_questions", "{}"),
    ("acc (LL)", "accuracy_ll", "{:.3f}"), ("acc (gen)", "accuracy_gen", "{:.3f}"),
    ("free match", "free_match", "{:.3f}"), ("gold NLL", "gold_nll", "{:.3f}"),
    ("prompt tok/q", "prompt_tokens", "{:.0f}"), ("context tok/q", "context_tokens", "{:.0f}"),
    ("cartridge tok/q", "cartridge_tokens", "{:.0f}"), ("KV MiB/q", "kv_mib", "{:.2f}"),
    ("truncated", "truncated", "{}"), ("recall", "retrieval_recall", "{:.3f}"),
    ("s/q", "latency_s", "{:.3f}"), ("q/s", "throughput", "{:.2f}"),
)


GENERATION_COLUMN = "acc (gen)"
"""Multiple-choice accuracy by greedy generation: near 0 for every method with the 135M
default model, ICL included (transformers' `generate` gives the same text), so the table
leaves it out unless asked; results.json always holds it (`accuracy_gen`)."""


def format_table(results: Sequence[EvalResult], generation: bool = False) -> str:
    """A markdown table, one row per method ("-" where a metric does not apply); `generation`
    adds the GENERATION_COLUMN."""
    columns = [c for c in _COLUMNS if generation or c[0] != GENERATION_COLUMN]
    lines = ["| " + " | ".join(c[0] for c in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for r in results:
        values = dict(r.summary(), kv_mib=r.kv_bytes / 2 ** 20)
        cells = ["-" if values[key] is None else fmt.format(values[key])
                 for _, key, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(results: Sequence[EvalResult], out_dir: str, generation: bool = False
                 ) -> tuple[str, str]:
    """Writes `report.md` (the table; `generation` as in `format_table`) and `results.json`
    (summaries and per-question records) under `out_dir`; returns both paths."""
    os.makedirs(out_dir, exist_ok=True)
    md, js = os.path.join(out_dir, "report.md"), os.path.join(out_dir, "results.json")
    with open(md, "w", encoding="utf-8") as f:
        f.write(format_table(results, generation) + "\n")
    with open(js, "w", encoding="utf-8") as f:
        json.dump({"methods": [r.summary() for r in results],
                   "records": {r.method: list(r.records) for r in results}},
                  f, indent=1, ensure_ascii=False)
    return md, js




def _mean(values) -> float | None:
    values = list(values)
    return float(np.mean(values)) if values else None


def summarise(method: str, records: list[dict[str, Any]], kv_bytes_per_token: int) -> EvalResult:
    mc = [r for r in records if r["kind"] == "mc"]
    free = [r for r in records if r["kind"] == "free"]
    cut = [r["truncated_tokens"] for r in records if r["truncated_tokens"] > 0]
    hits = [r["retrieval_hit"] for r in records if r["retrieval_hit"] is not None]
    return EvalResult(
        method=method, num_questions=len(records), num_mc=len(mc),
        accuracy_ll=_mean(r["correct_ll"] for r in mc),
        accuracy_gen=_mean(r["correct_gen"] for r in mc if "correct_gen" in r),
        free_match=_mean(r["correct_gen"] for r in free if "correct_gen" in r),
        gold_nll=_mean(r["gold_nll"] for r in records),
        prompt_tokens=_mean(r["prompt_tokens"] for r in records),
        context_tokens=_mean(r["context_tokens"] for r in records),
        cartridge_tokens=_mean(r["cartridge_tokens"] for r in records),
        kv_bytes=_mean((r["prompt_tokens"] + r["cartridge_tokens"]) * kv_bytes_per_token
                       for r in records),
        truncated=len(cut), truncated_tokens=_mean(cut) or 0.0,
        retrieval_recall=_mean(hits), seconds=0.0, compile_s=0.0, compilations=0,
        records=tuple(records))
