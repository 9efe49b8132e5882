"""model.fuse_projections: q/k/v weights as row views of one tensor, one matmul without gradients.

The fused and the three-matmul layouts must give identical logits and greedy tokens (same
products), keep the checkpoint names, and keep the view through casts, copies and optimizer
steps; anything that breaks the view falls back to the three matmuls, never to stale weights.
"""
import copy
import dataclasses

import pytest
import torch

from deepwish.config import model_config
from deepwish.generate import decode_one_token, generate, prefill
from deepwish.model.transformer import Transformer


def _pair(preset, **kw):
    torch.manual_seed(0)
    cfg = model_config(preset, **kw)
    fused = Transformer(cfg).eval()
    plain = Transformer(dataclasses.replace(cfg, fuse_projections=False)).eval()
    plain.load_state_dict(fused.state_dict())
    return fused, plain


def _attn(model):
    return next(b.mixer for b in model.blocks if hasattr(b.mixer, "q_proj"))


@pytest.mark.parametrize("preset,kw,T,n", [
    ("qwen3_tiny", {}, 9, 4), ("qwen3_tiny", {"attn_bias": True}, 9, 4), ("qwen3_moe_tiny", {}, 9, 4),
    ("qwen3_next_tiny", {}, 9, 4), ("qwen3_nsa_tiny", {}, 9, 4),
    # NSA's compression reads k after QK-norm and before rotary (the fused path: the joint norm's k
    # heads before the joint rotary): rows long enough for compressed tokens (16-token blocks every 8)
    # and a selection among several blocks
    pytest.param("qwen3_nsa_tiny", {}, 70, 12, id="nsa-compressed-blocks")])
def test_fused_equals_three_matmuls(preset, kw, T, n):
    fused, plain = _pair(preset, **kw)
    with torch.no_grad():
        assert _attn(fused)._fused_qkv() is not None and _attn(plain)._fused_qkv() is None
    V = fused.cfg.vocab_size
    ids = torch.randint(0, V, (2, T))
    with torch.no_grad():
        assert torch.equal(fused(ids).logits, plain(ids).logits)
    # prefill + one-token steps over a cache
    steps = torch.randint(0, V, (2, n))
    outs = []
    for m in (fused, plain):
        cache = m.make_cache(2, T + n + 3)
        got = [prefill(m, ids, cache)]
        for s in range(n):
            got.append(decode_one_token(m, steps[:, s], torch.full((2,), T + s), cache))
        outs.append(torch.stack(got))
    assert torch.equal(outs[0], outs[1])
    assert generate(fused, ids, 6) == generate(plain, ids, 6)


def test_names_and_gradients_unchanged():
    fused, plain = _pair("qwen3_tiny")
    assert list(fused.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert fused.param_roles() == plain.param_roles()
    ids = torch.randint(0, fused.cfg.vocab_size, (2, 7))
    for m in (fused, plain):
        m(ids, targets=ids).loss.backward()
    for (n, a), (_, b) in zip(fused.named_parameters(), plain.named_parameters()):
        assert torch.equal(a.grad, b.grad), n


def test_view_survives_cast_copy_and_steps():
    fused, _ = _pair("qwen3_tiny")
    attn = _attn(fused)
    opt = torch.optim.AdamW(fused.parameters(), lr=0.1)
    ids = torch.randint(0, fused.cfg.vocab_size, (1, 5))
    fused(ids, targets=ids).loss.backward()
    opt.step()  # in place: the fused tensor sees the new weights
    w, _ = attn._qkv
    q, k, v = w.split(attn.qkv_sizes)
    assert torch.equal(q, attn.q_proj.weight) and torch.equal(v, attn.v_proj.weight)
    with torch.no_grad():
        assert attn._fused_qkv() is not None
        for other in (copy.deepcopy(fused), copy.deepcopy(fused).to(torch.float64)):
            a = _attn(other)
            assert a._fused_qkv() is not None and a._qkv[0].data_ptr() != w.data_ptr()
            assert a._qkv[0].dtype == a.q_proj.weight.dtype


def test_replaced_parameters_fall_back():
    """load_state_dict(assign=True) replaces the parameters: the stale fused tensor must not be used."""
    fused, plain = _pair("qwen3_tiny")
    torch.manual_seed(1)
    other = Transformer(fused.cfg).eval()
    fused.load_state_dict(other.state_dict(), assign=True)
    plain.load_state_dict(other.state_dict())
    ids = torch.randint(0, fused.cfg.vocab_size, (1, 6))
    with torch.no_grad():
        assert _attn(fused)._fused_qkv() is None
        assert torch.equal(fused(ids).logits, plain(ids).logits)


def test_meta_build_materialises_fused():
    with torch.device("meta"):
        m = Transformer(model_config("qwen3_tiny"))
    assert _attn(m)._qkv is None
    m.to_empty(device="cpu")
    m.reset_parameters()
    with torch.no_grad():
        assert _attn(m)._fused_qkv() is not None
        w, _ = _attn(m)._qkv
        assert torch.equal(w[:_attn(m).qkv_sizes[0]], _attn(m).q_proj.weight)


def test_decode_step_traces_as_one_graph():
    """torch.compile must see the fused path (and the cache writes) without a graph break: dynamo
    alone (backend eager) over the one-token forward, fullgraph, gives the eager logits exactly."""
    fused, _ = _pair("qwen3_tiny")
    V = fused.cfg.vocab_size
    ids = torch.randint(0, V, (2, 5))
    caches = [fused.make_cache(2, 8) for _ in range(2)]
    for c in caches:
        prefill(fused, ids, c)

    @torch.no_grad()
    def step(tok, pos, cache):
        return fused(tok[:, None], positions=pos[:, None], cache=cache).logits

    tok, pos = torch.tensor([3, 4]), torch.tensor([5, 5])
    traced = torch.compile(step, backend="eager", fullgraph=True)
    assert torch.equal(traced(tok, pos, caches[0]), step(tok, pos, caches[1]))
    assert torch.equal(caches[0][0].k, caches[1][0].k)
