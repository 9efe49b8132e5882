"""Every linear layer of the model is called as a module in a training forward, so forward hooks
(the non-finite locator, activation probes), FSDP wrapping and adapters that wrap or replace a
projection see every call: a projection read as `.weight` beside its module would be skipped
silently. (Without gradients the q/k/v projections may run as one fused matmul,
model.fuse_projections, by design; this is the training path.)"""
import pytest
import torch
from torch import nn

from deepwish.config import model_config
from deepwish.model.transformer import Transformer


@pytest.mark.parametrize("preset", ["qwen3_tiny", "qwen3_moe_tiny", "qwen3_next_tiny", "deepseek_v3_tiny",
                                    "qwen3_nsa_tiny", "gpt_tiny", "gpt2_baseline_tiny"])
def test_every_linear_layer_runs_its_forward(preset):
    torch.manual_seed(0)
    model = Transformer(model_config(preset)).train()
    called = set()
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert linears
    for name, m in linears.items():
        m.register_forward_hook(lambda mod, args, out, name=name: called.add(name))
    ids = torch.randint(0, model.cfg.vocab_size, (2, 24))
    model(ids, targets=ids).loss.backward()
    # The tied head's embedding is not an nn.Linear; MTP heads run only with mtp targets.
    missing = sorted(n for n in set(linears) - called if ".mtp" not in f".{n}" and not n.startswith("mtp"))
    assert not missing, f"{preset}: read as weights, not called: {missing}"
