#!/usr/bin/env bash
# The attention kernels' GPU run: GPU tests, the launch-config sweep (tiles, decode splits, the
# unequal-dims error check), then `deepwish bench attention` with the swept tiles. Results in $OUT.
#   bash scripts/gpu_attention.sh            (BENCH_ARGS="--grid full" for the issue's whole grid)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/deepwish-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
date -u
timeout ${TEST_TIMEOUT:-150} python3 -m pytest -m gpu -q -p no:cacheprovider tests/kernels/test_attention_gpu.py 2>&1 | tail -12
python3 -m deepwish.bench.attention_tiles --out "$OUT/tiles" --parts "${TILE_PARTS:-diag,tiles,decode}" 2>&1 | tee "$OUT/tiles.log"
tiles=()
[ -f "$OUT/tiles/tiles.json" ] && tiles=(--tiles "$OUT/tiles/tiles.json")
python3 -m deepwish.cli bench attention --out "$OUT/bench" "${tiles[@]}" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
rm -f "$OUT/bench/train_rows.json"
date -u
