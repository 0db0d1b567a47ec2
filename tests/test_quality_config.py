"""benchmarks.quality's flags, defined from the nested `QualityConfig` (issue 27 item 4): every
stage gets the configs the hand-written flags built before, for the default flags and others;
the flags its callers use (shell scripts, variant sets, the markdown's commands) parse; and
cas_claims.sh copies nothing."""

import dataclasses
import os
import re
import shlex

import pytest
from absl import flags

from benchmarks import configs, quality
from cas_jax.cartridges.attention import Geometry
from cas_jax.studies import pipeline, quality_config, study, study_runs
from cas_jax.training import synthesis

ROOT = os.path.join(os.path.dirname(__file__), "..")

OLD_DEFAULTS = {
    "split": "test", "profiles": 26, "sections": ["geography"], "kinds": ["mc"],
    "conversations_per_doc": 24, "heldout_per_doc": 2, "family_weights": "spans=1",
    "span_turns": 4, "chunk_min": 1024, "chunk_max": 1024, "max_user_tokens": 48,
    "max_answer_tokens": 96, "no_repeat_ngram_size": 4, "repetition_penalty": 1.0,
    "synthesis_batch": 16, "tokens": 64, "init": "first_tokens", "steps": 0, "epochs": 6.0,
    "batch": 4, "seq_len": 320, "lr": 2e-2, "eval_every": -1, "max_new_tokens": -1,
    "rag_top_k": 2, "seed": 0, "reuse": "", "cas": False, "cas_epochs": 0.0, "cas_naive": True,
    "cas_distractors": 3, "cas_schedule": "uniform", "cas_p_iso": 0.0, "cas_quiet": 0.0,
    "geometry": "serial", "cas_ramp_steps": 100, "cas_grad_scope": "target",
    "compose_k": ["1", "3", "7"], "positions": ["first", "last", "random"], "positions_k": 3,
    "retrieval_k": ["1", "2", "4"], "retrievers": ["bm25", "dense"], "monolithic": True,
    "out": "runs/quality", "model": ""}
"""benchmarks.quality's flags and defaults before issue 27 item 4 (hand-written there)."""


def _old_flags(argv: list[str]) -> dict:
    """The old flags' values for `argv` (absl's rules: --name=value, --name / --noname)."""
    out = dict(OLD_DEFAULTS)
    for arg in argv:
        name, eq, value = arg[2:].partition("=")
        if not eq:
            name, value = (name[2:], False) if name not in out else (name, True)
            assert isinstance(out[name], bool), arg
        kind = type(OLD_DEFAULTS[name])
        out[name] = (value if kind is bool else [v for v in value.split(",") if v]
                     if kind is list else kind(value))
    return out


