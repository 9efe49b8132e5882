"""DSA in row blocks (model/dsa_rows.py): the chunked top-k selects exactly the dense reference's
set (`select_topk_latest`) on awkward cases, and both indexer losses equal `indexer_kl`."""
import pytest
import torch

from deepwish.model.attention import attention_mask
from deepwish.model.dsa import indexer_kl, select_topk_latest
from deepwish.model.dsa_rows import dense_kl, index_scores, sparse_kl, topk_indices, topk_latest_indices


def as_mask(indices: torch.Tensor, S: int) -> torch.Tensor:
    """[..., K] slots (-1 unused, each listed once) -> [..., S] bool."""
    m = torch.zeros(*indices.shape[:-1], S + 1, dtype=torch.bool)
    m.scatter_(-1, torch.where(indices >= 0, indices.long(), S), True)
    assert (indices >= 0).sum(-1).eq(m[..., :S].sum(-1)).all(), "a slot listed twice"
    return m[..., :S]


@pytest.mark.parametrize("k", [1, 3, 7, 12, 40])
def test_topk_indices_of_a_block_equal_the_reference_set(k):
    g = torch.Generator().manual_seed(k)
    scores = torch.randint(-2, 3, (3, 9, 12), generator=g).float()  # small integers: ties everywhere
    scores[1] = torch.randn(9, 12, generator=g)
    scores[2] = torch.where(torch.rand(9, 12, generator=g) < 0.5, -0.0, 0.0)  # every key tied (-0.0 == 0.0)
    assert torch.signbit(scores[2]).any()
    visible = torch.rand(3, 9, 12, generator=g) < 0.7
    visible[0, 0] = False  # a row that sees nothing
    got = topk_latest_indices(scores, visible, k)
    assert got.shape == (3, 9, k) and got.dtype == torch.int32
    assert torch.equal(as_mask(got, 12), select_topk_latest(scores, visible, k))
    assert (got[0, 0] == -1).all()


def indexer_inputs(B, T, Hi=3, Di=8, seed=0, tie_heads=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hi, Di, generator=g)
    k = torch.randn(B, T, Di, generator=g)
    w = torch.randn(B, T, Hi, generator=g)
    if tie_heads:  # one positive-weight head whose dots are mostly negative: most scores exactly 0
        w = w.abs()
        q[:, :, 1:] = 0
        q[:, :, 0] = -q[:, :, 0].abs() * 0.3
        k = k.abs()
        k[:, ::3] = -k[:, ::3]  # every third key scores > 0
    return q, w, k


def dense_reference(q, w, k, pos, doc, topk):
    scores = index_scores(q, w, k, 0.5)
    vis = attention_mask(pos, pos, 0, doc, doc)[:, 0]
    return select_topk_latest(scores, vis, topk)


