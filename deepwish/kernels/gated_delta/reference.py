"""Gated delta rule (Gated DeltaNet, Yang, Kautz & Hatamizadeh 2024; the linear-attention mixer of
Qwen3-Next): pure-torch fp32 references. These are the CPU path and the test oracle of `triton.py`.

Shape legend
    B batch, T time, H key heads, HV value heads (HV % H == 0), K key dim, V value dim,
    N number of sequences (N = B, or len(cu_seqlens) - 1 for packed input), C chunk size.

Recurrence, per sequence and value head, with state S in R^{K x V} (fp32):
    S_t = exp(g_t) * S_{t-1}
    S_t = S_t + beta_t * k_t^T (v_t - k_t S_t)           k_t is a 1 x K row, v_t a 1 x V row
    o_t = scale * q_t S_t                               scale defaults to K ** -0.5
Value head j reads key head j // (HV // H) (a grouped repeat, like `repeat_interleave`).

Chunked (WY / UT) form, per chunk of C steps with G the in-chunk cumulative sum of g:
    A   = strictly_lower(beta_i (k_i . k_j) exp(G_i - G_j))       [C, C]
    w   = (I + A)^{-1} (beta * exp(G) * k)                        [C, K]
    u   = (I + A)^{-1} (beta * v)                                 [C, V]
    v'  = u - w S                                                 corrections written to the state
    o   = scale (exp(G) * (q S) + (lower_incl_diag((q k^T) * exp(G_i - G_j))) v')
    S  <- exp(G_last) S + (exp(G_last - G) * k)^T v'
This is the decomposition of the Gated DeltaNet paper (section 3, "hardware-efficient chunkwise
algorithm"), and the one behind HF transformers' `torch_chunk_gated_delta_rule`.

Deviations / simplifications
- q and k are expected L2-normalised by the caller (the mixer does it); `use_qk_l2norm=True`
  normalises here with x / sqrt(sum x^2 + 1e-6), as HF's `l2norm` does.
- Key heads are shared by groups of value heads inside the functions, so callers never repeat q, k.
- Packed sequences (`cu_seqlens`, B == 1) are run one by one; no state crosses a boundary.
"""
from __future__ import annotations

