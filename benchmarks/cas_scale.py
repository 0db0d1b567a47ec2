"""Issue 12 item 3 (issue 25 item 4: the full run, ready for a GPU): CAS quality on a fixed
question sample as the collection grows.

    python -m benchmarks.cas_scale --sizes=26,60 [--read_geometry=serial] [--budget_frac=1]

Material: the default quality study's questions (319 multiple-choice questions on the
Geography sections of 26 test profiles), so closed book and ICL are read from `--rec`
(benchmarks/results/quality, matched by question). A collection of size n is those 26 question
documents plus the first n - 26 other `factbook_sections` sections in a fixed seeded order
(`cas_study.collection_ids`: nested; n = 26 is the TEST run's own collection).

Recipe: the one issue 24's TEST run trained (`TEST_RUN`: benchmarks.quality's defaults plus the
flags of `benchmarks/results/compose_test/README.md`), built by benchmarks.quality's own flag
parser and `quality_config.resolve`, so it follows the study's defaults and cannot drift: span
self-study (24 conversations per document, P=64), CAS "all6" (serial training rows, uniform
k <= 3 distractors, gradients to every cartridge of a row, 6 epochs: 36 steps of 4 rows per
document), read under `--read_geometry` (default the pipeline's `CollectionConfig.
read_geometry`, parallel,count_power=0.5,relevance=4,relevance_floor=1; kept in every
cartridge's meta). Every recipe field is a flag under benchmarks.quality's name
(`--cas_epochs`, `--cas_grad_scope`, `--tokens`, `--geometry`, `--train.schedule`, ...).
Training runs through the budget manager with a device budget of `--budget_frac` of all
cartridge bytes (raised to one step's bank of batch x (1 + k)).

Per n, in `<out>/n<n>/`, resumably: self-study, CAS training, then on the same questions: CAS
oracle, CAS composed with k=3 others of the collection, retrieval + CAS and RAG over the whole
collection (BM25, k = 1, 2, 4). Recorded per n (`scale.json`, `report.md`): the recipe (the
cartridges' stamp, the flags that reproduce it) and both geometries, documents and tokens,
seconds per stage and per document, peak RSS, the trainer's I/O-wait share and paging
bandwidth, accuracy with CI and recall per method, the claims. `<out>/report.md` puts the
sizes side by side.

Time per document on an H100 (an estimate: no GPU has run this yet).
  FLOPs, from the code's shapes (SmolLM2-135M: 30 layers of 3.54M weights = 7.08 MFLOP per token
  forward, tied head 576 x 49152 = 56.6 MFLOP, attention 2304 x context FLOP per layer):
  - training: 36 steps x 4 = 144 row passes. Rows are cut to the batch's longest rounded up to
    64 tokens: mean width 262 for 195 real tokens (the TEST self-study data). Per padded token,
    with the 4 x 64 prefix slots of a uniform k <= 3 bank in the attention context: forward
    30 x (7.08 + 1.18) + 56.6 = 304 MFLOP, backward to the cartridges only (no weight
    gradients) 30 x (7.08 + 2.36) + 56.6 = 340, so 0.644 GFLOP (XLA's cost analysis of one
    layer and the head agrees: 131 MFLOP per token). 144 x 262 x 0.644 = 24 TFLOP. The
    issue's 14.7 (4 x 134.5M x 190 x 144) counts real tokens and no attention: padding x1.38,
    attention x1.19.
  - synthesis: span conversations generate nothing; the model prefills each document block
    (<= 1024 tokens, 0.28 GFLOP per token) and runs the teacher over each conversation (8 rows
    padded to 256/512, mean 348 tokens, behind the block: 0.31 GFLOP per token, plus the top-20
    head on <= 128 targets): 24 x 348 x 0.31 + 0.2 = 2.7 TFLOP, and 0.2-0.4 TFLOP of prefill
    when the document fits one chunk (72% of sections), 7.0 when each conversation draws its
    own 1024-token chunk (28%): ~4.8 TFLOP on average, 3.4 for a Geography section.
  - in all ~29 TFLOP per document.
  Check on the 2-core CPU (BUILD_NOTES.md): the TEST run's 936 steps took ~80 min, 5.1 s per
  0.68-TFLOP step = 132 GFLOP/s, the large-GEMM rate measured there (138), so the count is not
  low; synthesis took 2.4 s per conversation (results/quality/times.json). CPU: ~4 min per
  document (184 s training, 57 s synthesis).
  H100 (the device tool's H100 80GB HBM3): f32 weights, matmuls assumed in TF32 (JAX's
  default matmul precision on GPU), dense peak ~495 TFLOP/s. Assumed: 5-20% of it, 25-100
  TFLOP/s (central 50; full f32 would cap at 67): a 135M model at ~1k tokens per step is
  launch-bound (a 30-layer scan forward and backward is ~10^3 kernels, ~10-20 ms per step =
  0.4-0.7 s for 36 steps). Compute: 0.3-1.2 s per document (central 0.6), plus ~0.2 s of host
  work in synthesis (assumed).
  Paging: a step reads ~10 cartridges (4 rows' own + 4 x 1.5 distractors) of 8.35 MiB (K/V and
  Adam state); a share s of them is resident (the budget's share of all bytes) and, with
  gradients to all, each paged one is written back: 36 x 10 x (1 - s) x 8.35 MiB x 2 = 5.3 GiB
  per document at s = 0.1. At ~2 GB/s (1.0-1.3 measured through the store on the CPU VM) that
  is ~2.8 s, overlapped with compute by prefetch. So per document: ~0.8 s with every cartridge
  resident (`--budget_frac=1`: 400 documents hold 3.3 GiB), ~1.4 s at n = 26 (s = 0.62: one
  step's bank), ~2.5 s at n = 60, ~3 s at n >= 100 with budget_frac 0.1 (range 1.5-6).
  Per run: ~15 s of start-up, ~1-2 min of compilation (prefill and teacher shapes, three train
  widths, scoring shapes), ~30-60 s of evaluation per size (8 rows of 319 questions; 40 s each
  on the CPU). `benchmarks/gpu_bundle.sh` sizes its one run (SIZES=26,60, ~6.5 min) from this.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import resource
import time
from collections.abc import Sequence

import jax
import numpy as np
from absl import app, flags

from benchmarks import quality
from cas_jax import config_flags
from cas_jax.cartridges import attention
from cas_jax.documents import corpus
from cas_jax.evaluation import evaluate, questions as questions_lib
from cas_jax.model import loading
from cas_jax.studies import cas_study, pipeline, quality_config, study, study_runs

TEST_RUN = ("--cas", "--cas_epochs=6", "--cas_grad_scope=all")
"""benchmarks.quality's flags of issue 24's TEST run beyond its defaults
(benchmarks/results/compose_test/README.md; cas_claims.sh adds --cas): the recipe trained here."""

EVALUATED = {"compose_k": (3,), "retrievers": ("bm25",), "naive": False, "monolithic": False,
             "positions": ()}
"""The collection methods run at every size (the dense retriever's MiniLM is not carried to
the GPU; `--retrievers=bm25,dense` adds it)."""

P = quality.P
OWN_SKIP = ("cas", "epochs", "study.heldout_per_doc", "study.eval_every", "study.max_new_tokens",
            "study.rag_top_k", P + "collection.steps", P + "collection.budget_bytes",
            "cas_recipe.naive", "cas_recipe.monolithic", "cas_recipe.positions",
            "cas_recipe.positions_k")
"""Study fields the scale run has no flag for: the isolated cartridges' and held-out set's
(none are made here), the budget (--budget_frac sets it per size), rows never run."""
SKIP = (*quality.SKIP, *OWN_SKIP)


def _skipped(path: str) -> bool:
    return any(path == s or path.startswith(s + ".") for s in SKIP)


NAMES = {**{p: n for p, n in quality.NAMES.items() if not _skipped(p)},
         P + "collection.read_geometry": "read_geometry"}
"""benchmarks.quality's flag names, and --read_geometry."""
HELPS = {**{p: h for p, h in quality.HELPS.items() if not _skipped(p)},
         P + "collection.read_geometry": "Composition geometry the CAS cartridges are read by "
                                         "(evaluation; kept in each cartridge's meta); 'none' "
                                         "= the training one (--geometry).",
         "cas_epochs": "CAS training length in epochs of each collection's self-study data.",
         "profiles": "Profiles (from the start of --split) whose --sections carry the "
                     "questions (26 test Geography sections: the 319 questions of --rec)."}
