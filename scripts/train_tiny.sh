#!/usr/bin/env bash
# One-GPU sanity run: a tiny preset trained for a few hundred steps on the embedded corpus, then a
# sample. Runs on the first GPU when there is one (CUDA_VISIBLE_DEVICES=0 unless set), else on CPU.
#   bash scripts/train_tiny.sh [extra `deepwish train` arguments, e.g. --set train.steps=50]
# Environment: PRESET (qwen3_tiny), STEPS (200), OUT_DIR (runs/train_tiny), PYTHON (.venv/bin/python
# when present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
device=$("$PYTHON" -c "import torch; print('cuda (' + torch.cuda.get_device_name(0) + ')' if torch.cuda.is_available() else 'cpu')")
out=${OUT_DIR:-runs/train_tiny}
echo "[train_tiny] ${PRESET:-qwen3_tiny}, ${STEPS:-200} steps on $device -> $out" >&2
exec "$PYTHON" -m deepwish.cli train --preset "${PRESET:-qwen3_tiny}" --out "$out" \
  --set "train.steps=${STEPS:-200}" "$@"
