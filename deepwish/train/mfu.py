"""Model FLOPs utilisation, counted one way for the trainer's progress line (train/log.py) and
`deepwish bench train` (bench/train.py).

MFU = tokens/s × training FLOPs per token / the device's dense bf16 matmul peak (PEAKS, measured
where we have a measurement, with its source printed beside every MFU figure).

Training FLOPs per token (`Transformer.flops_per_token`, built from the functions below):
- matmuls: 6 × the active matmul parameters (2 forward, 4 backward): every parameter but the
  embedding lookup, routed experts scaled by top-k / n_experts, a tied head counted once;
- softmax attention, per layer: 3 × forward, forward = 2·H·(d_qk + d_v) per (query, key) pair,
  with the mean number of keys a query attends (`mean_keys`): T/2 for causal attention (half the
  square, FlashAttention's and PaLM's convention), w - w²/(2T) for a causal sliding window w < T;
- the gated delta rule (Gated DeltaNet), per layer: 3 × forward, forward per token and value head
  of the chunked form (chunk C = 64, the kernels' chunk): 6·K·V + 6·C·K + 4·C·V (k k^T, w, u,
  w S, the state update, q S, q k^T and the intra-chunk product; bench/gdn.py counts the same);
- not counted: softmax, norms, rotary and other elementwise work; DSA is counted as dense MLA
  (its top-k selection and indexer are not separated); NSA (model/nsa.py) as softmax attention
  over mean_keys(T, w) window keys + min(n·l', T/2) selected keys + mean_keys(T)/d compressed
  tokens (block scoring, the compression MLP's matmuls aside, not counted).
"""
from __future__ import annotations

import torch

# Dense bf16 matmul peak FLOP/s and device copy bandwidth (bytes/s, None = not measured) by a
# substring of torch.cuda.get_device_name(); the first match wins (GH200 before H200).
PEAKS: tuple[tuple[str, float, float | None, str], ...] = (
    ("GH200", 774e12, None, "assumed equal to the measured H200 (same GH100 compute)"),
    ("H200", 774e12, 4172e9, "measured 2026-12-02 on one H200: 8192^3 bf16 matmul 774 TFLOP/s, "
                             "device copy 4,172 GB/s"),
    ("H100", 777e12, 2973e9, "measured on H100 SXM 80GB: 8192^3 bf16 matmul 777 TFLOP/s, device copy 2,973 GB/s"),
    ("B200", 2250e12, None, "datasheet dense bf16"),
    ("A100", 312e12, None, "datasheet dense bf16"),
    ("L40S", 362e12, None, "datasheet dense bf16"),
    ("A10G", 70e12, None, "datasheet dense bf16"),
    ("RTX 4090", 165e12, None, "datasheet dense bf16"),
)
GDN_CHUNK = 64


def peaks_for_name(name: str) -> tuple[float | None, float | None, str]:
    """(bf16 FLOP/s or None, copy bytes/s or None, a line naming the peak and its source)."""
    for key, flops, copy, source in PEAKS:
        if key in name:
            return flops, copy, f"{name}: {flops / 1e12:.0f} TFLOP/s ({source})"
    return None, None, f"{name}: peak unknown, MFU n/a (add it to PEAKS in train/mfu.py)"


def device_peak_flops(device: torch.device) -> tuple[float | None, str]:
    """(peak bf16 FLOP/s or None, where the number comes from) for a torch device."""
    if device.type != "cuda":
        return None, f"no peak for device type {device.type!r}: MFU n/a"
    flops, _, note = peaks_for_name(torch.cuda.get_device_name(device))
    return flops, note


def mfu(tok_s: float, flops_per_token: float, peak_flops: float | None) -> float | None:
    return tok_s * flops_per_token / peak_flops if peak_flops else None


def mean_keys(seq_len: int, window: int = 0) -> float:
    """Mean number of keys a query attends under causal masking, optionally within a sliding
    window of `window` keys (0 = none): T/2, or w - w²/(2T) when w < T (equal at w = T)."""
    if window <= 0 or window >= seq_len:
        return seq_len / 2
    return window - window * window / (2 * seq_len)


def attention_flops_per_token(n_heads: int, qk_dim: int, v_dim: int, keys: float) -> float:
    """Training FLOPs of softmax attention per token and layer: 3 × 2·H·(d_qk + d_v)·keys."""
    return 3 * 2 * n_heads * (qk_dim + v_dim) * keys


def gated_delta_flops_per_token(n_v_heads: int, k_dim: int, v_dim: int, chunk: int = GDN_CHUNK) -> float:
    """Training FLOPs of the chunked gated delta rule per token and layer (module docstring)."""
    return 3 * n_v_heads * (6 * k_dim * v_dim + 6 * chunk * k_dim + 4 * chunk * v_dim)
