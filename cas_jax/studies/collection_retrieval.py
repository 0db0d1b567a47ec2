"""Retrieval over a whole collection (issue 25, item 3): the study's questions asked of every
Factbook section at once (2,538 sections, ~2.07M tokens) instead of their 26 documents.

Stages (`run`; each resumes from what `out` holds, `benchmarks.collection_retrieval` wires them):
  1. the collection: documents and tokens (`stages.json`);
  2. retrieval of each question over two pools, the question documents and the whole
     collection, by BM25 and dense (`retrieval/<pool>_<retriever>.json`, embeddings cached
     under `embeddings/`); recall@k of each;
  3. baselines closed book and ICL (the pool does not change them: read from a study folder
     with the same questions when given, else evaluated; `eval/`);
  4. retrieval + CAS at each k over the whole collection: the retrieved documents' trained
     cartridges where the store has them, initial ones elsewhere
     (`collection_cartridges.CollectionCartridges`, kept in `initial/`), paged through the
     budget manager at `budget_share` of the bytes of the cartridges used
     (`eval/retrieval_cas_<retriever>_k<k>.json`; paging figures in `stages.json`);
  5. the substitution check, on the question documents alone: retrieval + CAS and composed
     sets with every cartridge trained, against the same sets with the non-gold documents'
     cartridges initial, paired accuracy differences with 95% CIs (`validation/eval/`; not
     paged: each method holds all its cartridges);
  6. RAG at each k over all chunks of the collection (`eval/rag_<retriever>_k<k>.json`; last,
     as the slowest);
  7. the report (`report.md`, `report.json`), last line `documents=N collection_tokens=T
     retrieval_cas_minus_rag=D token_ratio=R substitution_<method>=D ...`.
Cartridges compose by `geometry`, else the geometry the trained cartridges record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence

import numpy as np

from cas_jax.cartridges import attention
from cas_jax.documents import retrieval
from cas_jax.documents.corpus import Collection
from cas_jax.evaluation import evaluate
from cas_jax.evaluation.questions import Question
from cas_jax.evaluation.results import EvalResult
from cas_jax.model.loading import LoadedModel
from cas_jax.studies import cas_study, collection_cartridges as cc, study
from cas_jax.training.distractors import composed_sets

POOLS = ("documents", "collection")
"""The retrieval pools: the question documents alone, and every document of the collection."""


@dataclasses.dataclass(frozen=True)
class CollectionRetrievalConfig:
    """What `run` measures (module doc). `store`: the trained CAS cartridges (a store root or
    a folder holding one in cartridges/); `baselines`: a study folder whose eval/ holds
    closed_book and icl for the same questions ("" evaluates them); `geometry`: "" reads
    the trained cartridges' own; `compose_k`: sizes of the composed sets checked (others
    beside the true document)."""

    out: str
    store: str
    retrievers: tuple[str, ...] = ("bm25", "dense")
    top_k: tuple[int, ...] = (1, 2, 4)
    recall_k: tuple[int, ...] = (1, 2, 4, 8, 16)
    budget_share: float = 0.10
    geometry: str = ""
    baselines: str = ""
    rag: bool = True
    validation: bool = True
    compose_k: tuple[int, ...] = (1, 3)
    max_new_tokens: int = 0
    seed: int = 0


class StageLog:
    """Wall time and figures per stage in `<out>/stages.json`, kept across resumed runs: a
    stage is recorded when it runs, never when its result was read from disk."""

    def __init__(self, out: str):
        self.path = os.path.join(out, "stages.json")
        self.stages = json.load(open(self.path)) if os.path.exists(self.path) else {}

    def record(self, name: str, **figures) -> None:
        self.stages[name] = {**self.stages.get(name, {}), **figures}
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.stages, f, indent=1)
        os.replace(tmp, self.path)

    @contextlib.contextmanager
    def timed(self, name: str, **figures):
        t0 = time.perf_counter()
        yield
        self.record(name, wall_s=time.perf_counter() - t0, **figures)

    def cached(self, out: str, name: str, run: Callable[[], EvalResult], stamp: dict | None,
               stage: str = "") -> dict:
        """`study.cached_method`, with the run's wall time recorded under `stage` (default
        `name`)."""
        def timed_run():
            with self.timed(stage or name):
                return run()
        return study.cached_method(out, name, timed_run, stamp=stamp)


def ids_hash(ids: Sequence[str]) -> str:
    return hashlib.sha256("\0".join(ids).encode()).hexdigest()[:16]


def cached_search(log: StageLog, path: str, name: str, texts: dict[str, str], kind: str,
                  questions: Sequence[Question], depth: int, cache_dir: str) -> list[list[str]]:
    """The `depth` best ids of `texts` for each question by retriever `kind`, read from
    `path` when it holds this pool's, questions' and depth's search; else searched (index
    and search timed under `name`) and written there."""
    key = {"pool": ids_hash(list(texts)), "questions": ids_hash([q.question for q in questions]),
           "depth": depth, "kind": kind}
    if os.path.exists(path):
        obj = json.load(open(path))
        if obj["key"] == key:
            return obj["ids"]
    with log.timed(f"index_{name}"):
        index = retrieval.make_retriever(kind, texts, cache_dir=cache_dir)
    with log.timed(f"search_{name}", queries=len(questions)):
        found = [[i for i, _ in index.search(q.question, depth)] for q in questions]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump({"key": key, "ids": found}, f)
    os.replace(path + ".tmp", path)
    return found


def recall_at(found: Sequence[Sequence[str]], questions: Sequence[Question], k: int) -> float:
    """Share of questions whose own document is among their first k retrieved ids."""
    return float(np.mean([q.doc_id in f[:k] for f, q in zip(found, questions)]))


def collection_tokens(model: LoadedModel, docs: Collection, log: StageLog) -> int:
    """Tokens of every document of `docs` (recorded once in the stage log)."""
    got = log.stages.get("collection", {})
    if got.get("documents") != len(docs) or got.get("pool") != ids_hash(docs.ids):
        with log.timed("collection", documents=len(docs), pool=ids_hash(docs.ids)):
            tokens = sum(len(model.tokenizer.encode(d.text, add_special_tokens=False))
                         for d in docs.values())
        log.record("collection", tokens=tokens)
    return log.stages["collection"]["tokens"]


def geometry_for(cfg: CollectionRetrievalConfig, settings: cc.InitialSettings
                 ) -> attention.Geometry:
    return attention.Geometry.parse(cfg.geometry or settings.geometry)


def trained_stamp(cartridges: cc.CollectionCartridges, doc_ids: Sequence[str],
                  geometry: attention.Geometry, **extra) -> dict:
    """What a cartridge method's result depends on: the trained cartridges' live versions,
    how initial ones are made, the geometry, and `extra`."""
    versions = [f"{d}:{cartridges.trained.manifest(d)[0]}" for d in sorted(doc_ids)]
    return {"trained": ids_hash(versions), "initial": dataclasses.asdict(cartridges.settings),
            "geometry": str(geometry), **extra}


def baselines(ev: evaluate.Evaluator, questions: Sequence[Question],
              cfg: CollectionRetrievalConfig, log: StageLog) -> dict[str, dict]:
    """closed_book and icl: copied into `out/eval/` from cfg.baselines, else evaluated."""
    out = {}
    for name, run in (("closed_book", lambda: ev.closed_book(questions)),
                      ("icl", lambda: ev.icl(questions))):
        path = os.path.join(cfg.out, "eval", f"{name}.json")
        if cfg.baselines and not os.path.exists(path):
            obj = cas_study.read_baseline(cfg.baselines, name, questions)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                json.dump({**obj, "copied_from": cfg.baselines}, f, indent=1, ensure_ascii=False)
        out[name] = log.cached(cfg.out, name, run, stamp=None)
    return out


def retrieval_entries(found: Sequence[Sequence[str]], questions: Sequence[Question], k: int
                      ) -> tuple[list[list[str]], list[dict]]:
    """The top-k sets, and per question its "retrieved" ids and "retrieval_hit"."""
    sets = [list(f[:k]) for f in found]
    return sets, [{"retrieved": s, "retrieval_hit": q.doc_id in s}
                  for s, q in zip(sets, questions)]


def paged_method(log: StageLog, out: str, name: str, ev: evaluate.Evaluator,
                 questions: Sequence[Question], entries: list[list[str]],
                 cartridges: cc.CollectionCartridges, budget_share: float, stamp: dict,
                 extra: list[dict] | None = None, stage: str = "") -> dict:
    """One cached cartridge method (`collection_cartridges.paged_cartridges`); its initial
    cartridges are made first (timed apart) and its paging figures go to the stage log,
    under `stage` (default `name`)."""
    stage = stage or name

    def run():
        with log.timed(f"initial_cartridges_{stage}"):
            made = cartridges.ensure_initial([i for e in entries for i in e])
        log.record(f"initial_cartridges_{stage}", made=made)
        result, paging = cc.paged_cartridges(ev, questions, entries, cartridges, name,
                                             budget_share, extra)
        log.record(stage, paging=paging)
        return result
    return log.cached(out, name, run, stamp={**stamp, "budget_share": budget_share},
                      stage=stage)


def cas_methods(ev: evaluate.Evaluator, questions: Sequence[Question],
                found: dict[str, list[list[str]]], cartridges: cc.CollectionCartridges,
                cfg: CollectionRetrievalConfig, log: StageLog, stamp: dict) -> dict[str, dict]:
    """Stage 4: retrieval + CAS at every k over the whole collection, paged on the budget."""
    res: dict[str, dict] = {}
    for r in cfg.retrievers:
        for k in cfg.top_k:
            entries, extra = retrieval_entries(found[r], questions, k)
            name = f"retrieval_cas_{r}_k{k}"
            res[name] = paged_method(log, cfg.out, name, ev, questions, entries, cartridges,
                                     cfg.budget_share, stamp, extra)
    return res


def rag_methods(ev: evaluate.Evaluator, questions: Sequence[Question],
                cfg: CollectionRetrievalConfig, log: StageLog) -> dict[str, dict]:
    """Stage 6: RAG at every k over all chunks of the collection."""
    stamp = {"pool": ids_hash(ev.collection.ids), "chunk_tokens": ev.config.chunk_tokens}
    return {f"rag_{r}_k{k}": log.cached(cfg.out, f"rag_{r}_k{k}",
                                        lambda r=r, k=k: ev.rag(questions, k, r), stamp=stamp)
            for r in cfg.retrievers for k in cfg.top_k} if cfg.rag else {}


def substituted(entries: Sequence[Sequence[str]], questions: Sequence[Question]
                ) -> list[list[str]]:
    """`entries` with every document but the question's own read by its initial cartridge."""
    return [[d if d == q.doc_id else cc.initial_id(d) for d in e]
            for e, q in zip(entries, questions)]


