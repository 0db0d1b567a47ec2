"""How well cartridges compose: geometries, the composition curve, interference.

A study folder (`benchmarks.quality --cas`) holds the questions, the isolated cartridges
(`cartridges/`, read as "naive") and the CAS cartridges (`cas/`). On those, without
retraining:

  composed rows      per (source, geometry, k): each question's own cartridge plus k others
                     drawn by `distractors.composed_sets` (the same sets for every source and
                     geometry), composed by the geometry; k = 0 is the oracle. Cached as
                     eval/<source>_<geometry slug>_k<k>.json.
  composition curve  accuracy with 95% CIs and gold NLL against k, per (source, geometry),
                     and the paired difference of each k to its own k = 0 (`curve_rows`).
  versus             one geometry's reading minus another's, paired, per composed k, their
                     mean and per retrieval row (`versus_rows`): what a rule such as the
                     routing rule of BUILD_NOTES reads.
  interference       the mean KL(p_none || p_cart) per answer token of held-out
                     conversations, between the model reading one unrelated cartridge and the
                     model with none (nats; 0 = the cartridge is quiet off its document).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cas_jax.cartridges import attention
from cas_jax.evaluation import evaluate
from cas_jax.evaluation.questions import Question
from cas_jax.model import llama as model_lib
from cas_jax.model.loading import LoadedModel
from cas_jax.studies import cas_study, study
from cas_jax.training import dataset, distractors


def slug(geometry: attention.Geometry) -> str:
    """A file-name form of a geometry: "parallel", "parallel_temperature0.8", ..."""
    return str(geometry).replace(",", "_").replace("=", "")


def row_name(source: str, geometry: attention.Geometry, k: int) -> str:
    return f"{source}_{slug(geometry)}_k{k}"


def _reading_by(model: LoadedModel, ev: evaluate.Evaluator,
                geometry: attention.Geometry) -> evaluate.Evaluator:
    """`ev` composing cartridges by `geometry`."""
    return evaluate.Evaluator(model, ev.collection,
                              dataclasses.replace(ev.config, geometry=geometry))


def composed_row(model: LoadedModel, ev: evaluate.Evaluator, questions: Sequence[Question],
                 out: str, source_name: str, source, geometry: attention.Geometry, k: int,
                 seed: int = 0, stamp: dict | None = None) -> dict:
    """The cached evaluation of `source`'s cartridges composed k + 1 at a time (module doc)."""
    name = row_name(source_name, geometry, k)
    ids = ev.collection.ids

    def run():
        g_ev = _reading_by(model, ev, geometry)
        if k == 0:
            return g_ev.oracle_cartridge(questions, source, name=name)
        sets = distractors.composed_sets(questions, ids, k, seed, "random")
        table = {id(q): s for q, s in zip(questions, sets)}
        return g_ev.cartridges(questions, source, lambda q: table[id(q)], name, slots=k + 1,
                               capacity=len(ids))

    return study.cached_method(out, name, run, stamp=stamp)


def retrieval_row(model: LoadedModel, ev: evaluate.Evaluator, questions: Sequence[Question],
                  out: str, source_name: str, source, geometry: attention.Geometry,
                  retriever: str, k: int, slots: int, stamp: dict | None = None) -> dict:
    """The cached evaluation of retrieval + `source`'s cartridges under `geometry`: the top k
    documents `retriever` finds for each question, their cartridges composed (`slots`
    composition slots, the study's max k, so every k shares its shapes). Cached as
    eval/retrieval_<source>_<retriever>_<geometry slug>_k<k>.json."""
    name = f"retrieval_{source_name}_{retriever}_{slug(geometry)}_k{k}"

    def run():
        return _reading_by(model, ev, geometry).retrieval_cartridges(
            questions, source, top_k=k, retriever=retriever, slots=slots, name=name)

    return study.cached_method(out, name, run, stamp=stamp)


def claims_results(rows: dict[tuple[str, str, int], dict],
                   retrieval: dict[tuple[str, str, str, int], dict], references: dict[str, dict],
                   source: str, geometry: attention.Geometry) -> dict[str, dict]:
    """The claims' method table (`cas_study.claims` names) for `source` read under
    `geometry`: <source>_oracle and <source>_composed_k<k> from the composed rows (k = 0 is
    the oracle), retrieval_<source>_<r>_k<k> from the retrieval rows, and `references`
    (closed book, ICL, RAG, ... from the study's eval/) as they are."""
    g = str(geometry)
    out = dict(references)
    for (src, geo, k), obj in rows.items():
        if src == source and geo == g:
            out[f"{source}_oracle" if k == 0 else f"{source}_composed_k{k}"] = obj
    for (src, geo, r, k), obj in retrieval.items():
        if src == source and geo == g:
            out[f"retrieval_{source}_{r}_k{k}"] = obj
    return out


