"""DSA lightning-indexer scores I[t,s] = Σ_h w_h · relu(scale · q_h·k_s): `reference` (pure
torch, the reference's exact operation order, the CPU path and test oracle) and `triton`
(one fused kernel: no [Hi, S] intermediate, bf16 inputs with fp32 accumulation). The caller
(model/dsa.py, from model.dsa_backend) picks one explicitly."""
from deepwish.kernels.index_scores import reference

__all__ = ["reference"]
