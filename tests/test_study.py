"""The quality study: statistics, the evaluation cache and the recorded studies it reads."""

import dataclasses
import json
import os
import re

import numpy as np
import pytest

from cas_jax.studies import pipeline, study


def test_bootstrap_ci_brackets_the_mean_and_narrows_with_more_questions():
    x = np.random.default_rng(0).random(400) < 0.7
    lo, hi = study.bootstrap_ci(x)
    assert lo < x.mean() < hi and hi - lo < 0.1
    lo8, hi8 = study.bootstrap_ci(x[:40])
    assert hi8 - lo8 > hi - lo
    assert study.bootstrap_ci([1.0] * 10) == (1.0, 1.0)


def test_recovered_gain_and_its_paired_interval():
    assert study.recovered(0.75, 0.5, 0.9) == (0.75 - 0.5) / (0.9 - 0.5)
    assert np.isnan(study.recovered(0.6, 0.5, 0.5))  # ICL no better than closed book
    closed = np.asarray([0.0] * 50 + [1.0] * 50)
    icl = np.ones(100)
    method = np.asarray([0.0] * 25 + [1.0] * 75)  # half of the 50 closed-book misses recovered
    lo, hi = study.paired_recovered_ci(method, closed, icl)
    assert lo < 0.5 < hi and 0.2 < lo and hi < 0.8


def _row(method, acc, nll, compression=None):
    return {"method": method, "questions": 4, "accuracy": acc, "accuracy_ci": (acc - .1, acc + .1),
            "gold_nll": nll, "recovered_acc": acc, "recovered_nll": 0.5,
            "compression": compression, "kv_bytes": 2**20}


def test_sweep_rows_tag_size_dependent_methods_and_keep_baselines_once(tmp_path):
    def report(p, acc):
        return {"median_document_tokens": 640.0,
                "rows": [_row("closed_book", .3, 4.), _row("icl", .9, 2.), _row("rag_bm25_k2", .6, 3.),
                         _row("oracle_cartridge", acc, 3.5, 640 / p), _row("cas_oracle", acc, 3.4)]}

    rows, flat = study.sweep_rows({64: report(64, .6), 32: report(32, .5)})
    assert [r["method"] for r in flat] == ["closed_book", "icl", "rag_bm25_k2"]
    assert [(r["method"], r["tokens"], r["compression"]) for r in rows] == [
        ("oracle_cartridge", 32, 20.0), ("cas_oracle", 32, 20.0),
        ("oracle_cartridge", 64, 10.0), ("cas_oracle", 64, 10.0)]
    table = study.format_sweep(rows, flat)
    assert "| oracle_cartridge | 32 | 20.0x | 0.500 |" in table and "| icl | - |" in table
    study.plot_sweep(rows, flat, str(tmp_path / "sweep.png"))
    assert (tmp_path / "sweep.png").stat().st_size > 1000


def test_paired_difference_interval():
    rng = np.random.default_rng(1)
    a = (rng.random(300) < 0.5).astype(float)
    b = np.where(rng.random(300) < 0.2, 1.0, a)  # b fixes ~20% of the questions
    mean, lo, hi = study.paired_diff_ci(a, b)
    assert mean == b.mean() - a.mean() and 0 < lo < mean < hi
    assert study.paired_diff_ci(a, a) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same non-empty questions"):
        study.paired_diff_ci(a, b[:10])


def _fake_run(path, correct, nll):
    (path / "eval").mkdir(parents=True)
    # --steps=0: the steps were derived from --epochs; the run's config holds them.
    (path / "config.json").write_text(json.dumps({"flags": {"steps": 0},
                                                  "config": {"pipeline": {"steps": 8}}}))
    (path / "report.json").write_text("{}")
    (path / "curve.jsonl").write_text(json.dumps(
        {"step": 8, "heldout_loss": 1.0, "gold_nll": float(np.mean(nll)),
         "accuracy": float(np.mean(correct))}) + "\n")
    records = [{"doc_id": f"d{i % 3}", "question": f"q{i}", "correct_ll": bool(c), "gold_nll": n}
               for i, (c, n) in enumerate(zip(correct, nll))]
    (path / "eval" / "oracle_cartridge_step8.json").write_text(json.dumps({"records": records}))


