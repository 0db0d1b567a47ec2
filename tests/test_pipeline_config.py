"""The nested PipelineConfig and experiments.pipeline's flags built from it: every stage gets
the configs the flat PipelineConfig (before issue 27) built by hand, for the default flags and
for others."""

import dataclasses

import pytest
from absl import flags

from cas_jax.cartridges.attention import Geometry
from cas_jax.studies import pipeline
from cas_jax.training import synthesis, train
from cas_jax.training.distractors import DistractorSchedule
from cas_jax.training.train_collection import CollectionConfig

FLAG_SETS = [
    [],
    ["--steps=10", "--batch=2", "--lr=0.05", "--tokens_per_doc=32", "--distractors=3",
     "--schedule=ramp", "--seed=5", "--ramp_steps=7", "--grad_scope=all"],
    ["--schedule=mixed", "--p_iso=0.3", "--quiet=0.2", "--geometry=parallel,temperature=0.8",
     "--init=document_kv", "--conversations_per_doc=4", "--seq_len=256", "--top_k=3",
     "--chunk_min=256", "--family_weights=1,1,1,1,1,1,1", "--repetition_penalty=1.1"],
    ["--distractors=0", "--schedule=fixed", "--steps=3", "--budget_bytes=1000000"],
]


def _old_stage_configs(flat: dict, tokens_per_doc: int, distractors: int):
    """What the flat PipelineConfig's stages built (cas_jax/studies/pipeline.py before issue 27)."""
    d = {f.name: f.default for f in dataclasses.fields(OldFlat)}
    c = OldFlat(**{**d, **flat})
    syn = synthesis.SynthesisConfig(
        chunk_min=c.chunk_min, chunk_max=c.chunk_max, max_user_tokens=c.max_user_tokens,
        max_answer_tokens=c.max_answer_tokens, family_weights=c.family_weights,
        span_turns=c.span_turns, no_repeat_ngram_size=c.no_repeat_ngram_size,
        repetition_penalty=c.repetition_penalty)
    col = CollectionConfig(
        tokens_per_doc=tokens_per_doc, init=c.init, batch_size=c.batch, seq_len=c.seq_len,
        steps=c.steps, distractors=DistractorSchedule(
            distractors, c.distractor_schedule if distractors else "uniform", c.ramp_steps,
            p_iso=c.p_iso, quiet=c.quiet if distractors else 0.0),
        grad_scope=c.grad_scope, budget_bytes=c.budget_bytes,
        checkpoint_every=max(c.steps // 4, 1), seed=c.seed,
        read_geometry=pipeline.READ_GEOMETRY)  # issue 24's, added later
    tr = train.TrainConfig(lr=c.lr, total_steps=c.steps, geometry=c.geometry)
    return c, syn, col, tr


@dataclasses.dataclass(frozen=True)
class OldFlat:
    conversations_per_doc: int = 24
    chunk_min: int = 1024
    chunk_max: int = 1024
    max_user_tokens: int = 48
    max_answer_tokens: int = 96
    synthesis_batch: int = 16
    tokens_per_doc: int = 64
    distractors: int = 2
    steps: int = 48
    batch: int = 4
    seq_len: int = 320
    lr: float = 2e-2
    budget_bytes: int = 1 << 30
    top_k: int = 2
    seed: int = 0
    family_weights: tuple = pipeline.SPANS_ONLY
    span_turns: int = 4
    no_repeat_ngram_size: int = 4
    repetition_penalty: float = 1.0
    init: str = "first_tokens"
    distractor_schedule: str = "uniform"
    ramp_steps: int = 100
    grad_scope: str = "target"
    p_iso: float = 0.0
    quiet: float = 0.0
    geometry: Geometry = Geometry()


def _flat(argv: list[str]) -> dict:
    """The old PipelineConfig's fields that `argv` sets (flag names are the field names, but
    --schedule for distractor_schedule)."""
    out = {}
    for arg in argv:
        name, value = arg[2:].split("=", 1)
        name = {"schedule": "distractor_schedule"}.get(name, name)
        kind = type(getattr(OldFlat, name))
        out[name] = (Geometry.parse(value) if name == "geometry"
                     else tuple(float(v) for v in value.split(",")) if kind is tuple
                     else kind(value))
    return out


@pytest.fixture
def parsed():
    from experiments import pipeline as launcher
    yield lambda argv: (flags.FLAGS(["prog", *argv]), launcher.CONFIG.value())[1]
    flags.FLAGS.unparse_flags()


@pytest.mark.parametrize("argv", FLAG_SETS)
def test_flags_build_the_configs_the_flat_config_built(parsed, argv):
    flat = _flat(argv)
    cfg = parsed(argv)
    assert cfg == pipeline.PipelineConfig(**flat)
    old, syn, col, tr = _old_stage_configs(flat, flat.get("tokens_per_doc", 64),
                                           flat.get("distractors", 2))
    assert cfg.synthesis == syn and cfg.train == tr
    assert pipeline.collection_config(cfg, old.tokens_per_doc, old.distractors) == col
    for P, k in ((old.tokens_per_doc, 0), (old.tokens_per_doc * 8, 0), (9, 3)):
        assert pipeline.collection_config(cfg, P, k) == _old_stage_configs(flat, P, k)[2]
    for name in pipeline.FLAT:  # the flat view reads what the old fields held
        assert getattr(cfg, name) == getattr(old, name), name
    assert (cfg.conversations_per_doc, cfg.synthesis_batch, cfg.top_k, cfg.seed) == (
        old.conversations_per_doc, old.synthesis_batch, old.top_k, old.seed)


def test_stamp_keeps_the_flat_names():
    old = dataclasses.asdict(OldFlat())
    old = {k: v for k, v in old.items() if k not in pipeline.LATER_FIELDS}
    old["family_weights"] = list(old["family_weights"])
    assert pipeline.stamp(pipeline.PipelineConfig()) == old
    changed = pipeline.PipelineConfig(
        synthesis=dataclasses.replace(pipeline.SYNTHESIS, user_temperature=0.9), steps=5)
    s = pipeline.stamp(changed)
    assert s["steps"] == 5 and s["synthesis.user_temperature"] == 0.9
    assert "collection.checkpoint_every" not in s and "train.total_steps" not in s


def test_flat_keywords_and_replace():
    cfg = pipeline.PipelineConfig(steps=10, distractor_schedule="mixed", distractors=0,
                                  p_iso=1.0)
    assert cfg.collection.distractors == DistractorSchedule(0, "mixed", p_iso=1.0)
    assert cfg.train.total_steps == 10 and cfg.collection.checkpoint_every == 2
    assert dataclasses.replace(cfg, seed=3).collection.seed == 3
    with pytest.raises(TypeError, match="nope"):
        pipeline.PipelineConfig(nope=1)


def test_a_refused_section_names_its_flags(parsed):
    from cas_jax import config_flags
    with pytest.raises(config_flags.ConfigError, match="--schedule"):
        parsed(["--schedule=mixed", "--distractors=0"])


def test_recorded_stamps_are_reproduced():
    """Every stamp recorded under benchmarks/results is what `stamp` gives for the config it
    describes, so the recorded evaluations stay readable (`study.cached_method`)."""
    import glob
    import json
    import os

    root = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results")
    seen = set()
    for path in sorted(glob.glob(os.path.join(root, "**", "eval", "*.json"), recursive=True)):
        recorded = json.load(open(path)).get("stamp")
        if not recorded or json.dumps(recorded, sort_keys=True) in seen:
            continue
        if "pool" in recorded:  # collection_retrieval's stamps name a document pool, not a config
            continue
        seen.add(json.dumps(recorded, sort_keys=True))
        flat = {k: v for k, v in recorded.items() if k in pipeline.FLAT}
        extra = {k: v for k, v in recorded.items() if k not in pipeline.FLAT}
        flat["family_weights"] = tuple(flat["family_weights"])
        if "geometry" in flat:
            flat["geometry"] = Geometry.parse(flat["geometry"])
        if flat["distractors"]:
            extra["distractors"] = flat["distractors"]
        assert pipeline.stamp(pipeline.PipelineConfig(**flat), **extra) == recorded, path
    assert len(seen) >= 3


def test_a_stamp_without_distractors_leaves_out_a_read_geometry_that_reads_one_as_identity():
    """A CAS run reading its composed rows serially reuses an isolated study recorded under
    the default read geometry: one cartridge read alone is the same under both."""

    def with_read(spec):
        cfg = pipeline.PipelineConfig()
        return dataclasses.replace(cfg, collection=dataclasses.replace(
            cfg.collection, read_geometry=Geometry.parse(spec)))

    base = pipeline.stamp(pipeline.PipelineConfig())
    assert pipeline.stamp(with_read("serial")) == base
    assert (pipeline.stamp(with_read("serial"), distractors=3)
            != pipeline.stamp(pipeline.PipelineConfig(), distractors=3))  # composed rows
    assert pipeline.stamp(with_read("serial,temperature=0.8")) != base
