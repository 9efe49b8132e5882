#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv that also sees the system's packages (so
# a CUDA build of torch that is already installed is kept, never replaced), torch only when
# none is importable, then deepwish in editable mode with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv --system-site-packages .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] no torch found; installing a CUDA build of torch"
    pip install -q "torch>=2.11,<2.16"
  else
    # On a CPU-only machine pin the version whose CPU build the package index provides;
    # an unpinned torch would pull the multi-GB CUDA wheels.
    echo "[setup] no torch found; installing torch==2.13.0 (CPU build)"
    pip install -q "torch==2.13.0"
  fi
fi
if ! python -c "import triton" 2>/dev/null; then
  # CPU machines: the Triton interpreter runs the kernel tests. A CUDA torch brings its own
  # Triton, which is never replaced.
  echo "[setup] no triton found; installing triton==3.7.1 (for the CPU interpreter tests)"
  pip install -q "triton==3.7.1"
fi
stamp=.venv/.deepwish-setup
want="$(cat pyproject.toml | sha1sum | cut -c1-16) $(python -c 'import torch; print(torch.__version__)')"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing deepwish (editable) with test extras"
  pip install -q -e ".[dev]"
  echo "$want" > "$stamp"
fi
python -c "import torch, deepwish; print(f'[setup] deepwish {deepwish.__version__}, torch {torch.__version__}, cuda {torch.cuda.is_available()}')"
