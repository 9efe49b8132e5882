"""Qwen3 model mechanics: MoE grouping, routing, rotary, attention paths, caches."""
import math

import pytest
import torch
import torch.nn.functional as F

from deepwish.config import ModelConfig, model_config
from deepwish.model.attention import sdpa
from deepwish.model.moe import MoE, grouped_swiglu, route_softmax
from deepwish.model.rope import apply_rotary, rope_frequencies
from deepwish.model.transformer import Transformer


def loop_experts(x, idx, w, w_gate_up, w_down):
    """Readable oracle: one token and one expert at a time."""
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = idx[n, j]
            g, u = (w_gate_up[e] @ x[n]).chunk(2)
            out[n] += w[n, j] * (w_down[e] @ (F.silu(g) * u))
    return out


@pytest.mark.parametrize("k", [1, 2, 3])
def test_grouped_experts_equal_loop(k, rel_err):
    E, d, inner, N = 5, 12, 8, 37
    x = torch.randn(N, d)
    wgu, wd = torch.randn(E, 2 * inner, d), torch.randn(E, d, inner)
    w, idx, _ = route_softmax(torch.randn(N, E), k, True)
    assert rel_err(loop_experts(x, idx, w, wgu, wd), grouped_swiglu(x, idx, w, wgu, wd)) < 1e-6


def test_grouped_experts_gradients(rel_err):
    E, d, inner, N, k = 4, 8, 6, 19, 2
    x = torch.randn(N, d, requires_grad=True)
    wgu = torch.randn(E, 2 * inner, d, requires_grad=True)
    wd = torch.randn(E, d, inner, requires_grad=True)
    w, idx, _ = route_softmax(torch.randn(N, E), k, False)
    g = torch.randn(N, d)
    (loop_experts(x, idx, w, wgu, wd) * g).sum().backward()
    ref = [t.grad.clone() for t in (x, wgu, wd)]
    for t in (x, wgu, wd):
        t.grad = None
    (grouped_swiglu(x, idx, w, wgu, wd) * g).sum().backward()
    for r, t in zip(ref, (x, wgu, wd)):
        assert rel_err(r, t.grad) < 1e-6


def test_softmax_router_norm_topk():
    logits = torch.randn(10, 6)
    w, idx, probs = route_softmax(logits, 2, True)
    assert torch.allclose(w.sum(-1), torch.ones(10))
    w2, idx2, _ = route_softmax(logits, 2, False)
    assert torch.equal(idx, idx2)
    assert torch.allclose(w2, probs.gather(1, idx))


def test_moe_records_counts_and_aux_loss():
    cfg = model_config("qwen3_moe_tiny", n_layers=2)
    m = Transformer(cfg).train()
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    out = m(x, targets=x)
    assert sorted(out.moe_loads) == [0, 1]
    for load in out.moe_loads.values():
        assert int(load.sum()) == 2 * 16 * cfg.n_experts_per_tok
    assert out.aux_losses["moe"].requires_grad and float(out.aux_losses["moe"].detach()) > 0


def test_yarn_frequencies_interpolate_low_frequencies():
    base = ModelConfig(rope_theta=10000.0, head_dim=64)
    yarn = ModelConfig(rope_theta=10000.0, head_dim=64, rope_type="yarn", rope_factor=8.0, rope_original_max_len=512)
    f0, a0 = rope_frequencies(base, 64)
    f1, a1 = rope_frequencies(yarn, 64)
    assert a0 == 1.0 and math.isclose(a1, 0.1 * math.log(8.0) + 1.0)
    assert torch.allclose(f1[0], f0[0])  # highest frequency kept
    assert torch.allclose(f1[-1], f0[-1] / 8.0)  # lowest frequency interpolated


def test_rotary_preserves_norm_and_partial_passthrough():
    x = torch.randn(2, 5, 3, 16)
    inv = 1.0 / (10000 ** (torch.arange(0, 8, 2) / 8))  # rotate 8 of 16 channels
    pos = torch.arange(5).expand(2, 5).float()
    cos, sin = (pos[..., None] * inv).cos(), (pos[..., None] * inv).sin()
    for inter in (False, True):
        y = apply_rotary(x, cos, sin, interleave=inter)
        assert torch.allclose(y[..., 8:], x[..., 8:])
        assert torch.allclose(y[..., :8].norm(dim=-1), x[..., :8].norm(dim=-1), atol=1e-5)


def test_sdpa_and_explicit_softmax_agree(rel_err):
    q, k, v = torch.randn(2, 4, 9, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    a = sdpa(q, k, v, None, 8 ** -0.5, True, "sdpa")
    b = sdpa(q, k, v, None, 8 ** -0.5, True, "torch")
    assert rel_err(b, a) < 1e-5


def test_packed_documents_equal_separate_runs(rel_err):
    cfg = model_config("qwen3_tiny", n_layers=2)
    m = Transformer(cfg).eval()
    a, b = torch.randint(0, cfg.vocab_size, (1, 7)), torch.randint(0, cfg.vocab_size, (1, 12))
    packed = torch.cat([a, b], 1)
    doc = torch.tensor([[0] * 7 + [1] * 12])
    pos = torch.cat([torch.arange(7), torch.arange(12)])[None]
    with torch.no_grad():
        out = m(packed, positions=pos, doc_ids=doc).logits
        assert rel_err(m(a).logits, out[:, :7]) < 1e-5
        assert rel_err(m(b).logits, out[:, 7:]) < 1e-5


def test_training_step_reduces_loss():
    torch.manual_seed(0)
    cfg = model_config("qwen3_moe_tiny", n_layers=2, vocab_size=64)
    m = Transformer(cfg).train()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    x = torch.randint(0, 64, (4, 33))
    losses = []
    for _ in range(15):
        logits = m(x[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, 64), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
