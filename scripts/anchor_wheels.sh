#!/usr/bin/env bash
# The benchmark anchors that are not on the GPU machine, as wheels in .whl/ (pure Python, no
# dependencies resolved: torch and triton are the machine's own). scripts/gpu_run.sh installs
# whatever is in .whl/ to /tmp/site before it runs; a bench skips an anchor it cannot import and
# says why. Versions are the ones the reports were measured with. torchtitan 0.2.2, not 0.3.0:
# 0.3 needs a newer torch than the GPU machine's 2.11 (torch.distributed.fsdp.DataParallelMeshDims);
# bench/train.py takes either release's API.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: -d .whl \
  flash-linear-attention==0.6.0 fla-core==0.6.0 einops==0.8.2 \
  liger-kernel==0.8.5 \
  torchtitan==0.2.2 torchdata==0.11.0 tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1
ls -1 .whl
