#!/bin/bash
# Issue 12's collection methods on the default study's 319 questions, beside the recorded
# 3-epoch isolated cartridges: benchmarks.quality --cas with the recorded study REC (default
# benchmarks/results/quality) as --reuse, and REC and CAS_REC (default
# benchmarks/results/quality_cas: the CAS rows of the default CAS training; set CAS_REC= for a
# CAS variant, or list more folders or eval/<method>.json files, comma separated) as
# --reuse_eval: the study records each evaluation it finds there into OUT (stamps checked), so
# no cartridges are retrained for a recorded row. Resumable: rerun it. Extra flags go to
# benchmarks.quality (a later flag wins), e.g. --monolithic. The recorded rows were read under
# serial, so that is the read geometry here (pass --collection.read_geometry=... to change it).
#   nohup benchmarks/cas_claims.sh > runs/cas_claims.log 2>&1 &
cd "$(dirname "$0")/.."
REC=${REC:-benchmarks/results/quality} CAS_REC=${CAS_REC-benchmarks/results/quality_cas}
exec .venv/bin/python -m benchmarks.quality --epochs=3 --cas --nomonolithic --compose_k=3,1,7 \
    --reuse="$REC" --reuse_eval="$REC${CAS_REC:+,$CAS_REC}" --out="${OUT:-runs/quality_cas}" \
    --collection.read_geometry=serial "$@"
