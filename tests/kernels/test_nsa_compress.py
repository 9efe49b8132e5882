"""kernels/nsa/compress.py under the interpreter: the blocks ending in a cached chunk, compressed in
one launch, against the model's torch form (model/nsa.py `NSA.compress_chunk_`): the same compressed
slots and block ends, nothing else written."""
import copy

import pytest
import torch

from deepwish.config import model_config
from deepwish.kernels.grid import counters
from deepwish.kernels.nsa import compress
from deepwish.kernels.nsa.compress import compress_cache_blocks
from deepwish.model.nsa import NEVER
from deepwish.model.transformer import Transformer


def mixer_and_cache(dtype, L=96, B=2, preset="qwen3_nsa_tiny", device="cpu", **kw):
    torch.manual_seed(0)
    cfg = dict(n_layers=1, attn_backend="torch", nsa_backend="torch", **kw)
    model = Transformer(model_config(preset, **cfg)).eval().to(device, dtype)
    nsa = model.blocks[0].mixer
    for m in (nsa.k_compress, nsa.v_compress):   # a trained φ, not its zero / small initialisation
        for p in m.parameters():
            p.data = torch.randn_like(p) * 0.2
    cache = nsa.make_cache(B, L, dtype, device)
    cache.k_raw.normal_()
    cache.v.normal_()
    return model, nsa, cache


def chunk_ctx(model, p0, T):
    positions = torch.arange(T) + torch.tensor(p0)[:, None]   # one chunk a row, from p0[b]
    positions = positions.to(model.embed.weight.device)
    return model.context(torch.zeros_like(positions), positions)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("p0, T", [
    ((15, 40), 1),       # row 0's token ends the first block (l 16), row 1's ends none
    ((23, 31), 1),       # both end one (stride 8)
    ((3, 12), 5),        # row 0: no block yet; row 1: the first block ends inside the chunk
    ((23, 57), 17),      # row 0: three ends at T 17 (T // d + 1 candidates, every one used); row 1: two
    ((95, 87), 1),       # the cache's last block (slot N - 1) and the one before
])
def test_kernel_writes_the_torch_forms_slots(dtype, tol, p0, T):
    model, nsa, cache = mixer_and_cache(dtype)
    ctx = chunk_ctx(model, p0, T)
    want = copy.deepcopy(cache)
    nsa.compress_chunk_(want, ctx)
    compress_cache_blocks(cache.k_raw, cache.v, ctx.positions, nsa.k_compress, nsa.v_compress, ctx.cos, ctx.sin,
                          cache.k_cmp, cache.v_cmp, cache.cmp_end, nsa.cmp_stride)
    n = cache.n_blocks   # the torch form sends missing blocks to the trash slot N; the kernel writes none
    assert torch.equal(cache.cmp_end, want.cmp_end)
    assert (cache.cmp_end[:, :n] != NEVER).sum() == sum(  # every block ending in the chunk, no other
        (p >= 15 and (p - 15) % 8 == 0) for row in ctx.positions.tolist() for p in row)
    torch.testing.assert_close(cache.k_cmp[:, :n], want.k_cmp[:, :n], atol=tol, rtol=tol)
    torch.testing.assert_close(cache.v_cmp[:, :n], want.v_cmp[:, :n], atol=tol, rtol=tol)
    assert not cache.k_cmp[:, n].any() and not cache.v_cmp[:, n].any()


