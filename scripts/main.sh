#!/usr/bin/env bash
# Set up (idempotent), then the main job: train qwen3_tiny on the embedded corpus, save a
# checkpoint, plot the curves and print a sample. Extra arguments go to `deepwish train`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
exec deepwish train --preset qwen3_tiny "$@"
