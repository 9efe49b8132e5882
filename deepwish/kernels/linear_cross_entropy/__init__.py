"""Fused LM head + cross-entropy: `reference` (plain torch, materialises the logits; the CPU path
and test oracle) and `triton` (chunked cuBLAS + Triton, bounded memory). The caller picks one
explicitly via `deepwish.kernels.resolve_backend`."""
from deepwish.kernels.linear_cross_entropy import reference

__all__ = ["reference"]
