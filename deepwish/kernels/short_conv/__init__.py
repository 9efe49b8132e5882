"""Short depthwise causal conv1d (Gated DeltaNet / Mamba style): `reference` (pure torch, the CPU
path and test oracle) and `triton` (fused forward/backward and the decode update). The caller
picks one explicitly via `deepwish.kernels.resolve_backend`."""
from deepwish.kernels.short_conv import reference

__all__ = ["reference"]