@pytest.mark.parametrize("kw", [dict(rope_partial=0.5), dict(n_heads=36, n_kv_heads=18)])
def test_partial_rotary_and_more_kv_heads_than_one_tile(kw):
    """A rotated prefix of the channels (the others pass through), and 18 KV heads: two programs a
    block, 16 heads and 2."""
    model, nsa, cache = mixer_and_cache(torch.float32, **kw)
    ctx = chunk_ctx(model, (31, 47), 3)
    want = copy.deepcopy(cache)
    nsa.compress_chunk_(want, ctx)
    compress_cache_blocks(cache.k_raw, cache.v, ctx.positions, nsa.k_compress, nsa.v_compress, ctx.cos, ctx.sin,
                          cache.k_cmp, cache.v_cmp, cache.cmp_end, nsa.cmp_stride)
    n = cache.n_blocks
    assert torch.equal(cache.cmp_end, want.cmp_end)
    torch.testing.assert_close(cache.k_cmp[:, :n], want.k_cmp[:, :n], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.v_cmp[:, :n], want.v_cmp[:, :n], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("splits", [1, 2, 16, 3])
def test_every_slicing_of_w1_writes_the_same_slots(monkeypatch, splits):
    """W_1's column blocks in 1, 2 or l (16) slices, or 3 (does not divide l: one slice), the same
    slots as the torch form's in fp32 and a second chunk after the first: the slices' counts are back
    at zero after each launch."""
    monkeypatch.setattr(compress, "SPLITS", splits)
    model, nsa, cache = mixer_and_cache(torch.float32)
    want = copy.deepcopy(cache)
    for p0 in ((15, 23), (31, 39)):   # both rows end a block at both chunks
        ctx = chunk_ctx(model, p0, 1)
        nsa.compress_chunk_(want, ctx)
        compress_cache_blocks(cache.k_raw, cache.v, ctx.positions, nsa.k_compress, nsa.v_compress, ctx.cos, ctx.sin,
                              cache.k_cmp, cache.v_cmp, cache.cmp_end, nsa.cmp_stride)
        if splits in (2, 16):
            assert not counters(cache.k_raw.device, "nsa_compress_blocks", compress.COUNTERS).any()
    n = cache.n_blocks
    assert torch.equal(cache.cmp_end, want.cmp_end) and (cache.cmp_end[:, :n] != NEVER).sum() == 4
    torch.testing.assert_close(cache.k_cmp[:, :n], want.k_cmp[:, :n], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.v_cmp[:, :n], want.v_cmp[:, :n], atol=1e-5, rtol=1e-5)


def test_cos_and_sin_laid_out_apart_write_the_same_slots():
    """cos as a view whose last dim is not contiguous, sin contiguous (strides unlike each other's):
    the op lays them out alike before its kernel reads both with cos's strides."""
    model, nsa, cache = mixer_and_cache(torch.float32)
    ctx = chunk_ctx(model, (31, 47), 3)
    want = copy.deepcopy(cache)
    nsa.compress_chunk_(want, ctx)
    cos = ctx.cos.transpose(1, 2).contiguous().transpose(1, 2)   # the same values, [B, T, R] with strides (R·T, 1, T)
    sin = ctx.sin.contiguous()
    assert cos.stride() != sin.stride() and cos.stride(-1) != 1
    compress_cache_blocks(cache.k_raw, cache.v, ctx.positions, nsa.k_compress, nsa.v_compress, cos, sin,
                          cache.k_cmp, cache.v_cmp, cache.cmp_end, nsa.cmp_stride)
    n = cache.n_blocks
    assert torch.equal(cache.cmp_end, want.cmp_end)
    torch.testing.assert_close(cache.k_cmp[:, :n], want.k_cmp[:, :n], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.v_cmp[:, :n], want.v_cmp[:, :n], atol=1e-5, rtol=1e-5)


def test_mismatched_inputs_are_named():
    model, nsa, cache = mixer_and_cache(torch.float32)
    ctx = chunk_ctx(model, (15, 40), 1)
    with pytest.raises(ValueError, match="shapes disagree"):
        compress_cache_blocks(cache.k_raw, cache.v[:, :1], ctx.positions, nsa.k_compress, nsa.v_compress, ctx.cos,
                              ctx.sin, cache.k_cmp, cache.v_cmp, cache.cmp_end, nsa.cmp_stride)
    with pytest.raises(ValueError, match="share one dtype"):
        compress_cache_blocks(cache.k_raw.half(), cache.v.half(), ctx.positions, nsa.k_compress, nsa.v_compress,
                              ctx.cos, ctx.sin, cache.k_cmp.half(), cache.v_cmp.half(), cache.cmp_end, nsa.cmp_stride)


@pytest.mark.gpu
@pytest.mark.parametrize("p0, T", [((4095, 1000), 1), ((31, 2064), 5), ((47, 8190), 1)])
def test_kernel_writes_the_torch_forms_slots_on_gpu_at_the_models_shape(p0, T):
    """qwen3_0.6b_nsa's φ (8 KV heads, D 128, blocks of 32 every 16) in bf16 on the GPU: the torch
    form's slots to within bf16 rounding (the two sum φ's products in different orders)."""
    model, nsa, cache = mixer_and_cache(torch.bfloat16, L=8192, preset="qwen3_0.6b_nsa", device="cuda")
    ctx = chunk_ctx(model, p0, T)
    want = copy.deepcopy(cache)
    nsa.compress_chunk_(want, ctx)
    compress_cache_blocks(cache.k_raw, cache.v, ctx.positions, nsa.k_compress, nsa.v_compress, ctx.cos, ctx.sin,
                          cache.k_cmp, cache.v_cmp, cache.cmp_end, nsa.cmp_stride)
    n = cache.n_blocks
    assert torch.equal(cache.cmp_end, want.cmp_end) and (cache.cmp_end[:, :n] != NEVER).any()
    for got, ref in ((cache.k_cmp, want.k_cmp), (cache.v_cmp, want.v_cmp)):
        err = (got[:, :n].float() - ref[:, :n].float()).norm() / ref[:, :n].float().norm()
        assert err < 1e-2, err


def test_the_custom_op_passes_opcheck():
    """torch.compile's view of the op: the three compressed-cache buffers declared mutated and
    nothing else (torch.library.opcheck's schema, fake-tensor and AOT checks), on a chunk that ends
    a block."""
    model, nsa, cache = mixer_and_cache(torch.float32)
    ctx = chunk_ctx(model, (15, 23), 1)
    weights = [t.detach().contiguous() for m in (nsa.k_compress, nsa.v_compress)
               for t in (m.pos, m.up.weight, m.down.weight)]
    torch.library.opcheck(torch.ops.deepwish.nsa_compress_blocks.default,
                          (cache.k_raw, cache.v, ctx.positions, *weights, ctx.cos, ctx.sin, cache.k_cmp, cache.v_cmp,
                           cache.cmp_end, nsa.cmp_stride, "off"))
