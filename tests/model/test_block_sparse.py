"""Block-sparse attention layers (model/block_sparse.py; `B` in model.window_pattern): the masks
against the rule written out, the neutral stride, caches, packed documents, FlexAttention."""
from dataclasses import replace

import pytest
import torch

from deepwish.config import ConfigError
from deepwish.model import Transformer
from deepwish.model.block_sparse import (block_sparse_mask, flex_block_sparse_mask, mean_visible_keys,
                                         visible_reference)
from tests.model.test_gpt_family import BASE

SPARSE = replace(BASE, window_pattern="BL", sparse_local=1, sparse_stride=2, fused_qkv=True, n_kv_heads=4,
                 value_embeds=1, unet_skips=True, residual_scales=True, attn_softcap=20.0)


@pytest.mark.parametrize("local,stride", [(1, 0), (1, 2), (2, 3), (1, 1)])
def test_mask_is_the_rule(local, stride):
    pos = torch.tensor([list(range(0, 700, 7))])
    m = block_sparse_mask(pos, pos, local, stride)[0, 0]
    assert m.tolist() == visible_reference(pos[0].tolist(), pos[0].tolist(), local, stride)
    if stride == 1:  # every earlier block linked: full causal
        assert torch.equal(m, torch.ones_like(m).tril())


def test_mean_visible_keys_counts_the_mask():
    T = 700
    pos = torch.arange(T)[None]
    for local, stride in [(1, 0), (2, 3), (1, 1)]:
        m = block_sparse_mask(pos, pos, local, stride)
        assert mean_visible_keys(T, local, stride) == pytest.approx(m.sum().item() / T)


def test_flex_block_mask_equals_the_dense_mask():
    from torch.nn.attention.flex_attention import flex_attention
    T = 512
    pos = torch.cat([torch.arange(200), torch.arange(312)])[None]
    doc = torch.tensor([[0] * 200 + [1] * 312])
    q, k, v = (torch.randn(1, 2, T, 8) for _ in range(3))
    bm = flex_block_sparse_mask(pos, doc, 1, 2)
    out = flex_attention(q, k, v, block_mask=bm)
    dense = block_sparse_mask(pos, pos, 1, 2, doc, doc)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_neutral_stride_is_the_plain_block():
    torch.manual_seed(0)
    plain = Transformer(BASE).eval()
    sparse = Transformer(replace(BASE, window_pattern="B", sparse_local=1, sparse_stride=1)).eval()
    sparse.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 97, (1, 300))
    torch.testing.assert_close(sparse(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)
    cut = Transformer(replace(BASE, window_pattern="B", sparse_local=1, sparse_stride=2)).eval()
    cut.load_state_dict(plain.state_dict())
    assert not torch.allclose(cut(ids).logits, plain(ids).logits)
    assert torch.allclose(cut(ids).logits[:, :128], plain(ids).logits[:, :128], atol=1e-5)  # block 0 sees all


def test_prefill_decode_and_packed_documents():
    torch.manual_seed(0)
    model = Transformer(SPARSE).eval()
    T, P = 300, 297  # block 2 links to block 0 (stride 2), not to block 1
    ids = torch.randint(0, 97, (1, T))
    full = model(ids).logits
    cache = model.make_cache(1, 300)
    pos = torch.arange(T)[None]
    pre = model(ids[:, :P], positions=pos[:, :P], cache=cache).logits
    steps = [model(ids[:, t:t + 1], positions=pos[:, t:t + 1], cache=cache).logits for t in range(P, T)]
    torch.testing.assert_close(torch.cat([pre] + steps, 1), full, rtol=1e-4, atol=1e-4)
    a, b = ids[:, :40], ids[:, 40:]
    doc = torch.tensor([[0] * 40 + [1] * 260])
    dpos = torch.cat([torch.arange(40), torch.arange(260)])[None]
    out = model(ids, positions=dpos, doc_ids=doc).logits
    torch.testing.assert_close(out[:, :40], model(a).logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 40:], model(b).logits, rtol=1e-5, atol=1e-5)


def test_config_errors():
    with pytest.raises(ConfigError, match="sparse_local"):
        replace(BASE, window_pattern="B")
    with pytest.raises(ConfigError, match="triton"):
        Transformer(replace(SPARSE, attn_backend="triton"))
    assert replace(BASE, window_pattern="SB", window_short=1, sparse_local=2).layer_windows == (128, 0, 128, 0)


@pytest.mark.gpu
def test_flex_block_sparse_layers_equal_the_dense_mask_on_cuda(cuda, rel_err):
    """auto takes FlexAttention for B layers on CUDA (the own kernel has no block links); forward and
    backward against the dense-mask SDPA path, bf16 autocast, packed documents."""
    ids = torch.randint(0, 97, (2, 640), device=cuda)
    doc = torch.tensor([[0] * 300 + [1] * 340, [0] * 640], device=cuda)
    pos = torch.cat([torch.arange(300), torch.arange(340)]).to(cuda).expand(2, 640).clone()
    pos[1] = torch.arange(640, device=cuda)
    outs, grads = [], []
    for backend in ("auto", "sdpa"):
        torch.manual_seed(0)
        model = Transformer(replace(SPARSE, attn_backend=backend, head_dim=16)).to(cuda)
        assert model.blocks[0].mixer.sparse_backend == ("flex" if backend == "auto" else "sdpa")
        with torch.autocast("cuda", torch.bfloat16):
            out = model(ids, positions=pos, doc_ids=doc, targets=ids)
        out.loss.backward()
        outs.append(out.loss.detach().float())
        grads.append(model.blocks[0].mixer.qkv_weight.grad.float())
    assert abs(outs[0] - outs[1]) < 2e-2
    assert rel_err(grads[1], grads[0]) < 5e-2