def validation_sets(questions: Sequence[Question], found: dict[str, list[list[str]]],
                    doc_ids: Sequence[str], cfg: CollectionRetrievalConfig
                    ) -> list[tuple[str, list[list[str]], list[dict] | None]]:
    """(method, sets, extra) of the substitution check: retrieval + CAS over the question
    documents at each k, and the composed sets of `cas_study` (the true document among k
    others, drawn as `distractors.composed_sets` draws them)."""
    out = []
    for r in cfg.retrievers:
        for k in cfg.top_k:
            out.append((f"retrieval_cas_{r}_k{k}", *retrieval_entries(found[r], questions, k)))
    for k in cfg.compose_k:
        out.append((f"cas_composed_k{k}", composed_sets(questions, doc_ids, k, cfg.seed,
                                                        "random"), None))
    return out


def validation(ev: evaluate.Evaluator, questions: Sequence[Question],
               found: dict[str, list[list[str]]], cartridges: cc.CollectionCartridges,
               cfg: CollectionRetrievalConfig, log: StageLog, stamp: dict) -> list[dict]:
    """Stage 5: per method, trained against non-gold-initial, paired (module doc). Not
    under the budget: every cartridge a method uses is held at once (budget share 1), as
    in the study's own rows."""
    out, rows = os.path.join(cfg.out, "validation"), []
    os.makedirs(out, exist_ok=True)
    for name, sets, extra in validation_sets(questions, found, ev.collection.ids, cfg):
        trained = paged_method(log, out, name, ev, questions, sets, cartridges, 1.0, stamp,
                               extra, stage=f"validation_{name}")
        initial = paged_method(log, out, f"{name}_initial_others", ev, questions,
                               substituted(sets, questions), cartridges, 1.0, stamp, extra,
                               stage=f"validation_{name}_initial_others")
        a, b = study.mc_accuracy(trained), study.mc_accuracy(initial)
        diff, lo, hi = study.paired_diff_ci(a, b)
        rows.append({"method": name, "trained": float(a.mean()), "initial_others":
                     float(b.mean()), "diff": diff, "diff_ci": (lo, hi),
                     "trained_nll": trained["summary"]["gold_nll"],
                     "initial_others_nll": initial["summary"]["gold_nll"]})
    return rows


