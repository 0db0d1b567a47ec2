"""The quality study: closed book, ICL, RAG and trained oracle cartridges on held-out questions.

  python -m benchmarks.quality                      # the default study (test profiles)
  python -m benchmarks.quality --split=dev --profiles=4 --out=runs/quality_dev   # tuning

Documents are `factbook_sections` sections (--sections) of the first --profiles profiles of
the --split (`cas_jax.splits`: tune on dev, report on test). Questions: every Factbook question
field of those profiles, multiple choice and free answer, addressed to the section holding the
field. Stages resume from --out (`cas_jax.study`): self-study (+ a held-out set), baselines,
cartridge training with a learning curve, report (report.md, report.json, curve.png).
Last line: `icl_gap=X recovered_acc=Y recovered_nll=Z compression=C`.
"""

import dataclasses
import json
import os
import time

import numpy as np
from absl import app, flags

from cas_jax import attention, corpus, dataset, evaluate, loading, pipeline
from cas_jax import questions as questions_lib
from cas_jax import splits
from cas_jax import cas_study, selfstudy_quality, study, synthesis

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "runs/quality", "Output folder (resumed if present).")
flags.DEFINE_string("model", "", "HF folder or GGUF file; empty = embedded SmolLM2-135M-Instruct.")
flags.DEFINE_enum("split", "test", ["dev", "test"], "Profiles to draw documents from.")
flags.DEFINE_integer("profiles", 26, "Profiles (from the start of the split); the default gives "
                     "319 multiple-choice questions on 26 Geography sections (up to 13 fields each).")
flags.DEFINE_list("sections", ["geography"],
                  "Section slugs to use as documents (those holding question fields: geography, "
                  "government, people_and_society, communications, transportation).")
flags.DEFINE_list("kinds", ["mc"], "Question kinds (mc, free). Free answers are scored by "
                  "greedy generation, which the 135M model rarely gets verbatim, so the "
                  "default study uses multiple choice (accuracy and gold NLL).")
flags.DEFINE_integer("conversations_per_doc", 24, "Training conversations per document.")
flags.DEFINE_integer("heldout_per_doc", 2, "Held-out conversations per document (other seed).")
flags.DEFINE_string("family_weights", "spans=1",
                    "Self-study family weights as family=weight pairs; unlisted families get 0. "
                    f"Families: {','.join(synthesis.FAMILIES)}.")
D = pipeline.PipelineConfig()
flags.DEFINE_integer("span_turns", D.span_turns, "Exchanges per span conversation.")
flags.DEFINE_integer("chunk_min", D.chunk_min, "Shortest self-study chunk (tokens).")
flags.DEFINE_integer("chunk_max", D.chunk_max, "Longest self-study chunk (tokens).")
flags.DEFINE_integer("max_user_tokens", D.max_user_tokens, "Most tokens of a generated user turn.")
flags.DEFINE_integer("max_answer_tokens", D.max_answer_tokens, "Most tokens of a generated answer.")
flags.DEFINE_integer("no_repeat_ngram_size", D.no_repeat_ngram_size, "Agents' no-repeat n-gram size (0 = off).")
flags.DEFINE_float("repetition_penalty", 1.0, "Agents' repetition penalty (1 = off).")
flags.DEFINE_integer("synthesis_batch", D.synthesis_batch, "Conversations generated together.")
flags.DEFINE_integer("tokens", D.tokens_per_doc, "Cartridge tokens P per document.")
flags.DEFINE_enum("init", D.init, ["first_tokens", "document_kv"],
                  "Cartridge initialisation (train_collection.initialise_store).")
flags.DEFINE_integer("steps", 0, "Training steps (all documents together, in isolation); "
                     "0 = --epochs passes over the training conversations.")
flags.DEFINE_float("epochs", 6.0, "Passes over the training conversations when --steps=0 "
                   "(chosen on dev, benchmarks/results/dev_epochs: the best of 3-6 epochs, "
                   "accuracy 0.663/0.760/0.760/0.779).")
flags.DEFINE_integer("batch", D.batch, "Conversations per step.")
flags.DEFINE_integer("seq_len", D.seq_len, "Training sequence length.")
flags.DEFINE_float("lr", D.lr, "Adam learning rate.")
flags.DEFINE_integer("eval_every", -1, "Learning-curve interval in steps (0 = start and end, "
                     "-1 = once per epoch).")