def _old_configs(o: dict, n_docs: int):
    """(StudyConfig, CollectionRecipe or None) as the old `main` built them from its flags."""
    one_epoch = -(-n_docs * o["conversations_per_doc"] // o["batch"])
    steps = o["steps"] or max(1, round(o["epochs"] * one_epoch))
    pairs = dict(p.partition("=")[::2] for p in o["family_weights"].split(",") if p)
    cfg = study.StudyConfig(pipeline.PipelineConfig(
        conversations_per_doc=o["conversations_per_doc"], chunk_min=o["chunk_min"],
        chunk_max=o["chunk_max"], max_user_tokens=o["max_user_tokens"],
        max_answer_tokens=o["max_answer_tokens"], synthesis_batch=o["synthesis_batch"],
        tokens_per_doc=o["tokens"], distractors=0, steps=steps, batch=o["batch"],
        seq_len=o["seq_len"], lr=o["lr"], seed=o["seed"],
        family_weights=tuple(float(pairs.get(f, 0.0)) for f in synthesis.FAMILIES),
        span_turns=o["span_turns"], no_repeat_ngram_size=o["no_repeat_ngram_size"],
        repetition_penalty=o["repetition_penalty"], init=o["init"],
        geometry=Geometry.parse(o["geometry"])),
        heldout_per_doc=o["heldout_per_doc"],
        eval_every=one_epoch if o["eval_every"] < 0 else o["eval_every"],
        max_new_tokens=o["max_new_tokens"] if o["max_new_tokens"] >= 0
        else 24 if "free" in o["kinds"] else 0, rag_top_k=o["rag_top_k"])
    if not o["cas"]:
        return cfg, None
    return cfg, study_runs.CollectionRecipe(
        steps=max(1, round(o["cas_epochs"] * one_epoch)) if o["cas_epochs"] else steps,
        distractors=o["cas_distractors"], schedule=o["cas_schedule"],
        ramp_steps=o["cas_ramp_steps"], grad_scope=o["cas_grad_scope"], p_iso=o["cas_p_iso"],
        quiet=o["cas_quiet"], naive=o["cas_naive"], monolithic=o["monolithic"],
        compose_k=tuple(int(k) for k in o["compose_k"]), positions=tuple(o["positions"]),
        positions_k=o["positions_k"], retrieval_k=tuple(int(k) for k in o["retrieval_k"]),
        retrievers=tuple(o["retrievers"]))


def _parse(argv: list[str]):
    fv = flags.FlagValues()
    flag_set = quality.define_flags(fv)
    fv(["prog", *argv])
    return fv, quality.config(flag_set)


FLAG_SETS = [
    [],
    ["--epochs=3", "--cas", "--nomonolithic", "--compose_k=3,1,7",
     "--reuse=benchmarks/results/quality", "--out=runs/quality_cas"],
    ["--split=dev", "--profiles=8", "--epochs=6", "--nocas_naive", "--compose_k=3",
     "--positions=", "--retrievers=", "--cas_epochs=3", "--cas_grad_scope=all", "--cas"],
    ["--split=dev", "--profiles=8", "--steps=288", "--eval_every=48",
     "--conversations_per_doc=12", "--family_weights=spans=1,question=1", "--kinds=mc,free",
     "--sections=geography,government", "--tokens=32", "--lr=0.05", "--seed=3",
     "--init=document_kv", "--batch=2", "--seq_len=256", "--max_new_tokens=8",
     "--rag_top_k=4", "--heldout_per_doc=3", "--chunk_min=256", "--chunk_max=512",
     "--max_user_tokens=32", "--max_answer_tokens=64", "--no_repeat_ngram_size=0",
     "--repetition_penalty=1.1", "--synthesis_batch=8", "--span_turns=2"],
    ["--cas", "--cas_schedule=ramp", "--cas_ramp_steps=50", "--cas_distractors=5",
     "--geometry=parallel,count_power=0.5", "--retrieval_k=1,2", "--retrievers=bm25",
     "--positions=first,last", "--positions_k=2", "--monolithic", "--kinds=free"],
]
MIXED = ["--cas", "--cas_schedule=mixed", "--cas_p_iso=0.5", "--cas_distractors=7",
         "--cas_quiet=0.1", "--geometry=parallel,count_power=0.5", "--cas_epochs=6"]


@pytest.mark.parametrize("argv", FLAG_SETS)
@pytest.mark.parametrize("n_docs", [8, 26])
def test_flags_build_the_configs_the_hand_written_flags_built(argv, n_docs):
    fv, cfg = _parse(argv)
    new, recipe = quality_config.resolve(cfg, n_docs)
    old, old_recipe = _old_configs(_old_flags(argv), n_docs)
    assert new == old and recipe == old_recipe
    p = new.pipeline
    for k in (0, 3):  # the isolated, monolithic and any composed training
        assert pipeline.collection_config(p, p.tokens_per_doc, k) == \
            pipeline.collection_config(old.pipeline, old.pipeline.tokens_per_doc, k)
    if recipe is not None:  # the CAS cartridges' config, as the old stage replaced it
        cas = study_runs.cas_pipeline(p, recipe)
        old_cas = dataclasses.replace(
            old.pipeline, steps=old_recipe.steps, distractor_schedule=old_recipe.schedule,
            ramp_steps=old_recipe.ramp_steps, grad_scope=old_recipe.grad_scope,
            p_iso=old_recipe.p_iso, quiet=old_recipe.quiet)
        k = recipe.distractors
        assert pipeline.collection_config(cas, p.tokens_per_doc, k) == \
            pipeline.collection_config(old_cas, p.tokens_per_doc, k)
        assert cas.train == old_cas.train and cas.synthesis == old_cas.synthesis
        assert pipeline.stamp(cas, distractors=k) == pipeline.stamp(old_cas, distractors=k)
    o = _old_flags(argv)  # what config.json records and a reusing run compares
    for name in [*study_runs.SYNTHESIS_SETTINGS, "tokens", "epochs", "cas_epochs",
                 "cas_schedule", "cas_ramp_steps", "cas_grad_scope", "reuse"]:
        assert fv[name].value == o[name] and type(fv[name].value) is type(o[name]), name


def test_a_mixed_schedule_with_quiet_steps_trains():
    """The old stage's replace left k_max 0 beside the mixed schedule (refused since the
    nested config); the CAS config now carries the recipe's k_max."""
    _, cfg = _parse(MIXED)
    new, recipe = quality_config.resolve(cfg, 8)
    cas = study_runs.cas_pipeline(new.pipeline, recipe)
    col = pipeline.collection_config(cas, 64, recipe.distractors)
    assert (col.distractors.k_max, col.distractors.kind, col.distractors.p_iso,
            col.distractors.quiet, col.steps) == (7, "mixed", 0.5, 0.1, 288)
    assert pipeline.stamp(cas, distractors=7)["quiet"] == 0.1


def test_new_flags_reach_their_fields_and_refusals_name_the_flag():
    _, cfg = _parse(["--train.schedule=cosine", "--synthesis.user_temperature=0.9",
                     "--cas_steps=17", "--cas", "--epochs=1"])
    new, recipe = quality_config.resolve(cfg, 8)
    assert new.pipeline.train.schedule == "cosine" and recipe.steps == 17
    assert new.pipeline.synthesis.user_temperature == 0.9 and new.pipeline.steps == 48
    with pytest.raises(flags.IllegalFlagValueError, match="--geometry"):
        _parse(["--geometry=sideways"])
    with pytest.raises(Exception, match="--family_weights: unknown families"):
        _parse(["--family_weights=nope=1"])


def _caller_flags() -> list[tuple[str, list[str]]]:
    """(where, flags) of every command that runs benchmarks.quality: the variant sets, the
    shell scripts and the commands in the markdown files."""
    out = [(f"configs.SETS[{n}]", [*vs.common, *v]) for n, vs in configs.SETS.items()
           for v in vs.variants.values()]
    pattern = re.compile(r"(?:cas_claims\.sh|benchmarks\.quality)(?![\w.])")
    files = ["README.md", "BUILD_NOTES.md", "benchmarks/results/README.md",
             "benchmarks/results/CLAIMS.md",
             *(f"benchmarks/{f}" for f in os.listdir(os.path.join(ROOT, "benchmarks"))
               if f.endswith(".sh"))]
    for name in files:
        text = open(os.path.join(ROOT, name)).read()
        for m in pattern.finditer(text):
            end = text.find("`", m.end())
            words = shlex.split(text[m.end():None if end < 0 else end].replace("\\\n", " "),
                                comments=True)
            args = []
            for w in words:
                if not w.startswith("--") or w == "--":
                    break
                args.append(w)
            out.append((f"{name}: {m.group(0)}", args))
    return out


def test_every_callers_flags_parse():
    callers = _caller_flags()
    assert len(callers) > 10
    for where, argv in callers:
        argv = [a.replace('"$@"', "") for a in argv if "$" not in a]
        try:
            _parse(argv)
        except Exception as e:  # noqa: BLE001
            raise AssertionError(f"{where}: {argv}: {e}") from e


def test_cas_claims_is_a_wrapper_that_copies_nothing():
    path = os.path.join(ROOT, "benchmarks", "cas_claims.sh")
    code = [line for line in open(path).read().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]
    assert not any(re.search(r"\b(cp|mkdir|mv|ln|rsync)\b", line) for line in code), code
    command = " ".join(code).replace("\\", " ")
    assert "-m benchmarks.quality" in command and "--reuse_eval=" in command