CHOICES = {p: c for p, c in quality.CHOICES.items() if not _skipped(p)}


def default_recipe() -> quality_config.QualityConfig:
    """The TEST run's study config, as benchmarks.quality builds it from `TEST_RUN`, with the
    scale run's rows (`EVALUATED`): the defaults of this launcher's flags."""
    fv = flags.FlagValues()
    flag_set = quality.define_flags(fv)
    fv(["benchmarks.quality", *TEST_RUN])
    cfg = quality.config(flag_set)
    return dataclasses.replace(cfg, cas_recipe=dataclasses.replace(cfg.cas_recipe, **EVALUATED))


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> config_flags.ConfigFlags:
    """The launcher's flags in `flag_values`: its folders, sizes and budget, and one per recipe
    field (benchmarks.quality's names, `default_recipe` defaults). Returns what builds the config
    back."""
    flags.DEFINE_string("out", "runs/cas_scale", "Output folder (resumed if present).",
                        flag_values=flag_values)
    flags.DEFINE_string("model", "", "HF folder or GGUF file; empty = embedded "
                        "SmolLM2-135M-Instruct.", flag_values=flag_values)
    flags.DEFINE_string("rec", "benchmarks/results/quality", "Recorded study of the same "
                        "questions (its eval/closed_book.json and eval/icl.json are the "
                        "baselines).", flag_values=flag_values)
    flags.DEFINE_list("sizes", ["26", "60"], "Collection sizes (documents), each >= the "
                      "question documents; each trains its own cartridges.",
                      flag_values=flag_values)
    flags.DEFINE_float("budget_frac", 0.1, "Device budget as a share of all cartridge bytes "
                       "(1: every cartridge resident, no paging).", flag_values=flag_values)
    return config_flags.define(default_recipe(), names=NAMES, sections=quality.SECTIONS,
                               helps=HELPS, choices=CHOICES, skip=SKIP,
                               flag_values=flag_values)


