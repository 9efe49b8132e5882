"""SwiGLU feed-forward: down(silu(gate(x)) * up(x)).

gate and up are one matrix `w_gate_up` [2·d_ff, d] (gate rows first) so the forward is two
matmuls, not three; the HF loader concatenates `gate_proj` and `up_proj` into it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    PARAM_ROLES = {"w_down.weight": "matrix_out"}  # writes into the residual stream (model/roles.py)

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.d_ff = d_ff
        self.w_gate_up = nn.Linear(d_model, 2 * d_ff, bias=False)
        self.w_down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w_gate_up(x).chunk(2, dim=-1)
        return self.w_down(F.silu(gate) * up)
