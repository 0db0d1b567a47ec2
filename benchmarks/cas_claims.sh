#!/bin/bash
# Issue 12's collection methods on the default study's 319 questions, beside the recorded
# 3-epoch isolated cartridges (benchmarks/results/quality). Their learning curve and
# evaluations (oracle, naive composition, RAG) are copied in, so the isolated cartridges are
# not retrained (benchmarks.quality defers them to first use); then CAS is trained (468
# steps, 3 distractors, uniform) and every uncached collection method is evaluated.
# Resumable: rerun it. Extra flags go to benchmarks.quality, e.g. --monolithic.
#   nohup benchmarks/cas_claims.sh > runs/cas_claims.log 2>&1 &
cd "$(dirname "$0")/.."
REC=benchmarks/results/quality
OUT=${OUT:-runs/quality_cas}
mkdir -p "$OUT/eval"
[ -f "$OUT/curve.jsonl" ] || cp "$REC/curve.jsonl" "$OUT/"
for f in "$REC"/eval/*.json; do
  [ -f "$OUT/eval/$(basename "$f")" ] || cp "$f" "$OUT/eval/"
done
exec .venv/bin/python -m benchmarks.quality --epochs=3 --cas --nomonolithic --compose_k=3,1,7 \
    --reuse="$REC" --out="$OUT" "$@"