def test_ablation_report_compares_runs_on_the_same_questions(tmp_path):
    import subprocess
    import sys
    _fake_run(tmp_path / "base", [0, 1, 0, 1], [3.0, 2.0, 3.0, 2.0])
    _fake_run(tmp_path / "better", [1, 1, 1, 1], [2.0, 2.0, 2.0, 2.0])
    (tmp_path / "unfinished").mkdir()
    out = subprocess.run([sys.executable, "-m", "benchmarks.ablation_report",
                          f"--base={tmp_path / 'base'}",
                          f"--runs={tmp_path / 'better'},{tmp_path / 'unfinished'}"],
                         capture_output=True, text=True, check=True).stdout
    assert "| better | 8: 1.000 / 2.000 / 1.000 | 1.000 [1.000, 1.000] | +0.500 [" in out
    assert "| unfinished | not finished |" in out
    assert out.strip().splitlines()[-1] == "runs=3 finished=2"


def test_accuracy_by_field_groups_records_by_their_question_field():
    from cas_jax.evaluation.questions import Question

    qs = [Question("a", "q1", "x", "area", ("x", "y"), 0), Question("b", "q1", "x", "area", ("x", "y"), 0),
          Question("a", "q2", "x", "coast", ("x", "y"), 0), Question("a", "q3", "x", "coast")]
    rec = lambda d, q, c, kind="mc": {"doc_id": d, "question": q, "kind": kind, "correct_ll": c}  # noqa: E731
    results = {"m1": {"records": [rec("a", "q1", True), rec("b", "q1", False), rec("a", "q2", True),
                                  rec("a", "q3", False, "free")]},
               "m2": {"records": [rec("a", "q2", False)]}}
    table = study.accuracy_by_field(qs, results).splitlines()
    assert table[0] == "| field | questions | m1 | m2 |"
    assert table[2] == "| area | 2 | 0.50 | - |"
    assert table[3] == "| coast | 1 | 1.00 | 0.00 |"


def test_curve_completeness_and_lazy_source(tmp_path):
    cfg = study.StudyConfig(pipeline.PipelineConfig(steps=10), eval_every=4)
    assert study.curve_marks(cfg) == [0, 4, 8, 10]
    path = str(tmp_path / "curve.jsonl")
    assert not study.curve_complete(path, cfg)  # no file yet
    with open(path, "w") as f:
        f.write("".join(json.dumps({"step": s}) + "\n" for s in (0, 4, 8)))
    assert not study.curve_complete(path, cfg)  # step 10 missing
    with open(path, "a") as f:
        f.write(json.dumps({"step": 10}) + "\n")
    assert study.curve_complete(path, cfg)

    made = []

    class Source:
        def get(self, doc_id):
            return f"kv-{doc_id}"

    lazy = study.LazySource(lambda: made.append(1) or Source())
    assert made == []  # nothing trained until a method reads a cartridge
    assert lazy.get("a") == "kv-a" and lazy.get("b") == "kv-b"
    assert made == [1]  # made once


def test_cached_method_refuses_a_result_from_other_cartridges(tmp_path):
    class Result:
        records = [{"kind": "mc", "correct_ll": True, "gold_nll": 1.0}]

        def summary(self):
            return {"accuracy": 1.0}

    runs = []
    run = lambda: runs.append(1) or Result()  # noqa: E731
    out = str(tmp_path)
    first = study.cached_method(out, "naive_composed_k3", run, stamp={"steps": 468, "lr": 0.02})
    assert first["stamp"] == {"steps": 468, "lr": 0.02} and runs == [1]
    again = study.cached_method(out, "naive_composed_k3", run, stamp={"lr": 0.02, "steps": 468})
    assert again == first and runs == [1]  # same stamp: read, not rerun
    with pytest.raises(ValueError, match=r"naive_composed_k3\.json.*\['steps'\].*468.*936"):
        study.cached_method(out, "naive_composed_k3", run, stamp={"steps": 936, "lr": 0.02})
    assert study.cached_method(out, "naive_composed_k3", run)["stamp"]["steps"] == 468
    assert runs == [1]


