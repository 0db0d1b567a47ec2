"""Composition geometries and the composition curve on a study's trained cartridges, with no
retraining (`cas_jax.studies.composition`).

  python -m benchmarks.compose --run=runs/compose_dev_base \
      --geometries="serial;parallel;parallel,temperature=0.8" --compose_k=0,3

--run is a `benchmarks.quality --cas` folder: its questions.jsonl, its isolated cartridges
(cartridges/, source "naive") and CAS cartridges (cas/, source "cas"). Every (source,
geometry, k) row is cached under --out/eval; the table (accuracy [95% CI], gold NLL, paired
difference to the same geometry's k=0) goes to --out/report.md and the curve to curve.png.
--interference adds, per (source, geometry), the mean KL per answer token between the model
reading one unrelated cartridge and the model with none on --heldout conversations.
--retrievers adds retrieval + cartridges rows per (source, geometry) at --retrieval_k.
--versus=G adds, for every other geometry, its reading minus G's on the same questions
(paired 95% CIs) per composed k, their mean over --versus_mean_k and per retrieval row.
--claims=G writes the claims' method table for CAS read under G (one of --geometries) to
--out/claims/eval under the names `benchmarks.cas_claims_report` reads, and prints it; its
last line is then the claims line. Otherwise the last line is
`<source>_<geometry>_k<k>=accuracy ...` for every row.

Issue 24's test report (the base recipe's CAS cartridges, read under serial and under the
geometry chosen on dev):

  python -m benchmarks.compose --run=runs/compose_test --sources=cas \
      --geometries="serial;parallel,count_power=0.5" --compose_k=0,1,3,7,15 \
      --retrievers=bm25,dense --interference --claims="parallel,count_power=0.5"
"""

import json
import os

from absl import app, flags

from benchmarks import cas_claims_report
from cas_jax.cartridges import attention
from cas_jax.cartridges.store import CartridgeStore
from cas_jax.documents import corpus
from cas_jax.evaluation import evaluate, questions as questions_lib
from cas_jax.model import loading
from cas_jax.studies import composition, pipeline, study

FLAGS = flags.FLAGS
flags.DEFINE_string("run", None, "Study folder (benchmarks.quality --cas output).")
flags.DEFINE_string("out", "", "Output folder; empty = <run>/compose.")
flags.DEFINE_string("model", "", "HF folder or GGUF file; empty = embedded SmolLM2-135M-Instruct.")
flags.DEFINE_list("sources", ["cas", "naive"], "Cartridge sets: cas (<run>/cas), naive "
                  "(<run>/cartridges, trained in isolation).")
flags.DEFINE_string("geometries", "serial;parallel", "Geometries separated by ';', each as "
                    "attention.Geometry.parse reads it (e.g. parallel,temperature=0.8).")
flags.DEFINE_list("compose_k", ["0", "1", "3", "7"], "Other cartridges composed with the "
                  "question's own (0 = the oracle).")
flags.DEFINE_bool("interference", False, "Also the interference figure per source and "
                  "geometry (needs --heldout).")
flags.DEFINE_string("heldout", "", "Held-out conversations; empty = the run's --reuse "
                    "folder's heldout/, else <run>/heldout.")
flags.DEFINE_integer("seq_len", 320, "Sequence length of the held-out conversations.")
flags.DEFINE_integer("seed", 0, "Seed of the composed sets (the study's).")
flags.DEFINE_list("retrievers", [], "Also retrieval + cartridges per (source, geometry) by these "
                  "retrievers (bm25, dense) at --retrieval_k.")
flags.DEFINE_list("retrieval_k", ["1", "2", "4"], "k of the retrieval rows.")
flags.DEFINE_string("claims", "", "A geometry of --geometries: write the claims' method table "
                    "for the cas source read under it to <out>/claims/eval (standard names: "
                    "cas_oracle, cas_composed_k<k>, retrieval_cas_<r>_k<k>, and the run's "
                    "closed book, ICL, RAG and naive rows) and print its claims.")
flags.DEFINE_string("versus", "", "A geometry of --geometries: also print every other "
                    "geometry's reading minus this one's, paired, per composed k, their mean "
                    "over --versus_mean_k and per retrieval row.")
flags.DEFINE_list("versus_mean_k", ["1", "3", "7"], "Composed k averaged in --versus's mean row.")
flags.mark_flag_as_required("run")

STORE_DIRS = {"cas": "cas", "naive": "cartridges"}


def _sources(model) -> dict:
    out = {}
    for name in FLAGS.sources:
        if name not in STORE_DIRS:
            raise app.UsageError(f"--sources: {name!r} is not one of {sorted(STORE_DIRS)}")
        path = os.path.join(FLAGS.run, STORE_DIRS[name], "cartridges")
        if not os.path.isdir(path):
            raise app.UsageError(f"--sources={name}: no cartridge store at {path}")
        out[name] = pipeline.StoreSource(CartridgeStore(path, model.fingerprint))
    return out


def _heldout() -> str:
    if FLAGS.heldout:
        return FLAGS.heldout
    reuse = json.load(open(os.path.join(FLAGS.run, "config.json")))["flags"].get("reuse")
    return os.path.join(reuse or FLAGS.run, "heldout")


