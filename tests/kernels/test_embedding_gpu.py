"""The token-table gradient kernel at the GPT speedrun's size on the GPU: equal to torch's embedding
backward (to fp32 summation order), the same bits twice (no atomics), and through the model.
Run on the device machine: `pytest -m gpu tests/kernels/test_embedding_gpu.py`."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_table_grads_equal_torch_at_the_speedrun_size(cuda, dtype):
    from deepwish.kernels.embedding import triton as kernel
    g = torch.Generator(device=cuda).manual_seed(0)
    V, D, N = 50304, 768, 16 * 2048
    ids = torch.randint(0, V, (N,), device=cuda, generator=g)
    ids[torch.rand(N, device=cuda, generator=g) < 0.1] = 220  # a frequent token: a run of ~3,300 rows
    grads = [torch.randn(N, D, device=cuda, generator=g, dtype=dtype) for _ in range(4)]
    got = kernel.table_grads(ids, grads, V)
    again = kernel.table_grads(ids, grads, V)
    for gr, dw, dw2 in zip(grads, got, again):
        w = torch.zeros(V, D, device=cuda, requires_grad=True)
        (F.embedding(ids, w) * gr.float()).sum().backward()
        torch.testing.assert_close(dw, w.grad, rtol=1e-5, atol=1e-4)
        assert torch.equal(dw, dw2)  # deterministic


def test_gpt_model_gradients_equal_with_either_backend(cuda):
    from deepwish.config import load_config
    from deepwish.model import Transformer
    cfg = load_config("gpt_tiny").model
    ids = torch.randint(0, cfg.vocab_size, (4, 256), device=cuda)
    grads = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        model = Transformer(dataclasses.replace(cfg, embed_backend=backend)).to(cuda)
        model(ids, targets=ids).loss.backward()
        grads[backend] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for n, gt in grads["torch"].items():
        torch.testing.assert_close(grads["triton"][n], gt, rtol=1e-4, atol=1e-5, msg=n)
