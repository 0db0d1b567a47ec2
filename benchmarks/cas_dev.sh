#!/bin/bash
# Issue 12: a CAS recipe chosen on the DEV questions (8 Geography sections of dev profiles, 104
# multiple-choice questions, the study recorded in benchmarks/results/dev_epochs), never on the
# 319 test questions. Each variant trains CAS cartridges (3 distractors, uniform schedule) and
# evaluates the CAS oracle and the composition with 3 others; the isolated cartridges are not
# retrained (their 6-epoch oracle and the baselines are read from dev_epochs). Variants:
#   base3    the test recipe (3 epochs, gradients to the target only)
#   all3     gradients to every active cartridge
#   all6     gradients to all, 6 epochs
#   target6  gradients to the target, 6 epochs
# 3-epoch variants train 144 steps (~15 min here), 6-epoch ones 288 (~30 min). Resumable;
# arguments name the variants to run (default: all four, in that order).
#   nohup benchmarks/cas_dev.sh > runs/cas_dev.log 2>&1 &
cd "$(dirname "$0")/.."
REC=benchmarks/results/dev_epochs
declare -A FLAGS_OF=(
  [base3]="--cas_epochs=3"
  [all3]="--cas_epochs=3 --cas_grad_scope=all"
  [all6]="--cas_epochs=6 --cas_grad_scope=all"
  [target6]="--cas_epochs=6")
variants=("$@")
[ $# -eq 0 ] && variants=(base3 all3 all6 target6)
runs=()
for name in "${variants[@]}"; do
  [ -n "${FLAGS_OF[$name]}" ] || { echo "unknown variant $name: expected ${!FLAGS_OF[*]}"; exit 2; }
  # shellcheck disable=SC2086
  REC=$REC OUT=runs/cas_dev_$name CAS_REC=benchmarks/results/cas_dev_$name \
      benchmarks/cas_claims.sh --split=dev --profiles=8 --epochs=6 --nocas_naive \
      --compose_k=3 --positions= --retrievers= ${FLAGS_OF[$name]} || exit 1
  runs+=("runs/cas_dev_$name")
done
IFS=,
exec .venv/bin/python -m benchmarks.cas_schedules --runs="${runs[*]}" --isolated="$REC" \
    --out=runs/cas_dev.md
