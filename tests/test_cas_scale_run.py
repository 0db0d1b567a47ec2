"""benchmarks.cas_scale, the launcher (issue 25 item 4): its default recipe is the one issue 24's
TEST run trained (the stamp recorded with its CAS rows), its flags are benchmarks.quality's
plus --read_geometry, and a CPU dry run on 5 documents (tiny random model) trains by that
recipe, keeps the read geometry in every cartridge, evaluates under it, records both, and
resumes without retraining."""

import json
import os

import pytest
from absl import app, flags

from benchmarks import cas_scale
from cas_jax.cartridges.attention import SERIAL, Geometry
from cas_jax.cartridges.store import CartridgeStore
from cas_jax.studies import pipeline
from conftest import TINY_FINGERPRINT, tiny_model

ROOT = os.path.join(os.path.dirname(__file__), "..")
REC = os.path.join(ROOT, "benchmarks", "results", "quality")
TEST_CAS_ROW = os.path.join(ROOT, "benchmarks", "results", "compose_test", "serial", "eval",
                            "cas_composed_k15.json")
CHOSEN = Geometry("parallel", count_power=0.5, relevance=4, relevance_floor=1)


def _flags(*argv):
    fv = flags.FlagValues()
    flag_set = cas_scale.define_flags(fv)
    fv(["cas_scale", *argv])
    return flag_set


def test_the_default_recipe_is_the_one_the_test_run_trained():
    cfg = _flags().value()
    p, recipe, generate = cas_scale.recipe_for(cfg, 26)
    with open(TEST_CAS_ROW) as f:
        recorded = json.load(f)["stamp"]
    assert pipeline.stamp(p, distractors=recipe.distractors) == recorded
    assert (p.steps, p.collection.grad_scope, recipe.distractors, recipe.schedule) == (
        936, "all", 3, "uniform")
    assert p.train.geometry == SERIAL and pipeline.read_geometry(p) == CHOSEN
    assert pipeline.read_geometry(p) == pipeline.read_geometry(pipeline.PipelineConfig())
    assert generate == 0 and cas_scale.recipe_for(cfg, 60)[0].steps == 6 * 60 * 24 // 4


def test_recipe_and_geometry_flags_change_the_config_and_name_themselves():
    flag_set = _flags("--read_geometry=serial", "--cas_epochs=3", "--cas_grad_scope=target",
                      "--geometry=parallel")
    cfg = flag_set.value()
    p, _, _ = cas_scale.recipe_for(cfg, 26)
    assert pipeline.read_geometry(p) == SERIAL and p.train.geometry == Geometry("parallel")
    assert (p.steps, p.collection.grad_scope) == (468, "target")
    assert sorted(flag_set.argv(cfg)) == ["--cas_epochs=3.0", "--cas_grad_scope=target",
                                          "--geometry=parallel", "--read_geometry=serial"]
    with pytest.raises(flags.IllegalFlagValueError, match="read_geometry"):
        _flags("--read_geometry=diagonal")


@pytest.mark.parametrize("sizes, error", [("0", "collection of 0 documents; expected "
                                                  "between the 1 question documents"),
                                          ("x", "--sizes: invalid literal")])
def test_bad_sizes_are_usage_errors_before_any_work(tmp_path, monkeypatch, sizes, error):
    def load(path):
        raise AssertionError("loaded a model for a refused command line")

    monkeypatch.setattr(cas_scale.loading, "load_model", load)
    flag_set = _flags("--profiles=1", f"--sizes={sizes}", f"--rec={REC}", f"--out={tmp_path}")
    with pytest.raises(app.UsageError, match=error):
        cas_scale.main([], flag_set)
    assert not os.listdir(tmp_path)


def test_dry_run_on_five_documents_trains_by_the_recipe_and_reads_by_the_geometry(
        tmp_path, monkeypatch):
    tiny = tiny_model()
    monkeypatch.setattr(cas_scale.loading, "load_model", lambda path: tiny)
    out = tmp_path / "scale"
    flag_set = _flags("--profiles=1", "--sizes=5", "--conversations_per_doc=2",
                      "--cas_epochs=1", "--retrieval_k=1", f"--rec={REC}", f"--out={out}")
    cas_scale.main([], flag_set)

    record = json.loads((out / "n5" / "scale.json").read_text())
    assert record["documents"] == 5 and record["cas_steps"] == 3  # 1 epoch of 10 conversations
    assert record["read_geometry"] == str(CHOSEN) and record["train_geometry"] == "serial"
    recipe = record["recipe"]
    assert (recipe["grad_scope"], recipe["distractors"], recipe["distractor_schedule"],
            recipe["steps"], recipe["read_geometry"]) == ("all", 3, "uniform", 3, str(CHOSEN))
    assert sorted(record["argv"]) == ["--cas_epochs=1.0", "--conversations_per_doc=2",
                                      "--profiles=1", "--retrieval_k=1"]
    assert set(record["accuracy"]) == {"closed_book", "icl", "cas_oracle", "cas_composed_k3",
                                       "retrieval_cas_bm25_k1", "rag_bm25_k1"}
    assert set(record["seconds_per_document"]) == {"synthesis", "training"}
    store = CartridgeStore(str(out / "n5" / "cas" / "cartridges"), TINY_FINGERPRINT)
    assert len(store.list()) == 5
    assert {store.load_cartridge(d).meta.geometry for d in store.list()} == {str(CHOSEN)}
    composed = json.loads((out / "n5" / "eval" / "cas_composed_k3.json").read_text())
    assert composed["stamp"]["read_geometry"] == str(CHOSEN)
    assert f"read {CHOSEN}" in (out / "n5" / "report.md").read_text()
    texts = store.documents()  # what a server or chat over this store routes by
    assert len(texts) == 5 and all(texts.values())
    assert "| training |" in (out / "report.md").read_text()

    def retrain(*a, **k):
        raise AssertionError("a resumed run retrained its cartridges")

    monkeypatch.setattr(cas_scale.pipeline, "train_cartridges", retrain)
    cas_scale.main([], flag_set)
    again = json.loads((out / "n5" / "scale.json").read_text())
    assert again["accuracy"] == record["accuracy"] and again["recipe"] == record["recipe"]