def recipe_for(cfg: quality_config.QualityConfig, n_docs: int
               ) -> tuple[pipeline.PipelineConfig, study_runs.CollectionRecipe, int]:
    """(the pipeline config the CAS cartridges of an `n_docs` collection train under, the
    collection recipe, the evaluation's generation length), as the quality study resolves
    them (`quality_config.resolve`, `study_runs.cas_pipeline`)."""
    study_cfg, recipe = quality_config.resolve(cfg, n_docs)
    return (study_runs.cas_pipeline(study_cfg.pipeline, recipe), recipe,
            study_cfg.max_new_tokens)


@dataclasses.dataclass(frozen=True)
class Material:
    """What every size shares: the questions, their documents' order, baselines, settings."""

    questions: list
    question_docs: list[str]
    all_ids: list[str]
    closed: dict
    icl: dict
    budget_frac: float
    argv: tuple[str, ...]


def _stage_clock(out: str, times: dict):
    """`stage(name, t0)` adds the seconds since t0 to `times[name]` and saves times.json."""
    def stage(name: str, t0: float) -> None:
        times[name] = times.get(name, 0.0) + time.perf_counter() - t0
        print(f"  {name}: {times[name]:.0f}s", flush=True)
        with open(os.path.join(out, "times.json"), "w") as f:
            json.dump(times, f)
    return stage


