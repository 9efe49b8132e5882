"""DSA's fast path (model.dsa_backend auto/triton: row-block indexer, indices, sparse_mla in the
absorbed form; on the CPU sparse_mla's torch reference) against the dense reference (torch):
logits, both indexer losses and every gradient, packed documents, cached decoding, the cache's
fused latent rows, the backend's resolution and its errors."""
from dataclasses import replace

import pytest
import torch

from deepwish.config import ConfigError, load_config
from deepwish.model import Objective
from deepwish.model.dsa import DSACache, resolve_dsa_backend
from deepwish.model.transformer import Transformer


def pair(*extra):
    rc = load_config("deepseek_v32_tiny", ["model.n_layers=2", "model.n_mtp=0", "model.d_model=64",
                                           "model.vocab_size=101", "model.index_topk=5", "model.index_n_heads=2",
                                           *extra])
    fast = Transformer(rc.model)
    with torch.no_grad():
        for p in fast.parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p)) if p.dim() == 1 else p.normal_(0, 0.1)
    dense = Transformer(replace(rc.model, dsa_backend="torch"))
    dense.load_state_dict(fast.state_dict())
    assert dense.blocks[0].mixer.sparse_backend is None
    return fast, dense


@pytest.mark.parametrize("mode", ["sparse", "dense_warmup"])
@pytest.mark.parametrize("packed", [False, True])
def test_fast_path_equals_dense_reference(mode, packed, rel_err):
    fast, dense = pair()
    assert fast.blocks[0].mixer.sparse_backend == "torch"  # auto on the CPU: sparse_mla's reference
    g = torch.Generator().manual_seed(0)
    x, t = torch.randint(0, 101, (2, 19), generator=g), torch.randint(0, 101, (2, 19), generator=g)
    kw = {}
    if packed:
        doc = (torch.arange(19) >= 8).long().expand(2, 19)
        kw = dict(doc_ids=doc, positions=torch.cat([torch.arange(8), torch.arange(11)]).expand(2, 19))
    obj = Objective(indexer_mode=mode, indexer_weight=1.0)
    outs = []
    for m in (dense, fast):
        out = m(x, targets=t, objective=obj, **kw)
        out.loss.backward()
        outs.append((out, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    (ref, ref_g), (got, got_g) = outs
    assert rel_err(ref.logits, got.logits) < 1e-5
    assert ref.aux_losses["indexer"].item() > 1e-3
    assert got.aux_losses["indexer"].item() == pytest.approx(ref.aux_losses["indexer"].item(), rel=1e-5)
    assert ref_g.keys() == got_g.keys() and any(".indexer." in n for n in ref_g)
    for n in ref_g:
        assert rel_err(ref_g[n], got_g[n]) < 1e-4, n


def test_sparse_selection_matters_on_the_fast_path(rel_err):
    """The equality above is not the dense attention in disguise: top-5 of 19 keys differs from it."""
    fast, _ = pair()
    x = torch.randint(0, 101, (1, 19))
    with torch.no_grad():
        sparse = fast(x).logits
        warm = fast(x, objective=Objective(indexer_mode="dense_warmup")).logits
    assert rel_err(warm, sparse) > 1e-3


def test_fast_cached_decode_equals_full_forward(rel_err):
    from deepwish.generate import decode_one_token, prefill
    fast, dense = pair()
    x = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = dense(x).logits
        cache = fast.make_cache(2, 21)
        steps = [prefill(fast, x[:, :6], cache)]
        for t in range(6, 16):
            steps.append(decode_one_token(fast, x[:, t], torch.full((2,), t), cache))
    assert rel_err(full[:, 5:], torch.stack(steps, 1)) < 1e-4


def test_cache_latent_rows_are_one_buffer():
    c = DSACache.empty_dsa(2, 7, 5, 3, 4)
    c.update(torch.tensor([[1], [6]]), torch.ones(2, 1, 5), torch.full((2, 1, 3), 2.0))
    rows = c.latent_rows()
    assert rows.shape == (2, 7, 8) and rows[0, 1].tolist() == [1.0] * 5 + [2.0] * 3 and rows[0, 0].abs().sum() == 0
    c.reorder(torch.tensor([1, 1]))
    assert rows[0, 6].tolist() == [1.0] * 5 + [2.0] * 3  # reordered in place: the view follows
    with pytest.raises(ValueError, match="views of one"):
        DSACache(torch.zeros(2, 7, 5), torch.zeros(2, 7, 3), torch.zeros(2, 7, 4)).latent_rows()


def test_backend_resolution_and_errors(capsys, monkeypatch):
    assert resolve_dsa_backend("torch") is None
    assert "dense reference" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert resolve_dsa_backend("auto") == "torch"
        assert "row-block indexer/top-k (torch scores), sparse_mla torch (no CUDA device)" in capsys.readouterr().err
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        from deepwish.kernels.backend import BackendError
        with pytest.raises(BackendError, match="triton"):
            resolve_dsa_backend("triton")
    with pytest.raises(ConfigError, match="dsa_backend"):
        load_config("deepseek_v32_tiny", ["model.dsa_backend=fast"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs on CPU tensors; GPU: test_dsa_gpu.py")
def test_triton_kernel_route_under_the_interpreter_equals_dense(rel_err):
    """dsa_backend=triton: the Triton sparse_mla (TRITON_INTERPRET=1, tests/conftest.py) behind the
    row-block top-k, training step and cached decoding, against the dense reference."""
    from deepwish.generate import decode_one_token, prefill
    fast, dense = pair("model.n_layers=1", "model.dsa_backend=triton")
    assert fast.blocks[0].mixer.sparse_backend == "triton"
    x, t = torch.randint(0, 101, (1, 12)), torch.randint(0, 101, (1, 12))
    obj = Objective(indexer_mode="sparse", indexer_weight=1.0)
    res = []
    for m in (dense, fast):
        out = m(x, targets=t, objective=obj)
        out.loss.backward()
        res.append((out, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    (ref, ref_g), (got, got_g) = res
    assert rel_err(ref.logits, got.logits) < 1e-5
    assert got.aux_losses["indexer"].item() == pytest.approx(ref.aux_losses["indexer"].item(), rel=1e-5)
    for n in ref_g:
        assert rel_err(ref_g[n], got_g[n]) < 1e-4, n
    with torch.no_grad():
        cache = fast.make_cache(1, 16)
        steps = [prefill(fast, x[:, :6], cache)] + [decode_one_token(fast, x[:, i], torch.full((1,), i), cache)
                                                    for i in range(6, 12)]
    assert rel_err(ref.logits[:, 5:].detach(), torch.stack(steps, 1)) < 1e-4
