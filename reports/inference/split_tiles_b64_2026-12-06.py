"""The split-KV kernel alone at batch 64 (Qwen3-0.6B heads, context 512, bf16, PDL, 28 launches in a CUDA
graph): tile x split count. Run on the GPU machine from the repo root: PYTHONPATH=. python3 THIS_FILE.
Results (H200, 2026-12-06): reports/inference.md, "Measured 2026-12-06". They were taken with the splits
merged inside the split kernel (an option of decode_attention since removed); today 2 and 4 splits
also launch the merge kernel."""
import torch
from deepwish.kernels.attention import decode as dk
B, H, Hkv, D, L = 64, 16, 8, 128, 576
bf = dict(device="cuda", dtype=torch.bfloat16)
q = torch.randn(B, 1, H, D, **bf)
k, v = torch.randn(B, Hkv, L, D, **bf), torch.randn(B, Hkv, L, D, **bf)
pos = torch.full((B, 1), 511, device="cuda")
nbytes = B * Hkv * 512 * D * 2 * 2


def t(fn, n=30):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(28):
            fn()
    g.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(True), torch.cuda.Event(True)
    e0.record()
    for _ in range(n):
        g.replay()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) / n / 28 * 1e3


for bn, w, s in [(64, 4, 3), (64, 4, 2), (32, 4, 3), (32, 2, 4), (128, 8, 2), (64, 8, 3)]:
    # measured before DECODE_DIRECT_TILE existed (tree 2aad7d6); today both hold the candidate
    dk.DECODE_BN, dk.DECODE_WARPS, dk.DECODE_STAGES = bn, w, s
    dk.DECODE_DIRECT_TILE = (bn, w, s)
    for sp in (1, 2, 4):
        try:
            us = t(lambda: dk.decode_attention(q, k, v, pos, splits=sp, pdl=True))
            print(f"BN {bn} warps {w} stages {s} splits {sp}: {us:.2f} us/launch {nbytes / us / 1e3:.0f} GB/s", flush=True)
        except Exception as e:
            print(bn, w, s, sp, "failed", type(e).__name__, str(e)[:100], flush=True)