# ----------------------------------------------------------------------------- run and report


def run(model: LoadedModel, questions: Sequence[Question], docs: Collection,
        cfg: CollectionRetrievalConfig) -> dict:
    """Every stage (module doc) on `questions` over the collection `docs` (which holds their
    documents); returns the report (also written to report.md and report.json)."""
    os.makedirs(cfg.out, exist_ok=True)
    log = StageLog(cfg.out)
    question_docs = sorted({q.doc_id for q in questions})
    trained = cc.open_store(cfg.store, model.fingerprint)
    lacking = [d for d in question_docs if d not in docs or not trained.exists(d)]
    if lacking:
        raise ValueError(f"question documents {lacking[:5]} are not in the collection or have "
                         f"no trained cartridge in {trained.root}")
    tokens = collection_tokens(model, docs, log)
    settings = cc.trained_settings(trained, question_docs)
    geometry = geometry_for(cfg, settings)
    cartridges = cc.CollectionCartridges(model, docs.texts, trained,
                                         os.path.join(cfg.out, "initial"), settings)
    ecfg = evaluate.EvalConfig(max_new_tokens=cfg.max_new_tokens, geometry=geometry,
                               retrieval_cache=os.path.join(cfg.out, "embeddings"))
    ev = evaluate.Evaluator(model, docs, ecfg)
    depth = max((*cfg.recall_k, *cfg.top_k))
    texts = {"documents": docs.subset(question_docs).texts, "collection": docs.texts}
    found = {pool: {r: cached_search(log, os.path.join(cfg.out, "retrieval", f"{pool}_{r}.json"),
                                     f"{pool}_{r}", texts[pool], r, questions, depth,
                                     ecfg.retrieval_cache)
                    for r in cfg.retrievers} for pool in POOLS}
    recall = {pool: {r: {k: recall_at(found[pool][r], questions, k) for k in cfg.recall_k}
                     for r in cfg.retrievers} for pool in POOLS}
    stamp = trained_stamp(cartridges, question_docs, geometry)
    results = baselines(ev, questions, cfg, log)
    results.update(cas_methods(ev, questions, found["collection"], cartridges, cfg, log,
                               {**stamp, "pool": ids_hash(docs.ids)}))
    checks = []
    if cfg.validation:
        small = evaluate.Evaluator(model, docs.subset(question_docs), ecfg)
        checks = validation(small, questions, found["documents"], cartridges, cfg, log,
                            {**stamp, "pool": ids_hash(question_docs)})
    results.update(rag_methods(ev, questions, cfg, log))
    return write_report(cfg, len(docs), tokens, geometry, recall, results, checks, log)


