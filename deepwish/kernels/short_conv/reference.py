"""Short depthwise causal convolution: the pure-torch fp32 reference (CPU path and test oracle).

Qwen3-Next's Gated DeltaNet (and Mamba before it) mixes each channel with its last W inputs
through a depthwise causal conv1d (W=4, SiLU, no bias) before the recurrence.

Shape legend: B batch, T time, D channels, W kernel width, N documents.

    y[t, d] = act( bias[d] + sum_{k<W} weight[d, k] * x[t - (W-1) + k, d] )

so weight[:, W-1] multiplies the current token, exactly as torch's conv1d with left padding W-1
followed by truncation (the way HF runs it). Positions before a document's start read the
initial state (the W-1 previous inputs, oldest first) or zero when there is none.

Packed documents (cu_seqlens, B == 1) never read across a document start. The final state of a
document is its last W-1 inputs, reaching back into the initial state (or zeros) when the
document is shorter than W-1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", None)


def check_conv_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      activation: str | None, cu_seqlens: torch.Tensor | None,
                      initial_state: torch.Tensor | None) -> int:
    """Validate shapes and dtypes; return N, the number of documents (B, or len(cu_seqlens)-1)."""
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d: x must be [B, T, D], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"causal_conv1d: x must be floating point, got {x.dtype}")
    B, T, D = x.shape
    if weight.dim() != 2 or weight.shape[0] != D or weight.shape[1] < 1:
        raise ValueError(f"causal_conv1d: weight must be [D={D}, W], got shape {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (D,):
        raise ValueError(f"causal_conv1d: bias must be [D={D}], got shape {tuple(bias.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"causal_conv1d: activation must be 'silu' or None, got {activation!r}")
    W = weight.shape[1]
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"causal_conv1d: cu_seqlens needs packed input with B == 1, got B={B}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
            raise ValueError("causal_conv1d: cu_seqlens must be a 1-D integer tensor [N+1] with N >= 1")
        N = cu_seqlens.numel() - 1
    else:
        N = B
    if initial_state is not None and tuple(initial_state.shape) != (N, D, W - 1):
        raise ValueError(f"causal_conv1d: initial_state must be [N={N}, D={D}, W-1={W - 1}], "
                         f"got shape {tuple(initial_state.shape)}")
    return N


def check_cu_seqlens_values(cu_seqlens: torch.Tensor, T: int) -> None:
    """Value checks (these read the tensor, so they synchronise with the device)."""
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or cu[-1] != T or any(b < a for a, b in zip(cu[:-1], cu[1:])):
        raise ValueError(f"causal_conv1d: cu_seqlens must rise from 0 to T={T}, got {cu}")


def _activate(z: torch.Tensor, activation: str | None) -> torch.Tensor:
    return F.silu(z) if activation == "silu" else z


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  activation: str | None = "silu", cu_seqlens: torch.Tensor | None = None,
                  initial_state: torch.Tensor | None = None, output_final_state: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x: [B, T, D], weight: [D, W], bias: [D] | None, cu_seqlens: int [N+1] | None (B == 1),
    initial_state: [N, D, W-1] | None (oldest first).
    Returns y: [B, T, D] (x.dtype) and final_state: [N, D, W-1] (x.dtype) or None.
    Computed in fp32; differentiable in every floating input."""
    N = check_conv_inputs(x, weight, bias, activation, cu_seqlens, initial_state)
    B, T, D = x.shape
    W = weight.shape[1]
    if cu_seqlens is not None:
        check_cu_seqlens_values(cu_seqlens, T)
        bounds = cu_seqlens.tolist()
        docs = [x[0, bounds[n]:bounds[n + 1]] for n in range(N)]
    else:
        docs = [x[b] for b in range(B)]
    w = weight.float()[:, None, :]                      # [D, 1, W]: depthwise conv1d filters
    b = bias.float() if bias is not None else None
    ys, finals = [], []
    for n, doc in enumerate(docs):
        if initial_state is not None:
            left = initial_state[n].float().t()         # [W-1, D]
        else:
            left = x.new_zeros(W - 1, D, dtype=torch.float32)
        padded = torch.cat([left, doc.float()], dim=0)  # [W-1+L, D]
        if doc.shape[0] > 0:
            z = F.conv1d(padded.t()[None], w, b, groups=D)[0].t()  # [L, D]
        else:
            z = padded.new_zeros(0, D)
        ys.append(_activate(z, activation))
        finals.append(padded[padded.shape[0] - (W - 1):].t())  # [D, W-1]
    y = torch.cat(ys, dim=0).reshape(B, T, D).to(x.dtype)
    final_state = torch.stack(finals).to(x.dtype) if output_final_state else None
    return y, final_state


def causal_conv1d_update(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor | None = None, activation: str | None = "silu") -> torch.Tensor:
    """One decode step. x: [B, D], conv_state: [B, D, W-1] (oldest first; updated in place),
    weight: [D, W], bias: [D] | None. Returns y: [B, D] (x.dtype)."""
    check_update_inputs(x, conv_state, weight, bias, activation)
    window = torch.cat([conv_state.float(), x.float()[:, :, None]], dim=-1)  # [B, D, W]
    z = (window * weight.float()).sum(-1)
    if bias is not None:
        z = z + bias.float()
    conv_state.copy_(window[:, :, 1:])
    return _activate(z, activation).to(x.dtype)


def check_update_inputs(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor | None, activation: str | None) -> None:
    if x.dim() != 2:
        raise ValueError(f"causal_conv1d_update: x must be [B, D], got shape {tuple(x.shape)}")
    B, D = x.shape
    if weight.dim() != 2 or weight.shape[0] != D or weight.shape[1] < 1:
        raise ValueError(f"causal_conv1d_update: weight must be [D={D}, W], got {tuple(weight.shape)}")
    W = weight.shape[1]
    if tuple(conv_state.shape) != (B, D, W - 1):
        raise ValueError(f"causal_conv1d_update: conv_state must be [B={B}, D={D}, W-1={W - 1}], "
                         f"got {tuple(conv_state.shape)}")
    if bias is not None and tuple(bias.shape) != (D,):
        raise ValueError(f"causal_conv1d_update: bias must be [D={D}], got {tuple(bias.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"causal_conv1d_update: activation must be 'silu' or None, got {activation!r}")
