"""Named experiment variants (issue 27: they lived in bash arrays of cas_dev.sh,
cas_schedules.sh and ablations.sh). `benchmarks.variants` runs them.

A `VariantSet` is a list of named flag overrides for one launcher, the flags they share, where
each variant's run goes, and the command that tabulates the runs afterwards.
"""

from __future__ import annotations

import dataclasses

QUALITY = "quality"
"""Each variant runs `python -m benchmarks.quality COMMON --out=OUT FLAGS > OUT.log` (skipped
when OUT/report.json exists)."""
CLAIMS = "claims"
"""Each variant runs `benchmarks/cas_claims.sh COMMON FLAGS` with OUT and CAS_REC (and REC when
set) in its environment: `benchmarks.quality --reuse=REC --reuse_eval=REC,CAS_REC`, which
reuses the evaluations recorded there (stamps checked)."""


@dataclasses.dataclass(frozen=True)
class VariantSet:
    doc: str
    runner: str  # QUALITY or CLAIMS
    variants: dict[str, tuple[str, ...]]  # name -> its flags, in the default running order
    common: tuple[str, ...] = ()
    out: str = "runs/{name}"  # each variant's output folder
    cas_rec: str = ""  # CLAIMS: the variant's recorded evaluations ({name} filled in)
    rec: str = ""  # CLAIMS: the recorded study whose evaluations are reused ("" = the default)
    report: tuple[str, ...] = ()  # argv after `python -m`; {runs} = the variants' folders
    wait_for: str = ""  # QUALITY: wait while a process matching this pattern runs


ABLATIONS_BASE = "benchmarks/results/dev_epochs"

