#!/bin/bash
# Issue 12's collection methods on the default study's 319 questions, beside the recorded
# 3-epoch isolated cartridges (benchmarks/results/quality). Their learning curve and
# evaluations (oracle, naive composition, RAG) are copied in, and so are the collection
# evaluations recorded in $CAS_REC/eval (default benchmarks/results/quality_cas: the CAS rows
# of the default CAS training; set CAS_REC= for a CAS variant), so no cartridges
# are retrained for a cached row: benchmarks.quality trains the isolated, CAS (468 steps, 3
# distractors, uniform) and monolithic cartridges only when an uncached method reads them.
# Resumable: rerun it. Extra flags go to benchmarks.quality (a later flag wins), e.g.
# --monolithic; REC= names another recorded study (benchmarks/cas_dev.sh: dev_epochs).
#   nohup benchmarks/cas_claims.sh > runs/cas_claims.log 2>&1 &
cd "$(dirname "$0")/.."
REC=${REC:-benchmarks/results/quality}
OUT=${OUT:-runs/quality_cas}
CAS_REC=${CAS_REC-benchmarks/results/quality_cas}
mkdir -p "$OUT/eval"
[ -f "$OUT/curve.jsonl" ] || cp "$REC/curve.jsonl" "$OUT/"
for f in "$REC"/eval/*.json ${CAS_REC:+"$CAS_REC"/eval/*.json}; do
  [ -f "$f" ] || continue
  [ -f "$OUT/eval/$(basename "$f")" ] || cp "$f" "$OUT/eval/"
done
exec .venv/bin/python -m benchmarks.quality --epochs=3 --cas --nomonolithic --compose_k=3,1,7 \
    --reuse="$REC" --out="$OUT" "$@"