def _record(folder, name, stamp=None, accuracy=1.0):
    """A recorded study's eval/<name>.json; returns its path."""
    (folder / "eval").mkdir(parents=True, exist_ok=True)
    obj = {"summary": {"accuracy": accuracy}, "records": []}
    if stamp is not None:
        obj["stamp"] = stamp
    path = folder / "eval" / f"{name}.json"
    path.write_text(json.dumps(obj))
    return path


class _Computed:
    records: list = []

    def summary(self):
        return {"accuracy": 0.0}


def test_recorded_results_are_reused_and_recorded_here_when_stamps_match(tmp_path):
    rec, other, out = tmp_path / "rec", tmp_path / "other", str(tmp_path / "out")
    stamp = {"steps": 468, "lr": 0.02}
    _record(rec, "naive_composed_k3", stamp)
    _record(other, "naive_composed_k3", stamp, accuracy=0.5)  # later in the order
    _record(rec, "icl")  # no stamp: accepted, as a cached result is
    runs = []
    run = lambda: runs.append(1) or _Computed()  # noqa: E731
    obj = study.cached_method(out, "naive_composed_k3", run, stamp={"lr": 0.02, "steps": 468},
                              recorded=[str(rec), str(other)])
    assert obj["summary"]["accuracy"] == 1.0 and runs == []
    assert json.load(open(f"{out}/eval/naive_composed_k3.json")) == obj  # recorded here
    assert study.cached_method(out, "icl", run, recorded=[str(other), str(rec)]) == \
        json.load(open(rec / "eval" / "icl.json"))
    # What --out holds wins; a result file names itself; what nobody recorded is computed.
    _record(other, "icl", accuracy=0.5)
    assert study.cached_method(out, "icl", run, recorded=[str(other)])["summary"] == {
        "accuracy": 1.0}
    one = _record(other, "cas_oracle", {"steps": 1})
    assert study.recall_result(out, "cas_oracle", {"steps": 1}, [str(rec), str(one)]) == str(one)
    assert study.recall_result(out, "cas_oracle", {"steps": 1}, [str(rec)]) == out
    assert study.recall_result(out, "monolithic", None, [str(rec), str(one)]) is None
    assert study.cached_method(out, "monolithic", run, recorded=[str(rec)])["summary"] == {
        "accuracy": 0.0} and runs == [1]


def test_a_recorded_result_from_other_cartridges_is_refused_naming_file_and_keys(tmp_path):
    rec, out = tmp_path / "rec", tmp_path / "out"
    path = _record(rec, "naive_composed_k3", {"steps": 468, "lr": 0.02, "quiet": 0.1})
    runs = []
    with pytest.raises(ValueError, match=re.escape(str(path)) + r": recorded for another "
                       r"configuration \(differs in \['quiet', 'steps'\]: recorded \[0\.1, 468\], "
                       r"this run \[None, 936\]\)"):
        study.cached_method(str(out), "naive_composed_k3", lambda: runs.append(1),
                            stamp={"steps": 936, "lr": 0.02}, recorded=[str(rec)])
    assert runs == [] and not (out / "eval" / "naive_composed_k3.json").exists()