def run_size(model, cfg: quality_config.QualityConfig, m: Material, ids: list[str], out: str,
             times: dict) -> dict:
    """Self-study, CAS training and evaluation of one collection; returns its scale record."""
    docs = corpus.load_factbook_sections(documents=ids)
    p, recipe, generate = recipe_for(cfg, len(docs))
    per_cartridge = cas_study.cartridge_bytes(model, p.tokens_per_doc, p.lr)
    total = len(docs) * per_cartridge
    bank = p.batch * (1 + recipe.distractors) * per_cartridge
    p = dataclasses.replace(p, budget_bytes=max(int(m.budget_frac * total), bank))
    geometry = pipeline.read_geometry(p)
    tokens_of = {d: len(model.tokenizer(docs[d].text, add_special_tokens=False)["input_ids"])
                 for d in docs.ids}
    print(f"== {len(docs)} documents, {sum(tokens_of.values())} tokens; {p.steps} CAS steps; "
          f"read under {geometry}; budget {p.budget_bytes / 2**20:.0f} MiB = "
          f"{p.budget_bytes / total:.1%} of {total / 2**20:.0f} MiB ==", flush=True)
    stage = _stage_clock(out, times)

    t0 = time.perf_counter()
    data_dir = pipeline.synthesize(model, docs, os.path.join(out, "selfstudy"), p, on_batch=(
        lambda r: print(f"  {r.conversations_done}/{r.conversations_total} conversations, "
                        f"ETA {r.eta_s:.0f}s", flush=True)))
    stage("synthesis", t0)
    summary_path = os.path.join(out, "train_summary.json")

    def train_cas():
        t0 = time.perf_counter()
        store, summary = pipeline.train_cartridges(
            model, docs, data_dir, os.path.join(out, "cas"), p, distractors=recipe.distractors,
            on_report=lambda r: print(f"  step {r.step}/{r.total_steps} loss {r.loss:.4f} "
                                      f"ETA {r.eta_s:.0f}s", flush=True))
        with open(summary_path, "w") as f:
            json.dump(summary, f, indent=1, default=str)
        stage("training", t0)
        return pipeline.StoreSource(store)

    t0, trained_s = time.perf_counter(), times.get("training", 0.0)
    ev = evaluate.Evaluator(model, docs, evaluate.EvalConfig(max_new_tokens=generate,
                                                             geometry=geometry))
    read_by = ({} if geometry == attention.DEFAULT_GEOMETRY
               else {"read_geometry": str(geometry)})
    stamp = pipeline.stamp(p, distractors=recipe.distractors, documents=len(docs), **read_by)
    rows = cas_study.collection_methods(
        ev, m.questions, out, cas=study.LazySource(train_cas), naive=None, monolithic=None,
        tokens=p.tokens_per_doc, n_docs=len(docs), compose_k=list(recipe.compose_k),
        positions=[], retrieval_k=list(recipe.retrieval_k), retrievers=list(recipe.retrievers),
        seed=p.seed, stamps={"cas": stamp})
    stage("evaluation", t0 + times.get("training", 0.0) - trained_s)  # training not counted

    median_doc = float(np.median([tokens_of[q.doc_id] for q in m.questions]))
    table = [study.method_row(n, o, m.closed, m.icl, median_doc, None) for n, o in
             (("closed_book", m.closed), ("icl", m.icl))]
    table += cas_study.method_rows(rows, m.closed, m.icl, median_doc)
    claims = cas_study.claims({n: o for n, o, _ in rows}, k=3)
    summary = json.load(open(summary_path)) if os.path.exists(summary_path) else {}
    record = scale_record(p, docs, tokens_of, m, times, summary, table, out, stamp=stamp,
                          argv=m.argv, total=total)
    write_size_report(out, record, table, claims)
    return record


def scale_record(p: pipeline.PipelineConfig, docs, tokens_of: dict, m: Material, times: dict,
                 summary: dict, table: list[dict], out: str, *, stamp: dict,
                 argv: Sequence[str], total: int) -> dict:
    """One size's `scale.json`: the recipe and geometries, sizes, times, memory, paging and
    accuracy per method."""
    n = len(docs)
    read_s = summary.get("read_s") or 0.0
    return {
        "documents": n, "document_tokens": sum(tokens_of.values()),
        "questions": len(m.questions),
        "recipe": stamp, "argv": list(argv), "read_geometry": str(pipeline.read_geometry(p)),
        "train_geometry": str(p.train.geometry), "device": jax.devices()[0].device_kind,
        "cartridge_bytes_total": total, "budget_bytes": p.budget_bytes,
        "budget_share": p.budget_bytes / total,
        "store_bytes": sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in
                           os.walk(os.path.join(out, "cas", "cartridges")) for f in fs),
        "cas_steps": p.steps, "seconds": dict(times),
        "seconds_per_document": {k: times[k] / n for k in ("synthesis", "training")
                                 if k in times},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "train_peak_rss_mb": summary.get("peak_rss_mb"),
        "io_wait_share": summary.get("io_wait_share"),
        "paging_read_mb_s": (summary["bytes_read"] / read_s / 2**20) if read_s else None,
        "bytes_paged_in": summary.get("bytes_paged_in"), "evictions": summary.get("evictions"),
        "accuracy": {r["method"]: r["accuracy"] for r in table},
        "accuracy_ci": {r["method"]: r["accuracy_ci"] for r in table},
        "recall": {r["method"]: r["recall"] for r in table if "recall" in r}}


