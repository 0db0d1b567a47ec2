"""The quality study run end to end: its stages in order, resumed from the output folder.

`benchmarks.quality` turns its flags into a `QualityRun` and calls `run_quality_study`:
  1. self-study conversations (`selfstudy/`, or a reused run's when its synthesis settings are
     the same) and a held-out set from the next seed (`heldout/`), with the data
     report of `cas_jax.training.selfstudy_data` (`selfstudy/quality.json`);
  2. baselines: closed book, ICL, RAG (`eval/`);
  3. one cartridge per document trained in isolation with a learning curve
     (`cartridges/`, `curve.jsonl`, `train_with_curve`), then its oracle evaluation;
  4. with a `CollectionRecipe`: the collection methods of `cas_jax.studies.cas_study` (`cas/`,
     `monolithic/`);
  5. the report: `report.md`, `report.json`, `curve.png`, `times.json`, and the printed table
     with its last line `icl_gap=X recovered_acc=Y recovered_nll=Z compression=C`.
`cas_jax.studies.study` holds the stages' parts and the statistics.

Evaluations are cached in `eval/` (`study.cached_method`), one missing there first looked up in
the recorded studies (`QualityRun.reuse`, `reuse_eval`) and recorded here, its stamp checked.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence

import numpy as np

from cas_jax.cartridges import attention
from cas_jax.documents import corpus
from cas_jax.documents.corpus import Collection
from cas_jax.evaluation import evaluate, questions as questions_lib
from cas_jax.evaluation.questions import Question
from cas_jax.model.loading import LoadedModel
from cas_jax.studies import cas_study, pipeline, splits, study
from cas_jax.training import dataset, selfstudy_data

SYNTHESIS_SETTINGS = ("conversations_per_doc", "family_weights", "span_turns", "chunk_min",
                      "chunk_max", "max_user_tokens", "max_answer_tokens",
                      "no_repeat_ngram_size", "repetition_penalty", "synthesis_batch", "seed")
"""The recorded launcher settings (`QualityRun.record`) that decide the self-study data: a
reused run whose recorded values of all of them equal this run's lends its data too."""

DATA_REPORT_SAMPLE = 400
"""Conversations sampled for the self-study data report."""