def test_the_isolated_oracle_brings_its_curve_and_a_reused_synthesis_is_compared(tmp_path):
    from cas_jax.documents.corpus import Collection
    from cas_jax.studies import study_runs

    rec, out = tmp_path / "rec", tmp_path / "out"
    _record(rec, "oracle_cartridge_step288")  # recorded before stamps: accepted
    (rec / "curve.jsonl").write_text('{"step": 0}\n{"step": 288}\n')
    run = study_runs.QualityRun(out=str(out), config=study.StudyConfig(), questions=[],
                                docs=Collection([]), profiles=[], kinds=("mc",), split="dev",
                                record={}, reuse_eval=(str(tmp_path / "none"), str(rec)))
    study_runs.recall_isolated(run, "oracle_cartridge_step288", {"steps": 288})
    assert (out / "curve.jsonl").read_text() == (rec / "curve.jsonl").read_text()
    assert (out / "eval" / "oracle_cartridge_step288.json").exists()
    (out / "curve.jsonl").write_text('{"step": 0}\n')  # this study's own: kept
    study_runs.recall_isolated(run, "oracle_cartridge_step288", {"steps": 288})
    assert (out / "curve.jsonl").read_text() == '{"step": 0}\n'
    _record(rec, "oracle_cartridge_step9", {"steps": 9})
    with pytest.raises(ValueError, match="oracle_cartridge_step9.json: recorded for another"):
        study_runs.recall_isolated(run, "oracle_cartridge_step9", {"steps": 10})

    (out / "questions.jsonl").write_text('{"q": 1}\n')
    study_runs.check_recorded(run := dataclasses.replace(run, reuse_eval=(str(rec),)))
    (rec / "questions.jsonl").write_text('{"q": 2}\n')  # a study of other questions
    with pytest.raises(study_runs.ReuseError, match="rec: .*questions.jsonl differs"):
        study_runs.check_recorded(run)
    with pytest.raises(study_runs.ReuseError, match="none: no such recorded study"):
        study_runs.check_recorded(dataclasses.replace(run, reuse_eval=(str(tmp_path / "none"),)))

    mine = {f: 1 for f in study_runs.SYNTHESIS_SETTINGS} | {"synthesis.user_temperature": 0.6}
    theirs = {f: 1 for f in study_runs.SYNTHESIS_SETTINGS}  # recorded before the flag
    assert study_runs.same_synthesis(theirs, mine)  # 0.6 is the default
    assert not study_runs.same_synthesis(theirs, mine | {"synthesis.user_temperature": 0.9})
    assert not study_runs.same_synthesis(theirs | {"seed": 2}, mine)


def test_stamps_keep_recorded_results_readable_and_tell_geometries_apart():
    import dataclasses

    from cas_jax.cartridges import attention

    base = pipeline.PipelineConfig()
    old = json.loads(json.dumps({k: getattr(base, k) for k in pipeline.FLAT
                                 if k not in pipeline.LATER_FIELDS}))
    assert pipeline.stamp(base) == old  # what results recorded before these fields carry
    parallel = dataclasses.replace(base, geometry=attention.PARALLEL)
    assert pipeline.stamp(parallel) == old  # isolated rows: the layout changes nothing
    assert pipeline.stamp(parallel, distractors=3)["geometry"] == "parallel"
    counted = dataclasses.replace(base, geometry=attention.Geometry("parallel", count_power=1))
    assert pipeline.stamp(counted) == old  # n_active = 1: count_power changes nothing alone
    hot = dataclasses.replace(base, geometry=attention.Geometry("serial", temperature=0.8))
    assert pipeline.stamp(hot)["geometry"] == "serial,temperature=0.8"
    assert pipeline.stamp(dataclasses.replace(base, quiet=0.1))["quiet"] == 0.1


def _result(correct, hits=None):
    hits = hits or [None] * len(correct)
    return {"summary": {"prompt_tokens": 10.0, "cartridge_tokens": 0.0, "kv_bytes": 2.0**20,
                        "latency_s": 0.1, "free_match": None},
            "records": [{"kind": "mc", "correct_ll": c, "gold_nll": 1.0 + c,
                         "retrieval_hit": h} for c, h in zip(correct, hits)]}


def test_recall_is_a_row_field_and_rows_that_named_it_render_the_same():
    from cas_jax.studies import cas_study

    closed, icl = _result([0, 0, 1, 0]), _result([1, 1, 1, 0])
    rag = _result([1, 0, 1, 0], hits=[True, True, False, True])
    rows = cas_study.method_rows([("rag_bm25_k1", rag, None), ("cas_oracle", icl, 8)],
                                 closed, icl, 16.0)
    assert rows[0]["method"] == "rag_bm25_k1" and rows[0]["recall"] == 0.75
    assert "recall" not in rows[1] and rows[1]["compression"] == 2.0
    old = dict(rows[0], method="rag_bm25_k1 (recall 0.75)")  # as results before the field
    del old["recall"]
    table = study.format_rows(rows).splitlines()
    assert table[2].startswith("| rag_bm25_k1 (recall 0.75) | 4 | 0.500 |")
    assert study.format_rows([old]).splitlines()[2] == table[2]
    assert study.row_label(rows[1]) == "cas_oracle"