def _claims(out: str, results: dict, retrieval: dict, geometry: attention.Geometry) -> None:
    """<out>/claims/eval: the claims' method table under `geometry`; prints its report."""
    refs = cas_claims_report.read_results(FLAGS.run)
    refs = {n: o for n, o in refs.items()
            if n in ("closed_book", "icl", "oracle_cartridge", "monolithic")
            or n.startswith(("rag_", "naive_composed_"))}
    table = composition.claims_results(results, retrieval, refs, "cas", geometry)
    folder = os.path.join(out, "claims", "eval")
    os.makedirs(folder, exist_ok=True)
    for name, obj in table.items():
        name = "oracle_cartridge_step0" if name == "oracle_cartridge" else name
        with open(os.path.join(folder, name + ".json"), "w") as f:
            json.dump(obj, f)
    text = cas_claims_report.report(table)
    with open(os.path.join(out, "claims", "claims.md"), "w") as f:
        f.write(f"CAS read under {geometry}\n\n{text}\n")
    print(f"\nClaims, CAS read under {geometry}:\n\n{text}")


def main(argv):
    del argv
    out = FLAGS.out or os.path.join(FLAGS.run, "compose")
    try:
        geometries = [attention.Geometry.parse(g) for g in FLAGS.geometries.split(";") if g]
    except ValueError as e:
        raise app.UsageError(f"--geometries: {e}")
    ks = [int(k) for k in FLAGS.compose_k]
    try:
        claims = attention.Geometry.parse(FLAGS.claims) if FLAGS.claims else None
    except ValueError as e:
        raise app.UsageError(f"--claims: {e}")
    try:
        versus = attention.Geometry.parse(FLAGS.versus) if FLAGS.versus else None
    except ValueError as e:
        raise app.UsageError(f"--versus: {e}")
    if versus is not None and versus not in geometries:
        raise app.UsageError(f"--versus={FLAGS.versus!r} is not one of --geometries "
                             f"{[str(g) for g in geometries]}")
    if claims is not None and claims not in geometries:
        raise app.UsageError(f"--claims={FLAGS.claims!r} is not one of --geometries "
                             f"{[str(g) for g in geometries]}")
    qs_path = os.path.join(FLAGS.run, "questions.jsonl")
    if not os.path.exists(qs_path):
        raise app.UsageError(f"--run={FLAGS.run}: no questions.jsonl there")
    qs = [q for q in questions_lib.read_questions(qs_path) if q.kind == "mc"]
    model = loading.load_model(FLAGS.model or None)
    docs = corpus.load_factbook_sections(documents=sorted({q.doc_id for q in qs}))
    ev = evaluate.Evaluator(model, docs, evaluate.EvalConfig(max_new_tokens=0))
    sources = _sources(model)
    results = {}
    for g in geometries:
        for name, source in sources.items():
            for k in ks:
                print(f"== {name} / {g} / k={k} ==", flush=True)
                results[(name, str(g), k)] = composition.composed_row(
                    model, ev, qs, out, name, source, g, k, seed=FLAGS.seed)
    retrieval = {}
    rks = [int(k) for k in FLAGS.retrieval_k]
    for g in geometries:
        for name, source in sources.items():
            for r in FLAGS.retrievers:
                for k in rks:
                    print(f"== retrieval {r} + {name} / {g} / k={k} ==", flush=True)
                    retrieval[(name, str(g), r, k)] = composition.retrieval_row(
                        model, ev, qs, out, name, source, g, r, k, slots=max(rks))
    rows = composition.curve_rows(results)
    report = composition.format_curve(rows)
    if FLAGS.interference:
        heldout = _heldout()
        lines = ["| source | geometry | interference (nats / answer token) |", "|---|---|---|"]
        for g in geometries:
            for name, source in sources.items():
                kl = composition.cached_interference(
                    out, f"{name}_{composition.slug(g)}",
                    lambda s=source, g=g: composition.interference(model, heldout, s, g,
                                                                   FLAGS.seq_len))
                lines.append(f"| {name} | {g} | {kl:.4f} |")
        report += "\n\nInterference (held-out conversations of " + heldout + "):\n\n" + \
            "\n".join(lines)
    closed = os.path.join(FLAGS.run, "eval", "closed_book.json")
    closed_acc = (float(study.mc_accuracy(json.load(open(closed))).mean())
                  if os.path.exists(closed) else None)
    if retrieval:
        report += "\n\nRetrieval + cartridges:\n\n" + composition.format_retrieval(retrieval)
    for g in geometries if versus is not None else ():
        if g != versus:
            vs = composition.versus_rows(results, retrieval, str(versus), str(g),
                                         [int(k) for k in FLAGS.versus_mean_k])
            report += "\n\n" + composition.format_versus(vs, str(versus), str(g))
    composition.plot_curve(rows, os.path.join(out, "curve.png"), closed_acc)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(report + "\n")
    print(report)
    print(" ".join(f"{composition.row_name(r['source'], attention.Geometry.parse(r['geometry']), r['k'])}"
                   f"={r['accuracy']:.3f}" for r in rows))
    if claims is not None:
        _claims(out, results, retrieval, claims)


if __name__ == "__main__":
    app.run(main)