flags.DEFINE_integer("max_new_tokens", -1, "Greedy generation length (free-answer match, and "
                     "multiple choice by generation). -1: 24 when --kinds has free answers, else "
                     "0 (multiple choice is scored by option log-likelihood without it).")
flags.DEFINE_integer("rag_top_k", 2, "RAG chunks per question.")
flags.DEFINE_integer("seed", 0, "Seed of questions, synthesis and training.")
flags.DEFINE_string("reuse", "", "Another study folder (same questions) whose held-out data "
                    "and baseline results this run reuses, and its self-study data too when "
                    "the synthesis flags are the same (ablations).")
flags.DEFINE_bool("cas", False, "Also the collection methods (issue 12, `cas_jax.cas_study`): CAS "
                  "oracle and composed, naive composed, monolithic, retrieval + CAS, RAG.")
flags.DEFINE_float("cas_epochs", 0.0, "CAS training length in epochs of the self-study data "
                   "(0: --epochs, the isolated cartridges' length).")
flags.DEFINE_bool("cas_naive", True, "With --cas: also the naive composition rows (they read "
                  "the isolated cartridges, trained first if they are not).")
flags.DEFINE_integer("cas_distractors", 3, "k_max of CAS training.")
flags.DEFINE_enum("cas_schedule", "uniform", ["fixed", "uniform", "ramp", "mixed"],
                  "How CAS training draws k: per step (fixed, uniform, ramp) or per row "
                  "(mixed: alone with probability --cas_p_iso, else k ~ U{1..k_max}).")
flags.DEFINE_float("cas_p_iso", 0.0, "Mixed schedule: share of rows read alone.")
flags.DEFINE_float("cas_quiet", 0.0, "Share of quiet CAS steps: rows read only other "
                   "documents' cartridges and are distilled toward the model with none.")
flags.DEFINE_string("geometry", str(attention.DEFAULT_GEOMETRY),
                    "Composition geometry of training and evaluation (attention.Geometry: "
                    "serial, parallel, optionally ',temperature=T,scale=S,count_power=C').")
flags.DEFINE_integer("cas_ramp_steps", 100, "Steps for the 'ramp' schedule to reach k_max.")
flags.DEFINE_enum("cas_grad_scope", "target", ["target", "all"],
                  "CAS training: which active cartridges get updates.")
flags.DEFINE_list("compose_k", ["1", "3", "7"], "Other cartridges composed with the true one.")
flags.DEFINE_list("positions", ["first", "last", "random"],
                  "Where the true cartridge stands among --positions_k others.")
flags.DEFINE_integer("positions_k", 3, "Composition size of the position comparison.")
flags.DEFINE_list("retrieval_k", ["1", "2", "4"], "k of retrieval + CAS and of RAG.")
flags.DEFINE_list("retrievers", ["bm25", "dense"], "Retrievers of retrieval + CAS and RAG.")
flags.DEFINE_bool("monolithic", True, "With --cas: also train and evaluate the monolithic "
                  "baseline (n_docs x P tokens; slow: its prefix is the whole budget).")
SYNTHESIS_FLAGS = ("conversations_per_doc", "family_weights", "span_turns", "chunk_min",
                   "chunk_max", "max_user_tokens", "max_answer_tokens", "no_repeat_ngram_size",
                   "repetition_penalty", "synthesis_batch", "seed")


def _weights() -> tuple[float, ...]:
    pairs = dict(p.partition("=")[::2] for p in FLAGS.family_weights.split(",") if p)
    bad = sorted(f for f in pairs if f not in synthesis.FAMILIES)
    if bad:
        raise app.UsageError(f"--family_weights: unknown families {bad}; expected "
                             f"{synthesis.FAMILIES}")
    return tuple(float(pairs.get(f, 0.0)) for f in synthesis.FAMILIES)


def _geometry() -> attention.Geometry:
    try:
        return attention.Geometry.parse(FLAGS.geometry)
    except ValueError as e:
        raise app.UsageError(f"--geometry: {e}")


def _stage(name, times, t0):
    times[name] = times.get(name, 0.0) + time.perf_counter() - t0
    print(f"  {name}: {times[name]:.0f}s", flush=True)


