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
         scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """alpha · scale_i · P_i P_iᵀ + beta · Y_i for each i of P [N, M, K] (Y [N, M, M] symmetric,
    scale [N] fp32); returned in `out_dtype` (P's by default)."""
    P32 = P.float()
    C = alpha * (P32 @ P32.mT)
    if scale is not None:
        C = C * scale.float().view(-1, 1, 1)
    if Y is not None:
        C = C + beta * Y.float()
    return C.to(out_dtype or P.dtype)


def ns_update(L: torch.Tensor, R: torch.Tensor, Y: torch.Tensor, a: float,
              scale: torch.Tensor | None = None) -> torch.Tensor:
    """scale_i · (a · Y_i + L_i R_i) for each i (L [N, M, K], R [N, K, N'], Y [N, M, N']), in Y's dtype."""
    C = a * Y.float() + L.float() @ R.float()
    if scale is not None:
        C = C * scale.float().view(-1, 1, 1)
    return C.to(Y.dtype)


def momentum_stack(grads: list[torch.Tensor], bufs: list[torch.Tensor], mu: float, nesterov: bool,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Momentum m <- mu m + g (bufs updated in place) and the stacked update u = g + mu m (Nesterov)
    or m, rounded once to `dtype`. Returns (U [N, *shape], sum of squares of each rounded u_i [N] fp32)."""
    us = []
    for g, m in zip(grads, bufs):
        m.copy_(mu * m.float() + g.float())
        us.append((g.float() + mu * m.float()) if nesterov else m.float())
    U = torch.stack(us).to(dtype)
    return U, U.float().square().flatten(1).sum(1)


def apply_update(params: list[torch.Tensor], O: torch.Tensor, decay: float, alpha: float) -> None:
    """p_i <- decay · p_i + alpha · O_i, in place (the decoupled weight decay and the step)."""
    for p, o in zip(params, O.unbind(0)):
        p.copy_(decay * p.float() + alpha * o.float())
