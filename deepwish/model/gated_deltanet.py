"""Gated DeltaNet mixer (Yang, Kautz & Hatamizadeh 2024, "Gated Delta Networks"), the linear-attention
layer of Qwen3-Next, HF-exact against transformers' `Qwen3NextGatedDeltaNet`.

Shape legend
    B batch, T tokens, d model width, H key heads, HV value heads (HV % H == 0), K key head dim,
    V value head dim, W conv width, D_conv = 2·H·K + HV·V (channels of the short conv).

Per token (all in one layer):
    [q | k | v | z] = in_proj_qkvz(x)            q, k: H·K; v, z: HV·V
    [b | a]         = in_proj_ba(x)              HV each
    [q | k | v]     = silu(causal_conv1d_W([q | k | v]))       depthwise, no bias
    q, k            = l2norm(q), l2norm(k)       (inside the kernels, fp32)
    beta            = sigmoid(b)
    g               = -exp(A_log) · softplus(a + dt_bias)      fp32; the log decay, <= 0
    o               = gated_delta_rule(q, k, v, g, beta)       value head j reads key head j // (HV/H)
    y               = out_proj(rmsnorm(o) · w · silu(z))       per value head, plain weight w

Paths: training (no cache) runs the chunked rule over every sequence; batch rows are separate
sequences and, with packed documents (`ctx.doc_ids`), the B·T stream is cut at every document
start (`ctx.cu_seqlens()`) so neither the conv nor the recurrence reads across a boundary.
Prefill with a cache continues from the cache's conv and recurrent states (so a prompt prefilled
in two pieces equals one piece) and stores the final states; decode (T == 1 with a cache) uses
the single-step conv update and recurrent step, both in place on the cache.

Kernels are chosen once per layer at construction by `resolve_gdn_backend` (`cfg.gdn_backend`):
    torch   kernels/gated_delta/reference.py + kernels/short_conv/reference.py (readable, fp32)
    triton  kernels/gated_delta/triton.py + kernels/short_conv/triton.py (fwd + bwd + decode step)
    fla     flash-linear-attention's chunk_gated_delta_rule / fused_recurrent_gated_delta_rule,
            with this project's Triton conv; imported lazily, only on CUDA, after a tiny
            forward check against the reference
    auto    triton (on CUDA) > fla > torch, announced once per model (by the first GDN layer).

Deviations / simplifications (relative to HF transformers 5.17 on its torch path)
- Weight layout: the released checkpoints interleave in_proj_qkvz / in_proj_ba per key head
  ([q_h | k_h | v_h.. | z_h..] for h = 0..H-1). Here the rows are de-interleaved once at load
  time by the name table (hf/qwen3_next.py) to [q | k | v | z] and [b | a], so the forward is a
  plain split; save_hf re-interleaves. The conv weight is stored [D_conv, W] instead of
  [D_conv, 1, W].
- q and k are not repeated to the value heads before the kernels (the kernels group them); the
  fla backend repeats them, as HF does before calling fla.
- The gated norm multiplies weight, normalised x and silu(z) in fp32 and casts once; HF casts the
  normalised x to the input dtype before the weight. Identical in fp32, within bf16 rounding else.
- Initialisation (for training from scratch) follows Mamba-2 / the GDN reference: A ~ U(1, 16),
  softplus(dt_bias) log-uniform in [1e-3, 1e-1]; HF's `_init_weights` uses dt_bias = 1 instead.
- Padding masks (HF `attention_mask` zeroing pad tokens) are not supported: generation here
  never pads (see generate.py), and training packs documents instead.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from deepwish.config import ModelConfig
from deepwish.kernels.backend import resolve_backend
from deepwish.model.cache import RecurrentCache

GDN_AUTO_ORDER = ["triton", "fla", "torch"]


# ---- small pure functions ---------------------------------------------------------------------

def gate_log_decay(a: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """g = -exp(A_log) · softplus(a + dt_bias), always in fp32 (a bf16 A would round the decay
    rate; in fp16 exp(A_log) can overflow). a: [..., HV]; A_log, dt_bias: [HV]. Returns [..., HV]."""
    return -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())


class GatedRMSNorm(nn.Module):
    """rmsnorm(x) · w · silu(gate) over the last dim, with a plain weight initialised at one
    (Qwen3-Next's only norm that is NOT zero-centred). Statistics in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float() * F.silu(gate.float())).to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


# ---- backends ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class GDNKernels:
    """The four operations a Gated DeltaNet layer needs, from one backend.

    conv(x [B,T,D], weight [D,W], cu_seqlens, initial_state [N,D,W-1] | None, output_final_state)
        -> (y [B,T,D], final_state | None)                                     (SiLU, no bias)
    conv_step(x [B,D], conv_state [B,D,W-1] updated in place, weight) -> y [B,D]
    chunk(q, k [B,T,H,K], v [B,T,HV,V], g, beta [B,T,HV], initial_state [N,HV,K,V] | None,
          output_final_state, cu_seqlens) -> (o [B,T,HV,V], final_state fp32 | None)   (q,k L2-normed inside)
    step(q, k [B,H,K], v [B,HV,V], g, beta [B,HV], state [B,HV,K,V] fp32 updated in place) -> o [B,HV,V]
    """

    name: str
    conv: Callable
    conv_step: Callable
    chunk: Callable
    step: Callable


def _conv_ops(module) -> tuple[Callable, Callable]:
    def conv(x, weight, cu_seqlens, initial_state, output_final_state):
        return module.causal_conv1d(x, weight, None, "silu", cu_seqlens=cu_seqlens, initial_state=initial_state,
                                    output_final_state=output_final_state)

    def conv_step(x, conv_state, weight):
        return module.causal_conv1d_update(x, conv_state, weight, None, "silu")

    return conv, conv_step


def _torch_kernels() -> GDNKernels:
    from deepwish.kernels.gated_delta import reference as gd
    from deepwish.kernels.short_conv import reference as sc

    def chunk(q, k, v, g, beta, initial_state, output_final_state, cu_seqlens):
        return gd.chunk_gated_delta_rule_ref(q, k, v, g, beta, initial_state=initial_state,
                                             output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                                             use_qk_l2norm=True)

    def step(q, k, v, g, beta, state):
        o, new_state = gd.recurrent_gated_delta_step_ref(q, k, v, g, beta, state, use_qk_l2norm=True)
        state.copy_(new_state)
        return o

    return GDNKernels("torch", *_conv_ops(sc), chunk, step)


def _triton_kernels() -> GDNKernels:
    from deepwish.kernels.gated_delta import triton as gd
    from deepwish.kernels.short_conv import triton as sc

    def chunk(q, k, v, g, beta, initial_state, output_final_state, cu_seqlens):
        return gd.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=initial_state,
                                         output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                                         use_qk_l2norm=True)

    def step(q, k, v, g, beta, state):
        return gd.fused_recurrent_gated_delta_step(q, k, v, g, beta, state, use_qk_l2norm=True)

    return GDNKernels("triton", *_conv_ops(sc), chunk, step)