def epoch_steps(n_docs: int, conversations_per_doc: int, batch: int) -> int:
    """Training steps of one pass over n_docs x conversations_per_doc conversations, `batch`
    per step (a last partial batch is a step)."""
    return -(-n_docs * conversations_per_doc // batch)


def steps_for(epochs: float, one_epoch: int) -> int:
    """Steps of `epochs` passes of `one_epoch` steps each, rounded, at least 1."""
    return max(1, round(epochs * one_epoch))


def factbook_questions(split: str, profiles: int, sections: Sequence[str],
                       kinds: Sequence[str], seed: int
                       ) -> tuple[list[str], list[Question], Collection]:
    """The study's material: the first `profiles` profile ids of `split` ("dev" or "test",
    `cas_jax.studies.splits`), every Factbook question field of them (of `kinds`), addressed to the
    section holding the field and kept where that section is one of `sections`, and those
    section documents. Returns (profile ids, questions, documents)."""
    ids = (splits.dev_profiles() if split == "dev" else splits.test_profiles())[:profiles]
    qs = questions_lib.to_section_questions(questions_lib.generate_factbook_questions(
        ids, len(questions_lib.FIELDS), seed, kinds=list(kinds)))
    qs = [q for q in qs if q.doc_id.split("-", 1)[1] in sections]
    docs = corpus.load_factbook_sections(documents=sorted({q.doc_id for q in qs}))
    return ids, qs, docs


@dataclasses.dataclass(frozen=True)
class CollectionRecipe:
    """The collection methods of a study (`cas_jax.studies.cas_study`): how the CAS cartridges train
    (`steps`, k_max `distractors`, the schedule and its options of `cas_jax.training.distractors`,
    `grad_scope`), which rows run (`naive`: naive composition of the study's isolated
    cartridges; `monolithic`: the monolithic baseline) and their sizes."""

    steps: int
    distractors: int = 3
    schedule: str = "uniform"
    ramp_steps: int = 100
    grad_scope: str = "target"
    p_iso: float = 0.0
    quiet: float = 0.0
    naive: bool = True
    monolithic: bool = True
    compose_k: tuple[int, ...] = (1, 3, 7)
    positions: tuple[str, ...] = ("first", "last", "random")
    positions_k: int = 3
    retrieval_k: tuple[int, ...] = (1, 2, 4)
    retrievers: tuple[str, ...] = ("bm25", "dense")


@dataclasses.dataclass(frozen=True)
class QualityRun:
    """One quality study: its output folder, recipe and material (`factbook_questions`).

    `kinds` and `split` describe the material in the printed header; `record` (JSON-able, the
    launcher's settings) is written to `config.json` as "flags" and compared with a reused
    run's on `SYNTHESIS_SETTINGS` and every `synthesis.*` setting; `reuse` is another study
    folder with the same questions whose held-out data and baselines (and self-study data,
    when the settings match) this run reads, and whose recorded results of methods that read
    no cartridges (closed book, ICL, RAG) it reuses; `reuse_eval` are recorded study folders
    (or result files) of the same questions whose results of every method it reuses, their
    stamps checked (`study.recall_result`), the isolated cartridges' learning curve coming
    with their oracle's; `collection` adds the collection methods."""

    out: str
    config: study.StudyConfig
    questions: list[Question]
    docs: Collection
    profiles: list[str]
    kinds: tuple[str, ...]
    split: str
    record: dict
    reuse: str = ""
    collection: CollectionRecipe | None = None
    reuse_eval: tuple[str, ...] = ()


class ReuseError(ValueError):
    """The reused study is not of the same questions, or a recorded one is missing."""


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def selfstudy_dir(run: QualityRun) -> str:
    """Where this run's self-study data lives: its own `selfstudy/`, or the reused run's when
    that run recorded the same synthesis settings. Raises ReuseError if the reused run's
    questions differ from this run's (already written to `questions.jsonl`)."""
    own = os.path.join(run.out, "selfstudy")
    if not run.reuse:
        return own
    theirs = os.path.join(run.reuse, "questions.jsonl")
    if not os.path.exists(theirs) or (
            _read(theirs) != _read(os.path.join(run.out, "questions.jsonl"))):
        raise ReuseError(f"{run.reuse}: its questions.jsonl is missing or differs from this "
                         "run's (same split/profiles/sections/kinds/seed needed)")
    their_record = json.loads(_read(os.path.join(run.reuse, "config.json")))["flags"]
    if same_synthesis(their_record, run.record):
        return os.path.join(run.reuse, "selfstudy")
    return own


def same_synthesis(theirs: dict, mine: dict) -> bool:
    """Whether two `QualityRun.record`s make the same self-study data: equal on
    `SYNTHESIS_SETTINGS` and every `synthesis.<field>` (one `theirs` predates: the default)."""
    fields = [k for k in mine if k.startswith("synthesis.")]
    return (all(theirs.get(f) == mine.get(f) for f in SYNTHESIS_SETTINGS)
            and all(theirs.get(f, getattr(pipeline.SYNTHESIS, f.split(".", 1)[1]))
                    == mine[f] for f in fields))


def check_recorded(run: QualityRun) -> None:
    """Raises ReuseError if a `run.reuse_eval` entry is missing, or is a study whose
    questions.jsonl differs from this run's (a folder without one, e.g. of collection rows
    only, is taken to be of the same questions)."""
    mine = _read(os.path.join(run.out, "questions.jsonl"))
    for entry in run.reuse_eval:
        theirs = os.path.join(entry, "questions.jsonl")
        if not os.path.exists(entry) or (os.path.exists(theirs) and _read(theirs) != mine):
            raise ReuseError(f"{entry}: no such recorded study or result, or its "
                             "questions.jsonl differs from this run's")


class _Clock:
    """Wall time per stage, added to what earlier (resumed) runs recorded in times.json."""

    def __init__(self, out: str):
        self.path = os.path.join(out, "times.json")
        self.times = json.load(open(self.path)) if os.path.exists(self.path) else {}
        self.t0 = time.perf_counter()

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def stage(self, name: str) -> None:
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - self.t0
        print(f"  {name}: {self.times[name]:.0f}s", flush=True)

    def save(self) -> None:
        with open(self.path, "w") as f:
            json.dump(self.times, f)


def _print_report(r) -> None:
    print(f"  step {r.step}/{r.total_steps} loss {r.loss:.4f} ETA {r.eta_s:.0f}s", flush=True)


def _self_study(model: LoadedModel, run: QualityRun, data_source: str, clock: _Clock
                ) -> tuple[str, str, list[selfstudy_data.FamilyReport]]:
    """Stage 1: (training data folder, held-out folder, data report rows); the training
    data is synthesised into (or read from) `data_source` (`selfstudy_dir`)."""
    p = run.config.pipeline
    clock.start()
    print("== 1. self-study ==", flush=True)
    progress = lambda q: print(  # noqa: E731
        f"  {q.conversations_done}/{q.conversations_total} conversations, ETA {q.eta_s:.0f}s",
        flush=True)
    data_dir = pipeline.synthesize(model, run.docs, data_source, p, on_batch=progress)
    if run.reuse:  # the other run's held-out set, as it was synthesised
        heldout_dir = os.path.join(run.reuse, "heldout")
        dataset.read_manifests(heldout_dir)
    else:
        heldout_dir = pipeline.synthesize(
            model, run.docs, os.path.join(run.out, "heldout"),
            dataclasses.replace(p, conversations_per_doc=run.config.heldout_per_doc,
                                seed=p.seed + 1), on_batch=progress)
    clock.stage("synthesis")
    report_path = os.path.join(data_dir, "quality.json")  # named before the module was; kept
    if not os.path.exists(report_path):
        rows = selfstudy_data.dataset_report(model, data_dir, run.docs, limit=DATA_REPORT_SAMPLE)
        with open(report_path, "w") as f:
            json.dump([dataclasses.asdict(r) for r in rows], f, indent=1)
    data_report = [selfstudy_data.FamilyReport(**r) for r in json.load(open(report_path))]
    print(selfstudy_data.format_report(data_report), flush=True)
    return data_dir, heldout_dir, data_report


def train_with_curve(model: LoadedModel, docs: Collection, data_dir: str, heldout_dir: str,
                     store_dir: str, ev: evaluate.Evaluator, questions: Sequence[Question],
                     cfg: study.StudyConfig, curve_path: str,
                     on_report=None, on_point: Callable[[dict], None] | None = None) -> dict:
    """Trains one cartridge per document in isolation (distractors 0) to `cfg.pipeline.steps`,
    stopping every `cfg.eval_every` steps (and at step 0) to append a curve point: held-out
    loss, no-cartridge floor, oracle gold NLL and accuracy. Resumes from the curve and store."""
    p = cfg.pipeline
    points = study.curve_points(curve_path)
    done = {pt["step"] for pt in points}
    marks = study.curve_marks(cfg)
    floor = points[0]["heldout_floor"] if points else None
    quick = evaluate.Evaluator(ev.model, ev.collection,
                               dataclasses.replace(ev.config, max_new_tokens=0))
    summary: dict = {}
    for step in marks:
        t0 = time.perf_counter()
        if step:
            store, summary = pipeline.train_cartridges(model, docs, data_dir, store_dir,
                                                       dataclasses.replace(p, steps=step),
                                                       distractors=0, on_report=on_report)
        else:
            store = pipeline.initial_store(model, docs, store_dir, p)
        if step in done:
            continue
        source = pipeline.StoreSource(store)
        if floor is None:
            floor = study.heldout_loss(model, heldout_dir, source, p.seq_len,
                                       with_cartridges=False)
        res = quick.oracle_cartridge(questions, source)
        loss = study.heldout_loss(model, heldout_dir, source, p.seq_len)
        point = {"step": step, "heldout_loss": loss, "heldout_floor": floor,
                 "gold_nll": res.gold_nll, "accuracy": res.accuracy,
                 "seconds": time.perf_counter() - t0}
        with open(curve_path, "a") as f:
            f.write(json.dumps(point) + "\n")
        if on_point is not None:
            on_point(point)
    return summary


def recall_isolated(run: QualityRun, oracle_name: str, stamp: dict) -> None:
    """Records the isolated cartridges' oracle evaluation from `run.reuse_eval` into `run.out`
    where it is missing there (`study.recall_result`, its stamp checked), and with it the
    learning curve of the study it came from when `run.out` has none: a study whose curve
    and oracle are both in place trains the isolated cartridges only if a method reads them."""
    found = study.recall_result(run.out, oracle_name, stamp, run.reuse_eval)
    if found is None or found == run.out:
        return
    theirs, curve = (os.path.join(d, "curve.jsonl") for d in (found, run.out))
    if os.path.exists(theirs) and not os.path.exists(curve):
        shutil.copyfile(theirs, curve)


def _isolated(model: LoadedModel, run: QualityRun, ev: evaluate.Evaluator, data_dir: str,
              heldout_dir: str, clock: _Clock):
    """Stage 3: (the isolated cartridges as a source, their oracle result, their stamp)."""
    cfg, out = run.config, run.out
    clock.start()
    print("== 3. cartridges (one per document, with learning curve) ==", flush=True)
    store_dir = os.path.join(out, "cartridges")
    curve_path = os.path.join(out, "curve.jsonl")
    mc = [q for q in run.questions if q.kind == "mc"]
    oracle_name = f"oracle_cartridge_step{cfg.pipeline.steps}"
    isolated = pipeline.stamp(cfg.pipeline)  # stamps the results read from these cartridges

    def train_isolated():
        train_with_curve(
            model, run.docs, data_dir, heldout_dir, store_dir, ev, mc, cfg, curve_path,
            on_report=lambda r: print(f"  step {r.step}/{r.total_steps} loss {r.loss:.4f} "
                                      f"{r.tokens_per_s:.0f} tok/s ETA {r.eta_s:.0f}s", flush=True),
            on_point=lambda p: print(f"  curve: {json.dumps(p)}", flush=True))
        return pipeline.StoreSource(pipeline.initial_store(model, run.docs, store_dir,
                                                           cfg.pipeline))

    recall_isolated(run, oracle_name, isolated)
    if study.curve_complete(curve_path, cfg) and os.path.exists(
            os.path.join(out, "eval", f"{oracle_name}.json")):
        # A resumed study (or one reusing an earlier run's curve and evaluations): the
        # isolated cartridges are trained only if an uncached method reads them.
        print("  curve and oracle evaluation cached: training deferred to first use", flush=True)
        source = study.LazySource(train_isolated)
    else:
        source = train_isolated()
    clock.stage("training")
    clock.start()
    oracle = study.cached_method(out, oracle_name,
                                 lambda: ev.oracle_cartridge(run.questions, source),
                                 stamp=isolated, recorded=run.reuse_eval)
    clock.stage("cartridge evaluation")
    return source, oracle, isolated


def cas_pipeline(cfg: pipeline.PipelineConfig, recipe: CollectionRecipe
                 ) -> pipeline.PipelineConfig:
    """The pipeline config the CAS cartridges train under: the study's (`cfg`), with the
    recipe's steps and distractor schedule (k_max `recipe.distractors`)."""
    return dataclasses.replace(cfg, steps=recipe.steps, distractors=recipe.distractors,
                               distractor_schedule=recipe.schedule,
                               ramp_steps=recipe.ramp_steps, grad_scope=recipe.grad_scope,
                               p_iso=recipe.p_iso, quiet=recipe.quiet)


def _collection(model: LoadedModel, run: QualityRun, ev: evaluate.Evaluator, data_dir: str,
                naive, isolated: dict, clock: _Clock) -> list[tuple[str, dict, int | None]]:
    """Stage 5: every collection method, with the CAS and monolithic cartridges trained when a
    method first reads them (not at all when all are cached). `naive` is the isolated
    cartridges' source, `isolated` their stamp (`study.cached_method`)."""
    recipe, cfg, out = run.collection, run.config, run.out
    clock.start()
    print("== 5. collection methods (CAS) ==", flush=True)
    p = cas_pipeline(cfg.pipeline, recipe)
    # Composed rows also depend on the geometry they are read by (absent: the default).
    read_by = ({} if ev.config.geometry == attention.DEFAULT_GEOMETRY
               else {"read_geometry": str(ev.config.geometry)})
    stamps = {"naive": {**isolated, **read_by}, "monolithic": isolated,
              "cas": pipeline.stamp(p, distractors=recipe.distractors, **read_by)}

    def train_cas():
        cas, _ = pipeline.train_cartridges(model, run.docs, data_dir, os.path.join(out, "cas"),
                                           p, distractors=recipe.distractors,
                                           on_report=_print_report)
        return pipeline.StoreSource(cas)

    def train_mono():
        mono, _ = pipeline.train_monolithic(model, run.docs, data_dir,
                                            os.path.join(out, "monolithic"), cfg.pipeline,
                                            on_report=_print_report)
        return pipeline.StoreSource(mono)

    # Trained on first use: a method whose evaluation is cached (or recorded from
    # `run.reuse_eval`) does not retrain the cartridges it read.
    rows = cas_study.collection_methods(
        ev, run.questions, out, cas=study.LazySource(train_cas),
        naive=naive if recipe.naive else None,
        monolithic=study.LazySource(train_mono) if recipe.monolithic else None,
        tokens=cfg.pipeline.tokens_per_doc, n_docs=len(run.docs),
        compose_k=list(recipe.compose_k), positions=list(recipe.positions),
        positions_k=recipe.positions_k, retrieval_k=list(recipe.retrieval_k),
        retrievers=list(recipe.retrievers), seed=cfg.pipeline.seed, stamps=stamps,
        recorded=run.reuse_eval)
    clock.stage("collection training and evaluation")
    return rows


def _write_report(run: QualityRun, results: dict[str, dict], cas_rows, data_report,
                  doc_tokens: dict[str, int], times: dict) -> list[dict]:
    """Stage 6: report.md, report.json and curve.png; prints the table. `results` maps
    closed_book, icl, the RAG baseline and oracle_cartridge to their results."""
    out, tokens = run.out, run.config.pipeline.tokens_per_doc
    closed, icl = results["closed_book"], results["icl"]
    median_doc = float(np.median([doc_tokens[q.doc_id] for q in run.questions]))
    rows = [study.method_row(n, o, closed, icl, median_doc,
                             tokens if n == "oracle_cartridge" else None)
            for n, o in results.items()]
    rows += cas_study.method_rows(cas_rows, closed, icl, median_doc)
    table = study.format_rows(rows)
    claims = []
    if cas_rows:
        claims = cas_study.claims({**results, **{n: o for n, o, _ in cas_rows}},
                                  k=run.collection.positions_k)
        table += "\n\nIssue 12's claims (paired accuracy differences):\n\n" + \
            cas_study.format_claims(claims)
    fields = study.accuracy_by_field(run.questions, results)
    study.plot_curve(os.path.join(out, "curve.jsonl"), os.path.join(out, "curve.png"),
                     closed, icl)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(table + "\n\nAccuracy by question field:\n\n" + fields + "\n\n"
                + selfstudy_data.format_report(data_report) + "\n\nwall time (s): "
                + json.dumps({k: round(v) for k, v in times.items()}) + "\n")
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump({"rows": rows, "claims": claims,
                   "quality": [dataclasses.asdict(r) for r in data_report],
                   "times": times, "median_document_tokens": median_doc}, f, indent=1)
    print(table)
    return rows


def run_quality_study(model: LoadedModel, run: QualityRun) -> list[dict]:
    """Runs (or resumes) every stage of the study (module doc); returns the report rows."""
    cfg, out, qs, docs = run.config, run.out, run.questions, run.docs
    os.makedirs(out, exist_ok=True)
    clock = _Clock(out)
    questions_lib.write_questions(os.path.join(out, "questions.jsonl"), qs)
    check_recorded(run)
    data_source = selfstudy_dir(run)
    p = cfg.pipeline  # recorded with its flat view (`pipeline.FLAT`), as flat configs were
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({"flags": run.record, "profiles": run.profiles,
                   "config": {**dataclasses.asdict(cfg), "pipeline": {
                       **{n: getattr(p, n) for n in pipeline.FLAT}, **dataclasses.asdict(p)}}},
                  f, indent=1, default=str)
    doc_tokens = {d: len(model.tokenizer(docs[d].text, add_special_tokens=False)["input_ids"])
                  for d in docs.ids}
    print(f"{len(qs)} questions ({', '.join(run.kinds)}) on {len(docs)} section documents of "
          f"{len(run.profiles)} {run.split} profiles; median document "
          f"{np.median(list(doc_tokens.values())):.0f} tokens; P={cfg.pipeline.tokens_per_doc}",
          flush=True)
    data_dir, heldout_dir, data_report = _self_study(model, run, data_source, clock)

    clock.start()
    print("== 2. baselines ==", flush=True)
    ev = evaluate.Evaluator(model, docs, evaluate.EvalConfig(max_new_tokens=cfg.max_new_tokens,
                                                             geometry=pipeline.read_geometry(cfg.pipeline)))
    rag_name = f"rag_bm25_k{cfg.rag_top_k}"
    recorded = ((run.reuse,) if run.reuse else ()) + run.reuse_eval  # they read no cartridges
    results = {name: study.cached_method(out, name, method, recorded=recorded)
               for name, method in (("closed_book", lambda: ev.closed_book(qs)),
                                    ("icl", lambda: ev.icl(qs)),
                                    (rag_name, lambda: ev.rag(qs, top_k=cfg.rag_top_k)))}
    clock.stage("baselines")
    source, results["oracle_cartridge"], isolated = _isolated(model, run, ev, data_dir,
                                                              heldout_dir, clock)
    cas_rows = []
    if run.collection is not None:
        cas_rows = _collection(model, run, ev, data_dir, source, isolated, clock)
    clock.save()
    rows = _write_report(run, results, cas_rows, data_report, doc_tokens, clock.times)
    o = rows[3]
    print(f"icl_gap={rows[1]['accuracy'] - rows[0]['accuracy']:.3f} "
          f"recovered_acc={o['recovered_acc']:.3f} recovered_nll={o['recovered_nll']:.3f} "
          f"compression={o['compression']:.1f}")
    return rows