SETS = {
    "ablations": VariantSet(
        doc="Issue 11's one-change-at-a-time ablations of the cartridge recipe on DEV profiles, "
            "each against the recorded base run benchmarks/results/dev_epochs (its self-study "
            "data, held-out set and baselines are reused). Tabulate with `python -m "
            "benchmarks.ablation_report --base=benchmarks/results/dev_epochs "
            "--runs=runs/abl8_convs12,runs/abl8_mix_question`.",
        runner=QUALITY,
        variants={
            # Same steps, half the conversations (so 12 passes over them): does more data help?
            "abl8_convs12": ("--conversations_per_doc=12",),
            # Generated question conversations mixed 1:1 with spans (issue 11 item 2).
            "abl8_mix_question": ("--family_weights=spans=1,question=1",),
        },
        common=("--split=dev", "--profiles=8", "--steps=288", "--eval_every=48",
                f"--reuse={ABLATIONS_BASE}"),
        wait_for="benchmarks.quality.*--out=runs/abl8_"),
    "dev26": VariantSet(
        doc="The larger DEV study (issues 24 and 25, session 15): Geography sections of 26 dev "
            "profiles (~320 questions, as many as the test study's), isolated cartridges at "
            "the test recipe (6 epochs) with their learning curve, closed book, ICL and RAG. "
            "The base that compose_dev26 and recipe_dev26 reuse (record it as "
            "benchmarks/results/dev26 when it is done).",
        runner=QUALITY,
        variants={"dev26": ("--epochs=6",)},
        common=("--split=dev", "--profiles=26"),
        out="runs/{name}"),
    "sections_dev": VariantSet(
        doc="Issue 25 item 2: the single-cartridge study on two more section types, on DEV "
            "profiles first: 21 profiles of People and Society sections (310 questions, "
            "~1,800 tokens, P=64 ~28x) and 28 of Government sections (300 questions on 27 "
            "sections, ~2,060 tokens, ~32x), at the dev26 recipe. Counts: BUILD_NOTES, "
            "\"Section types\".",
        runner=QUALITY,
        variants={
            "people": ("--sections=people_and_society", "--profiles=21"),
            "government": ("--sections=government", "--profiles=28"),
        },
        common=("--split=dev", "--epochs=6"),
        out="runs/sections_dev_{name}"),
    "recipe_dev26": VariantSet(
        doc="Issue 25 item 1: the single cartridge's recipe, one change at a time against "
            "dev26 (its self-study data, held-out set and baselines are reused where the "
            "synthesis flags match). Tabulate with `python -m benchmarks.ablation_report "
            "--base=benchmarks/results/dev26 --runs=runs/recipe_dev26_convs48,...`.",
        runner=QUALITY,
        variants={
            "init_chunks": ("--init=sampled_chunks",),  # opening + sampled chunks of the doc
            "cosine5e-2": ("--lr=5e-2", "--train.schedule=cosine", "--train.warmup_steps=50"),
            "epochs10": ("--epochs=10",),
            "convs48": ("--conversations_per_doc=48",),  # new synthesis: 2x the data and steps
        },
        common=("--split=dev", "--profiles=26", "--epochs=6",
                "--reuse=benchmarks/results/dev26"),
        out="runs/recipe_dev26_{name}"),
    "compose_dev26": VariantSet(
        doc="Issue 24: one-change CAS training ablations from the TEST run's base (all6: "
            "serial rows, uniform k <= 3, gradients to all, 6 epochs) on dev26's questions, "
            "read under serial (cas_claims.sh); compare with `benchmarks.compose --run=OUT "
            "--sources=cas --geometries=...` for other read geometries (G2, the default read "
            "geometry, for every variant: BUILD_NOTES \"Training under the read geometry\").",
        runner=CLAIMS,
        variants={
            "base": ("--cas_epochs=6", "--cas_grad_scope=all"),
            "quiet": ("--cas_epochs=6", "--cas_grad_scope=all", "--cas_quiet=0.1"),
            "mixed": ("--cas_epochs=6", "--cas_grad_scope=all", "--cas_schedule=mixed",
                      "--cas_p_iso=0.5"),
            "k7": ("--cas_epochs=6", "--cas_grad_scope=all", "--cas_distractors=7"),
            "target": ("--cas_epochs=6",),
            # Trained under the read geometry G2 (pipeline.READ_GEOMETRY), rows routed by
            # their first exchange (cas_jax.training.routing).
            "routed": ("--cas_epochs=6", "--cas_grad_scope=all",
                       "--geometry=parallel,count_power=0.5,relevance=4,"
                       "relevance_floor=1"),
        },
        common=("--split=dev", "--profiles=26", "--epochs=6", "--nocas_naive",
                "--compose_k=1,3,7", "--positions=", "--retrievers="),
        out="runs/compose_dev26_{name}", rec="benchmarks/results/dev26",
        report=("benchmarks.cas_schedules", "--runs={runs}",
                "--isolated=benchmarks/results/dev26", "--out=runs/compose_dev26.md")),
    "cas_dev": VariantSet(
        doc="Issue 12: a CAS recipe chosen on the DEV questions (8 Geography sections of dev "
            "profiles, 104 questions, benchmarks/results/dev_epochs); the isolated cartridges "
            "are not retrained.",
        runner=CLAIMS,
        variants={
            "base3": ("--cas_epochs=3",),  # the test recipe (gradients to the target only)
            "all3": ("--cas_epochs=3", "--cas_grad_scope=all"),  # gradients to every cartridge
            "all6": ("--cas_epochs=6", "--cas_grad_scope=all"),
            "target6": ("--cas_epochs=6",),
        },
        common=("--split=dev", "--profiles=8", "--epochs=6", "--nocas_naive", "--compose_k=3",
                "--positions=", "--retrievers="),
        out="runs/cas_dev_{name}", cas_rec="benchmarks/results/archive/cas_dev_{name}",
        rec="benchmarks/results/dev_epochs",
        report=("benchmarks.cas_schedules", "--runs={runs}",
                "--isolated=benchmarks/results/dev_epochs", "--out=runs/cas_dev.md")),
    "cas_schedules": VariantSet(
        doc="Issue 12's distractor ablations beside the default CAS run (cas_claims.sh): a ramp "
            "schedule, and gradients to every cartridge in the bank.",
        runner=CLAIMS,
        variants={"scope_all": ("--cas_grad_scope=all",),
                  "ramp": ("--cas_schedule=ramp",)},
        common=("--compose_k=3", "--positions=", "--retrievers="),
        out="runs/cas_{name}", cas_rec="benchmarks/results/archive/cas_{name}",
        report=("benchmarks.cas_schedules",
                "--runs=runs/quality_cas,runs/cas_scope_all,runs/cas_ramp",
                "--out=runs/cas_schedules.md")),
}
