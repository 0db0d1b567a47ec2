#!/bin/bash
# The cas_schedules experiment variants, named in benchmarks/configs.py (SETS["cas_schedules"])
# and run by benchmarks.variants (the same commands and output folders; resumable: rerun it).
#   nohup benchmarks/cas_schedules.sh > runs/cas_schedules.log 2>&1 &
cd "$(dirname "$0")/.."
exec .venv/bin/python -m benchmarks.variants --set=cas_schedules