def _collection_methods(model, docs, data_dir, naive, isolated, ev, qs, cfg, cas_steps, times):
    """Stage 5 (--cas): every collection method, with the CAS and monolithic cartridges
    trained when a method first reads them (not at all when all are cached). `naive`
    is the isolated cartridges' source, `isolated` their training config (the stamp of the
    results read from them, `study.cached_method`); `cas_steps` the CAS training length."""
    out = FLAGS.out
    t0 = time.perf_counter()
    print("== 5. collection methods (CAS) ==", flush=True)
    report = lambda r: print(f"  step {r.step}/{r.total_steps} loss {r.loss:.4f} "  # noqa: E731
                             f"ETA {r.eta_s:.0f}s", flush=True)
    p = dataclasses.replace(cfg.pipeline, steps=cas_steps, distractor_schedule=FLAGS.cas_schedule,
                            ramp_steps=FLAGS.cas_ramp_steps, grad_scope=FLAGS.cas_grad_scope,
                            p_iso=FLAGS.cas_p_iso, quiet=FLAGS.cas_quiet)
    # Composed rows also depend on the geometry they are read by (absent: the default).
    read_by = ({} if ev.config.geometry == attention.DEFAULT_GEOMETRY
               else {"read_geometry": str(ev.config.geometry)})
    stamps = {"naive": {**isolated, **read_by}, "monolithic": isolated,
              "cas": pipeline.stamp(p, distractors=FLAGS.cas_distractors, **read_by)}

    def train_cas():
        cas, _ = pipeline.train_cartridges(model, docs, data_dir, os.path.join(out, "cas"), p,
                                           distractors=FLAGS.cas_distractors, on_report=report)
        return pipeline.StoreSource(cas)

    def train_mono():
        mono, _ = pipeline.train_monolithic(model, docs, data_dir, os.path.join(out, "monolithic"),
                                            cfg.pipeline, on_report=report)
        return pipeline.StoreSource(mono)

    # Trained on first use: a method whose evaluation is cached (e.g. copied from an earlier
    # session's eval/) does not retrain the cartridges it read.
    cas = study.LazySource(train_cas)
    mono = study.LazySource(train_mono) if FLAGS.monolithic else None
    rows = cas_study.collection_methods(
        ev, qs, out, cas=cas, naive=naive if FLAGS.cas_naive else None, monolithic=mono,
        tokens=FLAGS.tokens, n_docs=len(docs), compose_k=[int(k) for k in FLAGS.compose_k],
        positions=FLAGS.positions, positions_k=FLAGS.positions_k,
        retrieval_k=[int(k) for k in FLAGS.retrieval_k], retrievers=FLAGS.retrievers,
        seed=FLAGS.seed, stamps=stamps)
    _stage("collection training and evaluation", times, t0)
    return rows


def _generation_tokens() -> int:
    if FLAGS.max_new_tokens >= 0:
        return FLAGS.max_new_tokens
    return 24 if "free" in FLAGS.kinds else 0


