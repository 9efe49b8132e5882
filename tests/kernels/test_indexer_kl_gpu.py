"""The sparse-stage indexer loss's kernels (kernels/indexer_kl) on the GPU at real sizes — 64
index heads of 128, top-k 2048, the bench shape's 16 heads of 320 = 256 + 64 and V3's 128 heads
of 576 = 512 + 64 (four head tiles: the atomic target) — bf16 against the fp32 reference on a
slice of queries (run with -m gpu)."""
import pytest
import torch

from deepwish.bench.sparse_mla import causal_indices
from deepwish.kernels.indexer_kl import reference as ref
from deepwish.kernels.indexer_kl import triton as tk

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("H,D", [(16, 320), (128, 576)])
def test_kernels_match_reference_at_real_size(cuda, H, D, rel_err):
    B, T, S, Hi, Di, K = 1, 64, 4096, 64, 128, 2048
    g = torch.Generator(device=cuda).manual_seed(H)
    bf = torch.bfloat16
    q = torch.randn(B, T, Hi, Di, device=cuda, generator=g).to(bf)
    w = torch.randn(B, T, Hi, device=cuda, generator=g) * Hi ** -0.5
    k = torch.randn(B, S, Di, device=cuda, generator=g).to(bf)
    q_abs = torch.randn(B, T, H, D, device=cuda, generator=g).to(bf)
    kv = torch.randn(B, S, D, device=cuda, generator=g).to(bf)
    idx = causal_indices(B, T, S, K, cuda, seed=1)  # the last T queries of S: full rows of K
    idx[:, :3] = causal_indices(B, 3, 1500, K, cuda, seed=2)  # a few short rows: -1 tails
    scale = D ** -0.5
    rows = ref._rows(kv, idx).float()
    s = torch.einsum("bthd,btkd->bthk", q_abs.float(), rows) * scale
    lse = s.masked_fill((idx < 0)[:, :, None], float("-inf")).logsumexp(-1)
    want_i, want_p = ref.scores_and_target(q, w, k, q_abs, kv, lse, idx, index_scale=Di ** -0.5, attn_scale=scale)
    got_i, got_p = tk.scores_and_target(q, w, k, q_abs, kv, lse, idx, index_scale=Di ** -0.5, attn_scale=scale)
    keep = idx >= 0
    assert torch.equal(torch.isinf(got_i), ~keep)
    assert rel_err(want_i[keep], got_i[keep]) < 1e-2
    assert rel_err(want_p, got_p) < 2e-2
    gi = torch.randn(B, T, K, device=cuda, generator=g).masked_fill(~keep, 0.0)
    for a, b in zip(ref.scores_backward(q, w, k, idx, gi, index_scale=Di ** -0.5),
                    tk.scores_backward(q, w, k, idx, gi, index_scale=Di ** -0.5)):
        assert rel_err(a, b) < 1e-2
