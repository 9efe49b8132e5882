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


def test_nsa_cache_writes_take_index_put_when_compiling(monkeypatch):
    """NSACache writes through the same helper: under torch.compile an index_put_ (inductor writes
    it in place; a scatter_ there copied the whole cache twice per layer and step), the same
    values as the eager scatter_, the trash slot written by several blocks of one chunk included."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from deepwish.model.nsa import NEVER, NSACache

    class Ops(TorchDispatchMode):
        seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    B, L, Hkv, D, l, d = 2, 40, 2, 4, 8, 4
    pos = torch.tensor([[5, 6, 7], [20, 21, 22]])
    k, k_raw, v = (torch.randn(B, 3, Hkv, D) for _ in range(3))
    caches = [NSACache.empty(B, L, Hkv, D, l, d) for _ in range(2)]
    n = caches[0].n_blocks
    slot = torch.tensor([[0, n, n], [3, n, 4]])
    k_cmp, v_cmp = torch.randn(B, 3, Hkv, D), torch.randn(B, 3, Hkv, D)
    end = torch.where(slot < n, slot * d + l - 1, NEVER)
    for compiling, cache in zip((False, True), caches):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda c=compiling: c)
        with Ops() as ops:
            ops.seen = set()
            cache.write(pos, k, k_raw, v)
            cache.write_blocks(slot, k_cmp, v_cmp, end)
        assert ("index_put_" in ops.seen) == compiling and ("scatter_" in ops.seen) != compiling, ops.seen
    eager, compiled = caches
    for name in ("k", "v", "k_raw", "cmp_end"):
        assert torch.equal(getattr(eager, name), getattr(compiled, name)), name
    # the trash slot's contents depend on which duplicate write lands last
    assert torch.equal(eager.k_cmp[:, :n], compiled.k_cmp[:, :n]) and torch.equal(eager.v_cmp[:, :n], compiled.v_cmp[:, :n])
    assert torch.equal(eager.k_cmp[1, 4], k_cmp[1, 2]) and eager.cmp_end[1, 3] == 3 * d + l - 1
    assert torch.equal(eager.k[1, :, 21], k[1, 1]) and torch.equal(eager.k_raw[0, :, 7], k_raw[0, 2])
