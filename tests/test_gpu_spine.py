"""GPU checks of the spine (run on the device machine: pytest -m gpu)."""
import pytest
import torch

from deepwish.config import model_config
from deepwish.generate import generate
from deepwish.model.moe import grouped_swiglu, route_softmax
from deepwish.model.transformer import Transformer

pytestmark = pytest.mark.gpu


def test_qwen3_cuda_fp32_matches_cpu(cuda, rel_err):
    torch.manual_seed(0)
    m = Transformer(model_config("qwen3_moe_tiny")).eval()
    x = torch.randint(0, m.cfg.vocab_size, (2, 64))
    with torch.no_grad():
        ref = m(x).logits
        out = m.to(cuda)(x.to(cuda)).logits.cpu()
    assert rel_err(ref, out) < 1e-3  # tf32 matmuls may be on


def test_qwen3_bf16_close_and_greedy(cuda, rel_err):
    torch.manual_seed(0)
    m = Transformer(model_config("qwen3_tiny")).eval().to(cuda)
    x = torch.randint(0, m.cfg.vocab_size, (2, 128), device=cuda)
    with torch.no_grad():
        ref = m(x).logits.float()
        mb = m.to(torch.bfloat16)
        out = mb(x).logits.float()
    assert rel_err(ref, out) < 3e-2
    a = generate(mb, [[1, 2, 3], [4, 5]], 16)
    b = [generate(mb, [p], 16)[0] for p in ([1, 2, 3], [4, 5])]
    assert a == b


def test_grouped_mm_matches_padded_path(cuda, rel_err):
    E, d, inner, N, k = 8, 256, 128, 1000, 2
    x = torch.randn(N, d, device=cuda, dtype=torch.bfloat16)
    wgu = torch.randn(E, 2 * inner, d, device=cuda, dtype=torch.bfloat16) * 0.05
    wd = torch.randn(E, d, inner, device=cuda, dtype=torch.bfloat16) * 0.05
    w, idx, _ = route_softmax(torch.randn(N, E, device=cuda), k, True)
    fast = grouped_swiglu(x, idx, w, wgu, wd)
    slow = grouped_swiglu(x.float(), idx, w, wgu.float(), wd.float())
    assert rel_err(slow, fast.float()) < 2e-2


def test_sdpa_training_step_bf16(cuda):
    torch.manual_seed(0)
    m = Transformer(model_config("qwen3_tiny")).to(cuda)
    x = torch.randint(0, m.cfg.vocab_size, (4, 257), device=cuda)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        with torch.autocast("cuda", torch.bfloat16):
            logits = m(x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
