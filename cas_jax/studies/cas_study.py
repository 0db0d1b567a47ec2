"""The collection methods of the quality study (Cartridges at Scale), on the same questions.

`benchmarks.quality --cas` adds, after the single-cartridge study (`cas_jax.studies.study`):
  CAS oracle           the question's cartridge, trained with distractor mixing (`cas/`)
  CAS composed k       that cartridge plus k other documents' cartridges, composed in the
                       order `position` gives (first, last, or random: the true one anywhere)
  naive composed k     the same sets, from the cartridges trained in isolation (the study's own)
  monolithic           one cartridge of n_docs x P tokens on the same conversations, steps,
                       batch and learning rate (`monolithic/`)
  retrieval + CAS      the top-k documents by BM25 or dense retrieval, their CAS cartridges
                       composed, with retrieval recall (the report row's "recall")
  RAG                  the top-k chunks by the same retrievers
The other documents of a composed set are drawn per question from a seed that depends on the
question and k only, so CAS and naive composition read the same sets.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cas_jax.evaluation import evaluate
from cas_jax.evaluation.questions import Question
from cas_jax.evaluation.results import EvalResult
from cas_jax.model.loading import LoadedModel
from cas_jax.studies import pipeline, study
from cas_jax.training import train
from cas_jax.training.distractors import POSITIONS, composed_sets

def _lookup(questions: Sequence[Question], sets: list[list[str]]
            ) -> Callable[[Question], list[str]]:
    table = {id(q): s for q, s in zip(questions, sets)}
    return lambda q: table[id(q)]


def recall(obj: dict) -> float | None:
    """Share of questions whose retrieved set held their own document (None if not recorded)."""
    hits = [r["retrieval_hit"] for r in obj["records"] if r.get("retrieval_hit") is not None]
    return float(np.mean(hits)) if hits else None


def method_rows(rows: Sequence[tuple[str, dict, int | None]], closed: dict, icl: dict,
                doc_tokens: float | None) -> list[dict]:
    """Report rows (`study.method_row`) of `collection_methods`' results, each with its
    retrieval recall where its records hold one; compression only for the CAS oracle (one
    cartridge per question)."""
    return [study.method_row(n, o, closed, icl, doc_tokens, c if n == "cas_oracle" else None,
                             recall=recall(o)) for n, o, c in rows]


def cartridges_read(method: str) -> str | None:
    """Which cartridges a collection method reads: "cas", "naive", "monolithic" or None."""
    if method.startswith(("cas_", "retrieval_cas_")):
        return "cas"
    return next((s for s in ("naive", "monolithic") if method.startswith(s)), None)


def collection_methods(ev: evaluate.Evaluator, questions: Sequence[Question], out: str, *,
                       cas, naive, monolithic, tokens: int, n_docs: int,
                       compose_k: Sequence[int] = (1, 3, 7),
                       positions: Sequence[str] = POSITIONS, positions_k: int = 3,
                       retrieval_k: Sequence[int] = (1, 2, 4),
                       retrievers: Sequence[str] = ("bm25", "dense"), seed: int = 0,
                       stamps: Mapping[str, dict] | None = None,
                       recorded: Sequence[str] = (),
                       ) -> list[tuple[str, dict, int | None]]:
    """Runs (or reads from `out/eval/`) every collection method; returns (name, result,
    cartridge tokens per question) in report order. cas / naive / monolithic are cartridge
    sources (`evaluate.CartridgeSource`); naive or monolithic None leaves its rows out.
    `stamps` maps "cas" / "naive" / "monolithic" to the training config of those cartridges:
    a cached result read from cartridges trained otherwise is refused (`study.cached_method`).
    A result `out/eval/` lacks is first looked up in the `recorded` studies of the same
    questions and recorded into `out` (`study.recall_result`: the same stamp check)."""
    ids = ev.collection.ids
    rows: list[tuple[str, dict, int | None]] = []
    stamps = dict(stamps or {})

    def add(name: str, run: Callable[[], EvalResult], cartridge_tokens: int | None):
        obj = study.cached_method(out, name, run, stamp=stamps.get(cartridges_read(name)),
                                  recorded=recorded)
        rows.append((name, obj, cartridge_tokens))

    add("cas_oracle", lambda: ev.oracle_cartridge(questions, cas, name="cas_oracle"), tokens)
    capacity = len(ids)
    for k in compose_k:
        sets = composed_sets(questions, ids, k, seed, "random")
        for label, source in (("cas", cas), ("naive", naive)):
            if source is None:
                continue
            add(f"{label}_composed_k{k}", lambda s=sets, src=source, n=f"{label}_composed_k{k}":
                ev.cartridges(questions, src, _lookup(questions, s), n, slots=k + 1,
                              capacity=capacity), (k + 1) * tokens)
    for position in positions:
        if position == "random" and positions_k in compose_k:
            continue  # the composed row above is that setting
        sets = composed_sets(questions, ids, positions_k, seed, position)
        name = f"cas_composed_k{positions_k}_true_{position}"
        add(name, lambda s=sets, n=name: ev.cartridges(
            questions, cas, _lookup(questions, s), n, slots=positions_k + 1,
            capacity=capacity), (positions_k + 1) * tokens)
    if monolithic is not None:
        add("monolithic", lambda: pipeline.evaluate_monolithic(ev, questions, monolithic,
                                                               name="monolithic"),
            n_docs * tokens)
    for r in retrievers:
        for k in retrieval_k:
            add(f"retrieval_cas_{r}_k{k}", lambda r=r, k=k: ev.retrieval_cartridges(
                questions, cas, top_k=k, retriever=r, slots=max(retrieval_k),
                name=f"retrieval_cas_{r}_k{k}"), k * tokens)
        for k in retrieval_k:
            add(f"rag_{r}_k{k}", lambda r=r, k=k: ev.rag(questions, top_k=k, retriever=r), None)
    return rows


# ----------------------------------------------------------------------------- the claims


def attended_positions(obj: dict) -> float:
    """Positions a question attends to: its prompt plus every cartridge token it reads."""
    s = obj["summary"]
    return float(s["prompt_tokens"]) + float(s["cartridge_tokens"])


def _best(results: Mapping[str, dict], prefix: str) -> str | None:
    names = [n for n in results if n.startswith(prefix)]
    return max(names, key=lambda n: (study.mc_accuracy(results[n]).mean(), n)) if names else None


COMPOSE_BARS = {3: -0.05, 7: -0.08}
"""Issue 24's "CAS composes" bars by k: composed with k others, within this many points of
its own oracle (-0.05 for any other k)."""


def claims(results: Mapping[str, dict], k: int = 3) -> list[dict]:
    """Issue 12's bars as paired accuracy differences (method - reference, 95% CI over the
    same questions resampled jointly), from `results`: method name -> `eval/<name>.json`
    object. "oracle_cartridge" is the study's isolated cartridge
    (the naive composition's own oracle). A claim whose methods are missing is left out.

      naive collapse      naive_composed_k{k} vs oracle_cartridge: bar diff <= -0.10
      CAS composes        cas_composed_k{k} vs cas_oracle:          bar diff >= COMPOSE_BARS[k]
      CAS vs monolithic   cas_oracle vs monolithic:                 bar diff >= +0.10
      retrieval vs RAG    best retrieval_cas_* vs best rag_*:       bar diff >= 0 and
                          >= 3x fewer attended positions (prompt + cartridge tokens)
    """
    # (claim, method, reference, op, bar, min_token_ratio): the ratio is reference / method
    # attended positions, checked only where it is given.
    specs = [("naive collapse", f"naive_composed_k{k}", "oracle_cartridge", "<=", -0.10, None),
             ("CAS composes", f"cas_composed_k{k}", "cas_oracle", ">=",
              COMPOSE_BARS.get(k, -0.05), None),
             ("CAS vs monolithic", "cas_oracle", "monolithic", ">=", 0.10, None),
             ("retrieval vs RAG", _best(results, "retrieval_cas_"), _best(results, "rag_"),
              ">=", 0.0, 3.0)]
    rows = []
    for claim, method, ref, op, bar, min_ratio in specs:
        if method not in results or ref not in results:
            continue
        a, b = study.mc_accuracy(results[ref]), study.mc_accuracy(results[method])
        diff, lo, hi = study.paired_diff_ci(a, b)
        met = diff <= bar if op == "<=" else diff >= bar
        row = {"claim": claim, "method": method, "reference": ref,
               "method_accuracy": float(b.mean()), "reference_accuracy": float(a.mean()),
               "diff": diff, "diff_ci": (lo, hi), "bar": f"diff {op} {bar:+.2f}"}
        if min_ratio is not None:
            ratio = attended_positions(results[ref]) / max(attended_positions(results[method]),
                                                            1e-9)
            row["token_ratio"] = ratio
            row["bar"] += f" and >= {min_ratio:g}x fewer tokens"
            met = met and ratio >= min_ratio
        row["met"] = bool(met)
        rows.append(row)
    return rows


def format_claims(rows: Sequence[dict]) -> str:
    lines = ["| claim | method | reference | accuracy | reference accuracy | diff [95% CI] "
             "| tokens ratio | bar | met |", "|" + "---|" * 9]
    for r in rows:
        ratio = f"{r['token_ratio']:.1f}x" if "token_ratio" in r else "-"
        lines.append(f"| {r['claim']} | {r['method']} | {r['reference']} "
                     f"| {r['method_accuracy']:.3f} | {r['reference_accuracy']:.3f} "
                     f"| {r['diff']:+.3f} [{r['diff_ci'][0]:+.3f}, {r['diff_ci'][1]:+.3f}] "
                     f"| {ratio} | {r['bar']} | {'yes' if r['met'] else 'NO'} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- ablations


def composition_rows(runs: Sequence[tuple[str, dict, dict]]) -> list[dict]:
    """Distractor schedules (or anything else that changes how cartridges are trained) side by
    side: per (label, oracle result, composed result), on the same questions, the oracle's and
    the composition's accuracy with 95% CIs, gold NLL, the composition's paired loss against
    its own oracle, and its paired difference to the first run's composition."""
    rows = []
    first = study.mc_accuracy(runs[0][2]) if runs else None
    for label, oracle, composed in runs:
        a, b = study.mc_accuracy(oracle), study.mc_accuracy(composed)
        diff, lo, hi = study.paired_diff_ci(a, b)
        vs, vlo, vhi = study.paired_diff_ci(first, b)
        rows.append({"run": label, "oracle": float(a.mean()), "oracle_ci": study.bootstrap_ci(a),
                     "composed": float(b.mean()), "composed_ci": study.bootstrap_ci(b),
                     "oracle_nll": float(oracle["summary"]["gold_nll"]),
                     "composed_nll": float(composed["summary"]["gold_nll"]),
                     "composed_minus_oracle": (diff, lo, hi),
                     "composed_vs_first": (vs, vlo, vhi)})
    return rows


def format_composition_rows(rows: Sequence[dict], k: int) -> str:
    def ci(m, lo_hi):
        return f"{m:.3f} [{lo_hi[0]:.3f}, {lo_hi[1]:.3f}]"

    lines = [f"| run | oracle accuracy | composed k={k} accuracy | gold NLL oracle / composed "
             "| composed - own oracle | composed - first row's composed |", "|" + "---|" * 6]
    for r in rows:
        lines.append(f"| {r['run']} | {ci(r['oracle'], r['oracle_ci'])} "
                     f"| {ci(r['composed'], r['composed_ci'])} "
                     f"| {r['oracle_nll']:.3f} / {r['composed_nll']:.3f} "
                     f"| {study.format_diff(r['composed_minus_oracle'])} "
                     f"| {study.format_diff(r['composed_vs_first'])} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- scale


def cartridge_bytes(model: LoadedModel, tokens: int, lr: float) -> int:
    """Bytes of one float32 cartridge of `tokens` positions plus its Adam state, as the budget
    manager holds it resident during training (shapes only: nothing is allocated)."""
    c = model.config
    kv = jax.ShapeDtypeStruct((1, c.num_layers, tokens, c.num_kv_heads, c.head_dim), jnp.float32)
    carts = jax.eval_shape(lambda k, v: train.split_cartridges(k, v, 1), kv, kv)
    opt = jax.eval_shape(train.make_optimizer(train.TrainConfig(lr=lr, total_steps=1)).init, carts)
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((carts, opt)))


def collection_ids(question_docs: list[str], all_ids: list[str], size: int, seed: int
                   ) -> list[str]:
    """The question documents, then the other ids of `all_ids` in a seeded order, `size` in
    all; a larger size extends a smaller one's list."""
    others = sorted(set(all_ids) - set(question_docs))
    if not len(question_docs) <= size <= len(question_docs) + len(others):
        raise ValueError(f"collection of {size} documents; expected between the "
                             f"{len(question_docs)} question documents and all "
                             f"{len(question_docs) + len(others)}")
    order = np.random.default_rng([seed, 12]).permutation(len(others))
    return list(question_docs) + [others[i] for i in order[:size - len(question_docs)]]


def _labelled(record: dict, key: str) -> dict:
    """record[key] (method -> value) keyed by `study.method_label`: the method with the recall
    the record holds for it (records written before "recall" had it in the method name)."""
    recalls = record.get("recall", {})
    return {study.method_label(m, recalls.get(m)): v for m, v in record[key].items()}


def format_sizes(records: list[dict]) -> str:
    """Accuracy [95% CI] per method (rows) and collection size (columns); the rows are the
    first size's methods, each labelled with its retrieval recall where it has one."""
    acc = [_labelled(r, "accuracy") for r in records]
    acc_ci = [_labelled(r, "accuracy_ci") for r in records]
    methods = list(acc[0]) if records else []
    lines = ["| method | " + " | ".join(f"{r['documents']} docs ({r['document_tokens']} tok)"
                                       for r in records) + " |", "|---" * (len(records) + 1) + "|"]
    for m in methods:
        cells = []
        for i in range(len(records)):
            a, ci = acc[i].get(m), acc_ci[i].get(m)
            cells.append("-" if a is None else f"{a:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    for key, fmt in (("cas_steps", "{}"), ("budget_share", "{:.1%}"), ("peak_rss_mb", "{:.0f}"),
                     ("io_wait_share", "{:.1%}"), ("paging_read_mb_s", "{:.0f}")):
        lines.append(f"| {key} | " + " | ".join(
            "-" if r.get(key) is None else fmt.format(r[key]) for r in records) + " |")
    return "\n".join(lines)


def read_baseline(rec: str, name: str, qs) -> dict:
    """`rec`'s eval/<name>.json, its records in the order of `qs` (matched on document and
    question; an error names the file if a question is missing). The summary is the recorded
    one, i.e. of the whole recorded set."""
    path = os.path.join(rec, "eval", f"{name}.json")
    if not os.path.exists(path):
        raise ValueError(f"{rec}: {path} is missing")
    obj = json.load(open(path))
    by_key = {(r["doc_id"], r["question"]): r for r in obj["records"]}
    missing = [q.question for q in qs if (q.doc_id, q.question) not in by_key]
    if missing:
        raise ValueError(f"{path}: {len(missing)} of {len(qs)} questions are not recorded "
                             f"there (e.g. {missing[0]!r}): another question set")
    return {"summary": obj["summary"], "records": [by_key[(q.doc_id, q.question)] for q in qs]}
