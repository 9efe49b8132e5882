"""Qwen3-0.6B's captured decode step (bench.decode's graph mode, 32 steps) with the split kernel's 64-key
and 32-key tiles, at batch 64 and 8, contexts 512 and 4096. Run on the GPU machine from the repo root:
PYTHONPATH=. python3 THIS_FILE. Results (H200, 2026-12-06): reports/inference.md, "Measured 2026-12-06"."""
import dataclasses, torch
from deepwish.bench.decode import _decode_rows, build
from deepwish.config import model_config
from deepwish.kernels.attention import decode as dk
cfg = model_config("qwen3_0.6b")
cfg = dataclasses.replace(cfg, max_seq_len=max(cfg.max_seq_len, 4200))
torch.manual_seed(0)
model = build(cfg, torch.device("cuda"))
for batch, ctx in ((64, 512), (64, 4096), (8, 512), (8, 4096)):
    for tile in ((64, 4, 3), (32, 4, 3)):
        # measured before DECODE_DIRECT_TILE existed (tree 2aad7d6); today both hold the candidate
        dk.DECODE_BN, dk.DECODE_WARPS, dk.DECODE_STAGES = tile
        dk.DECODE_DIRECT_TILE = tile
        (r,) = _decode_rows("qwen3_0.6b", model, batch, ctx, 32, ["graph"], torch.device("cuda"), label=f"b{batch} tile {tile}")
        print(f"b{batch} ctx {ctx} tile {tile}: {r.ms_per_step:.3f} ms/step", flush=True)
