#!/bin/bash
# Issue 11's one-change-at-a-time ablations of the cartridge recipe on DEV profiles (16 Geography
# sections, 64 multiple-choice questions), each against runs/abl_base. Resumable: rerun it
# (replace this file with mv, not in place, while it runs: bash reads it as it goes).
#   nohup benchmarks/ablations.sh > runs/ablations.log 2>&1 &
cd "$(dirname "$0")/.."
PY=.venv/bin/python
COMMON="--split=dev --profiles=16 --sections=geography --kinds=mc --heldout_per_doc=2
        --chunk_min=1024 --chunk_max=1024 --seq_len=320 --eval_every=96 --steps=288"
while pgrep -f "benchmarks.quality.*--out=runs/abl_" > /dev/null; do sleep 20; done
run() {
  name=$1; shift
  [ -f runs/$name/report.json ] && return
  echo "== $name $(date)"
  $PY -m benchmarks.quality $COMMON --out=runs/$name "$@" > runs/$name.log 2>&1
  tail -1 runs/$name.log
}
run abl_base --conversations_per_doc=24
run abl_lr5e-2 --conversations_per_doc=24 --lr=5e-2 --reuse=runs/abl_base
run abl_init_document_kv --conversations_per_doc=24 --init=document_kv --reuse=runs/abl_base
# P: the compression sweep around the base run (P=64), same data and steps.
if [ ! -f runs/abl_sweep/sweep.json ]; then
  echo "== abl_sweep $(date)"
  $PY -m benchmarks.compression_sweep --tokens=128,64,32 --reuse=runs/abl_base \
      --out=runs/abl_sweep -- $COMMON --conversations_per_doc=24 > runs/abl_sweep.log 2>&1
  tail -1 runs/abl_sweep.log
fi
run abl_convs12 --conversations_per_doc=12 --reuse=runs/abl_base
run abl_mix_question --conversations_per_doc=24 --family_weights=spans=1,question=1 --reuse=runs/abl_base
echo "== all done $(date)"
