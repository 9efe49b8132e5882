#!/usr/bin/env bash
# What the GPU machine runs: environment report, GPU tests and benchmarks, results under $OUT.
#   bash scripts/gpu_run.sh STAGE...   with STAGE in: env tests kernels gdn gdn_fault train decode sweep tradeoff notebook profile profile_anchors step_sources embedding gpt_mfu corpus speedrun loop_profile mfu_variants lce ablate dsa nsa_kernels nsa_model nsa_quality attn_dq_tiles attn_dq muon attn_focus_tiles attn_goals decode_tests decode_compare decode_tiles decode_rows decode_rows_compiled decode_profiles generate nsa_generate train_paths packed_bench
# Optional wheels in .whl/ (flash-linear-attention, liger-kernel) are installed to /tmp/site
# first, so the anchors run side by side with deepwish in the same process (NO_WHEELS=1 skips
# them, e.g. for HF's Qwen3-Next on its torch path).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/deepwish-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${NO_WHEELS:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
status=0
for stage in "$@"; do
  echo "=== $stage ($(date -u +%H:%M:%S))"
  case "$stage" in
    env)
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
      python3 -c "import torch, triton, transformers, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
      python3 -c "import fla; print('fla', fla.__version__)" 2>&1 | tail -1
      python3 -c "import liger_kernel; print('liger ok')" 2>&1 | tail -1 ;;
    tests)
      python3 -m pytest -m gpu -q -p no:cacheprovider ${GPU_TESTS:-tests} 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
      [ "${PIPESTATUS[0]}" = 0 ] || status=1 ;;
    kernels) python3 -m deepwish.cli bench kernels --out "$OUT/kernels" || status=1 ;;
    gdn)  # GDN_ARGS="--against FILE --seqlens 16384 65536": ours against another version of the kernels, alternating
      python3 -m deepwish.cli bench gdn --out "$OUT/gdn" ${GDN_ARGS:-} || status=1 ;;
    gdn_fault)  # the tiny hybrid model's GPU test (tests/model/test_gated_deltanet.py) stopped on an illegal memory
      # access in its triton step's backward (H100, 2026-12-07; the kernels' own tests passed): the kernels at its
      # head dims, then the test, every launch synchronous so the fault names its kernel; then memcheck (~5 min)
      n=0
      for t in "tests/kernels/test_gated_delta_gpu.py -k smallest_head_dims" \
               "tests/kernels/test_kernels_gpu_conv_lce.py -k conv_matches" \
               "tests/kernels/test_attention_gpu.py -k small_head_dims" \
               "tests/model/test_gated_deltanet.py -k triton_matches"; do
        n=$((n + 1))
        CUDA_LAUNCH_BLOCKING=1 python3 -m pytest -m gpu -p no:cacheprovider -o addopts="" -q $t > "$OUT/gdn_fault_$n.log" 2>&1 \
          || { status=1; grep -E "^E |\.py:[0-9]+: in|_kernel|passed|failed" "$OUT/gdn_fault_$n.log" | head -40; }
        echo "$t: $(tail -1 "$OUT/gdn_fault_$n.log")"
      done
      if command -v compute-sanitizer >/dev/null; then
        timeout 300 compute-sanitizer --tool memcheck --print-limit 5 python3 -m pytest -m gpu -p no:cacheprovider \
          -o addopts="" -q -x tests/model/test_gated_deltanet.py -k triton_matches > "$OUT/gdn_memcheck.log" 2>&1
        grep -E "Invalid|at 0x|by thread|ERROR SUMMARY|passed|failed" "$OUT/gdn_memcheck.log" | head -30
      else echo "no compute-sanitizer on this machine"; fi ;;
    train) python3 -m deepwish.cli bench train --out "$OUT/train" ${TRAIN_ARGS:-} || status=1 ;;
    decode) python3 -m deepwish.cli bench decode --out "$OUT/decode" ${DECODE_ARGS:-} || status=1 ;;
    decode_tests)  # the decode GPU tests (fused kernels, captured and compiled steps), ~4 min
      python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_decode_fused_gpu.py tests/test_decode_graph_gpu.py 2>&1 \
        | tee "$OUT/decode_tests.log" | tail -8
      [ "${PIPESTATUS[0]}" = 0 ] || status=1 ;;
    decode_compare)  # the before/after rows: cuBLAS, the GEMV, its prologue kernel, decode_fusion, decode_pdl (~8 min)
      python3 -m deepwish.bench.decode --compare --out "$OUT/decode_compare" ${DECODE_COMPARE_ARGS:-} || status=1 ;;
    decode_tiles)  # the step's kernels' launch configurations as the step runs them, the split kernel's L2 prefetch
      # switched, and the captured step with each change undone (~4 min)
      python3 -m deepwish.bench.decode_tiles --out "$OUT/decode_tiles" --parts gemv,split,step --context 512,4096 ${DECODE_TILES_ARGS:-} \
        | tee "$OUT/decode_tiles.log" | grep -E "^gemv|^split|shipped|alone|step" || status=1 ;;
    decode_rows)  # the rows kernel's forms (bench/decode_tiles.py ROWS_FORMS) at 8 and 64 rows against cuBLAS,
      # then the captured step at batches 1, 8, 64 with each form switched and the other matmul (~7 min)
      python3 -m deepwish.bench.decode_tiles --out "$OUT/decode_rows" --parts rows,step --rows 8,64 --batch 1,8,64 \
        --context 512 | tee "$OUT/decode_rows.log" | grep -E "^rows|step" || status=1 ;;
    decode_rows_compiled)  # the same switches in the compiled and captured step, batches 64 and 8 (~6 min)
      python3 -m deepwish.bench.decode_tiles --out "$OUT/decode_rows_compiled" --parts step --step-mode compiled \
        --batch 64,8 --context 512 | tee "$OUT/decode_rows_compiled.log" | grep -E "step" || status=1 ;;
    decode_profiles)  # one step's kernels: the GEMV path with every decode option on, with the prologue kernel only; batch 64
      python3 -m deepwish.bench.decode_profile --out "$OUT/decode_profile_pdl" --paths compiled-captured --matmul triton \
        --prologue --fusion --pdl || status=1
      python3 -m deepwish.bench.decode_profile --out "$OUT/decode_profile_gemv_prologue" --paths compiled-captured --matmul triton \
        --prologue || status=1
      # batch 64 (cuBLAS: the GEMV serves <= 16 rows), where the cache reads are most of the roofline's bytes
      python3 -m deepwish.bench.decode_profile --out "$OUT/decode_profile_b64" --paths compiled-captured --batch 64 \
        --prologue || status=1 ;;
    generate)  # `deepwish generate` itself, 512 greedy tokens on a 30-step qwen3_0.6b checkpoint: the plain capture,
      # --compile with every decode option off, and --compile as it comes (prologue kernel, decode_fusion, decode_pdl on); timing lines on stderr
      python3 -m deepwish.cli train --preset qwen3_0.6b --out /tmp/gen_run --set train.steps=30 --set train.eval_every=30 \
        --set train.save_every=30 --set train.sample_tokens=0 2>&1 | tail -3 || status=1
      i=0
      for opts in "" "--compile --set model.decode_prologue=false --set model.decode_fusion=false --set model.decode_pdl=off" "--compile"; do
        i=$((i + 1))
        echo "--- deepwish generate $opts"
        python3 -m deepwish.cli generate --ckpt /tmp/gen_run --max-new-tokens 512 --temperature 0 $opts \
          > "$OUT/generate_out_$i.txt" 2> >(tee -a "$OUT/generate.log" | grep -E "generate:|rror" >&2) || status=1
      done ;;
    sweep) python3 -m deepwish.cli bench sweep --out "$OUT/sweep" ${SWEEP_ARGS:---time-limit 420} || status=1 ;;
    notebook) python3 scripts/run_notebook.py notebooks/walkthrough.ipynb --out "$OUT/walkthrough_gpu.ipynb" || status=1 ;;
    tradeoff) python3 -m deepwish.cli bench decode --tradeoff --out "$OUT/tradeoff" ${TRADEOFF_ARGS:-} || status=1 ;;
    profile) python3 -m deepwish.bench.profile_train ${PROFILE_ARGS:-} || status=1 ;;
    profile_anchors)  # qwen3_0.6b's bench step, ours and torchtitan's, profiled one after the other (~3 min)
      for v in deepwish torchtitan; do
        python3 -m deepwish.bench.profile_train --preset qwen3_0.6b --variant $v --rows 45 > "$OUT/profile_$v.txt" 2>&1 \
          || status=1
        grep -E "^==|Self CUDA time total" "$OUT/profile_$v.txt"
      done ;;
    step_sources)  # qwen3_0.6b's bench step profiled with its trace (every kernel's full name and time) and the
      # Triton source inductor generated for it, to read each fused kernel's loads and stores (~2 min)
      TORCHINDUCTOR_CACHE_DIR=/tmp/step_sources python3 -m deepwish.bench.profile_train --preset qwen3_0.6b \
        --variant ${STEP_VARIANT:-deepwish} --rows 20 --out "$OUT/step_sources" > "$OUT/step_sources.txt" 2>&1 || status=1
      grep -E "^==" "$OUT/step_sources.txt"
      gzip -f "$OUT/step_sources/trace.json"
      (cd /tmp/step_sources && find . -name "*.py" | tar czf "$OUT/step_sources/inductor_py.tgz" -T -) ;;
    gpt_mfu)  # gpt_124m's training rate after its step changes, ~9 minutes: the token-table kernel's bench,
      # the speedrun (corpus built first) with the token tables' backend as it comes (EMBED_BACKEND=triton
      # for the kernel, measured slower: reports/speedrun.md), the profile by shape; then the GPU tests
      python3 -m deepwish.bench.embedding --out "$OUT/embedding" || status=1
      bash "$0" corpus >/dev/null || status=1
      python3 -m deepwish.cli bench speedrun --out "$OUT/speedrun" --data "${CORPUS:-/tmp/deepwish-pycode}" --steps 160 \
        --set train.eval_every=10 --set train.eval_batches=8 --set model.embed_backend=${EMBED_BACKEND:-auto} ${SPEEDRUN_ARGS:-} || status=1
      python3 -m deepwish.bench.profile_train --preset gpt_124m --variant deepwish-muon --batch 16 --seq 2048 \
        --by-shape --rows 40 ${PROFILE_ARGS:-} || status=1
      python3 -m pytest -m gpu -q -p no:cacheprovider tests/kernels/test_embedding_gpu.py tests/train/test_to_device.py \
        tests/train/test_gpt_gpu.py 2>&1 | tail -5 ;;
    embedding)  # the token-table gradient kernel: GPU tests, then against torch's embedding backward
      python3 -m pytest -m gpu -q -p no:cacheprovider tests/kernels/test_embedding_gpu.py 2>&1 | tail -5
      [ "${PIPESTATUS[0]}" = 0 ] || status=1
      python3 -m deepwish.bench.embedding --out "$OUT/embedding" || status=1 ;;
    corpus)  # the speedrun's corpus, built in place from the installed Python's code and docs (data/text_tree.py);
      # kept under $CORPUS while the machine stays up (meta.json is written last: its presence = a complete build)
      CORPUS=${CORPUS:-/tmp/deepwish-pycode}
      if [ ! -f "$CORPUS/meta.json" ]; then
        python3 -m deepwish.cli data build --tree python --out "$CORPUS" \
          ${CORPUS_ARGS:---bpe-vocab 50304 --token-budget 24000000 --val-fraction 0.02} || status=1
      fi
      [ -f "$CORPUS/meta.json" ] && cp "$CORPUS/meta.json" "$OUT/corpus_meta.json" \
        && python3 -c "import json,sys; m=json.load(open(sys.argv[1])); print('corpus', sys.argv[1], m['fingerprint'], m['train']['tokens'], 'train tokens', m['val']['tokens'], 'val tokens')" "$CORPUS/meta.json" ;;
    nsa_generate)  # `deepwish generate` itself on a 2-step qwen3_0.6b_nsa checkpoint (every attention layer NSA;
      # trained uncompiled: the checkpoint only has to exist; with a 10-step compiled run first, the stage ran
      # past its time limit twice before --compile printed):
      # 256 greedy tokens, the plain capture and --compile (NSA_GENERATE_OPTS: a subset, e.g. "--compile");
      # timing lines on stderr
      python3 -m deepwish.cli train --preset qwen3_0.6b_nsa --out /tmp/gen_nsa --set train.steps=2 --set train.eval_every=2 \
        --set train.save_every=2 --set train.sample_tokens=0 --set train.compile=off 2>&1 | tail -3 || status=1
      for opts in ${NSA_GENERATE_OPTS:-"" "--compile"}; do
        echo "--- deepwish generate (qwen3_0.6b_nsa) $opts"
        python3 -m deepwish.cli generate --ckpt /tmp/gen_nsa --max-new-tokens 256 --temperature 0 $opts \
          > "$OUT/nsa_generate_out.txt" 2> >(tee -a "$OUT/nsa_generate.log" | grep -E "generate:|rror" >&2) || status=1
      done ;;
    loop_profile)  # where the real loop's step goes (train.profile_steps, train/profile.py): gpt_124m on the
      # speedrun's corpus, steps 31-33 of 40 after the compile warm-up; the GPU's idle time by host phase
      bash "$0" corpus >/dev/null || status=1
      C=${CORPUS:-/tmp/deepwish-pycode}
      for preset in ${LOOP_PROFILE_PRESETS:-gpt_124m}; do
        rm -rf "/tmp/loop_profile/$preset"  # a fresh run each time (an earlier one on this machine would be refused)
        python3 -m deepwish.cli train --preset "$preset" --set "data.train_bin=$C/train.bin" --set "data.val_bin=$C/val.bin" \
          --set "data.tokenizer=$C/tokenizer" --set train.steps=40 --set train.compile_warmup=true \
          --set train.profile_start=30 --set train.profile_steps=3 --set train.eval_every=40 --set train.sample_tokens=0 \
          --set "train.out_dir=/tmp/loop_profile/$preset" ${LOOP_PROFILE_ARGS:-} 2>&1 | grep -v '^step' | tail -40 || status=1
        cp "/tmp/loop_profile/$preset/profile/summary.txt" "$OUT/loop_profile_$preset.txt" || status=1
        [ -n "${LOOP_PROFILE_TRACE:-}" ] && cp "/tmp/loop_profile/$preset/profile/trace.json.gz" "$OUT/loop_profile_$preset.trace.json.gz"
      done ;;
    mfu_variants)  # gpt_124m's training rate under setting variants, each a real `deepwish train` run on the
      # corpus (bench/variants.py), at the final windows from step 0 (one compiled shape set: ~2-3 min a run)
      # (the runs' checkpoints stay on the machine: only the tables and each run's metrics come back)
      bash "$0" corpus >/dev/null || status=1
      rm -rf /tmp/variants
      python3 -m deepwish.cli bench variants --out /tmp/variants --preset gpt_124m --data "${CORPUS:-/tmp/deepwish-pycode}" \
        --steps 40 --set train.window_warmup_frac=0 --set train.eval_every=40 --set train.eval_batches=4 \
        --variant "bf16: train.residual_dtype=bf16" \
        --variant "b32: train.batch_size=32 train.grad_accum=1" \
        --variant "b32_bf16: train.batch_size=32 train.grad_accum=1 train.residual_dtype=bf16" \
        ${VARIANTS_ARGS:-} 2>&1 | grep -v '^step' | tail -30 || status=1
      mkdir -p "$OUT/variants"
      cp /tmp/variants/variants.* "$OUT/variants/" 2>/dev/null || status=1
      for m in /tmp/variants/*/metrics.jsonl; do [ -f "$m" ] && cp "$m" "$OUT/variants/$(basename "$(dirname "$m")")_metrics.jsonl"; done ;;
    train_paths)  # `deepwish train --preset qwen3_0.6b` itself on packed documents (the speedrun's corpus, batch
      # 8 x 2048): AdamW with the attention backend as it comes, FlexAttention and SDPA (the packed path of
      # the attention issue), and Muon (the optimizer issue), each a real run (bench/variants.py), ~10 min
      bash "$0" corpus >/dev/null || status=1
      rm -rf /tmp/variants_qwen
      python3 -m deepwish.cli bench variants --out /tmp/variants_qwen --preset qwen3_0.6b --data "${CORPUS:-/tmp/deepwish-pycode}" \
        --steps 30 --set train.optimizer=adamw --set train.eval_every=30 --set train.eval_batches=2 \
        --variant "flex: model.attn_backend=flex" --variant "sdpa: model.attn_backend=sdpa" \
        --variant "muon: train.optimizer=muon" ${TRAIN_PATHS_ARGS:-} 2>&1 | grep -v '^step' | tail -30 || status=1
      mkdir -p "$OUT/train_paths"
      cp /tmp/variants_qwen/variants.* "$OUT/train_paths/" 2>/dev/null || status=1 ;;
    packed_bench)  # `bench train` plain causal beside its packed variant on the speedrun's code corpus (many
      # documents a row; the row prints documents per row), one process, ~3 min: the attention issue's
      # packed-within-5% goal measured where packing is real
      bash "$0" corpus >/dev/null || status=1
      python3 -m deepwish.cli bench train --out "$OUT/packed_bench" --preset qwen3_0.6b --variants deepwish,deepwish-packed \
        --packed-data "${CORPUS:-/tmp/deepwish-pycode}" --steps 12 --warmup 4 ${PACKED_BENCH_ARGS:-} 2>&1 \
        | grep -v '^step' | tail -12 || status=1 ;;
    lce)  # the fused loss: GPU tests (the soft-cap's tanh instruction included), then its row kernel and the
      # whole loss against torch.compile of the plain loss (bench/lce_rows.py)
      python3 -m pytest -m gpu -q -p no:cacheprovider tests/kernels/test_kernels_gpu_conv_lce.py 2>&1 | tail -5
      [ "${PIPESTATUS[0]}" = 0 ] || status=1
      python3 -m deepwish.bench.lce_rows --out "$OUT/lce" || status=1 ;;
    speedrun) python3 -m deepwish.cli bench speedrun --out "$OUT/speedrun" ${SPEEDRUN_ARGS:-} || status=1 ;;
    ablate) python3 -m deepwish.cli bench ablate --out "$OUT/ablate" ${ABLATE_ARGS:-} || status=1 ;;
    dsa) python3 -m deepwish.cli bench dsa --out "$OUT/dsa" ${DSA_ARGS:-} || status=1 ;;
    nsa_kernels) python3 -m deepwish.bench.nsa_kernels --out "$OUT/nsa_kernels" ${NSA_KERNELS_ARGS:-} || status=1 ;;
    nsa_model)  # qwen3_0.6b_nsa as users run it: the selected dK/dV sweep at its heads (8 x 2048, 16 / 8, the
      # small-group rows), then `deepwish train --preset qwen3_0.6b_nsa` itself on the speedrun's corpus with
      # steps 21-22 profiled (loop_profile's settings; ~6 min)
      timeout 150 python3 -m deepwish.bench.nsa_kernels --out "$OUT/nsa_model" --parts sweep --shape 8,16,8 \
        --sweep-T 2048 --sweep-kinds slc_dkdv --no-fla 2>&1 | grep -v '^{' | tail -12 || status=1
      LOOP_PROFILE_PRESETS=qwen3_0.6b_nsa LOOP_PROFILE_ARGS="--set train.steps=25 --set train.profile_start=20 --set train.profile_steps=2 --set train.eval_every=25 ${NSA_MODEL_ARGS:-}" \
        bash "$0" loop_profile || status=1 ;;
    nsa_quality) python3 -m deepwish.cli bench nsa --quality --out "$OUT/nsa_quality" ${NSA_QUALITY_ARGS:---seeds 2} || status=1 ;;
    attn_dq_tiles)  # tile sweep of the atomic-dq backward kernel (dkdvq) only; attn_dq applies its picks
      python3 -m deepwish.bench.attention_tiles --out "$OUT/attn_dq_tiles" --parts tiles --kinds dkdvq \
        ${ATTN_DQ_TILES_ARGS:-} 2>&1 | tee "$OUT/attn_dq_tiles.log" || status=1 ;;
    attn_dq)  # the flash backward's dq forms (kernels/attention/triton.py: BACKWARD_DQ) side by side, then
      # the attention GPU tests (~5 min of their own; after the timings, so a time limit cuts the tests)
      tiles=()
      [ -f "$OUT/attn_dq_tiles/tiles.json" ] && tiles=(--tiles "$OUT/attn_dq_tiles/tiles.json")
      python3 -m deepwish.cli bench attention --out "$OUT/attn_dq" --dq-forms kernel,atomic,atomic_t --parts check,train \
        --paths own,flex "${tiles[@]}" ${ATTN_DQ_ARGS:-} 2>&1 | tee "$OUT/attn_dq.log" || status=1
      python3 -m pytest -m gpu -q -p no:cacheprovider tests/kernels/test_attention_gpu.py 2>&1 | tee "$OUT/attn_dq_tests.log" | tail -15 ;;
    muon)  # Muon's Triton step against its torch step: GPU tests, the optimizer step alone, the training step
      python3 -m pytest -m gpu -q -p no:cacheprovider tests/kernels/test_muon_kernels_gpu.py tests/train/test_muon.py 2>&1 \
        | tee "$OUT/muon_tests.log" | tail -8
      [ "${PIPESTATUS[0]}" = 0 ] || status=1
      TRITON_PRINT_AUTOTUNING=1 python3 -m deepwish.cli bench muon --out "$OUT/muon" --steps 8 --profile \
        --variants ${MUON_VARIANTS:-adamw,muon-torch,muon-fused-cublas,muon-triton-gram,muon-triton-all,muon,muon-overlap} 2>&1 | tee "$OUT/muon_bench.log"
      [ "${PIPESTATUS[0]}" = 0 ] || status=1
      python3 -m deepwish.cli bench train --out "$OUT/muon_train" --preset qwen3_0.6b --steps 10 \
        --variants deepwish,deepwish-muon,deepwish-muon-overlap,deepwish-muon-torch 2>&1 | tee "$OUT/muon_train.log"
      [ "${PIPESTATUS[0]}" = 0 ] || status=1 ;;
    attn_focus_tiles)  # tile sweep of the latest flash-attention changes only (attention_tiles FOCUS; with
      # ATTN_FOCUS_TILES_ARGS="--loads pointer,tma" each fwd / dq candidate in both K/V load forms) beside
      # today's TILES picks; attn_goals applies its picks
      python3 -m deepwish.bench.attention_tiles --out "$OUT/attn_focus_tiles" --parts tiles --focus \
        --kinds ${ATTN_FOCUS_KINDS:-fwd,dkdv} ${ATTN_FOCUS_TILES_ARGS:-} 2>&1 | tee "$OUT/attn_focus_tiles.log" || status=1 ;;
    attn_goals)  # own vs FlexAttention vs SDPA flash (plain causal) at the goals' eight shapes, with the focus picks
      python3 -m pytest -m gpu -q -p no:cacheprovider tests/kernels/test_attention_gpu.py 2>&1 | tee "$OUT/attn_goals_tests.log" | tail -15
      tiles=()
      [ -f "$OUT/attn_focus_tiles/tiles.json" ] && tiles=(--tiles "$OUT/attn_focus_tiles/tiles.json")
      python3 -m deepwish.cli bench attention --out "$OUT/attn_goals" --grid goals --parts train \
        --paths own,flex,sdpa_flash_causal "${tiles[@]}" ${ATTN_GOALS_ARGS:-} 2>&1 | tee "$OUT/attn_goals.log" || status=1 ;;
    *) echo "unknown stage $stage"; status=2 ;;
  esac
done
exit $status