def scale_rows(results: dict[str, dict], stages: dict) -> list[dict]:
    """Per RAG and retrieval + CAS method: accuracy, recall, attended positions per question
    (prompt plus cartridge tokens), paging figures and times."""
    rows = []
    for name, obj in results.items():
        if not name.startswith(("rag_", "retrieval_cas_")):
            continue
        s = obj["summary"]
        rows.append({"method": name, "accuracy": float(study.mc_accuracy(obj).mean()),
                     "recall": cas_study.recall(obj),
                     "attended": float(s["prompt_tokens"]) + float(s["cartridge_tokens"]),
                     "eval_s": s["seconds"], "wall_s": stages.get(name, {}).get("wall_s"),
                     "paging": stages.get(name, {}).get("paging")})
    return rows


def _num(x, fmt: str) -> str:
    return "-" if x is None else fmt.format(x)


def format_scale(rows: Sequence[dict]) -> str:
    lines = ["| method | accuracy | recall | attended positions/q | initial share | budget MiB "
             "(share of used) | read MiB | hit rate (prefetched) | eval s | wall s |",
             "|" + "---|" * 10]
    for r in rows:
        p = r["paging"] or {}
        budget = (f"{p['budget_bytes'] / 2**20:.0f} ({p['budget_share']:.1%} of "
                  f"{p['used_cartridges']})" if p else "-")
        hits = f"{p['hit_rate']:.2f} ({p['prefetch_hit_rate']:.2f})" if p else "-"
        read = f"{p['bytes_read'] / 2**20:.0f}" if p else "-"
        lines.append(f"| {r['method']} | {r['accuracy']:.3f} | {_num(r['recall'], '{:.3f}')} "
                     f"| {r['attended']:.0f} | {_num(p.get('initial_share'), '{:.2f}')} "
                     f"| {budget} | {read} "
                     f"| {hits} | {r['eval_s']:.0f} | {_num(r['wall_s'], '{:.0f}')} |")
    return "\n".join(lines)


