"""The sparse-stage indexer loss's kernels (kernels/indexer_kl) under the interpreter against the
torch reference: scores I and head-summed target P at the selected slots, and the gradients of
Σ g·I, on awkward selections (-1 holes, a row that selects nothing, K not a multiple of the
step, several head tiles, a rope tail that pads, batch > 1), fp32 and fp16."""
import pytest
import torch

from deepwish.kernels.indexer_kl import reference as ref

tk = pytest.importorskip("deepwish.kernels.indexer_kl.triton")

TOL = {torch.float32: 2e-5, torch.float16: 4e-3}


def inputs(B, T, S, Hi, Di, H, D, K, dtype, seed=0, empty_row=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hi, Di, generator=g).to(dtype)
    w = torch.randn(B, T, Hi, generator=g)
    k = torch.randn(B, S, Di, generator=g).to(dtype)
    q_abs = torch.randn(B, T, H, D, generator=g).to(dtype)
    kv = torch.randn(B, S, D, generator=g).to(dtype)
    idx = torch.full((B, T, K), -1, dtype=torch.int32)
    for b in range(B):
        for t in range(T):
            pick = torch.randperm(S, generator=g)[:K].int()
            pick[torch.rand(len(pick), generator=g) < 0.2] = -1  # holes anywhere
            idx[b, t, :len(pick)] = pick
    if empty_row is not None:
        idx[:, empty_row] = -1
    # lse of the attention over the same slots (the sparse attention's own output)
    rows = ref._rows(kv, idx).float()
    s = torch.einsum("bthd,btkd->bthk", q_abs.float(), rows) * 0.2
    lse = s.masked_fill((idx < 0)[:, :, None], float("-inf")).logsumexp(-1)
    return q, w, k, q_abs, kv, lse, idx


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,T,S,Hi,Di,H,D,K", [(2, 5, 40, 3, 20, 3, 10, 7),    # D 8 + 2: the tail pads
                                              (1, 3, 70, 17, 16, 40, 24, 37),  # 3 head tiles, 3 steps of K
                                              (1, 4, 20, 4, 8, 2, 32, 16)])    # no tail, one full step
def test_scores_target_and_backward_match_reference(B, T, S, Hi, Di, H, D, K, dtype, rel_err):
    q, w, k, q_abs, kv, lse, idx = inputs(B, T, S, Hi, Di, H, D, K, dtype, seed=T + K, empty_row=1)
    want_i, want_p = ref.scores_and_target(q, w, k, q_abs, kv, lse, idx, index_scale=0.3, attn_scale=0.2)
    got_i, got_p = tk.scores_and_target(q, w, k, q_abs, kv, lse, idx, index_scale=0.3, attn_scale=0.2)
    keep = idx >= 0
    assert torch.equal(torch.isinf(got_i), ~keep) and (got_p[~keep] == 0).all()
    assert rel_err(want_i[keep], got_i[keep]) < TOL[dtype]
    assert rel_err(want_p, got_p) < TOL[dtype]
    # every selected row's probabilities sum to one per head: P sums to H
    full = keep.any(-1)
    assert torch.allclose(got_p.sum(-1)[full], torch.full_like(got_p.sum(-1)[full], H), rtol=1e-2 if dtype != torch.float32 else 1e-5)
    g = torch.randn(B, T, K, generator=torch.Generator().manual_seed(1)).masked_fill(~keep, 0.0)
    for a, b in zip(ref.scores_backward(q, w, k, idx, g, index_scale=0.3),
                    tk.scores_backward(q, w, k, idx, g, index_scale=0.3)):
        assert b.dtype == torch.float32 and rel_err(a, b) < TOL[dtype]


def test_errors_name_the_problem():
    q, w, k, q_abs, kv, lse, idx = inputs(1, 2, 8, 2, 8, 2, 8, 3, torch.float32)
    with pytest.raises(ValueError, match="share a dtype"):
        tk.scores_and_target(q, w, k.half(), q_abs, kv, lse, idx, index_scale=1.0, attn_scale=1.0)
    with pytest.raises(ValueError, match="do not match"):
        tk.scores_backward(q, w[:, :, :1], k, idx, lse, index_scale=1.0)
