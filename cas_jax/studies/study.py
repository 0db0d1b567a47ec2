"""The quality study: do trained cartridges recover ICL's gain over closed book, measured?

The stages' parts and statistics (`cas_jax.studies.study_runs` runs the stages in order, each
resuming from what its output folder already holds):
  1. self-study conversations for every document (`selfstudy/`), and a smaller HELD-OUT set
     from another seed (`heldout/`) that training never reads;
  2. baselines on the questions: closed book, ICL, RAG (`eval/<method>.json`, `cached_method`:
     computed once, or recorded from another study of the same questions);
  3. one cartridge per document, trained in isolation (`cartridges/`), evaluated every
     `eval_every` steps: held-out distillation loss (with the no-cartridge student as the
     floor), gold NLL and accuracy (`curve.jsonl`);
  4. the report: accuracy with 95% bootstrap CIs over questions, gold NLL, ICL gain recovered
     (method - closed book) / (ICL - closed book) on accuracy and on NLL, compression
     (document tokens / P), prompt tokens and KV bytes per question, wall time per stage
     (`report.md`, `report.json`, `curve.png`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cas_jax.evaluation import evaluate
from cas_jax.evaluation.questions import Question
from cas_jax.evaluation.results import EvalResult
from cas_jax.model.loading import LoadedModel
from cas_jax.studies import pipeline
from cas_jax.training import dataset, train

CI_SAMPLES = 1000


# ----------------------------------------------------------------------------- statistics


def bootstrap_ci(values: Sequence[float], samples: int = CI_SAMPLES, seed: int = 0
                 ) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of `values` (resampled with replacement)."""
    x = np.asarray(values, np.float64)
    if len(x) == 0:
        return float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, len(x), (samples, len(x)))
    means = x[idx].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def recovered(method: float, closed: float, icl: float) -> float:
    """(method - closed book) / (ICL - closed book); nan when ICL does not beat closed book."""
    gap = icl - closed
    return float((method - closed) / gap) if gap > 0 else float("nan")


