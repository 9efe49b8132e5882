#!/usr/bin/env bash
# Set up (idempotent), then the main job: train qwen3_tiny on the embedded corpus, save a
# checkpoint, plot the curves and print a sample. Extra arguments go to `deepwish train`.
# Run again, it resumes the run it finds in the run directory (runs/qwen3_tiny, or --out): an
# interrupted run continues, a finished one is evaluated, plotted and sampled again.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
out=runs/qwen3_tiny
prev=""
for arg in "$@"; do
  if [ "$prev" = "--out" ]; then out=$arg; fi
  case $arg in --out=*) out=${arg#--out=} ;; esac
  prev=$arg
done
if [ -f "$out/checkpoints/latest" ]; then
  echo "[main] $out already holds a run: resuming it (delete $out to start afresh)" >&2
  exec deepwish train --resume "$out" "$@"
fi
exec deepwish train --preset qwen3_tiny "$@"