def _fla_kernels() -> GDNKernels:
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

    from deepwish.kernels.short_conv import triton as sc

    def grouped(q, k, v):
        # fla is called the way HF calls it: key heads repeated to the value heads first.
        rep = v.shape[-2] // k.shape[-2]
        if rep > 1:
            q, k = q.repeat_interleave(rep, dim=-2), k.repeat_interleave(rep, dim=-2)
        return q, k

    def chunk(q, k, v, g, beta, initial_state, output_final_state, cu_seqlens):
        q, k = grouped(q, k, v)
        return chunk_gated_delta_rule(q, k, v, g=g, beta=beta, initial_state=initial_state,
                                      output_final_state=output_final_state,
                                      cu_seqlens=None if cu_seqlens is None else cu_seqlens.long(),
                                      use_qk_l2norm_in_kernel=True)

    def step(q, k, v, g, beta, state):
        q, k = grouped(q, k, v)
        o, new_state = fused_recurrent_gated_delta_rule(q[:, None], k[:, None], v[:, None], g=g[:, None],
                                                        beta=beta[:, None], initial_state=state,
                                                        output_final_state=True, use_qk_l2norm_in_kernel=True)
        state.copy_(new_state)
        return o[:, 0]

    return GDNKernels("fla", *_conv_ops(sc), chunk, step)


