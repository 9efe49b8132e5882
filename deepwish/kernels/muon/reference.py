"""Muon's step in plain torch: the torch backend's Newton–Schulz (`newton_schulz`: cuBLAS bmm /
baddbmm in the compute dtype) and, in fp32 arithmetic, the ops `triton.py` fuses.

Newton–Schulz (train/muon.py) is X <- a X + (b A + c A²) X with A = X Xᵀ. Written with these ops:
    A = gram(X, scale=s²)             A = s² X Xᵀ       (s: the per-matrix Frobenius normalisation,
    B = gram(A, c, b, A)              B = b A + c A Aᵀ   folded into the first iteration only)
    X = ns_update(B, X, X, a, s)      X = s (a X + B X)
Both Gram products are symmetric (A and A² = A Aᵀ), which is what the kernel exploits.
"""
from __future__ import annotations

import torch


def newton_schulz(G: torch.Tensor, coeffs, f: float, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """train/muon.py newton_schulz's torch path (the `torch` backend: cuBLAS bmm / baddbmm), for
    explicit coefficients (train/muon.py ns_coefficients) and the matmuls' dtype."""
    m, n = G.shape[-2:]
    G3 = G.reshape(-1, m, n)
    # Frobenius normalisation bounds the spectral norm by 1, inside the iteration's basin; the norm
    # and the division in fp32 (out= rounds once, to the compute dtype).
    norm = torch.linalg.vector_norm(G3, dim=(-2, -1), keepdim=True, dtype=torch.promote_types(G.dtype, torch.float32))
    X = torch.empty(G3.shape, dtype=dtype, device=G.device)
    torch.mul(G3, 1.0 / (norm * f + eps), out=X)
    # A tall X (m > n) keeps its layout: the iteration on W = X^T (A = W W^T = X^T X, W <- a W + B W)
    # transposed is X <- a X + X B (B is symmetric), so the Gram matrix is the smaller one and
    # every operand and result stays contiguous (no transposed copies before the update).
    for a, b, c in coeffs:
        if m > n:
            A = torch.bmm(X.mT, X)
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
            X = torch.baddbmm(X, X, B, beta=a, alpha=1.0)  # a X + X B
        else:
            A = torch.bmm(X, X.mT)
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)
            X = torch.baddbmm(X, B, X, beta=a, alpha=1.0)  # a X + B X
    return X.reshape(G.shape).to(G.dtype)


def gram(P: torch.Tensor, alpha: float = 1.0, beta: float = 0.0, Y: torch.Tensor | None = None,
         scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
         other: torch.Tensor | None = None) -> torch.Tensor:
    """alpha · scale_i · P_i P_iᵀ + beta · Y_i for each i of P [N, M, K] (Y [N, M, M] symmetric,
    scale [N] fp32); returned in `out_dtype` (P's by default). other [N, M, K]: P_i otherᵢᵀ instead,
    for products the caller knows to be symmetric, made exactly so from the upper triangle as the
    kernel makes it from its upper tiles (the rounding of a product of two operands is not symmetric,
    and the Gram recurrence drifts when it is kept)."""
    P32 = P.float()
    C = alpha * (P32 @ (P32 if other is None else other.float()).mT)
    if other is not None:
        C = torch.triu(C) + torch.triu(C, 1).mT
    if scale is not None:
        C = C * scale.float().view(-1, 1, 1)
    if Y is not None:
        C = C + beta * Y.float()
    return C.to(out_dtype or P.dtype)


GRAM_NS_RESTART = 2  # the iteration before which the Gram form restarts from X (with 4+ iterations)


