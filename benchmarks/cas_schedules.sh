#!/bin/bash
# Issue 12's distractor ablations beside the default CAS run (benchmarks/cas_claims.sh: uniform
# schedule, gradients to the target only): the same CAS training with a ramp schedule, and with
# gradients to every cartridge in the bank. Each trains 468 steps (~60 min here) and evaluates
# the CAS oracle and the composition with 3 others (~3 min); then benchmarks.cas_schedules
# tabulates them with the isolated cartridges (schedule "none") and the positions. Resumable.
#   nohup benchmarks/cas_schedules.sh > runs/cas_schedules.log 2>&1 &
cd "$(dirname "$0")/.."
for variant in "ramp --cas_schedule=ramp" "scope_all --cas_grad_scope=all"; do
  set -- $variant
  name=$1; shift
  OUT=runs/cas_$name CAS_REC= benchmarks/cas_claims.sh --compose_k=3 --positions= \
      --retrievers= "$@" || exit 1
done
exec .venv/bin/python -m benchmarks.cas_schedules \
    --runs=runs/quality_cas,runs/cas_ramp,runs/cas_scope_all --out=runs/cas_schedules.md
