#!/bin/bash
# Issue 11's one-change-at-a-time ablations of the cartridge recipe on DEV profiles, each
# against the recorded base run benchmarks/results/dev_epochs (8 dev Geography sections, 104
# multiple-choice questions with 13 fields, 24 span conversations per document, 288 steps =
# 6 epochs; its self-study data, held-out set and baselines are reused). Resumable: rerun it
# (replace this file with mv, not in place, while it runs: bash reads it as it goes).
#   nohup benchmarks/ablations.sh > runs/ablations.log 2>&1 &
#   .venv/bin/python -m benchmarks.ablation_report --base=benchmarks/results/dev_epochs \
#       --runs=runs/abl8_convs12,runs/abl8_mix_question
# Sessions 4-6 ran lr, init and P on the earlier 4-field questions (16 dev sections, 64
# questions, 3 epochs); their results are in BUILD_NOTES.md and benchmarks/results/abl_*.
cd "$(dirname "$0")/.."
PY=.venv/bin/python
BASE=benchmarks/results/dev_epochs
COMMON="--split=dev --profiles=8 --steps=288 --eval_every=48 --reuse=$BASE"
while pgrep -f "benchmarks.quality.*--out=runs/abl8_" > /dev/null; do sleep 20; done
run() {
  name=$1; shift
  [ -f runs/$name/report.json ] && return
  echo "== $name $(date)"
  $PY -m benchmarks.quality $COMMON --out=runs/$name "$@" > runs/$name.log 2>&1
  tail -1 runs/$name.log
}
# Same steps, half the conversations (so 12 passes over them): does more data help?
run abl8_convs12 --conversations_per_doc=12
# Generated question conversations mixed 1:1 with spans (issue 11 item 2: spans against
# generated answers and their mixture, on quality).
run abl8_mix_question --family_weights=spans=1,question=1
echo "== all done $(date)"
