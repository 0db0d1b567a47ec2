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
Last line: `<source>_<geometry>_k<k>=accuracy ...` for every row.
"""

import json
import os

from absl import app, flags

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


def main(argv):
    del argv
    out = FLAGS.out or os.path.join(FLAGS.run, "compose")
    try:
        geometries = [attention.Geometry.parse(g) for g in FLAGS.geometries.split(";") if g]
    except ValueError as e:
        raise app.UsageError(f"--geometries: {e}")
    ks = [int(k) for k in FLAGS.compose_k]
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
    composition.plot_curve(rows, os.path.join(out, "curve.png"), closed_acc)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(report + "\n")
    print(report)
    print(" ".join(f"{composition.row_name(r['source'], attention.Geometry.parse(r['geometry']), r['k'])}"
                   f"={r['accuracy']:.3f}" for r in rows))


if __name__ == "__main__":
    app.run(main)
