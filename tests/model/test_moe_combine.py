"""The MoE combine (each token's k weighted expert outputs summed) is deterministic: its result
does not depend on the order in which experts are processed, and the decode step issues no
floating-point accumulation by scatter (index_add_ / scatter_add_ / index_put_(accumulate)),
which CUDA runs with atomic adds in an order that changes from run to run. Such an op made two
runs of one bf16 decode step (eager, or replayed from a CUDA graph) pick different greedy tokens."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from deepwish.config import model_config
from deepwish.generate import decode_one_token, prefill
from deepwish.model.moe import grouped_swiglu
from deepwish.model.transformer import Transformer

# aten ops that accumulate into a destination through an index: CUDA implements them with atomics
ACCUMULATING = {"aten.index_add_.default", "aten.index_add.default", "aten.scatter_add_.default",
                "aten.scatter_add.default", "aten.scatter_reduce_.two", "aten.scatter_reduce.two",
                "aten.index_reduce_.default", "aten.index_reduce.default", "aten._index_put_impl_.default"}


class FloatAccumulations(TorchDispatchMode):
    """Records the accumulating ops that were called on a floating-point destination."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        accumulate = name in ACCUMULATING or (name in ("aten.index_put_.default", "aten.index_put.default")
                                              and (kwargs.get("accumulate") or (len(args) > 3 and args[3])))
        if accumulate and args[0].is_floating_point():
            self.found.append(name)
        return func(*args, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_does_not_depend_on_expert_order(dtype):
    """Relabelling the experts (and permuting their weights to match) changes the order in which
    their outputs are produced, never the result: bit for bit, fp32 and bf16."""
    N, d, E, k, inner = 64, 96, 8, 4, 32
    x = torch.randn(N, d).to(dtype)
    wgu = (torch.randn(E, 2 * inner, d) * 0.2).to(dtype)
    wd = (torch.randn(E, d, inner) * 0.2).to(dtype)
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(N)])
    w = torch.rand(N, k).softmax(-1)
    perm = torch.randperm(E)  # expert e is called perm[e]
    inv = torch.argsort(perm)
    a = grouped_swiglu(x, idx, w, wgu, wd)
    b = grouped_swiglu(x, perm[idx], w, wgu[inv], wd[inv])
    assert torch.equal(a, b)


def test_decode_step_accumulates_nothing_by_scatter():
    """One decode step of a Qwen3-Next MoE model (Gated DeltaNet + gated attention + experts)."""
    model = Transformer(model_config("qwen3_next_tiny")).eval()
    cache = model.make_cache(2, 16)
    prefill(model, torch.tensor([[1, 2, 3], [4, 5, 6]]), cache)
    with FloatAccumulations() as rec:
        decode_one_token(model, torch.tensor([7, 8]), torch.tensor([3, 3]), cache)
    assert rec.found == []