def _triton_unusable(allow_interpreter: bool) -> str | None:
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if not torch.cuda.is_available() and not (allow_interpreter and interpreting):
        return "no CUDA device (TRITON_INTERPRET=1 runs the kernels on CPU when 'triton' is asked for by name)"
    try:
        import deepwish.kernels.gated_delta.triton  # noqa: F401
        import deepwish.kernels.short_conv.triton  # noqa: F401
    except ImportError as e:
        return f"Triton kernels cannot be imported ({e})"
    return None


def _fla_unusable() -> str | None:
    """Whether flash-linear-attention imports AND computes the rule correctly on this device."""
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    return _fla_probe_on_cuda()


@functools.cache
def _fla_probe_on_cuda() -> str | None:
    """Memoised: the answer is a property of the process's environment, probed once (a tiny
    forward against the reference), not once per layer."""
    try:
        kernels = _fla_kernels()
    except ImportError as e:
        return f"flash-linear-attention is not installed ({e})"
    if _triton_unusable(allow_interpreter=False) is not None:
        return "this project's Triton conv kernel cannot be imported"
    from deepwish.kernels.gated_delta.reference import chunk_gated_delta_rule_ref
    try:
        dev = torch.device("cuda")
        q, k = torch.randn(2, 1, 80, 2, 64, device=dev, dtype=torch.bfloat16).unbind(0)
        v = torch.randn(1, 80, 4, 64, device=dev, dtype=torch.bfloat16)
        g = -torch.rand(1, 80, 4, device=dev).mul(0.5)
        beta = torch.rand(1, 80, 4, device=dev, dtype=torch.bfloat16)
        o, _ = kernels.chunk(q, k, v, g, beta, None, False, None)
        ref, _ = chunk_gated_delta_rule_ref(q, k, v, g, beta, use_qk_l2norm=True)
        err = float((o.float() - ref.float()).norm() / ref.float().norm())
    except Exception as e:  # any failure to run means "not usable here", with the reason shown
        return f"flash-linear-attention fails on this device: {type(e).__name__}: {e}"
    if not err < 2e-2:
        return f"flash-linear-attention disagrees with the reference (rel err {err:.2e})"
    return None


def resolve_gdn_backend(requested: str, announce: bool = True) -> str:
    """'auto' | 'torch' | 'triton' | 'fla' -> the backend that will run (see the module docstring)."""
    candidates = {
        "torch": lambda: None,
        "triton": lambda: _triton_unusable(allow_interpreter=requested == "triton"),
        "fla": _fla_unusable,
    }
    return resolve_backend("gated_delta", requested, candidates, GDN_AUTO_ORDER, announce=announce)


def gdn_kernels(backend: str) -> GDNKernels:
    return {"torch": _torch_kernels, "triton": _triton_kernels, "fla": _fla_kernels}[backend]()


# ---- the mixer --------------------------------------------------------------------------------

