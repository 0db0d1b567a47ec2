#!/bin/bash
# The 'cas_dev' experiment variants, named in benchmarks/configs.py (SETS["cas_dev"]) and run
# by benchmarks.variants (the same commands and output folders; resumable: rerun it).
#   nohup benchmarks/cas_dev.sh > runs/cas_dev.log 2>&1 &
cd "$(dirname "$0")/.."
exec .venv/bin/python -m benchmarks.variants --set=cas_dev ${1:+--only="$(IFS=,; echo "$*")"}