def test_training_length_in_epochs():
    from cas_jax.studies import study_runs

    assert study_runs.epoch_steps(26, 24, 4) == 156
    assert study_runs.epoch_steps(3, 5, 4) == 4  # 15 conversations: the last step is partial
    assert study_runs.steps_for(6.0, 156) == 936 and study_runs.steps_for(0.1, 4) == 1


def test_a_reused_study_lends_its_data_only_for_the_same_questions_and_synthesis(tmp_path):
    from cas_jax.documents.corpus import Collection
    from cas_jax.studies import study_runs

    theirs, mine = tmp_path / "theirs", tmp_path / "mine"
    for d in (theirs, mine):
        d.mkdir()
        (d / "questions.jsonl").write_text('{"q": 1}\n')
    record = {f: 1 for f in study_runs.SYNTHESIS_SETTINGS}
    (theirs / "config.json").write_text(json.dumps({"flags": {**record, "lr": 0.1}}))

    def run(**kw):
        return study_runs.QualityRun(
            out=str(mine), config=study.StudyConfig(), questions=[], docs=Collection([]),
            profiles=[], kinds=("mc",), split="dev", record={**record, "lr": 0.5},
            reuse=str(theirs), **kw)

    assert study_runs.selfstudy_dir(run()) == str(theirs / "selfstudy")
    other = run().record | {"seed": 2}
    assert study_runs.selfstudy_dir(dataclasses.replace(run(), record=other)) == str(
        mine / "selfstudy")
    assert study_runs.selfstudy_dir(dataclasses.replace(run(), reuse="")) == str(
        mine / "selfstudy")
    (theirs / "questions.jsonl").write_text('{"q": 2}\n')
    with pytest.raises(study_runs.ReuseError, match="theirs: its questions.jsonl .*differs"):
        study_runs.selfstudy_dir(run())


def _eval_obj(qs, correct, stamp=None):
    obj = {"summary": {"accuracy": float(sum(correct)) / len(qs), "gold_nll": 1.0,
                       "prompt_tokens": 10.0, "cartridge_tokens": 0.0, "kv_bytes": 1024.0,
                       "latency_s": 0.1, "free_match": None},
           "records": [{"doc_id": q.doc_id, "question": q.question, "kind": "mc",
                        "correct_ll": c, "gold_nll": 1.0 + c} for q, c in zip(qs, correct)]}
    return obj if stamp is None else {**obj, "stamp": stamp}