class GatedDeltaNet(nn.Module):
    # model/roles.py: the output projection writes into the residual stream; the depthwise filter
    # and the per-head decay parameters keep this module's own initialisation (reset_parameters)
    PARAM_ROLES = {"out_proj.weight": "matrix_out", "conv_weight": "conv", "A_log": "scalar", "dt_bias": "scalar"}

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        H, HV = cfg.linear_n_k_heads, cfg.linear_n_v_heads
        K, V, W = cfg.linear_k_head_dim, cfg.linear_v_head_dim, cfg.linear_conv_kernel
        if min(H, HV, K, V) <= 0 or W < 1:
            raise ValueError(f"layer {layer_idx}: gdn needs positive linear_n_k_heads ({H}), linear_n_v_heads ({HV}), "
                             f"linear_k_head_dim ({K}), linear_v_head_dim ({V}) and linear_conv_kernel ({W})")
        if HV % H:
            raise ValueError(f"layer {layer_idx}: linear_n_v_heads={HV} must be a multiple of linear_n_k_heads={H}")
        self.layer_idx = layer_idx
        self.n_k_heads, self.n_v_heads, self.k_head_dim, self.v_head_dim = H, HV, K, V
        self.conv_width = W
        self.key_dim, self.value_dim = H * K, HV * V
        self.conv_dim = 2 * self.key_dim + self.value_dim
        d = cfg.d_model
        self.in_proj_qkvz = nn.Linear(d, self.conv_dim + self.value_dim, bias=False)  # rows [q | k | v | z]
        self.in_proj_ba = nn.Linear(d, 2 * HV, bias=False)  # rows [b | a]
        self.conv_weight = nn.Parameter(torch.empty(self.conv_dim, W))
        self.A_log = nn.Parameter(torch.empty(HV))
        self.dt_bias = nn.Parameter(torch.empty(HV))
        self.norm = GatedRMSNorm(V, cfg.norm_eps)
        self.out_proj = nn.Linear(self.value_dim, d, bias=False)
        first_gdn = next((i for i, (m, _) in enumerate(cfg.layer_types) if m == "gdn"), layer_idx)
        self.backend = resolve_gdn_backend(cfg.gdn_backend, announce=layer_idx == first_gdn)
        self.kernels = gdn_kernels(self.backend)
        # Triton outside the interpreter runs on CUDA tensors only; checked per call without
        # reading the environment inside forward (keeps forward traceable by torch.compile).
        self.needs_cuda = self.backend in ("triton", "fla") and os.environ.get("TRITON_INTERPRET", "0") != "1"
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.conv_width)  # nn.Conv1d's default for a depthwise filter
        self.conv_weight.uniform_(-bound, bound)
        self.A_log.uniform_(1.0, 16.0).log_()
        dt = self.dt_bias.uniform_(math.log(1e-3), math.log(1e-1)).exp_().clamp_(min=1e-4).clone()
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^{-1}(dt)

    def make_cache(self, batch: int, max_len: int, dtype, device) -> RecurrentCache:
        return RecurrentCache.empty(batch, self.conv_dim, self.conv_width, self.n_v_heads, self.k_head_dim,
                                    self.v_head_dim, dtype=dtype, device=device)

    def _heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[..., D_conv] -> q, k [..., H, K], v [..., HV, V]."""
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        return (q.unflatten(-1, (self.n_k_heads, self.k_head_dim)), k.unflatten(-1, (self.n_k_heads, self.k_head_dim)),
                v.unflatten(-1, (self.n_v_heads, self.v_head_dim)))

    def forward(self, x: torch.Tensor, ctx, cache: RecurrentCache | None = None) -> tuple[torch.Tensor, dict]:
        B, T, _ = x.shape
        if self.needs_cuda and not x.is_cuda:
            raise RuntimeError(f"layer {self.layer_idx}: gdn backend {self.backend!r} needs CUDA tensors, got {x.device}")
        qkv, z = self.in_proj_qkvz(x).split([self.conv_dim, self.value_dim], dim=-1)
        b, a = self.in_proj_ba(x).chunk(2, dim=-1)
        beta = b.sigmoid()
        g = gate_log_decay(a, self.A_log, self.dt_bias)
        ops = self.kernels
        if cache is not None and ctx.doc_ids is not None:
            raise ValueError(f"layer {self.layer_idx}: packed documents (doc_ids) cannot be run into a cache")
        if cache is None:
            cu = None
            if ctx.doc_ids is not None:  # one stream of B·T tokens, cut at rows and documents
                cu = ctx.cu_seqlens()
                qkv, g, beta = qkv.reshape(1, B * T, -1), g.reshape(1, B * T, -1), beta.reshape(1, B * T, -1)
            qkv, _ = ops.conv(qkv, self.conv_weight, cu, None, False)
            q, k, v = self._heads(qkv)
            o, _ = ops.chunk(q, k, v, g, beta, None, False, cu)
        elif T == 1:
            q, k, v = self._heads(ops.conv_step(qkv[:, 0], cache.conv_state, self.conv_weight))
            o = ops.step(q, k, v, g[:, 0], beta[:, 0], cache.recurrent_state)
        else:
            qkv, conv_state = ops.conv(qkv, self.conv_weight, None, cache.conv_state, True)
            q, k, v = self._heads(qkv)
            o, state = ops.chunk(q, k, v, g, beta, cache.recurrent_state, True, None)
            cache.conv_state.copy_(conv_state)
            cache.recurrent_state.copy_(state)
        o = self.norm(o.reshape(B, T, self.n_v_heads, self.v_head_dim), z.view(B, T, self.n_v_heads, self.v_head_dim))
        return self.out_proj(o.reshape(B, T, self.value_dim)), {}