def curve_rows(results: dict[tuple[str, str, int], dict]) -> list[dict]:
    """One row per (source, geometry, k) of `results` [(source, geometry str, k) -> eval
    object]: accuracy [95% CI], gold NLL, and the paired difference to the same source and
    geometry at k = 0 (None where that row is missing)."""
    rows = []
    for (src, geo, k), obj in sorted(results.items()):
        acc = study.mc_accuracy(obj)
        row = {"source": src, "geometry": geo, "k": k, "accuracy": float(acc.mean()),
               "accuracy_ci": study.bootstrap_ci(acc),
               "gold_nll": float(obj["summary"]["gold_nll"]), "minus_oracle": None}
        base = results.get((src, geo, 0))
        if k > 0 and base is not None:
            row["minus_oracle"] = study.paired_diff_ci(study.mc_accuracy(base), acc)
        rows.append(row)
    return rows


def format_curve(rows: Sequence[dict]) -> str:
    lines = ["| source | geometry | k | accuracy [95% CI] | gold NLL | minus own k=0 [95% CI] |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        d = r["minus_oracle"]
        diff = "-" if d is None else study.format_diff(d)
        lo, hi = r["accuracy_ci"]
        lines.append(f"| {r['source']} | {r['geometry']} | {r['k']} | {r['accuracy']:.3f} "
                     f"[{lo:.3f}, {hi:.3f}] | {r['gold_nll']:.3f} | {diff} |")
    return "\n".join(lines)


def format_retrieval(rows: dict[tuple[str, str, str, int], dict]) -> str:
    """Retrieval rows [(source, geometry str, retriever, k) -> eval object]: accuracy [95%
    CI], recall (the question's document among those retrieved), attended positions."""
    lines = ["| source | geometry | retriever | k | accuracy [95% CI] | recall "
             "| attended positions |", "|---|---|---|---|---|---|---|"]
    for (src, geo, r, k), obj in sorted(rows.items()):
        acc = study.mc_accuracy(obj)
        lo, hi = study.bootstrap_ci(acc)
        recall = cas_study.recall(obj)
        lines.append(f"| {src} | {geo} | {r} | {k} | {acc.mean():.3f} [{lo:.3f}, {hi:.3f}] "
                     f"| {'-' if recall is None else f'{recall:.3f}'} "
                     f"| {cas_study.attended_positions(obj):.0f} |")
    return "\n".join(lines)


def versus_rows(results: dict[tuple[str, str, int], dict],
                retrieval: dict[tuple[str, str, str, int], dict], base: str, other: str,
                mean_ks: Sequence[int]) -> list[dict]:
    """`other` geometry's reading minus `base`'s on the same questions, per source: each
    composed k, the mean over `mean_ks` composed k (each question's correctness averaged over
    them first, so the interval is paired), then each retrieval (retriever, k). Rows: {source,
    row, diff: (mean, lo, hi)} with a 95% paired bootstrap interval; rows missing on either
    side are left out."""
    rows = []
    for src in sorted({s for s, _, _ in results}):
        pairs = {k: aligned_accuracy(results[(src, base, k)], results[(src, other, k)])
                 for (s, g, k) in results if s == src and g == base and k > 0
                 and (src, other, k) in results}
        for k in sorted(pairs):
            rows.append({"source": src, "row": f"composed k={k}",
                         "diff": study.paired_diff_ci(*pairs[k])})
        ks = [k for k in mean_ks if k in pairs]
        if ks:
            a = np.mean([pairs[k][0] for k in ks], axis=0)
            b = np.mean([pairs[k][1] for k in ks], axis=0)
            rows.append({"source": src, "row": "composed mean k=" + ",".join(map(str, ks)),
                         "diff": study.paired_diff_ci(a, b)})
        for (s, g, r, k), obj in sorted(retrieval.items()):
            if s == src and g == base and (src, other, r, k) in retrieval:
                pair = aligned_accuracy(obj, retrieval[(src, other, r, k)])
                rows.append({"source": src, "row": f"retrieval {r} k={k}",
                             "diff": study.paired_diff_ci(*pair)})
    return rows


def aligned_accuracy(a: dict, b: dict) -> tuple[np.ndarray, np.ndarray]:
    """Per-question correctness of two eval objects (`eval/<method>.json`), refusing records
    of other questions or in another order (ValueError naming both methods)."""
    keys = [[(r["doc_id"], r["question"]) for r in o["records"] if r["kind"] == "mc"]
            for o in (a, b)]
    if keys[0] != keys[1]:
        names = [o["summary"].get("method", "?") for o in (a, b)]
        raise ValueError(f"{names[0]} and {names[1]} are not scored on the same questions in "
                         "the same order")
    return study.mc_accuracy(a), study.mc_accuracy(b)


def format_versus(rows: Sequence[dict], base: str, other: str) -> str:
    lines = [f"| source | row | {other} minus {base} [95% CI] |", "|---|---|---|"]
    for r in rows:
        d = r["diff"]
        lines.append(f"| {r['source']} | {r['row']} | {study.format_diff(d)} |")
    return "\n".join(lines)


def plot_curve(rows: Sequence[dict], png_path: str, closed_book: float | None = None) -> None:
    """Accuracy (with CIs) against k, one line per (source, geometry)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for key in sorted({(r["source"], r["geometry"]) for r in rows}):
        pts = sorted((r["k"], r["accuracy"], *r["accuracy_ci"]) for r in rows
                     if (r["source"], r["geometry"]) == key)
        ks, acc, lo, hi = map(np.asarray, zip(*pts))
        ax.errorbar(ks, acc, yerr=[acc - lo, hi - acc], marker="o", capsize=3,
                    label=f"{key[0]} / {key[1]}")
    if closed_book is not None:
        ax.axhline(closed_book, color="gray", ls="--", label="closed book")
    ax.set_xlabel("other cartridges composed (k)")
    ax.set_ylabel("accuracy (multiple choice)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- interference


@functools.partial(jax.jit, static_argnames=("config", "geometry"))
def _kl_to_closed_book(params, keys, values, tokens, positions_from, loss_mask, *, config,
                       geometry):
    """Sum over masked tokens of KL(p_none || p_cart) and the token count, for rows of
    `tokens` [B, T] each reading one cartridge (keys/values [B, L, P, K, Dh])."""
    b, t = tokens.shape
    bank = attention.CartridgeBank(keys, values, jnp.full((b,), keys.shape[2], jnp.int32))
    prefix = attention.compose(bank, jnp.arange(b, dtype=jnp.int32)[:, None],
                               jnp.ones((b, 1), bool), geometry)
    idx = jnp.arange(t, dtype=jnp.int32)[None]
    valid = idx < positions_from[:, None]
    start = attention.num_prefix_tokens(prefix, b)
    with_cart, _ = model_lib.forward(params, tokens, jnp.where(valid, start[:, None] + idx, -1),
                                     prefix=prefix, config=config)
    none, _ = model_lib.forward(params, tokens, jnp.where(valid, idx, -1), config=config)
    lp_none = jax.nn.log_softmax(none, axis=-1)
    lp_cart = jax.nn.log_softmax(with_cart, axis=-1)
    kl = jnp.sum(jnp.exp(lp_none) * (lp_none - lp_cart), axis=-1)  # [B, T]
    return jnp.sum(jnp.where(loss_mask, kl, 0.0)), jnp.sum(loss_mask)


def interference(model: LoadedModel, data_dir: str, source, geometry: attention.Geometry,
                 seq_len: int, batch_size: int = 4, seed: int = 0) -> float:
    """Mean KL(p_none || p_cart) per answer token over `data_dir`'s conversations, each read
    with one cartridge of another document of the same data (seeded draw per row)."""
    ids = dataset.doc_ids(data_dir)
    if len(ids) < 2:
        raise ValueError(f"{data_dir}: interference needs conversations of >= 2 documents")
    rng = np.random.default_rng([seed, 24])
    cache: dict[str, object] = {}
    total = count = 0.0
    it = dataset.make_train_iterator(data_dir, batch_size, seq_len, shuffle=False, num_epochs=1)
    for batch in it:
        batch = dataset.trim_batch(batch, dataset.LENGTH_BUCKET)
        own = [ids[i] for i in np.asarray(batch["doc_index"])]
        other = [[d for d in ids if d != o][rng.integers(len(ids) - 1)] for o in own]
        for d in other:
            if d not in cache:
                cache[d] = source.get(d)
        keys = np.stack([np.asarray(cache[d].keys) for d in other])
        values = np.stack([np.asarray(cache[d].values) for d in other])
        s, n = _kl_to_closed_book(model.params, jnp.asarray(keys), jnp.asarray(values),
                                  jnp.asarray(batch["tokens"]), jnp.asarray(batch["length"]),
                                  jnp.asarray(batch["loss_mask"]), config=model.config,
                                  geometry=geometry)
        total += float(s)
        count += float(n)
    return total / max(count, 1.0)


def cached_interference(out: str, name: str, run: Callable[[], float]) -> float:
    """`run()` once, kept in out/interference.json under `name`."""
    path = os.path.join(out, "interference.json")
    table = json.load(open(path)) if os.path.exists(path) else {}
    if name not in table:
        table[name] = run()
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(table, f, indent=1)
        os.replace(tmp, path)
    return table[name]
