"""NSA's gated sum of its three branches in one launch, for inference (no gradient):

    o = σ(g_cmp) · o_cmp + σ(g_slc) · o_slc + σ(g_win) · o_win      (model/nsa.py, its module docstring)

with the gate logits g [B, T, 3H] laid out as the model's `gate_proj` writes them (head h's three
gates at 3h, 3h + 1, 3h + 2). The torch form is six launches a layer (sigmoid, a cast, three
products, two sums) on a few kilobytes; here one program a token computes all heads. Rounded where
the torch form rounds (σ in g's dtype, then each product and each sum in o's dtype), so the two
agree to the last bit wherever the products round alike.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from deepwish.kernels.pdl import launch_options, setting, wait_for_inputs

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _gated_sum_kernel(G, A, B, C, O, s_gb, s_gt, s_ab, s_at, s_ah, s_bb, s_bt, s_bh, s_cb, s_ct, s_ch,
                      s_ob, s_ot, s_oh, T, H, D, BH: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)  # under PDL: the three branches' outputs written, before any read
    bt = tl.program_id(0)
    b = tl.cast(bt // T, tl.int64)
    t = bt % T
    h = tl.program_id(1) * BH + tl.arange(0, BH)
    d = tl.arange(0, BLOCK_D)
    h_ok = h < H
    ok = h_ok[:, None] & (d < D)[None, :]
    h = tl.cast(h, tl.int64)
    gdt = G.dtype.element_ty
    odt = O.dtype.element_ty
    g = G + b * s_gb + t * s_gt + 3 * h
    g0 = tl.sigmoid(tl.load(g, mask=h_ok, other=0.0).to(tl.float32)).to(gdt).to(odt).to(tl.float32)[:, None]
    g1 = tl.sigmoid(tl.load(g + 1, mask=h_ok, other=0.0).to(tl.float32)).to(gdt).to(odt).to(tl.float32)[:, None]
    g2 = tl.sigmoid(tl.load(g + 2, mask=h_ok, other=0.0).to(tl.float32)).to(gdt).to(odt).to(tl.float32)[:, None]
    a = tl.load(A + b * s_ab + t * s_at + h[:, None] * s_ah + d[None, :], mask=ok, other=0.0).to(tl.float32)
    x = tl.load(B + b * s_bb + t * s_bt + h[:, None] * s_bh + d[None, :], mask=ok, other=0.0).to(tl.float32)
    c = tl.load(C + b * s_cb + t * s_ct + h[:, None] * s_ch + d[None, :], mask=ok, other=0.0).to(tl.float32)
    s = ((g0 * a).to(odt).to(tl.float32) + (g1 * x).to(odt).to(tl.float32)).to(odt).to(tl.float32)
    o = (s + (g2 * c).to(odt).to(tl.float32)).to(odt)
    tl.store(O + b * s_ob + t * s_ot + h[:, None] * s_oh + d[None, :], o, mask=ok)


@torch.library.custom_op("deepwish::nsa_gated_sum", mutates_args=())
def _gated_sum_op(g: torch.Tensor, o_cmp: torch.Tensor, o_slc: torch.Tensor, o_win: torch.Tensor,
                  pdl: str) -> torch.Tensor:
    B, T, H, D = o_win.shape
    P, launch = launch_options(pdl, o_win.device, "nsa gated_sum")
    out = torch.empty(B, T, H, D, dtype=o_win.dtype, device=o_win.device)
    bh = min(16, triton.next_power_of_2(H))
    _gated_sum_kernel[(B * T, triton.cdiv(H, bh))](
        g, o_cmp, o_slc, o_win, out, g.stride(0), g.stride(1), *o_cmp.stride()[:3], *o_slc.stride()[:3],
        *o_win.stride()[:3], *out.stride()[:3], T, H, D, BH=bh, BLOCK_D=triton.next_power_of_2(D), PDL=P,
        num_warps=1 if _INTERPRET else 4, **launch)
    return out


@_gated_sum_op.register_fake
def _(g, o_cmp, o_slc, o_win, pdl):
    return torch.empty_like(o_win, memory_format=torch.contiguous_format)


def gated_sum(g: torch.Tensor, o_cmp: torch.Tensor, o_slc: torch.Tensor, o_win: torch.Tensor, *,
              pdl: bool | str = False) -> torch.Tensor:
    """g [B, T, 3H] gate logits, o_cmp, o_slc, o_win [B, T, H, D] -> o [B, T, H, D] in o_win's dtype
    (module docstring). No gradient: training keeps the torch form. pdl: programmatic dependent
    launch (kernels/pdl.py)."""
    B, T, H, D = o_win.shape
    if o_cmp.shape != o_win.shape or o_slc.shape != o_win.shape or tuple(g.shape) != (B, T, 3 * H):
        raise ValueError(f"gated_sum: g [B, T, 3H] and three [B, T, H, D] outputs, got g {tuple(g.shape)}, "
                         f"{tuple(o_cmp.shape)}, {tuple(o_slc.shape)}, {tuple(o_win.shape)}")
    if g.stride(-1) != 1 or any(o.stride(-1) != 1 for o in (o_cmp, o_slc, o_win)):
        g, o_cmp, o_slc, o_win = (t.contiguous() for t in (g, o_cmp, o_slc, o_win))
    return _gated_sum_op(g, o_cmp, o_slc, o_win, setting(pdl, "nsa gated_sum"))
