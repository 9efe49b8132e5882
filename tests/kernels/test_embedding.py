"""Token-table lookups with one sort for all tables: the run-sum kernel (interpreter on CPU)
against the reference gradient, on skewed ids (one token holding most positions, tokens absent),
widths that are not a multiple of the column block, and more positions than table rows."""
import pytest
import torch

from deepwish.kernels import embedding as E
from deepwish.kernels.embedding import reference as ref
from deepwish.kernels.embedding import triton as tri


def _ids(n, V, g):
    ids = torch.randint(0, V, (n,), generator=g)
    ids[torch.rand(n, generator=g) < 0.6] = 3  # one token holds most positions: a run of many blocks
    return ids


def test_segments_order_runs_stably():
    order, tokens, ends = ref.segments(torch.tensor([5, 1, 5, 0, 1, 5]))
    assert tokens.tolist() == [0, 1, 1, 5, 5, 5] and order.tolist() == [3, 1, 4, 0, 2, 5]
    assert ends.tolist() == [1, 3, 3, 6, 6, 6]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,V,D", [(100, 37, 24), (70, 200, 160), (1, 5, 8)])
def test_table_grads_match_the_reference(n, V, D, dtype):
    g = torch.Generator().manual_seed(n + V)
    ids = _ids(n, V, g)
    grads = [torch.randn(n, D, generator=g).to(dtype), torch.randn(n, D // 2 + 1, generator=g).to(dtype)]
    got = tri.table_grads(ids, grads, V)
    for gr, dw in zip(grads, got):
        want = ref.table_grad(ids, gr, V)
        assert dw.dtype == torch.float32 and dw.shape == want.shape
        torch.testing.assert_close(dw, want, rtol=1e-5, atol=1e-5)
        absent = torch.ones(V, dtype=torch.bool)
        absent[ids] = False
        assert not dw[absent].any()  # tokens the batch does not hold: zero rows


def test_lookups_forward_and_backward_equal_torch_per_table():
    g = torch.Generator().manual_seed(0)
    V = 50
    ids = _ids(2 * 33, V, g).view(2, 33)
    tables = [torch.randn(V, w, generator=g, requires_grad=True) for w in (40, 24, 40)]
    frozen = torch.randn(V, 8, generator=g)  # no gradient wanted
    cot = [torch.randn(2, 33, w, generator=g) for w in (40, 24, 40)]
    grads = {}
    for backend in ("torch", "triton"):
        outs = E.lookups(ids, [*tables, frozen], backend)
        grads[backend] = outs
        # the second table's output is not used: its gradient is None with either backend
        loss = (outs[0] * cot[0]).sum() + (outs[2] * cot[2]).sum() + outs[3].sum()
        grads[backend] = (outs, torch.autograd.grad(loss, tables, allow_unused=True))
    (o_t, g_t), (o_k, g_k) = grads["torch"], grads["triton"]
    for a, b in zip(o_t, o_k):
        assert torch.equal(a, b)
    assert g_t[1] is None and g_k[1] is None
    for k in (0, 2):
        assert g_k[k].dtype == tables[k].dtype
        torch.testing.assert_close(g_k[k], g_t[k], rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # no graph wanted: plain lookups
        assert all(torch.equal(a, b) for a, b in zip(E.lookups(ids, tables, "triton"), o_t))
    with pytest.raises(ValueError, match="vocabularies differ"):
        E.lookups(ids, [tables[0], torch.randn(V + 1, 4, requires_grad=True)], "triton")
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        E.lookups(ids, tables, "cuda")