import torch


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim (HF `l2norm` convention)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                 initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None) -> tuple[int, ...]:
    """Validate shapes shared by every sequence-level entry point; return (B, T, H, HV, K, V, N)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"gated delta: q, k, v must be 4-D [B, T, heads, dim]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape != k.shape:
        raise ValueError(f"gated delta: q {tuple(q.shape)} and k {tuple(k.shape)} must have the same shape")
    B, T, H, K = k.shape
    if v.shape[:2] != (B, T):
        raise ValueError(f"gated delta: v {tuple(v.shape)} must share [B, T] = {(B, T)} with k")
    HV, V = v.shape[2], v.shape[3]
    if HV < H or HV % H != 0:
        raise ValueError(f"gated delta: value heads HV={HV} must be a multiple of key heads H={H}")
    for name, x in (("g", g), ("beta", beta)):
        if tuple(x.shape) != (B, T, HV):
            raise ValueError(f"gated delta: {name} has shape {tuple(x.shape)}, expected [B, T, HV] = {(B, T, HV)}")
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"gated delta: cu_seqlens (packed sequences) requires B == 1, got B={B}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError("gated delta: cu_seqlens must be a 1-D int tensor [N + 1]")
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"gated delta: cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
        c = cu_seqlens.tolist()
        if c[0] != 0 or c[-1] != T or any(b < a for a, b in zip(c[:-1], c[1:])):
            raise ValueError(f"gated delta: cu_seqlens must rise from 0 to T={T}; got {c}")
        N = len(c) - 1
    else:
        N = B
    if initial_state is not None and tuple(initial_state.shape) != (N, HV, K, V):
        raise ValueError(f"gated delta: initial_state has shape {tuple(initial_state.shape)}, "
                         f"expected [N, HV, K, V] = {(N, HV, K, V)}")
    return B, T, H, HV, K, V, N


def _sequences(B: int, T: int, cu_seqlens: torch.Tensor | None) -> list[tuple[int, int, int]]:
    """(batch row, begin, end) of every sequence."""
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    c = cu_seqlens.tolist()
    return [(0, c[n], c[n + 1]) for n in range(len(c) - 1)]


def _prepare(q, k, v, g, beta, scale, use_qk_l2norm):
    """fp32 copies with q, k repeated to the value heads and q pre-scaled."""
    H, K, HV = k.shape[2], k.shape[3], v.shape[2]
    q, k, v, g, beta = (x.float() for x in (q, k, v, g, beta))
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    scale = K ** -0.5 if scale is None else scale
    q = q.repeat_interleave(HV // H, dim=2) * scale
    k = k.repeat_interleave(HV // H, dim=2)
    return q, k, v, g, beta


def _run(core, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm):
    B, T, H, HV, K, V, N = check_inputs(q, k, v, g, beta, initial_state, cu_seqlens)
    out_dtype = v.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta, scale, use_qk_l2norm)
    outs, finals = [], []
    for n, (b, bos, eos) in enumerate(_sequences(B, T, cu_seqlens)):
        S0 = (torch.zeros(HV, K, V, dtype=torch.float32, device=v.device) if initial_state is None
              else initial_state[n].float())
        sl = slice(bos, eos)
        o_n, S_n = core(q[b, sl], k[b, sl], v[b, sl], g[b, sl], beta[b, sl], S0)
        outs.append((b, o_n))
        finals.append(S_n)
    if cu_seqlens is None:
        o = torch.stack([o_n for _, o_n in outs])
    else:
        o = torch.cat([o_n for _, o_n in outs], dim=0)[None]
    final = torch.stack(finals) if output_final_state else None
    return o.to(out_dtype), final


def _recurrent_core(q, k, v, g, beta, S):
    """One sequence, all value heads. q, k: [L, HV, K] (q pre-scaled); v: [L, HV, V]; g, beta: [L, HV];
    S: [HV, K, V]. Returns (o [L, HV, V], S_final [HV, K, V])."""
    outs = []
    for t in range(q.shape[0]):
        S = S * g[t].exp()[:, None, None]
        kv = torch.einsum("hk,hkv->hv", k[t], S)
        S = S + torch.einsum("hk,hv->hkv", k[t], beta[t][:, None] * (v[t] - kv))
        outs.append(torch.einsum("hk,hkv->hv", q[t], S))
    o = torch.stack(outs) if outs else v.new_zeros(v.shape)
    return o, S


def naive_recurrent_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                                     beta: torch.Tensor, scale: float | None = None,
                                     initial_state: torch.Tensor | None = None, output_final_state: bool = False,
                                     cu_seqlens: torch.Tensor | None = None, use_qk_l2norm: bool = False):
    """Token-by-token loop (the definition).

    q, k: [B, T, H, K]; v: [B, T, HV, V]; g (log decay, <= 0), beta: [B, T, HV];
    initial_state: [N, HV, K, V] or None; cu_seqlens: [N + 1] int (B == 1) or None.
    Returns (o [B, T, HV, V] in v.dtype, final_state [N, HV, K, V] fp32 or None).
    """
    return _run(_recurrent_core, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                use_qk_l2norm)


def _chunk_core(q, k, v, g, beta, S, chunk_size):
    """One sequence, chunked form; same shapes as `_recurrent_core`."""
    L = q.shape[0]
    C = chunk_size
    if L == 0:
        return v.new_zeros(v.shape), S
    pad = (-L) % C
    # Zero padding is exact: k = 0 and beta = 0 write nothing, g = 0 decays nothing.
    q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
    g, beta = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (g, beta))
    NC = (L + pad) // C
    # [HV, NC, C, ...]
    q, k, v = (x.reshape(NC, C, *x.shape[1:]).transpose(0, 2).transpose(1, 2) for x in (q, k, v))
    g, beta = (x.reshape(NC, C, -1).permute(2, 0, 1) for x in (g, beta))
    G = g.cumsum(-1)                                                   # [HV, NC, C]
    decay = (G[..., :, None] - G[..., None, :])                        # [HV, NC, C, C], i - j
    lower_incl = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    strict = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)
    # Mask before exp: the upper triangle holds exp(+large) otherwise.
    D_incl = torch.where(lower_incl, decay, torch.full_like(decay, float("-inf"))).exp()
    D_strict = torch.where(strict, decay, torch.full_like(decay, float("-inf"))).exp()
    A = beta[..., :, None] * (k @ k.transpose(-1, -2)) * D_strict      # [HV, NC, C, C]
    I = torch.eye(C, dtype=A.dtype, device=A.device)
    w = torch.linalg.solve_triangular(I + A, (beta * G.exp())[..., None] * k, upper=False, unitriangular=True)
    u = torch.linalg.solve_triangular(I + A, beta[..., None] * v, upper=False, unitriangular=True)
    Aqk = (q @ k.transpose(-1, -2)) * D_incl
    G_last = G[..., -1:]
    k_to_end = (G_last - G).exp()[..., None] * k                       # k decayed to the chunk end
    outs = []
    for c in range(NC):
        v_new = u[:, c] - w[:, c] @ S                                   # [HV, C, V]
        outs.append(G[:, c].exp()[..., None] * (q[:, c] @ S) + Aqk[:, c] @ v_new)
        S = G_last[:, c, :, None].exp() * S + k_to_end[:, c].transpose(-1, -2) @ v_new
    o = torch.stack(outs, dim=1).reshape(q.shape[0], NC * C, -1).transpose(0, 1)[:L]
    return o, S


def chunk_gated_delta_rule_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                               beta: torch.Tensor, scale: float | None = None,
                               initial_state: torch.Tensor | None = None, output_final_state: bool = False,
                               cu_seqlens: torch.Tensor | None = None, use_qk_l2norm: bool = False,
                               chunk_size: int = 64):
    """Chunked WY/UT form (see module docstring); same arguments and returns as
    `naive_recurrent_gated_delta_rule`. T need not be a multiple of `chunk_size`."""
    if chunk_size < 1:
        raise ValueError(f"gated delta: chunk_size must be positive, got {chunk_size}")

    def core(q, k, v, g, beta, S):
        return _chunk_core(q, k, v, g, beta, S, chunk_size)

    return _run(core, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm)


def check_step_inputs(q, k, v, g, beta, state) -> tuple[int, ...]:
    """Validate one decode step's shapes; return (B, H, HV, K, V)."""
    if q.dim() != 3 or q.shape != k.shape:
        raise ValueError(f"gated delta step: q, k must be [B, H, K] and equal; got {tuple(q.shape)}, {tuple(k.shape)}")
    B, H, K = k.shape
    if v.dim() != 3 or v.shape[0] != B:
        raise ValueError(f"gated delta step: v must be [B, HV, V] with B={B}; got {tuple(v.shape)}")
    HV, V = v.shape[1], v.shape[2]
    if HV < H or HV % H != 0:
        raise ValueError(f"gated delta step: value heads HV={HV} must be a multiple of key heads H={H}")
    for name, x in (("g", g), ("beta", beta)):
        if tuple(x.shape) != (B, HV):
            raise ValueError(f"gated delta step: {name} has shape {tuple(x.shape)}, expected [B, HV] = {(B, HV)}")
    if tuple(state.shape) != (B, HV, K, V):
        raise ValueError(f"gated delta step: state has shape {tuple(state.shape)}, expected {(B, HV, K, V)}")
    return B, H, HV, K, V


def recurrent_gated_delta_step_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                                   beta: torch.Tensor, state: torch.Tensor, scale: float | None = None,
                                   use_qk_l2norm: bool = False):
    """One decode step. q, k: [B, H, K]; v: [B, HV, V]; g, beta: [B, HV]; state: [B, HV, K, V].
    Returns (o [B, HV, V] in v.dtype, new_state [B, HV, K, V] fp32); `state` is not modified."""
    check_step_inputs(q, k, v, g, beta, state)
    qf, kf, vf, gf, bf = _prepare(q[:, None], k[:, None], v[:, None], g[:, None], beta[:, None], scale, use_qk_l2norm)
    S = state.float() * gf[:, 0].exp()[..., None, None]
    kv = torch.einsum("bhk,bhkv->bhv", kf[:, 0], S)
    S = S + torch.einsum("bhk,bhv->bhkv", kf[:, 0], bf[:, 0, :, None] * (vf[:, 0] - kv))
    o = torch.einsum("bhk,bhkv->bhv", qf[:, 0], S)
    return o.to(v.dtype), S