def paired_recovered_ci(method: np.ndarray, closed: np.ndarray, icl: np.ndarray,
                        samples: int = CI_SAMPLES, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of `recovered` over questions resampled jointly (paired)."""
    idx = np.random.default_rng(seed).integers(0, len(method), (samples, len(method)))
    m, c, i = method[idx].mean(1), closed[idx].mean(1), icl[idx].mean(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(i - c > 0, (m - c) / (i - c), np.nan)
    r = r[np.isfinite(r)]
    if len(r) == 0:
        return float("nan"), float("nan")
    return float(np.percentile(r, 2.5)), float(np.percentile(r, 97.5))


def format_diff(diff: Sequence[float]) -> str:
    """A (mean, lo, hi) difference as reports print it: "+0.012 [-0.030, +0.052]"."""
    mean, lo, hi = diff
    return f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def paired_diff_ci(a: Sequence[float], b: Sequence[float], samples: int = CI_SAMPLES,
                   seed: int = 0) -> tuple[float, float, float]:
    """(mean of b - a, 95% bootstrap interval) over questions resampled jointly: two methods
    scored on the same questions."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or len(a) == 0:
        raise ValueError(f"paired scores need the same non-empty questions, got {a.shape} and "
                         f"{b.shape}")
    d = b - a
    return (float(d.mean()), *bootstrap_ci(d, samples, seed))


# ----------------------------------------------------------------------------- held-out loss


@functools.partial(jax.jit, static_argnames=("config", "train_config"))
def _batch_loss(keys, values, params, batch, *, config, train_config):
    parts = train.split_cartridges(keys, values, 1)
    return train.loss_fn(parts, params, batch, config=config, train_config=train_config)


def heldout_loss(model: LoadedModel, data_dir: str, source, seq_len: int, batch_size: int = 8,
                 with_cartridges: bool = True) -> float:
    """Mean distillation loss (nats per answer token) of the student on every conversation in
    `data_dir`, each row reading its own document's cartridge from `source` (with_cartridges
    False: the no-cartridge student, the floor training must beat)."""
    ids = dataset.doc_ids(data_dir)
    it = dataset.make_train_iterator(data_dir, batch_size, seq_len, shuffle=False, num_epochs=1)
    tcfg = train.TrainConfig()
    total, count = 0.0, 0.0
    cartridges: dict[str, Any] = {}
    for batch in it:
        batch = dataset.trim_batch(batch, dataset.LENGTH_BUCKET)
        rows = [ids[i] for i in np.asarray(batch["doc_index"])]
        b = len(batch["tokens"])
        for d in rows:
            if d not in cartridges:
                cartridges[d] = source.get(d) if with_cartridges else None
        if with_cartridges:
            if any(cartridges[d] is None for d in rows):
                raise KeyError(f"no cartridge for {[d for d in rows if cartridges[d] is None]}")
            keys = np.stack([cartridges[d].keys for d in rows])
            values = np.stack([cartridges[d].values for d in rows])
        else:  # one dummy 2-token cartridge, never selected
            cfg = model.config
            keys = values = np.zeros((1, cfg.num_layers, 2, cfg.num_kv_heads, cfg.head_dim),
                                     model.params["embed"].dtype)
        host = {k: jnp.asarray(batch[k]) for k in ("tokens", "loss_mask", "teacher_ids",
                                                  "teacher_logprobs", "length")}
        host["selection"] = jnp.asarray(np.arange(b)[:, None] % len(keys), jnp.int32)
        host["selected"] = jnp.full((b, 1), with_cartridges)
        mean, n = _batch_loss(jnp.asarray(keys), jnp.asarray(values), model.params, host,
                              config=model.config, train_config=tcfg)
        total += float(mean) * float(n)
        count += float(n)
    return total / max(count, 1.0)


# ----------------------------------------------------------------------------- stages


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """The study's recipe and sizes (defaults: the recipe recorded in BUILD_NOTES.md)."""

    pipeline: pipeline.PipelineConfig = pipeline.PipelineConfig()
    heldout_per_doc: int = 4
    eval_every: int = 0  # 0: evaluate at step 0 and at the end only
    max_new_tokens: int = 24
    rag_top_k: int = 2


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
    os.replace(tmp, path)


def _check_stamp(path: str, obj: dict, stamp: dict | None, whose: str) -> None:
    """Raises ValueError naming `path` and the differing keys if the result `obj` read from it
    was stamped otherwise than `stamp` (a result or a run without a stamp passes)."""
    if stamp is None or obj.get("stamp", stamp) == stamp:
        return
    changed = sorted(k for k in set(stamp) | set(obj["stamp"])
                     if stamp.get(k) != obj["stamp"].get(k))
    raise ValueError(f"{path}: {whose} for another configuration (differs in {changed}: "
                     f"{whose} {[obj['stamp'].get(k) for k in changed]}, this run "
                     f"{[stamp.get(k) for k in changed]}); " + (
                         "move it away or use another output folder" if whose == "cached"
                         else "leave its study out of the recorded ones"))


def _recorded_path(entry: str, name: str) -> str | None:
    """`name`'s result in a recorded study folder (`<entry>/eval/<name>.json`) or, when
    `entry` is a result file itself, `entry` if it is `<name>.json`; None where absent."""
    path = (os.path.join(entry, "eval", f"{name}.json") if os.path.isdir(entry)
            else entry if os.path.basename(entry) == f"{name}.json" else None)
    return path if path and os.path.exists(path) else None


def recall_result(out_dir: str, name: str, stamp: dict | None = None,
                  recorded: Sequence[str] = ()) -> str | None:
    """Where `name`'s result is: `out_dir` if its `eval/<name>.json` exists; else the first of
    the `recorded` study folders (or result files) holding it, whose result is then recorded
    (copied) into `out_dir/eval/` after its stamp is checked as `cached_method` checks it;
    else None."""
    if os.path.exists(os.path.join(out_dir, "eval", f"{name}.json")):
        return out_dir
    for entry in recorded:
        path = _recorded_path(entry, name)
        if path is not None:
            obj = _read_json(path)
            _check_stamp(path, obj, None if stamp is None else json.loads(json.dumps(stamp)),
                         "recorded")
            os.makedirs(os.path.join(out_dir, "eval"), exist_ok=True)
            _write_json(os.path.join(out_dir, "eval", f"{name}.json"), obj)
            return entry
    return None


def cached_method(out_dir: str, name: str, run: Callable[[], EvalResult],
                  stamp: dict | None = None, recorded: Sequence[str] = ()) -> dict:
    """The method's summary and records from `eval/<name>.json`, computed by `run` once.

    `stamp` (JSON-able) names what the result depends on beyond the questions, e.g. the
    training config of the cartridges it read. It is stored with the result, and a cached
    result stamped differently is an error rather than a silent reuse (a result without a
    stamp is accepted as it is). A result `out_dir` lacks is first looked up in the
    `recorded` studies of the same questions (`recall_result`) and recorded here."""
    path = os.path.join(out_dir, "eval", f"{name}.json")
    stamp = None if stamp is None else json.loads(json.dumps(stamp))
    recall_result(out_dir, name, stamp, recorded)
    if os.path.exists(path):
        obj = _read_json(path)
        _check_stamp(path, obj, stamp, "cached")
        return obj
    os.makedirs(os.path.dirname(path), exist_ok=True)
    r = run()
    obj = {"summary": r.summary(), "records": list(r.records)}
    if stamp is not None:
        obj["stamp"] = stamp
    _write_json(path, obj)
    return obj


def curve_marks(cfg: StudyConfig) -> list[int]:
    """The steps at which `study_runs.train_with_curve` records a curve point."""
    every = cfg.eval_every or cfg.pipeline.steps
    return sorted({0, *range(every, cfg.pipeline.steps, every), cfg.pipeline.steps})


def curve_points(curve_path: str) -> list[dict]:
    """The learning-curve points recorded in `curve_path` (none if it does not exist)."""
    if not os.path.exists(curve_path):
        return []
    with open(curve_path) as f:
        return [json.loads(line) for line in f if line.strip()]


def curve_complete(curve_path: str, cfg: StudyConfig) -> bool:
    """Whether `curve_path` already holds every point `study_runs.train_with_curve` would record."""
    return set(curve_marks(cfg)) <= {pt["step"] for pt in curve_points(curve_path)}


class LazySource:
    """A cartridge source made on first use (an `evaluate.CartridgeSource`): lets a resumed
    study skip training cartridges whose every evaluation is already cached."""

    def __init__(self, make: Callable[[], "evaluate.CartridgeSource"]):
        self._make = make
        self._source = None

    def get(self, doc_id: str):
        if self._source is None:
            self._source = self._make()
        return self._source.get(doc_id)


# ----------------------------------------------------------------------------- report


def mc_accuracy(obj: dict) -> np.ndarray:
    """Per-question correctness (0/1, by option log-likelihood) of a method's multiple-choice
    records (`eval/<name>.json` object)."""
    return np.asarray([float(r["correct_ll"]) for r in obj["records"] if r["kind"] == "mc"])


def method_label(method: str, recall: float | None) -> str:
    """How a report shows a method: its name, with its retrieval recall where it has one."""
    return method if recall is None else f"{method} (recall {recall:.2f})"


def row_label(row: dict) -> str:
    """`method_label` of a report row (rows recorded before the "recall" field existed hold
    the label in "method")."""
    return method_label(row["method"], row.get("recall"))


def method_row(name: str, obj: dict, closed: dict, icl: dict, doc_tokens: float | None,
               cartridge_tokens: float | None, recall: float | None = None) -> dict:
    """One report row: accuracy (mc by option log-likelihood) with CI, gold NLL with CI, gain
    recovered on accuracy and NLL (with paired CIs), compression, prompt tokens, KV bytes;
    and "recall", the retrieval recall, where `recall` is given."""
    recs = obj["records"]
    acc = mc_accuracy(obj)
    nll = np.asarray([r["gold_nll"] for r in recs])
    acc_c = mc_accuracy(closed)
    acc_i = mc_accuracy(icl)
    nll_c = np.asarray([r["gold_nll"] for r in closed["records"]])
    nll_i = np.asarray([r["gold_nll"] for r in icl["records"]])
    s = obj["summary"]
    row = {"method": name, "questions": len(recs), "accuracy": float(acc.mean()),
           "accuracy_ci": bootstrap_ci(acc), "gold_nll": float(nll.mean()),
           "gold_nll_ci": bootstrap_ci(nll),
           "free_match": s.get("free_match"),
           "recovered_acc": recovered(acc.mean(), acc_c.mean(), acc_i.mean()),
           "recovered_acc_ci": paired_recovered_ci(acc, acc_c, acc_i),
           # NLL falls as context helps: recovered on -NLL.
           "recovered_nll": recovered(-nll.mean(), -nll_c.mean(), -nll_i.mean()),
           "recovered_nll_ci": paired_recovered_ci(-nll, -nll_c, -nll_i),
           "compression": (doc_tokens / cartridge_tokens) if doc_tokens and cartridge_tokens
           else None,
           "prompt_tokens": s["prompt_tokens"], "cartridge_tokens": s["cartridge_tokens"],
           "kv_bytes": s["kv_bytes"], "seconds_per_question": s["latency_s"]}
    if recall is not None:
        row["recall"] = recall
    return row


def format_rows(rows: Sequence[dict]) -> str:
    def ci(x):
        return f"[{x[0]:.3f}, {x[1]:.3f}]"

    def num(x, fmt="{:.3f}"):
        return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else fmt.format(x)

    lines = ["| method | questions | accuracy | 95% CI | gold NLL | 95% CI | recovered (acc) "
             "| recovered (NLL) | compression | prompt tok/q | cartridge tok/q | KV MiB/q |",
             "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {row_label(r)} | {r['questions']} | {r['accuracy']:.3f} | {ci(r['accuracy_ci'])} "
            f"| {r['gold_nll']:.3f} | {ci(r['gold_nll_ci'])} | {num(r['recovered_acc'])} "
            f"| {num(r['recovered_nll'])} | {num(r['compression'], '{:.1f}x')} "
            f"| {r['prompt_tokens']:.0f} | {r['cartridge_tokens']:.0f} "
            f"| {r['kv_bytes'] / 2**20:.2f} |")
    return "\n".join(lines)


def accuracy_by_field(questions: Sequence[Question], results: dict[str, dict]) -> str:
    """Markdown table: multiple-choice accuracy per question field (rows) and method
    (columns, `results`: name -> `eval/<name>.json` object), matched by (doc_id, question)."""
    field = {(q.doc_id, q.question): q.field or "-" for q in questions if q.kind == "mc"}
    names = sorted(set(field.values()))
    cells: dict[str, dict[str, list[float]]] = {m: {f: [] for f in names} for m in results}
    for m, obj in results.items():
        for r in obj["records"]:
            key = (r["doc_id"], r["question"])
            if r["kind"] == "mc" and key in field:
                cells[m][field[key]].append(float(r["correct_ll"]))
    lines = ["| field | questions | " + " | ".join(results) + " |",
             "|" + "---|" * (2 + len(results))]
    for f in names:
        n = max(len(cells[m][f]) for m in results)
        lines.append(f"| {f} | {n} | " + " | ".join(
            f"{np.mean(cells[m][f]):.2f}" if cells[m][f] else "-" for m in results) + " |")
    return "\n".join(lines)


def plot_curve(curve_path: str, png_path: str, closed: dict, icl: dict) -> None:
    """Held-out loss (with floor), gold NLL and accuracy against step, with the closed-book and
    ICL levels as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = curve_points(curve_path)
    steps = [p["step"] for p in pts]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(steps, [p["heldout_loss"] for p in pts], "o-", label="oracle cartridge")
    axes[0].axhline(pts[0]["heldout_floor"], color="grey", ls="--", label="no cartridge")
    axes[0].set_title("held-out distillation loss")
    for ax, key, name in ((axes[1], "gold_nll", "gold_nll"), (axes[2], "accuracy", "accuracy")):
        ax.plot(steps, [p[key] for p in pts], "o-", label="oracle cartridge")
        ax.axhline(closed["summary"][key], color="grey", ls="--", label="closed book")
        ax.axhline(icl["summary"][key], color="green", ls=":", label="ICL")
        ax.set_title(name.replace("_", " "))
    for ax in axes:
        ax.set_xlabel("training step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- compression sweep


def _is_flat(method: str) -> bool:
    """Methods that do not depend on the cartridge size: closed book, ICL, RAG."""
    return method in ("closed_book", "icl") or method.startswith("rag_")


def sweep_rows(reports: dict[int, dict]) -> tuple[list[dict], list[dict]]:
    """Report rows of one study per cartridge size P (`report.json` objects keyed by P): the
    P-dependent rows, each with `tokens` = P and `compression` = median document tokens / P, and
    the P-independent rows (closed book, ICL, RAG) of the first P."""
    rows = []
    for p, rep in sorted(reports.items()):
        for r in rep["rows"]:
            if not _is_flat(r["method"]):
                rows.append({**r, "tokens": p, "compression": rep["median_document_tokens"] / p})
    first = reports[min(reports)]
    return rows, [r for r in first["rows"] if _is_flat(r["method"])]


def format_sweep(rows: Sequence[dict], flat: Sequence[dict]) -> str:
    lines = ["| method | P | compression | accuracy | 95% CI | gold NLL | recovered (acc) "
             "| recovered (NLL) | KV MiB/q |", "|" + "---|" * 9]
    def line(r, size, compression):
        return (f"| {row_label(r)} | {size} | {compression} | {r['accuracy']:.3f} "
                f"| [{r['accuracy_ci'][0]:.3f}, {r['accuracy_ci'][1]:.3f}] | {r['gold_nll']:.3f} "
                f"| {r['recovered_acc']:.3f} | {r['recovered_nll']:.3f} "
                f"| {r['kv_bytes'] / 2**20:.2f} |")

    lines += [line(r, r["tokens"], f"{r['compression']:.1f}x")
              for r in sorted(rows, key=lambda r: (r["method"], r["tokens"]))]
    lines += [line(r, "-", "-") for r in flat]
    return "\n".join(lines)


def plot_sweep(rows: Sequence[dict], flat: Sequence[dict], png_path: str) -> None:
    """Accuracy (with CI bars) and gold NLL against compression (log x), one line per
    P-dependent method, the P-independent methods as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    methods = sorted({r["method"] for r in rows})
    for i, m in enumerate(methods):
        pts = sorted((r for r in rows if r["method"] == m), key=lambda r: r["compression"])
        x = [r["compression"] for r in pts]
        acc = [r["accuracy"] for r in pts]
        err = [[a - r["accuracy_ci"][0] for a, r in zip(acc, pts)],
               [r["accuracy_ci"][1] - a for a, r in zip(acc, pts)]]
        axes[0].errorbar(x, acc, yerr=err, marker="o", capsize=3, label=m, color=f"C{i}")
        axes[1].plot(x, [r["gold_nll"] for r in pts], marker="o", label=m, color=f"C{i}")
    for j, r in enumerate(flat, start=len(methods)):
        for ax, key in ((axes[0], "accuracy"), (axes[1], "gold_nll")):
            ax.axhline(r[key], ls="--", lw=1, color=f"C{j % 10}", label=row_label(r))
    for ax, name in ((axes[0], "multiple-choice accuracy"), (axes[1], "gold NLL (nats/token)")):
        ax.set_xscale("log")
        ax.set_xlabel("compression (median document tokens / P)")
        ax.set_title(name)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