def write_size_report(out: str, record: dict, table: list[dict], claims: list[dict]) -> None:
    """`scale.json` and `report.md` of one size."""
    with open(os.path.join(out, "scale.json"), "w") as f:
        json.dump(record, f, indent=1, default=float)
    rest = {k: v for k, v in record.items()
            if k not in ("accuracy", "accuracy_ci", "recall", "recipe", "argv")}
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(f"{record['documents']} documents ({record['document_tokens']} tokens), "
                f"{record['questions']} questions\n\nCAS cartridges: the TEST run's recipe"
                + (f" with {' '.join(record['argv'])}" if record["argv"] else "")
                + f", rows composed {record['train_geometry']} in training, read "
                f"{record['read_geometry']}; stamp {json.dumps(record['recipe'])}\n\n"
                + study.format_rows(table) + "\n\n" + cas_study.format_claims(claims)
                + "\n\n" + json.dumps(rest, default=float) + "\n")


def format_times(records: Sequence[dict]) -> str:
    """Seconds per document of synthesis and training, by size (what the H100 estimate in the
    module doc predicts)."""
    lines = ["| seconds per document | " + " | ".join(f"{r['documents']} docs" for r in records)
             + " |", "|---" * (len(records) + 1) + "|"]
    for stage in ("synthesis", "training"):
        lines.append(f"| {stage} | " + " | ".join(
            "-" if stage not in r.get("seconds_per_document", {})
            else f"{r['seconds_per_document'][stage]:.2f}" for r in records) + " |")
    return "\n".join(lines)


def prepare(cfg: quality_config.QualityConfig, *, rec: str, sizes: Sequence[int],
            budget_frac: float, argv: Sequence[str] = ()) -> tuple[Material, dict[int, list]]:
    """The material and every size's document ids, before any work. Raises ValueError for a
    size the sections cannot make or a baseline that does not hold the questions."""
    _, qs, _ = study_runs.factbook_questions(cfg.split, cfg.profiles, cfg.sections, cfg.kinds,
                                             cfg.study.pipeline.seed)
    m = Material(qs, sorted({q.doc_id for q in qs}), list(corpus.load_factbook_sections().ids),
                 cas_study.read_baseline(rec, "closed_book", qs),
                 cas_study.read_baseline(rec, "icl", qs), budget_frac, tuple(argv))
    return m, {n: cas_study.collection_ids(m.question_docs, m.all_ids, n,
                                           cfg.study.pipeline.seed) for n in sorted(sizes)}


def run_scale(model, cfg: quality_config.QualityConfig, m: Material,
              collections: dict[int, list], out: str) -> list[dict]:
    """Every collection (size -> ids, `prepare`) in increasing size, resumably under `out`;
    returns the records."""
    os.makedirs(out, exist_ok=True)
    questions_lib.write_questions(os.path.join(out, "questions.jsonl"), m.questions)
    records = []
    for size, ids in sorted(collections.items()):
        size_out = os.path.join(out, f"n{size}")
        os.makedirs(size_out, exist_ok=True)
        times_path = os.path.join(size_out, "times.json")
        times = json.load(open(times_path)) if os.path.exists(times_path) else {}
        records.append(run_size(model, cfg, m, ids, size_out, times))
        table = cas_study.format_sizes(records)
        with open(os.path.join(out, "report.md"), "w") as f:
            f.write(f"CAS quality by collection size, {len(m.questions)} questions\n\n"
                    f"{table}\n\n{format_times(records)}\n")
        print(table, flush=True)
    return records


def _sizes(values: Sequence[str]) -> list[int]:
    try:
        return [int(v) for v in values]
    except ValueError as e:
        raise ValueError(f"--sizes: {e}") from e


def main(argv, flag_set: config_flags.ConfigFlags):
    del argv
    fv = flag_set.flag_values
    try:
        cfg = flag_set.value()
        m, collections = prepare(cfg, rec=fv.rec, sizes=_sizes(fv.sizes),
                                 budget_frac=fv.budget_frac, argv=flag_set.argv(cfg))
    except ValueError as e:  # a refused config, bad --sizes, --rec without these questions
        raise app.UsageError(str(e)) from e
    run_scale(loading.load_model(fv.model or None), cfg, m, collections, fv.out)


if __name__ == "__main__":
    app.run(functools.partial(main, flag_set=define_flags()))
