#!/usr/bin/env bash
# speedrun after the value-embedding graph fix, then a profile of gpt_124m's training step
cd "$(dirname "$0")/.."
export OUT=${OUT:-/tmp/out}
git log --oneline -1 2>/dev/null || true
SPEEDRUN_ARGS="--data /tmp/deepwish-pycode --steps 160 --set train.eval_every=10 --set train.eval_batches=8" \
  timeout 420 bash scripts/gpu_run.sh env corpus speedrun 2>&1 | tee $OUT/speedrun.log | grep -v "^step\|it/s" | tail -60
grep -c recompile_limit $OUT/speedrun.log
PROFILE_ARGS="--preset gpt_124m --variant deepwish-muon --batch 16 --seq 2048 --rows 30" timeout 150 bash scripts/gpu_run.sh profile 2>&1 | tail -50
find $OUT -name "*.pt" -o -name "*.safetensors" -o -name "tokenizer*" | xargs rm -rf
find $OUT -type f | head -20
