"""Gated delta rule (Gated DeltaNet / Qwen3-Next linear attention).

`reference` holds the pure-torch fp32 references (importable everywhere); the Triton kernels are
imported on first use, so this package imports without Triton and the Triton entry points raise a
clear error when it is missing."""
from __future__ import annotations

from deepwish.kernels.gated_delta.reference import (chunk_gated_delta_rule_ref, naive_recurrent_gated_delta_rule,
                                                    recurrent_gated_delta_step_ref)


def _triton_module():
    try:
        from deepwish.kernels.gated_delta import triton as triton_impl
    except ImportError as e:  # triton itself missing (CPU-only torch without the triton package)
        raise ImportError(f"gated delta: the Triton path needs the `triton` package ({e}); "
                          "use the torch references (chunk_gated_delta_rule_ref) instead") from e
    return triton_impl


def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                           cu_seqlens=None, use_qk_l2norm=False):
    """Triton chunked gated delta rule (forward + backward); see `triton.chunk_gated_delta_rule`."""
    return _triton_module().chunk_gated_delta_rule(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                                   output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                                                   use_qk_l2norm=use_qk_l2norm)


def fused_recurrent_gated_delta_step(q, k, v, g, beta, state, scale=None, use_qk_l2norm=False):
    """Triton one-step decode, updating `state` in place; see `triton.fused_recurrent_gated_delta_step`."""
    return _triton_module().fused_recurrent_gated_delta_step(q, k, v, g, beta, state, scale=scale,
                                                             use_qk_l2norm=use_qk_l2norm)


__all__ = ["chunk_gated_delta_rule", "chunk_gated_delta_rule_ref", "fused_recurrent_gated_delta_step",
           "naive_recurrent_gated_delta_rule", "recurrent_gated_delta_step_ref"]
