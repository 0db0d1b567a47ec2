#!/bin/bash
# The 'ablations' experiment variants, named in benchmarks/configs.py (SETS["ablations"]) and run
# by benchmarks.variants (the same commands and output folders; resumable: rerun it).
#   nohup benchmarks/ablations.sh > runs/ablations.log 2>&1 &
cd "$(dirname "$0")/.."
exec .venv/bin/python -m benchmarks.variants --set=ablations
