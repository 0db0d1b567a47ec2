"""benchmarks.variants: the named variant sets run the commands the shell scripts ran."""

from benchmarks import variants
from benchmarks.configs import SETS


def test_cas_dev_commands_are_the_scripts():
    cmds = variants.commands(SETS["cas_dev"], ["all3"])
    name, env, argv, log = cmds[0]
    assert env == {"OUT": "runs/cas_dev_all3", "CAS_REC": "benchmarks/results/archive/cas_dev_all3",
                   "REC": "benchmarks/results/dev_epochs"}
    assert argv == ["benchmarks/cas_claims.sh", "--split=dev", "--profiles=8", "--epochs=6",
                    "--nocas_naive", "--compose_k=3", "--positions=", "--retrievers=",
                    "--cas_epochs=3", "--cas_grad_scope=all"]
    assert cmds[1][2] == [".venv/bin/python", "-m", "benchmarks.cas_schedules",
                          "--runs=runs/cas_dev_all3",
                          "--isolated=benchmarks/results/dev_epochs", "--out=runs/cas_dev.md"]


def test_ablation_commands_are_the_scripts():
    (name, env, argv, log), = variants.commands(SETS["ablations"], ["abl8_convs12"])
    assert (env, log) == ({}, "runs/abl8_convs12.log")
    assert argv == [".venv/bin/python", "-m", "benchmarks.quality", "--split=dev",
                    "--profiles=8", "--steps=288", "--eval_every=48",
                    "--reuse=benchmarks/results/dev_epochs", "--out=runs/abl8_convs12",
                    "--conversations_per_doc=12"]


def test_schedule_commands_are_the_scripts():
    cmds = variants.commands(SETS["cas_schedules"], list(SETS["cas_schedules"].variants))
    assert [c[1] for c in cmds[:2]] == [
        {"OUT": "runs/cas_scope_all", "CAS_REC": "benchmarks/results/archive/cas_scope_all"},
        {"OUT": "runs/cas_ramp", "CAS_REC": "benchmarks/results/archive/cas_ramp"}]
    assert cmds[1][2][-1] == "--cas_schedule=ramp"
    assert cmds[2][2][-2] == "--runs=runs/quality_cas,runs/cas_scope_all,runs/cas_ramp"
