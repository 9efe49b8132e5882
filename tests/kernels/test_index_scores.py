"""Lightning-indexer scores: the fused Triton kernel (under the interpreter on CPU) against the
torch reference on awkward shapes, and exactly on integer-valued inputs (every product and sum
exact in fp32, so any order agrees), where the row-block top-k then selects the dense set."""
import pytest
import torch

from deepwish.kernels.index_scores import reference as ref
from deepwish.model.attention import attention_mask
from deepwish.model.dsa import select_topk_latest
from deepwish.model.dsa_rows import topk_indices

tk = pytest.importorskip("deepwish.kernels.index_scores.triton")


@pytest.mark.parametrize("B,C,S,H,D", [(2, 5, 37, 3, 20), (1, 1, 70, 64, 128), (1, 9, 16, 4, 8), (2, 3, 130, 16, 32)])
def test_kernel_matches_reference(B, C, S, H, D, rel_err):
    g = torch.Generator().manual_seed(B * C + S)
    q, k = torch.randn(B, C, H, D, generator=g), torch.randn(B, S, D, generator=g)
    w = torch.randn(B, C, H, generator=g)
    want = ref.index_scores(q, w, k, D ** -0.5)
    got = tk.index_scores(q, w, k, D ** -0.5)
    assert got.shape == (B, C, S) and got.dtype == torch.float32
    assert rel_err(want, got) < 1e-5


def integer_inputs(B, T, H, D, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-2, 3, (B, T, H, D), generator=g).float()
    k = torch.randint(-2, 3, (B, T, D), generator=g).float()
    w = torch.randint(-1, 3, (B, T, H), generator=g).float()
    return q, w, k


def test_integer_inputs_score_exactly_and_select_the_dense_set():
    B, T, H, D, K = 2, 19, 3, 8, 4
    q, w, k = integer_inputs(B, T, H, D, 0)
    assert torch.equal(tk.index_scores(q, w, k, 0.5), ref.index_scores(q, w, k, 0.5))
    pos = torch.arange(T).expand(B, T)
    doc = (torch.arange(T) >= 7).long().expand(B, T)
    pos = torch.where(doc == 1, pos - 7, pos)
    dense = select_topk_latest(ref.index_scores(q, w, k, 0.5), attention_mask(pos, pos, 0, doc, doc)[:, 0], K)
    for budget in (1 << 20, 6 * T * 2):  # one block, several
        got = topk_indices(q, w, k, 0.5, K, pos, pos, doc, doc, causal_prefix=True, budget=budget, scorer="triton")
        m = torch.zeros(B, T, T + 1, dtype=torch.bool).scatter_(-1, torch.where(got >= 0, got.long(), T), True)
        assert torch.equal(m[..., :T], dense)
    with pytest.raises(ValueError, match="scorer"):
        topk_indices(q, w, k, 0.5, K, pos, pos, scorer="cuda")


def test_kernel_reads_row_block_views(rel_err):
    """topk_indices passes q[:, t0:t1] and k[:, :n] of a batch: strided views, read in place."""
    g = torch.Generator().manual_seed(7)
    q, k, w = torch.randn(2, 11, 5, 24, generator=g), torch.randn(2, 11, 24, generator=g), torch.randn(2, 11, 5, generator=g)
    qv, wv, kv = q[:, 3:8], w[:, 3:8], k[:, :8]
    assert not qv.is_contiguous() and not kv.is_contiguous()
    assert rel_err(ref.index_scores(qv, wv, kv, 0.25), tk.index_scores(qv, wv, kv, 0.25)) < 1e-5


@pytest.mark.parametrize("packed", [False, True])
def test_index_keys_equal_the_selection_keys_built_in_torch(packed):
    """index_keys writes topk_latest_indices' int64 keys (ordered score · 2^32 + slot, -inf where
    invisible, -0.0 as +0.0) in the kernel: bit-equal on integer inputs (exact scores, many ties
    and signed zeros), with documents, and with cache-style expanded key positions (stride 0)."""
    from deepwish.model.dsa_rows import top_of_keys, topk_latest_indices
    B, T, S, H, D = 2, 9, 21, 4, 8  # 4 heads: no padded head adds a +0.0 to the kernel's head sum
    q, w, _ = integer_inputs(B, T, H, D, 3)
    k = torch.randint(-2, 3, (B, S, D), generator=torch.Generator().manual_seed(4)).float()
    q_pos = torch.arange(S - T, S).expand(B, T)
    k_pos = torch.arange(S).expand(B, S)  # stride 0 in the batch, as the cached path passes it
    q_doc = k_doc = None
    if packed:
        k_doc = (torch.arange(S) >= 14).long().expand(B, S).contiguous()
        q_doc = k_doc[:, S - T:]
    w[1] = -w[1].abs() - 1  # batch 1: every head weight negative, so a key no head fires on sums -0.0 terms
    scores = ref.index_scores(q, w, k, 0.5)
    assert (scores == 0).any()
    vis = attention_mask(q_pos, k_pos, 0, q_doc, k_doc)[:, 0]
    s = scores.masked_fill(~vis, float("-inf")) + 0.0
    bits = s.view(torch.int32)
    want = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(torch.int64) * (1 << 32) + torch.arange(S)
    got = tk.index_keys(q, w, k, 0.5, q_pos, k_pos, q_doc, k_doc)
    assert got.dtype == torch.int64 and torch.equal(got, want)
    assert torch.equal(top_of_keys(got, 5).sort(-1).values, topk_latest_indices(scores, vis, 5).sort(-1).values)
    with pytest.raises(ValueError, match="q_doc and k_doc"):
        tk.index_keys(q, w, k, 0.5, q_pos, k_pos, q_doc=q_pos)
