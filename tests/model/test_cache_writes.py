"""Cache writes: the eager scatter_ and the index_put_ form taken under torch.compile write the same
values, for every buffer layout the caches use."""
import pytest
import torch

from deepwish.model.cache import KVCache, index_put_rows_, scatter_rows_


@pytest.mark.parametrize("shape,dim,T", [((3, 2, 11, 5), 2, 1), ((3, 2, 11, 5), 2, 4), ((3, 11, 7), 1, 3),
                                         ((3, 11), 1, 2)])
def test_index_put_equals_scatter(shape, dim, T):
    B, L = shape[0], shape[dim]
    slots = torch.stack([torch.randperm(L)[:T] for _ in range(B)])  # distinct within a row
    vshape = list(shape)
    vshape[dim] = T
    values = torch.randn(vshape, dtype=torch.float64)  # cast to the buffer's dtype by both
    a, b = torch.randn(shape), None
    b = a.clone()
    scatter_rows_(a, dim, slots, values)
    index_put_rows_(b, dim, slots, values)
    assert torch.equal(a, b)
    assert not torch.equal(a, a.clone().zero_())


def test_compiled_update_writes_in_place():
    cache = KVCache.empty(2, 9, 2, 4)
    ref = KVCache.empty(2, 9, 2, 4)
    pos = torch.tensor([[3], [7]])
    k, v = torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4)
    ref.update(pos, k, v)
    torch.compile(cache.update, backend="aot_eager", fullgraph=True)(pos, k, v)
    assert torch.equal(cache.k, ref.k) and torch.equal(cache.v, ref.v)