def main(argv):
    del argv
    out = FLAGS.out
    os.makedirs(out, exist_ok=True)
    times_path = os.path.join(out, "times.json")
    times = json.load(open(times_path)) if os.path.exists(times_path) else {}
    model = loading.load_model(FLAGS.model or None)
    profiles = (splits.dev_profiles() if FLAGS.split == "dev" else splits.test_profiles())
    profiles = profiles[:FLAGS.profiles]
    qs = questions_lib.to_section_questions(questions_lib.generate_factbook_questions(
        profiles, len(questions_lib.FIELDS), FLAGS.seed, kinds=FLAGS.kinds))
    qs = [q for q in qs if q.doc_id.split("-", 1)[1] in FLAGS.sections]
    docs = corpus.load_factbook_sections(documents=sorted({q.doc_id for q in qs}))
    questions_lib.write_questions(os.path.join(out, "questions.jsonl"), qs)
    shared = FLAGS.reuse or out  # where held-out data and baselines live
    selfstudy_dir = os.path.join(out, "selfstudy")
    if FLAGS.reuse:
        def read(path):
            with open(path) as f:
                return f.read()

        their_questions = os.path.join(FLAGS.reuse, "questions.jsonl")
        if not os.path.exists(their_questions) or (
                read(their_questions) != read(os.path.join(out, "questions.jsonl"))):
            raise app.UsageError(f"--reuse={FLAGS.reuse}: its questions.jsonl is missing or "
                                 "differs from this run's (same --split/--profiles/--sections/"
                                 "--kinds/--seed needed)")
        their_flags = json.loads(read(os.path.join(FLAGS.reuse, "config.json")))["flags"]
        if all(their_flags.get(f) == FLAGS[f].value for f in SYNTHESIS_FLAGS):
            selfstudy_dir = os.path.join(FLAGS.reuse, "selfstudy")
    epoch_steps = -(-len(docs) * FLAGS.conversations_per_doc // FLAGS.batch)
    steps = FLAGS.steps or max(1, round(FLAGS.epochs * epoch_steps))
    cas_steps = max(1, round(FLAGS.cas_epochs * epoch_steps)) if FLAGS.cas_epochs else steps
    eval_every = epoch_steps if FLAGS.eval_every < 0 else FLAGS.eval_every
    cfg = study.StudyConfig(pipeline.PipelineConfig(
        conversations_per_doc=FLAGS.conversations_per_doc, chunk_min=FLAGS.chunk_min,
        chunk_max=FLAGS.chunk_max, max_user_tokens=FLAGS.max_user_tokens,
        max_answer_tokens=FLAGS.max_answer_tokens, synthesis_batch=FLAGS.synthesis_batch,
        tokens_per_doc=FLAGS.tokens, distractors=0, steps=steps, batch=FLAGS.batch,
        seq_len=FLAGS.seq_len, lr=FLAGS.lr, seed=FLAGS.seed, family_weights=_weights(),
        span_turns=FLAGS.span_turns, no_repeat_ngram_size=FLAGS.no_repeat_ngram_size,
        repetition_penalty=FLAGS.repetition_penalty, init=FLAGS.init,
        geometry=_geometry()),
        heldout_per_doc=FLAGS.heldout_per_doc, eval_every=eval_every,
        max_new_tokens=_generation_tokens(), rag_top_k=FLAGS.rag_top_k)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({"flags": FLAGS.flag_values_dict(), "profiles": profiles,
                   "config": dataclasses.asdict(cfg)}, f, indent=1, default=str)
    doc_tokens = {d: len(model.tokenizer(docs[d].text, add_special_tokens=False)["input_ids"])
                  for d in docs.ids}
    print(f"{len(qs)} questions ({', '.join(FLAGS.kinds)}) on {len(docs)} section documents of "
          f"{len(profiles)} {FLAGS.split} profiles; median document {np.median(list(doc_tokens.values())):.0f} "
          f"tokens; P={FLAGS.tokens}", flush=True)

    t0 = time.perf_counter()
    print("== 1. self-study ==", flush=True)
    progress = lambda p: print(  # noqa: E731
        f"  {p.conversations_done}/{p.conversations_total} conversations, ETA {p.eta_s:.0f}s",
        flush=True)
    data_dir = pipeline.synthesize(model, docs, selfstudy_dir, cfg.pipeline,
                                   on_batch=progress)
    if FLAGS.reuse:  # the other run's held-out set, as it was synthesised
        heldout_dir = os.path.join(FLAGS.reuse, "heldout")
        dataset.read_manifests(heldout_dir)
    else:
        heldout_dir = pipeline.synthesize(
            model, docs, os.path.join(out, "heldout"),
            dataclasses.replace(cfg.pipeline, conversations_per_doc=cfg.heldout_per_doc,
                                seed=cfg.pipeline.seed + 1), on_batch=progress)
    _stage("synthesis", times, t0)
    quality_path = os.path.join(data_dir, "quality.json")
    if not os.path.exists(quality_path):
        rows = selfstudy_quality.dataset_report(model, data_dir, docs, limit=400)
        with open(quality_path, "w") as f:
            json.dump([dataclasses.asdict(r) for r in rows], f, indent=1)
    quality = [selfstudy_quality.FamilyQuality(**r) for r in json.load(open(quality_path))]
    print(selfstudy_quality.format_report(quality), flush=True)

    t0 = time.perf_counter()
    print("== 2. baselines ==", flush=True)
    ev = evaluate.Evaluator(model, docs, evaluate.EvalConfig(max_new_tokens=cfg.max_new_tokens,
                                                             geometry=cfg.pipeline.geometry))
    closed = study.cached_method(shared, "closed_book", lambda: ev.closed_book(qs))
    icl = study.cached_method(shared, "icl", lambda: ev.icl(qs))
    rag = study.cached_method(shared, f"rag_bm25_k{cfg.rag_top_k}",
                              lambda: ev.rag(qs, top_k=cfg.rag_top_k))
    _stage("baselines", times, t0)

    t0 = time.perf_counter()
    print("== 3. cartridges (one per document, with learning curve) ==", flush=True)
    store_dir = os.path.join(out, "cartridges")
    curve_path = os.path.join(out, "curve.jsonl")
    mc = [q for q in qs if q.kind == "mc"]
    oracle_name = f"oracle_cartridge_step{cfg.pipeline.steps}"
    isolated = pipeline.stamp(cfg.pipeline)  # stamps the results read from these cartridges

    def train_isolated():
        study.train_with_curve(
            model, docs, data_dir, heldout_dir, store_dir, ev, mc, cfg, curve_path,
            on_report=lambda r: print(f"  step {r.step}/{r.total_steps} loss {r.loss:.4f} "
                                      f"{r.tokens_per_s:.0f} tok/s ETA {r.eta_s:.0f}s", flush=True),
            on_point=lambda p: print(f"  curve: {json.dumps(p)}", flush=True))
        return pipeline.StoreSource(pipeline.initial_store(model, docs, store_dir, cfg.pipeline))

    if study.curve_complete(curve_path, cfg) and os.path.exists(
            os.path.join(out, "eval", f"{oracle_name}.json")):
        # A resumed study (e.g. --cas after the copied eval/ and curve of an earlier run):
        # the isolated cartridges are trained only if an uncached method reads them.
        print("  curve and oracle evaluation cached: training deferred to first use", flush=True)
        source = study.LazySource(train_isolated)
    else:
        source = train_isolated()
    _stage("training", times, t0)
    t0 = time.perf_counter()
    oracle = study.cached_method(out, oracle_name, lambda: ev.oracle_cartridge(qs, source),
                                 stamp=isolated)
    _stage("cartridge evaluation", times, t0)
    cas_rows = []
    if FLAGS.cas:
        cas_rows = _collection_methods(model, docs, data_dir, source, isolated, ev, qs, cfg,
                                       cas_steps, times)
    with open(times_path, "w") as f:
        json.dump(times, f)

    median_doc = float(np.median([doc_tokens[q.doc_id] for q in qs]))
    rows = [study.method_row(n, o, closed, icl, median_doc, c) for n, o, c in (
        ("closed_book", closed, None), ("icl", icl, None), (f"rag_bm25_k{cfg.rag_top_k}", rag, None),
        ("oracle_cartridge", oracle, FLAGS.tokens))]
    rows += [study.method_row(n, o, closed, icl, median_doc, c if n == "cas_oracle" else None)
             for n, o, c in cas_rows]
    table = study.format_rows(rows)
    study_results = {"closed_book": closed, "icl": icl, f"rag_bm25_k{cfg.rag_top_k}": rag,
                     "oracle_cartridge": oracle}
    claims = []
    if cas_rows:
        claims = cas_study.claims({**study_results,
                                   **{n.split(" (recall")[0]: o for n, o, _ in cas_rows}},
                                  k=FLAGS.positions_k)
        table += "\n\nIssue 12's claims (paired accuracy differences):\n\n" + \
            cas_study.format_claims(claims)
    fields = study.accuracy_by_field(qs, study_results)
    study.plot_curve(curve_path, os.path.join(out, "curve.png"), closed, icl)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(table + "\n\nAccuracy by question field:\n\n" + fields + "\n\n"
                + selfstudy_quality.format_report(quality) + "\n\nwall time (s): "
                + json.dumps({k: round(v) for k, v in times.items()}) + "\n")
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump({"rows": rows, "claims": claims,
                   "quality": [dataclasses.asdict(r) for r in quality],
                   "times": times, "median_document_tokens": median_doc}, f, indent=1)
    print(table)
    o = rows[3]
    print(f"icl_gap={rows[1]['accuracy'] - rows[0]['accuracy']:.3f} "
          f"recovered_acc={o['recovered_acc']:.3f} recovered_nll={o['recovered_nll']:.3f} "
          f"compression={o['compression']:.1f}")


if __name__ == "__main__":
    app.run(main)
