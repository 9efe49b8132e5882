"""Muon's optimizer step on the GPU: `reference` (plain torch, fp32: the definition of each fused op
and the test oracle) and `triton` (the fused momentum/stack pass, the symmetric Gram products and
the fused update of Newton–Schulz, and the fused parameter update). The whole Newton–Schulz
iteration's torch path is `deepwish.train.muon.newton_schulz`; Muon picks one backend explicitly
(`train.muon_backend`)."""
from deepwish.kernels.muon import reference

__all__ = ["reference"]
