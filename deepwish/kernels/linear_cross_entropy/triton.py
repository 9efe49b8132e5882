"""Linear (LM head) + cross-entropy without materialising the [N, V] logits.

Same semantics as `reference.py` (read it first). Shape legend: N tokens, D hidden, V vocab,
n rows in one chunk.

Design: the 'chunked' scheme (cuBLAS GEMMs + one Triton row kernel), chosen over a fully fused
Triton GEMM because on H100 the three GEMMs (logits, dh, dW) dominate and cuBLAS runs them
near peak, while the softmax work is memory-bound and cheap per chunk.
- Rows are processed in chunks of n (default for bf16: N/8 rounded down to a power of two,
  clamped to [128, 2048]; proportionally fewer rows for wider buffers), so the only large
  temporary is one [n, V] logits buffer: about 2% of what the plain loss allocates (bf16 logits
  + fp32 copy + fp32 grad) for N >= 1024.
- Per chunk: logits = h_c @ W^T (cuBLAS, fp32 accumulation) into the buffer; a Triton kernel
  walks each row with an online log-sum-exp (running max and rescaled sum, as in
  online-softmax, Milakov & Gimelshein 2018), picks the target logit, and, when gradients are
  wanted, overwrites the row in place with dlogits = a * softmax - b * onehot (times the softcap
  derivative 1 - (logit/softcap)^2). Then dh_c = dlogits @ W and dW += dlogits^T @ h_c.
- When the loss is reduced (sum/mean) and logprobs are not requested, every row's output
  gradient is the same scalar, so the gradients are computed during the forward (no recompute;
  idea as in Liger-Kernel's fused linear cross-entropy) and the backward only scales them.
  Otherwise (reduction='none', or logprobs requested) the forward saves lse [N] and the backward
  recomputes each chunk's logits once.

Deviations / precision:
- The logits buffer has h's dtype unless `logits_dtype=torch.float32` is passed: for bf16
  inputs, logits are rounded to bf16 after fp32 accumulation, exactly as the plain
  `(h @ W.T).float()` loss does. Pass float32 when per-token logprobs must be precise (RL);
  it costs twice the buffer and more memory traffic.
- dW is accumulated across chunks in the weight's dtype (one rounding per chunk for bf16).
- Target values are checked on the host (one device synchronisation per call) unless the caller
  says it checked them (check_targets=False).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepwish.kernels.linear_cross_entropy.reference import (check_lce_inputs, check_target_values,
                                                              reduce_loss)

# One program per row; each thread holds 8 consecutive logits of a block (16-byte bf16 loads).
# Measured on one H200 (torch 2.11, triton 3.6; chunks of 2048 rows, lse + gradient passes, bf16):
#   V = 50,304 (GPT presets): 4096 columns x 16 warps 162 us (2.55 TB/s over the minimal bytes, one
#     read and one write per logit); the earlier 16384 x 32 227 us: a 16384 block leaves 23% of the
#     lanes of the last block idle and allows one program per SM; with the 15.0 soft-cap 268 us vs 408;
#   V = 151,936 (Qwen3): 8192 x 32 476 us (2.61 TB/s), 4096 x 16 490, 16384 x 32 553.
# The gradient pass walks the row backwards, so its first blocks are the lse pass's last (the most
# recently cached in L2).
def row_block(V: int) -> tuple[int, int]:
    """(columns a row program loads per iteration, its warps): 8 logits per thread."""
    bv = min(4096 if V <= 65536 else 8192, triton.next_power_of_2(V))
    return bv, max(1, bv // 256)


MIN_CHUNK_ROWS, MAX_CHUNK_ROWS = 128, 2048


@triton.jit
def _tanh(x, HW_TANH: tl.constexpr):
    if HW_TANH:
        # the GPU's tanh instruction (sm_75+, one special-function op where the exp-based form
        # takes an exp and a reciprocal): relative error at most ~2^-10.7, below a 16-bit logits buffer's own
        # rounding (bf16 2^-9), so taken only for those buffers
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    # exp-based tanh (the interpreter has no libdevice); absolute error ~1e-7. The quotient is the
    # 2-ulp approximate division: an IEEE-rounded fp32 division is a ~10-instruction sequence, and
    # with two of them per logit per pass the soft-capped row kernel was bound by them, not by memory.
    e = tl.exp(-2.0 * tl.abs(x))
    r = tl.fdiv(1.0 - e, 1.0 + e, ieee_rounding=False)
    return tl.where(x < 0, -r, r)


def hardware_tanh(logits: torch.Tensor) -> bool:
    """Whether the row kernel takes the GPU's tanh instruction for these logits: a 16-bit buffer
    on a CUDA GPU of compute capability 7.5 or later (not in the interpreter, which runs no PTX)."""
    return (logits.is_cuda and logits.dtype in (torch.bfloat16, torch.float16) and torch.version.cuda is not None
            and torch.cuda.get_device_capability(logits.device) >= (7, 5))


@triton.jit
def _ce_rows_kernel(logits_ptr, grad_ptr, targets_ptr, lse_ptr, target_logit_ptr, g_loss_ptr, g_lp_ptr,
                    V, stride_logits, stride_grad, z_loss, softcap, inv_softcap,
                    HAS_SOFTCAP: tl.constexpr, COMPUTE_LSE: tl.constexpr, WRITE_GRAD: tl.constexpr,
                    HW_TANH: tl.constexpr, BV: tl.constexpr):
    """One program per row of the chunk. COMPUTE_LSE: online log-sum-exp and target logit.
    WRITE_GRAD: dlogits = (g_loss*(1 + 2 z lse) - g_lp) * softmax - (g_loss - g_lp) * onehot,
    times the softcap derivative; g_loss / g_lp are the row's loss / logprob output gradients."""
    row = tl.program_id(0)
    row64 = tl.cast(row, tl.int64)
    logits_row = logits_ptr + row64 * stride_logits
    target = tl.load(targets_ptr + row)
    offs = tl.arange(0, BV)
    if COMPUTE_LSE:
        # Per-lane online log-sum-exp, reduced across lanes once after the loop: no cross-warp
        # reduction (shared memory + barrier) per block, so the warps stream their loads
        # independently. One exp per element: with e = exp(-|x - m|), a new maximum x rescales
        # the lane's sum (s e + 1) and any other x adds e (s + e).
        m = tl.full((BV,), -1e30, tl.float32)
        s = tl.zeros((BV,), dtype=tl.float32)
        for v0 in range(0, V, BV):
            cols = v0 + offs
            ok = cols < V
            x = tl.load(logits_row + cols, mask=ok, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                x = softcap * _tanh(x * inv_softcap, HW_TANH)
            e = tl.exp(-tl.abs(x - m))
            up = x > m
            s = tl.where(ok, tl.where(up, s * e + 1.0, s + e), s)
            m = tl.where(ok & up, x, m)
        m_row = tl.max(m, 0)
        lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), 0))
        tl.store(lse_ptr + row, lse)
        # The target logit is one element: read it directly (ignored rows carry an out-of-range
        # target and get 0, which the loss masks anyway).
        t_ok = (target >= 0) & (target < V)
        t_x = tl.load(logits_row + tl.where(t_ok, target, 0), mask=t_ok, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            t_x = softcap * _tanh(t_x * inv_softcap, HW_TANH)
        tl.store(target_logit_ptr + row, tl.where(t_ok, t_x, 0.0))
    else:
        lse = tl.load(lse_ptr + row)
    if WRITE_GRAD:
        g_loss = tl.load(g_loss_ptr + row)
        g_lp = tl.load(g_lp_ptr + row)
        coef_p = g_loss * (1.0 + 2.0 * z_loss * lse) - g_lp
        coef_t = g_loss - g_lp
        grad_row = grad_ptr + row64 * stride_grad
        # Walked backwards: the blocks the lse pass read last are the likeliest to still be in L2.
        n_blocks = tl.cdiv(V, BV)
        for i in range(0, n_blocks):
            cols = (n_blocks - 1 - i) * BV + offs
            ok = cols < V
            x = tl.load(logits_row + cols, mask=ok, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                x = softcap * _tanh(x * inv_softcap, HW_TANH)
            g = coef_p * tl.exp(x - lse) - tl.where(cols == target, coef_t, 0.0)
            if HAS_SOFTCAP:
                g = g * (1.0 - (x * inv_softcap) * (x * inv_softcap))
            # Each element is read and then written by the same lane, so in place is safe.
            tl.store(grad_row + cols, g.to(grad_ptr.dtype.element_ty), mask=ok)


def default_chunk_rows(N: int, bytes_per_logit: int = 2) -> int:
    """Rows per chunk: N/8 for a 2-byte logits buffer (fewer for wider buffers, so the buffer
    stays ~1/40 of what the plain loss allocates), a power of two clamped to [128, 2048] and to N."""
    rows = max(1, N * 2 // (8 * bytes_per_logit))
    rows = 1 << (rows.bit_length() - 1)
    return max(1, min(N, max(MIN_CHUNK_ROWS, min(MAX_CHUNK_ROWS, rows))))


def _chunk_logits(h_c: torch.Tensor, weight: torch.Tensor, buf: torch.Tensor | None) -> torch.Tensor:
    """[n, V] logits of one chunk, fp32-accumulated: into buf ([>=n, V] scratch of h's dtype)
    when given, else as a new fp32 tensor."""
    n = h_c.shape[0]
    if buf is not None:
        return torch.mm(h_c, weight.t(), out=buf[:n])
    if h_c.is_cuda:  # 16-bit operands, fp32 output straight from cuBLAS (torch >= 2.8)
        return torch.mm(h_c, weight.t(), out_dtype=torch.float32)
    return torch.mm(h_c.float(), weight.t().float())  # CPU: same math, upcast operands


def _launch_rows(logits, grad, targets_c, lse_c, target_logit_c, g_loss_c, g_lp_c, z_loss, softcap,
                 compute_lse: bool, write_grad: bool):
    n, V = logits.shape
    if n == 0:
        return
    dummy = lse_c
    bv, warps = row_block(V)
    _ce_rows_kernel[(n,)](
        logits, grad if grad is not None else logits, targets_c, lse_c,
        target_logit_c if target_logit_c is not None else dummy,
        g_loss_c if g_loss_c is not None else dummy, g_lp_c if g_lp_c is not None else dummy,
        V, logits.stride(0), grad.stride(0) if grad is not None else 0,
        float(z_loss), float(softcap) if softcap is not None else 1.0, 1.0 / float(softcap) if softcap else 1.0,
        HAS_SOFTCAP=softcap is not None, COMPUTE_LSE=compute_lse, WRITE_GRAD=write_grad,
        HW_TANH=softcap is not None and hardware_tanh(logits), BV=bv, num_warps=warps)


def _chunked_pass(h, weight, targets, lse, target_logit, g_loss, g_lp, z_loss, softcap,
                  chunk_rows, logits_dtype, compute_lse: bool, want_dh: bool, want_dw: bool):
    """Walk the rows chunk by chunk. Fills lse / target_logit (if compute_lse) and returns
    (dh, dW) for the row gradients g_loss / g_lp (each None when not wanted)."""
    N, D = h.shape
    V = weight.shape[0]
    write_grad = want_dh or want_dw
    n_max = min(chunk_rows, N)
    same_dtype = logits_dtype == h.dtype
    buf = torch.empty((n_max, V), dtype=h.dtype, device=h.device) if same_dtype else None
    grad_buf = torch.empty((n_max, V), dtype=h.dtype, device=h.device) if write_grad and not same_dtype else None
    dh = torch.empty(h.shape, dtype=h.dtype, device=h.device) if want_dh else None
    dW = torch.zeros_like(weight) if want_dw and N == 0 else None
    with torch.autocast(h.device.type, enabled=False):   # the dtypes are chosen here, not by autocast
        for r0 in range(0, N, chunk_rows):
            r1 = min(N, r0 + chunk_rows)
            h_c = h[r0:r1]
            logits = _chunk_logits(h_c, weight, buf)
            grad = None
            if write_grad:
                grad = grad_buf[:r1 - r0] if grad_buf is not None else logits
            _launch_rows(logits, grad, targets[r0:r1], lse[r0:r1],
                         target_logit[r0:r1] if compute_lse else None,
                         g_loss[r0:r1] if write_grad else None, g_lp[r0:r1] if write_grad else None,
                         z_loss, softcap, compute_lse, write_grad)
            if want_dh:
                torch.mm(grad, weight, out=dh[r0:r1])
            if want_dw:
                if dW is None:
                    dW = torch.mm(grad.t(), h_c)
                else:
                    dW.addmm_(grad.t(), h_c)
            del logits, grad
    return dh, dW


class _LinearCrossEntropyFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index, reduction, z_loss, softcap, return_logprobs,
                chunk_rows, logits_dtype):
        N = h.shape[0]
        valid = targets != ignore_index
        lse = torch.empty(N, dtype=torch.float32, device=h.device)
        target_logit = torch.empty(N, dtype=torch.float32, device=h.device)
        want_dh, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # Reduced loss, no logprobs: every row's output gradient is one scalar, known up to that
        # scalar now, so the gradients are made in this pass and the backward only scales them.
        eager = (want_dh or want_dw) and reduction != "none" and not return_logprobs
        g_loss = g_lp = None
        if eager:
            g_loss = valid.float()
            if reduction == "mean":
                g_loss = torch.where(valid, 1.0 / valid.sum().float(), 0.0)
            g_lp = torch.zeros_like(g_loss)
        dh, dW = _chunked_pass(h, weight, targets, lse, target_logit, g_loss, g_lp, z_loss, softcap,
                               chunk_rows, logits_dtype, compute_lse=True,
                               want_dh=eager and want_dh, want_dw=eager and want_dw)
        zero = torch.zeros((), device=h.device)
        loss = torch.where(valid, lse - target_logit + z_loss * lse.square(), zero)
        logprobs = torch.where(valid, target_logit - lse, zero)
        ctx.eager = eager
        ctx.consumed = False
        ctx.cfg = (reduction, z_loss, softcap, chunk_rows, logits_dtype)
        if eager:
            ctx.save_for_backward(dh, dW)
        else:
            ctx.save_for_backward(h, weight, targets, valid, lse)
        return reduce_loss(loss, valid, reduction), logprobs

    @staticmethod
    def backward(ctx, g_out, g_logprobs):
        if ctx.eager:
            if ctx.consumed:
                raise RuntimeError("linear_cross_entropy: backward through the same graph twice is "
                                   "not supported (its gradients are scaled in place)")
            ctx.consumed = True
            dh, dW = ctx.saved_tensors
            dh = dh.mul_(g_out.to(dh.dtype)) if dh is not None else None
            dW = dW.mul_(g_out.to(dW.dtype)) if dW is not None else None
            return dh, dW, None, None, None, None, None, None, None, None
        h, weight, targets, valid, lse = ctx.saved_tensors
        reduction, z_loss, softcap, chunk_rows, logits_dtype = ctx.cfg
        N = h.shape[0]
        zero = torch.zeros((), device=h.device)
        if g_out is None:
            g_loss = torch.zeros(N, dtype=torch.float32, device=h.device)
        elif reduction == "none":
            g_loss = torch.where(valid, g_out.float(), zero)
        elif reduction == "sum":
            g_loss = torch.where(valid, g_out.float().expand(N), zero)
        else:
            g_loss = torch.where(valid, g_out.float() / valid.sum().float(), zero)
        g_lp = torch.where(valid, g_logprobs.float(), zero) if g_logprobs is not None else torch.zeros_like(g_loss)
        dh, dW = _chunked_pass(h, weight, targets, lse, None, g_loss.contiguous(), g_lp.contiguous(),
                               z_loss, softcap, chunk_rows, logits_dtype, compute_lse=False,
                               want_dh=ctx.needs_input_grad[0], want_dw=ctx.needs_input_grad[1])
        return dh, dW, None, None, None, None, None, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, reduction: str = "sum", z_loss: float = 0.0,
                         softcap: float | None = None, return_logprobs: bool = False,
                         chunk_rows: int | None = None, logits_dtype: torch.dtype | None = None,
                         check_targets: bool = True):
    """h: [N, D], weight: [V, D], targets: int [N]. Returns loss (fp32; scalar for sum/mean,
    [N] for none) and, if return_logprobs, logprobs [N] (fp32, 0 where ignored).
    chunk_rows bounds the [chunk_rows, V] logits buffer (default `default_chunk_rows(N)`);
    logits_dtype is h.dtype (default) or torch.float32. check_targets=False: the caller has
    checked the targets (on the host, e.g. train/loss.py `checked_target_count`), so nothing is read
    back from the device (the check synchronises; an unchecked out-of-range target is masked by
    the kernel, not read out of bounds, but its loss is wrong)."""
    check_lce_inputs(h, weight, targets, reduction, softcap)
    if check_targets:
        check_target_values(targets, weight.shape[0], ignore_index)
    logits_dtype = h.dtype if logits_dtype is None else logits_dtype
    if logits_dtype not in (h.dtype, torch.float32):
        raise ValueError(f"linear_cross_entropy: logits_dtype must be h.dtype or float32, got {logits_dtype}")
    if chunk_rows is None:
        # Buffer bytes per logit: the logits, plus a separate h-dtype gradient when they differ.
        width = logits_dtype.itemsize + (h.dtype.itemsize if logits_dtype != h.dtype else 0)
        chunk_rows = default_chunk_rows(h.shape[0], width)
    if chunk_rows < 1:
        raise ValueError(f"linear_cross_entropy: chunk_rows must be >= 1, got {chunk_rows}")
    h = h if h.stride(-1) == 1 else h.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    loss, logprobs = _LinearCrossEntropyFn.apply(h, weight, targets.contiguous(), int(ignore_index),
                                                 reduction, float(z_loss), softcap, return_logprobs,
                                                 chunk_rows, logits_dtype)
    return (loss, logprobs) if return_logprobs else loss