def format_recall(recall: dict, sizes: dict[str, int]) -> str:
    ks = sorted({k for pool in recall.values() for r in pool.values() for k in r})
    lines = ["| pool | retriever | " + " | ".join(f"recall@{k}" for k in ks) + " |",
             "|" + "---|" * (2 + len(ks))]
    for pool, by in recall.items():
        for r, at in by.items():
            lines.append(f"| {pool} ({sizes[pool]} docs) | {r} | "
                         + " | ".join(f"{at[k]:.3f}" for k in ks) + " |")
    return "\n".join(lines)


def format_validation(rows: Sequence[dict]) -> str:
    lines = ["| method (question documents) | all trained | non-gold initial | initial - trained "
             "[95% CI] | gold NLL trained / initial |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['trained']:.3f} | {r['initial_others']:.3f} "
                     f"| {r['diff']:+.3f} [{r['diff_ci'][0]:+.3f}, {r['diff_ci'][1]:+.3f}] "
                     f"| {r['trained_nll']:.3f} / {r['initial_others_nll']:.3f} |")
    return "\n".join(lines)


def write_report(cfg: CollectionRetrievalConfig, documents: int, tokens: int,
                 geometry: attention.Geometry, recall: dict, results: dict[str, dict],
                 checks: list[dict], log: StageLog) -> dict:
    """Stage 7: report.md and report.json; prints the report and its last line."""
    closed, icl = results["closed_book"], results["icl"]
    rows = [study.method_row(n, o, closed, icl, None, None, recall=cas_study.recall(o))
            for n, o in results.items()]
    scale = scale_rows(results, log.stages)
    claims = [c for c in cas_study.claims(results) if c["claim"] == "retrieval vs RAG"]
    sizes = {"documents": len({r["doc_id"] for r in closed["records"]}),
             "collection": documents}
    stages = "\n".join(f"| {n} | {_num(s.get('wall_s'), '{:.1f}')} | "
                       + json.dumps({k: v for k, v in s.items()
                                     if k not in ("wall_s", "paging")}) + " |"
                       for n, s in log.stages.items())
    text = (f"{documents} documents, {tokens} tokens; {len(closed['records'])} questions; "
            f"geometry {geometry}\n\n" + format_recall(recall, sizes) + "\n\n"
            + study.format_rows(rows) + "\n\n" + format_scale(scale) + "\n\n"
            + cas_study.format_claims(claims)
            + ("\n\nSubstitution check (paired accuracy differences):\n\n"
               + format_validation(checks) if checks else "")
            + "\n\n| stage | wall s | figures |\n|---|---|---|\n" + stages)
    last = {"documents": documents, "collection_tokens": tokens}
    if claims:
        last.update(retrieval_cas_minus_rag=round(claims[0]["diff"], 4),
                    token_ratio=round(claims[0]["token_ratio"], 2))
    last.update({f"substitution_{c['method']}": round(c["diff"], 4) for c in checks})
    text += "\n\n" + " ".join(f"{k}={v}" for k, v in last.items())
    report = {"documents": documents, "collection_tokens": tokens, "geometry": str(geometry),
              "recall": recall, "rows": rows, "scale": scale, "claims": claims,
              "validation": checks, "stages": log.stages, "last": last}
    with open(os.path.join(cfg.out, "report.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(cfg.out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(text, flush=True)
    return report
