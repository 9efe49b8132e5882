#!/usr/bin/env bash
cd "$(dirname "$0")/.."
export OUT=${OUT:-/tmp/out} PYTHONPATH=$PWD
timeout 300 python3 .dev/lce_sweep.py 2>&1 | tee $OUT/lce_sweep.log | grep -v Warning
timeout 120 python3 -m deepwish.bench.profile_train --preset gpt_124m --variant deepwish-muon --batch 16 --seq 2048 --rows 45 2>&1 | tail -52
