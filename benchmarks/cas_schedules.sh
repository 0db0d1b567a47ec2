#!/bin/bash
# Issue 12's distractor ablations beside the default CAS run (benchmarks/cas_claims.sh: uniform
# schedule, gradients to the target only): the same CAS training with a ramp schedule, and with
# gradients to every cartridge in the bank. Each trains 468 steps (~45 min here) and evaluates
# the CAS oracle and the composition with 3 others (~3 min); then benchmarks.cas_schedules
# tabulates them with the isolated cartridges (schedule "none") and the positions. Resumable;
# a variant whose evaluations are recorded in benchmarks/results/cas_<name>/eval is not retrained.
#   nohup benchmarks/cas_schedules.sh > runs/cas_schedules.log 2>&1 &
cd "$(dirname "$0")/.."
for variant in "scope_all --cas_grad_scope=all" "ramp --cas_schedule=ramp"; do
  set -- $variant
  name=$1; shift
  OUT=runs/cas_$name CAS_REC=benchmarks/results/cas_$name benchmarks/cas_claims.sh \
      --compose_k=3 --positions= --retrievers= "$@" || exit 1
done
exec .venv/bin/python -m benchmarks.cas_schedules \
    --runs=runs/quality_cas,runs/cas_scope_all,runs/cas_ramp --out=runs/cas_schedules.md
