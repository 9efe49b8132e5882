"""Lightning-indexer scores in pure torch (DeepSeek-V3.2 §2.1), the oracle of triton.py.

Shapes: q [B, C, Hi, Di] index queries, w [B, C, Hi] per-head weights (fp32, Hi^-0.5 folded in),
k [B, S, Di] index keys (one per token, shared by the heads) -> I [B, C, S] fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def index_scores(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """I[t,s] = Σ_h w_h · relu(q_h·k_s · scale) in HF's operation order (fp32 matmul, relu, a
    matmul with w), so ties and near-ties resolve as there. Memory: one [B, C, Hi, S] buffer."""
    # in place: one [B,C,Hi,S] buffer, not three (neither op's backward needs what it overwrites)
    s = torch.matmul(q.float(), k.transpose(-1, -2).float().unsqueeze(1)).mul_(scale)  # [B,C,Hi,S]
    s = F.relu_(s)
    return torch.matmul(w.unsqueeze(-2), s).squeeze(-2)