def _recorded_claims_run(tmp_path, monkeypatch):
    """A cas_claims-like run (`reuse` = REC, `reuse_eval` = REC, CAS_REC) whose every result
    is recorded there; computing or training anything fails the test."""
    from cas_jax.documents.corpus import Collection, Document
    from cas_jax.evaluation.questions import Question, write_questions
    from cas_jax.studies import study_runs

    docs = Collection([Document(d, d, f"text of {d}") for d in ("a-geography", "b-geography")])
    qs = [Question(d, f"q{i}", "x", field="area", options=("x", "y"), answer=0)
          for i, d in enumerate(docs.ids)]
    cfg = study.StudyConfig(pipeline.PipelineConfig(steps=4, distractors=0), eval_every=0,
                            max_new_tokens=0)
    recipe = study_runs.CollectionRecipe(steps=4, monolithic=False, compose_k=(1,),
                                         positions=(), retrieval_k=(1,), retrievers=())
    rec, cas_rec = tmp_path / "rec", tmp_path / "cas_rec"
    for folder in (rec, cas_rec):
        (folder / "eval").mkdir(parents=True)
    write_questions(str(rec / "questions.jsonl"), qs)
    (rec / "config.json").write_text(json.dumps({"flags": {}}))
    (rec / "curve.jsonl").write_text("".join(json.dumps(
        {"step": s, "heldout_loss": 1.0, "heldout_floor": 2.0, "gold_nll": 1.5,
         "accuracy": 0.5}) + "\n" for s in (0, 4)))
    read_by = {"read_geometry": str(pipeline.read_geometry(cfg.pipeline))}  # not serial
    isolated = {**pipeline.stamp(cfg.pipeline), **read_by}
    cas = pipeline.stamp(study_runs.cas_pipeline(cfg.pipeline, recipe), distractors=3, **read_by)
    for name, folder, stamp in [("closed_book", rec, None), ("icl", rec, None),
                                ("rag_bm25_k2", rec, None), ("oracle_cartridge_step4", rec,
                                                             None),
                                ("naive_composed_k1", rec, isolated),
                                ("cas_oracle", cas_rec, cas), ("cas_composed_k1", cas_rec, cas)]:
        (folder / "eval" / f"{name}.json").write_text(json.dumps(_eval_obj(qs, [1, 0], stamp)))

    def fail(*a, **k):
        raise AssertionError("computed or trained what was recorded")

    class Evaluator:
        def __init__(self, model, collection, config):
            self.collection, self.config = collection, config

        def __getattr__(self, name):
            return fail

    monkeypatch.setattr(pipeline, "synthesize", lambda model, docs, data_dir, *a, **k:
                        os.makedirs(data_dir, exist_ok=True) or data_dir)
    monkeypatch.setattr(study_runs.dataset, "read_manifests", lambda d: None)
    monkeypatch.setattr(study_runs.selfstudy_data, "dataset_report", lambda *a, **k: [])
    monkeypatch.setattr(study_runs.evaluate, "Evaluator", Evaluator)
    monkeypatch.setattr(study_runs, "train_with_curve", fail)
    monkeypatch.setattr(pipeline, "train_cartridges", fail)
    model = type("M", (), {"tokenizer": staticmethod(
        lambda text, add_special_tokens: {"input_ids": text.split()})})()
    run = study_runs.QualityRun(
        out=str(tmp_path / "out"), config=cfg, questions=qs, docs=docs,
        profiles=["a", "b"], kinds=("mc",), split="test", record={}, reuse=str(rec),
        collection=recipe, reuse_eval=(str(rec), str(cas_rec)))
    return model, run


def test_a_study_reuses_recorded_evaluations_without_copies_by_shell(tmp_path, monkeypatch):
    from cas_jax.studies import study_runs

    model, run = _recorded_claims_run(tmp_path, monkeypatch)
    rows = study_runs.run_quality_study(model, run)
    out, rec = tmp_path / "out", tmp_path / "rec"
    assert [r["method"] for r in rows] == [
        "closed_book", "icl", "rag_bm25_k2", "oracle_cartridge", "cas_oracle",
        "cas_composed_k1", "naive_composed_k1"]
    assert sorted(os.listdir(out / "eval")) == sorted(
        ["closed_book.json", "icl.json", "rag_bm25_k2.json", "oracle_cartridge_step4.json",
         "naive_composed_k1.json", "cas_oracle.json", "cas_composed_k1.json"])
    assert (out / "curve.jsonl").read_text() == (rec / "curve.jsonl").read_text()
    assert json.load(open(out / "config.json"))["config"]["pipeline"]["steps"] == 4
    study_runs.run_quality_study(model, run)  # rerun = resume: reads its own eval/


def test_a_study_refuses_a_recorded_evaluation_of_other_cartridges(tmp_path, monkeypatch):
    from cas_jax.studies import study_runs

    model, run = _recorded_claims_run(tmp_path, monkeypatch)
    path = tmp_path / "cas_rec" / "eval" / "cas_composed_k1.json"
    obj = json.loads(path.read_text())
    path.write_text(json.dumps({**obj, "stamp": {**obj["stamp"], "steps": 5}}))
    with pytest.raises(ValueError, match=re.escape(str(path)) + r": recorded for another "
                       r"configuration \(differs in \['steps'\]: recorded \[5\], this run \[4\]"):
        study_runs.run_quality_study(model, run)
    assert not (tmp_path / "out" / "eval" / "cas_composed_k1.json").exists()