def gram_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype `gram_newton_schulz` iterates in for matmul operands in `dtype` (its docstring: why fp16)."""
    return torch.float32 if dtype == torch.float32 else torch.float16


def gram_newton_schulz(G: torch.Tensor, coeffs, f: float, eps: float, dtype: torch.dtype,
                       sumsq: torch.Tensor | None = None, restart: int = GRAM_NS_RESTART, gram=gram,
                       out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The same iteration carried on the Gram matrix (Zhang, Amsel, Chen, Dao 2026, "Gram
    Newton–Schulz"). With X wide (d x D, d <= D) every iterate is X_k = Q_k X_0, Q_k a polynomial in
    R_0 = X_0 X_0ᵀ, so the d x D products are needed only to form R_0 and the result: per iteration
        P = a I + b R + c R²,   Q <- Q P,   R <- P R P,
    d x d products that are all symmetric (Q, R and P are polynomials in one symmetric matrix, so
    they commute): `gram` (this module's, or triton.py's kernel computing the upper tiles only) with
    `other` for the products of two. Before iteration `restart` (with more iterations than that
    plus one) it starts again from X <- Q X_0, R <- X Xᵀ, Q <- I: without it the d x d recurrences
    drift in half precision. Half-precision operands are fp16 (its 11-bit mantissa: the recurrence
    in bf16 lands further from the exact iteration than the plain iteration in bf16; in fp16 nearer,
    tests/kernels/test_muon_kernels.py); X_0 is normalised, so X, R and P stay well inside fp16's
    range. Per matrix this trades 2·k·d²·D FLOPs of updates for 4·d²·D (the restart and the result)
    plus ~4·k·d³: a gain when D is several times d (Qwen3's gate/up [6144, 1024]). The result is
    contiguous in G's layout (a tall G's Oᵀ = Xwᵀ Q, Q symmetric: no transposed copy) and in
    `out_dtype` (None: G's; the iteration's own dtype skips a cast pass where the caller reads any)."""
    half = gram_dtype(dtype)
    m, n = G.shape[-2:]
    G3 = G.reshape(-1, m, n)
    norm = sumsq.float().sqrt() if sumsq is not None else torch.linalg.vector_norm(G3.float(), dim=(-2, -1))
    X = torch.empty(G3.shape, dtype=half, device=G.device)
    torch.mul(G3, (1.0 / (norm * f + eps)).view(-1, 1, 1), out=X)  # one pass, rounded once (no fp32 copy)
    Xw = X.mT if m > n else X  # wide: d x D, d <= D
    R = gram(Xw)
    Q = None
    for k, (a, b, c) in enumerate(coeffs):
        if k == restart and len(coeffs) > restart + 1:
            Xw = torch.bmm(Q, Xw)
            R = gram(Xw)
            Q = None
        P = gram(R, alpha=c, beta=b, Y=R)  # b R + c R Rᵀ
        P.diagonal(dim1=-2, dim2=-1).add_(a)
        Q = P if Q is None else gram(Q, other=P)
        if k < len(coeffs) - 1:
            R = gram(P, other=gram(R, other=P))  # P (R P)
    O = torch.bmm(Xw.mT, Q) if m > n else torch.bmm(Q, Xw)
    return O.reshape(G.shape).to(out_dtype or G.dtype)


def ns_update(L: torch.Tensor, R: torch.Tensor, Y: torch.Tensor, a: float,
              scale: torch.Tensor | None = None) -> torch.Tensor:
    """scale_i · (a · Y_i + L_i R_i) for each i (L [N, M, K], R [N, K, N'], Y [N, M, N']), in Y's dtype."""
    C = a * Y.float() + L.float() @ R.float()
    if scale is not None:
        C = C * scale.float().view(-1, 1, 1)
    return C.to(Y.dtype)


def momentum_stack(grads: list[torch.Tensor], bufs: list[torch.Tensor], mu: float, nesterov: bool,
                   dtype: torch.dtype, grad_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Momentum m <- mu m + g (bufs updated in place) and the stacked update u = g + mu m (Nesterov)
    or m, rounded once to `dtype`. Returns (U [N, *shape], sum of squares of each rounded u_i [N] fp32).
    grad_scale: a 0-d tensor each gradient is divided by as it is read (clipping's 1 / coefficient,
    torch's fused-optimizer protocol); the gradients themselves are left as they are."""
    us = []
    for g, m in zip(grads, bufs):
        g = g.float() if grad_scale is None else g.float() / grad_scale.float()
        m.copy_(mu * m.float() + g.float())
        us.append((g.float() + mu * m.float()) if nesterov else m.float())
    U = torch.stack(us).to(dtype)
    return U, U.float().square().flatten(1).sum(1)


def apply_update(params: list[torch.Tensor], O: torch.Tensor, decay: float, alpha: float) -> None:
    """p_i <- decay · p_i + alpha · O_i, in place (the decoupled weight decay and the step)."""
    for p, o in zip(params, O.unbind(0)):
        p.copy_(decay * p.float() + alpha * o.float())