CASES = {  # name: (T, topk, budget, packed, ties)
    "T_below_topk": (6, 9, 1 << 20, False, False),
    "topk_1_several_blocks": (23, 1, 3 * 23 * 4, False, False),
    "ties_one_block": (21, 5, 1 << 20, False, True),
    "ties_several_blocks": (21, 5, 3 * 21 * 2, False, True),
    "packed_ties_several_blocks": (25, 4, 3 * 25 * 5, True, True),
    "packed_random_one_row_blocks": (17, 6, 1, True, False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_chunked_topk_equals_dense_selection(name):
    T, topk, budget, packed, ties = CASES[name]
    B = 2
    q, w, k = indexer_inputs(B, T, tie_heads=ties, seed=T + topk)
    if packed:
        cut = [T // 3, T // 2]  # two layouts: documents of different lengths per row
        doc = torch.stack([(torch.arange(T) >= c).long() + (torch.arange(T) >= T - 3).long() for c in cut])
        pos = torch.stack([torch.cat([torch.arange(int((d == i).sum())) for i in range(3)]) for d in doc])
    else:
        doc, pos = None, torch.arange(T).expand(B, T)
    ref = dense_reference(q, w, k, pos, doc, topk)
    if ties:
        assert (index_scores(q, w, k, 0.5) == 0).float().mean() > 0.4  # the case really is tied
    for prefix in (True, False):
        got = topk_indices(q, w, k, 0.5, topk, pos, pos, doc, doc, causal_prefix=prefix, budget=budget)
        assert got.shape == (B, T, topk)
        assert torch.equal(as_mask(got, T), ref), prefix


def test_cached_rows_select_the_same_set_as_uncached():
    """Decode: queries at the end of a longer static cache (unwritten slots invisible)."""
    B, T, L = 2, 14, 30
    q, w, k = indexer_inputs(B, T, tie_heads=True, seed=5)
    pos = torch.arange(T).expand(B, T)
    ref = dense_reference(q, w, k, pos, None, 4)
    k_cache = torch.cat([k, torch.randn(B, L - T, k.shape[-1])], 1)
    got = topk_indices(q[:, -3:], w[:, -3:], k_cache, 0.5, 4, pos[:, -3:], torch.arange(L).expand(B, L))
    assert torch.equal(as_mask(got, L), torch.cat([ref[:, -3:], torch.zeros(B, 3, L - T, dtype=torch.bool)], -1))


def kl_inputs(B=2, T=13, H=3, D=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, w, k = indexer_inputs(B, T, seed=seed)
    q_abs, kv = torch.randn(B, T, H, D, generator=g), torch.randn(B, T, D, generator=g)
    return [t.requires_grad_() for t in (q, w, k)], q_abs, kv


def reference_kl(q, w, k, q_abs, kv, attend):
    s = torch.einsum("bthd,bsd->bhts", q_abs, kv) * 0.3
    return indexer_kl(s, index_scores(q, w, k, 0.5), attend[:, None])


@pytest.mark.parametrize("budget", [1 << 20, 3 * 13 * 2])
@pytest.mark.parametrize("packed", [False, True])
def test_dense_warmup_kl_and_grads_equal_reference(budget, packed, rel_err):
    (q, w, k), q_abs, kv = kl_inputs()
    B, T = 2, 13
    doc = (torch.arange(T) >= 5).long().expand(B, T) if packed else None
    pos = torch.cat([torch.arange(5), torch.arange(T - 5)]).expand(B, T) if packed else torch.arange(T).expand(B, T)
    vis = attention_mask(pos, pos, 0, doc, doc)[:, 0]
    ref = reference_kl(q, w, k, q_abs, kv, vis)
    ref_grads = torch.autograd.grad(ref, (q, w, k))
    got = dense_kl(q, w, k, q_abs, kv, 0.5, 0.3, pos, pos, doc, doc, causal_prefix=True, budget=budget)
    assert abs(got.item() - ref.item()) < 1e-5 * max(1.0, ref.item()) and ref.item() > 0.01
    for a, b in zip(ref_grads, torch.autograd.grad(got, (q, w, k))):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("budget", [1 << 20, 5 * 10])
def test_sparse_kl_and_grads_equal_reference(budget, rel_err):
    (q, w, k), q_abs, kv = kl_inputs(seed=3)
    B, T, topk = 2, 13, 4
    pos = torch.arange(T).expand(B, T)
    indices = topk_indices(q.detach(), w.detach(), k.detach(), 0.5, topk, pos, pos, causal_prefix=True)
    attend = as_mask(indices, T)
    ref = reference_kl(q, w, k, q_abs, kv, attend)
    ref_grads = torch.autograd.grad(ref, (q, w, k))
    got = sparse_kl(q, w, k, q_abs, kv, indices, 0.5, 0.3, budget=budget)
    assert abs(got.item() - ref.item()) < 1e-5 * max(1.0, ref.item()) and ref.item() > 0.01
    for a, b in zip(ref_grads, torch.autograd.grad(got, (q, w, k))):
        assert rel_err(a, b) < 1e-5


def test_sparse_kl_scaled_backward_and_frozen_inputs(rel_err):
    """The gradients computed in the forward pass are scaled by the upstream gradient (an indexer
    weight), go only where asked (w alone when q and k are frozen), and a no-grad call returns
    the same value."""
    (q, w, k), q_abs, kv = kl_inputs(B=2, T=11, seed=5)
    pos = torch.arange(11).expand(2, 11)
    indices = topk_indices(q.detach(), w.detach(), k.detach(), 0.5, 5, pos, pos, causal_prefix=True)
    attend = as_mask(indices, 11)
    ref = reference_kl(q, w, k, q_abs, kv, attend)
    ref_grads = torch.autograd.grad(2.5 * ref, (q, w, k))
    got = sparse_kl(q, w, k, q_abs, kv, indices, 0.5, 0.3, budget=5 * 10)
    for a, b in zip(ref_grads, torch.autograd.grad(2.5 * got, (q, w, k))):
        assert rel_err(a, b) < 1e-5
    qf, kf = q.detach(), k.detach()
    only_w = sparse_kl(qf, w, kf, q_abs, kv, indices, 0.5, 0.3)
    (gw,) = torch.autograd.grad(only_w, (w,))
    assert rel_err(ref_grads[1] / 2.5, gw) < 1e-5
    with torch.no_grad():
        plain = sparse_kl(q, w, k, q_abs, kv, indices, 0.5, 0.3)
    assert not plain.requires_grad and abs(plain.item() - ref.item()) < 1e-5 * max(1.0, ref.item())


def test_sparse_kl_under_bf16_autocast_stays_near_fp32():
    """Under autocast the dots run in bf16 (as autograd runs them there), the rest in fp32: the
    loss and gradients stay within bf16 noise of the fp32 ones, in the inputs' dtypes."""
    (q, w, k), q_abs, kv = kl_inputs(B=1, T=16, H=4, D=16, seed=7)
    pos = torch.arange(16)[None]
    indices = topk_indices(q.detach(), w.detach(), k.detach(), 0.5, 6, pos, pos, causal_prefix=True)
    ref = sparse_kl(q, w, k, q_abs, kv, indices, 0.5, 0.3)
    ref_grads = torch.autograd.grad(ref, (q, w, k))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = sparse_kl(q, w, k, q_abs, kv, indices, 0.5, 0.3)
    grads = torch.autograd.grad(got, (q, w, k))
    assert got.dtype == torch.float32 and abs(got.item() - ref.item()) < 2e-2 * ref.item()
    for a, b in zip(ref_grads, grads):
        assert b.dtype == a.dtype and rel_rms(a, b) < 5e-2


def rel_rms(a, b):
    return ((a - b).float().pow(2).mean().sqrt() / a.float().pow(2).mean().sqrt().clamp_min(1e-30)).item()


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sparse_kl_from_the_attention_lse_equals_reference(backend, dtype, rel_err):
    """The kernel route (kernels/indexer_kl, under the interpreter): the target from sparse_mla's
    own lse, the loss and every gradient equal to `indexer_kl`'s, also under an upstream weight."""
    from deepwish.kernels.sparse_mla import reference as attention
    (q, w, k), q_abs, kv = kl_inputs(B=2, T=13, H=3, D=10, seed=3)
    pos = torch.arange(13).expand(2, 13)
    indices = topk_indices(q.detach(), w.detach(), k.detach(), 0.5, 4, pos, pos, causal_prefix=True)
    ref = reference_kl(q, w, k, q_abs, kv, as_mask(indices, 13))
    ref_grads = torch.autograd.grad(1.5 * ref, (q, w, k))
    qa, kvd = q_abs.to(dtype), kv.to(dtype)
    _, lse = attention.sparse_mla(qa, kvd, indices, dv=8, scale=0.3)
    qd, kd = q.detach().to(dtype).requires_grad_(), k.detach().to(dtype).requires_grad_()
    got = sparse_kl(qd, w, kd, qa, kvd, indices, 0.5, 0.3, lse=lse, backend=backend)
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    assert abs(got.item() - ref.item()) < tol * max(1.0, ref.item()) and ref.item() > 0.01
    grads = torch.autograd.grad(1.5 * got, (qd, w, kd))
    for a, b, x in zip(ref_grads, grads, (qd, w, kd)):
        assert b.dtype == x.dtype and rel_err(a, b.float()) < 2 * tol
    with pytest.raises(ValueError, match="lse"):
        sparse_kl(q, w, k, q_abs, kv, indices, 0.5, 0.3, backend=backend)
    with pytest.raises(ValueError, match="backend"):
        sparse_kl(q, w, k, q_abs, kv, indices, 0.5, 0.3, backend="cuda")


def test_dense_kl_scaled_backward_frozen_inputs_and_no_grad(rel_err):
    """dense_kl's gradients, computed in its forward pass, follow an upstream weight, go only to
    the inputs that ask (w alone), and a no-grad call gives the same value."""
    (q, w, k), q_abs, kv = kl_inputs(B=2, T=11, seed=4)
    pos = torch.arange(11).expand(2, 11)
    vis = attention_mask(pos, pos, 0)[:, 0]
    ref = reference_kl(q, w, k, q_abs, kv, vis)
    ref_grads = torch.autograd.grad(0.7 * ref, (q, w, k))
    got = dense_kl(q, w, k, q_abs, kv, 0.5, 0.3, pos, pos, causal_prefix=True, budget=3 * 11 * 3)
    for a, b in zip(ref_grads, torch.autograd.grad(0.7 * got, (q, w, k))):
        assert rel_err(a, b) < 1e-5
    (gw,) = torch.autograd.grad(dense_kl(q.detach(), w, k.detach(), q_abs, kv, 0.5, 0.3, pos, pos), (w,))
    assert rel_err(ref_grads[1] / 0.7, gw) < 1e-5
    with torch.no_grad():
        plain = dense_kl(q, w, k, q_abs, kv, 0.5, 0.3, pos, pos, causal_prefix=True)
    assert not plain.requires_grad and abs(plain.item() - ref.item()) < 1e-5 * max(1.0, ref.item())
