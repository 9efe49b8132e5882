#!/usr/bin/env bash
# Generate from a model: MODEL_PATH is an HF directory (config.json + safetensors) or a deepwish run
# or checkpoint directory; TOKENIZER_PATH (optional) a tokenizer.json or its directory, else the
# model's own tokenizer. Defaults to the run of scripts/train_tiny.sh.
#   MODEL_PATH=runs/train_tiny bash scripts/infer_tiny.sh [--prompt "KING:"] [other `deepwish generate` args]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
model=${MODEL_PATH:-runs/train_tiny}
if [ ! -e "$model" ]; then
  echo "[infer_tiny] MODEL_PATH=$model does not exist (train one with scripts/train_tiny.sh)" >&2
  exit 2
fi
if [ -f "$model/config.json" ] && ls "$model"/*.safetensors >/dev/null 2>&1; then src=--hf; else src=--ckpt; fi
export TOKENIZER_PATH=${TOKENIZER_PATH:-}  # read by `deepwish generate` when --tokenizer is not given
echo "[infer_tiny] $src $model${TOKENIZER_PATH:+, tokenizer $TOKENIZER_PATH}" >&2
exec "$PYTHON" -m deepwish.cli generate "$src" "$model" --max-new-tokens "${MAX_NEW_TOKENS:-64}" "$@"
