"""The bounds check itself (tests/kernels/bounds.py; tests/conftest.py runs every other test's
kernels under it), and the kernels behind a training step run forward and backward under it at the
shapes where a missing mask would show: attention on packed documents at head width 16, the Gated
DeltaNet chunk rule at head width 16 with documents ending inside chunks, the short conv narrower
than its backward's channel block."""
import pytest
import torch
import triton
import triton.language as tl

from tests.kernels.bounds import bounds_checked


@triton.jit
def _copy_kernel(src, dst, n, reach, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    tl.store(dst + o, tl.load(src + o, mask=o < n + reach, other=0.0), mask=o < n)


def test_the_check_sees_a_read_one_past_the_end_and_nothing_in_a_masked_tile():
    src, dst = torch.arange(10.0), torch.zeros(10)
    with bounds_checked() as r:
        _copy_kernel[(1,)](src, dst, 10, 0, BLOCK=16)   # 16 lanes, 6 masked off
    assert r.faults == [] and r.kernels == {"_copy_kernel"} and torch.equal(dst, src)
    with bounds_checked() as r:
        _copy_kernel[(1,)](src, dst, 10, 1, BLOCK=16)   # the mask lets lane 10 read
    assert [(k, what, n) for k, what, n, _ in r.faults] == [("_copy_kernel", "load", 1)]
    assert r.faults[0][3] == src.data_ptr() + 10 * src.element_size()


def test_attention_on_packed_documents_stays_inside_its_tensors():
    from deepwish.kernels.attention import flash_attention
    B, T, H, KV, D = 1, 90, 4, 2, 16
    q = torch.randn(B, T, H, D, requires_grad=True)
    k = torch.randn(B, T, KV, D, requires_grad=True)
    v = torch.randn(B, T, KV, D, requires_grad=True)
    ids = torch.tensor([0] * 23 + [1] * 50 + [2] * 17).view(1, T)
    for window in (0, 7):                                  # 0: no window
        with bounds_checked() as r:
            flash_attention(q, k, v, doc_ids=ids, window=window).square().sum().backward()
        assert r.faults == [], (window, r.faults)
        assert len(r.kernels) >= 3, r.kernels                # forward, and the backward's kernels
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("K,V,H,HV", [(16, 16, 2, 4), (48, 24, 1, 2)])
def test_gated_delta_chunk_rule_stays_inside_its_tensors(K, V, H, HV):
    from tests.kernels.test_gated_delta import make_inputs
    from deepwish.kernels.gated_delta import chunk_gated_delta_rule
    cu = torch.tensor([0, 37, 100, 150])                  # documents end inside the 64-row chunks
    leaves = [x.requires_grad_() for x in make_inputs(B=1, T=150, H=H, HV=HV, K=K, V=V, N=3)]
    q, k, v, g, beta, h0 = leaves
    with bounds_checked() as r:
        o, ht = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                                       use_qk_l2norm=True)
        (o.square().sum() + ht.sum()).backward()
    assert r.faults == []
    assert {"_wy_inverse_kernel", "_chunk_bwd_wy_kernel", "_chunk_bwd_qk_kernel", "_wy_bwd_kernel"} <= r.kernels
    assert all(x.grad is not None for x in leaves)


@pytest.mark.parametrize("with_state", [False, True])
def test_short_conv_stays_inside_its_tensors(with_state):
    from deepwish.kernels.short_conv.triton import causal_conv1d
    D, W = 128, 4                                          # narrower than the backward's 512-channel block
    cu = torch.tensor([0, 9, 40, 70])
    x = torch.randn(1, 70, D, requires_grad=True)
    w = torch.randn(D, W, requires_grad=True)
    b = torch.randn(D, requires_grad=True) if with_state else None
    h0 = torch.randn(3, D, W - 1, requires_grad=True) if with_state else None
    with bounds_checked() as r:
        y, final = causal_conv1d(x, w, b, "silu", cu_seqlens=cu, initial_state=h0, output_final_state=with_state)
        (y.square().sum() + (final.sum() if with_state else 0)).backward()
    assert r.faults == [] and "_conv4_bwd_kernel" in r.kernels
    assert x.grad is not None and w.grad is not None
