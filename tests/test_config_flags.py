"""cas_jax.config_flags: absl flags defined from a nested dataclass config, and back."""

from __future__ import annotations

import dataclasses
from typing import Literal

import pytest
from absl import flags

from cas_jax import config_flags
from cas_jax.cartridges.attention import DEFAULT_GEOMETRY, Geometry


@dataclasses.dataclass(frozen=True)
class Optim:
    """Optimiser.

    lr: peak learning rate.
    clip: global-norm clipping (None = off).
    """

    lr: float = 0.02
    clip: float | None = 1.0
    schedule: Literal["constant", "cosine"] = "constant"

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclasses.dataclass(frozen=True)
class Data:
    steps: int = 10
    """Training steps."""
    weights: tuple[float, ...] | None = (1.0, 0.0)
    name: str = "spans"  # which data
    shuffle: bool = True
    kind: str = dataclasses.field(default="a", metadata={"help": "The kind.",
                                                         "choices": ("a", "b")})


@dataclasses.dataclass(frozen=True)
class Run:
    data: Data = Data()
    optim: Optim = Optim()
    geometry: Geometry = DEFAULT_GEOMETRY
    seed: int = 0


def _define(default=Run(), **kw):
    fv = flags.FlagValues()
    return fv, config_flags.define(default, flag_values=fv, **kw)


def test_defaults_parse_back_to_the_config():
    for default in (Run(), Run(Data(steps=3, weights=None), Optim(lr=0.5, clip=None), seed=4)):
        fv, cf = _define(default)
        fv(["prog"])
        assert cf.value() == default


def test_flags_set_every_type():
    fv, cf = _define(names={"optim.lr": "lr"})
    fv(["prog", "--lr=0.1", "--optim.clip=none", "--optim.schedule=cosine", "--data.steps=7",
        "--data.weights=0.5,2", "--data.name=q", "--nodata.shuffle", "--data.kind=b",
        "--geometry=parallel,temperature=0.8", "--seed=3"])
    assert cf.value() == Run(Data(7, (0.5, 2.0), "q", False, "b"),
                             Optim(0.1, None, "cosine"),
                             Geometry.parse("parallel,temperature=0.8"), 3)
    assert cf.names["optim.lr"] == "lr" and "optim.lr" not in fv


def test_argv_reproduces_a_config():
    fv, cf = _define(names={"optim.lr": "lr"})
    target = Run(Data(steps=7, weights=None, shuffle=False), Optim(lr=0.1),
                 Geometry.parse("parallel"))
    argv = cf.argv(target)
    assert "--lr=0.1" in argv and "--data.weights=none" in argv
    fv(["prog", *argv])
    assert cf.value() == target


def test_help_texts():
    fv, _ = _define(helps={"seed": "The seed."})
    assert fv["optim.lr"].help == "peak learning rate."
    assert fv["optim.clip"].help == "global-norm clipping (None = off)."
    assert fv["data.steps"].help == "Training steps."
    assert fv["data.name"].help == "which data"
    assert fv["data.kind"].help.endswith("The kind.")  # absl puts the choices first
    assert fv["seed"].help == "The seed."


def test_prefix_and_skip():
    fv, cf = _define(prefix="run.", skip=("optim", "data.kind"))
    assert "run.data.steps" in fv and "run.optim.lr" not in fv and "run.data.kind" not in fv
    fv(["prog", "--run.data.steps=2"])
    assert cf.value() == Run(Data(steps=2))


@dataclasses.dataclass(frozen=True)
class Outer:
    run: Run = Run()
    other: Data = Data(steps=4)
    tag: str = "t"


def test_sections_rename_their_fields_flags():
    fv, cf = _define(Outer(), sections={"run": "", "other": "o_"},
                     names={"run.seed": "run_seed", "other.kind": "other_kind"})
    assert {"data.steps", "optim.lr", "geometry", "run_seed", "o_steps", "o_weights",
            "other_kind", "tag"} <= set(fv)
    assert "run.data.steps" not in fv and "other.steps" not in fv
    fv(["prog", "--data.steps=2", "--o_steps=7", "--run_seed=3", "--other_kind=b"])
    assert cf.value() == Outer(Run(Data(steps=2), seed=3), Data(steps=7, kind="b"))
    with pytest.raises(ValueError, match="nope"):
        _define(Outer(), sections={"nope": ""})


@pytest.mark.parametrize("arg, flag", [("--data.steps=x", "data.steps"),
                                       ("--optim.lr=fast", "optim.lr"),
                                       ("--data.weights=1,x", "data.weights"),
                                       ("--geometry=sideways", "geometry"),
                                       ("--data.kind=c", "data.kind"),
                                       ("--optim.schedule=linear", "optim.schedule")])
def test_bad_values_name_the_flag(arg, flag):
    fv, _ = _define()
    with pytest.raises(flags.IllegalFlagValueError, match=f"--{flag}"):
        fv(["prog", arg])


def test_values_the_config_refuses_name_the_flags():
    fv, cf = _define()
    fv(["prog", "--optim.lr=-1"])
    with pytest.raises(config_flags.ConfigError, match=r"--optim\.lr: lr must be > 0"):
        cf.value()


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="optim.nope"):
        _define(names={"optim.nope": "x"})
