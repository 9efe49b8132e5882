"""Flash attention and split-KV decoding: Triton (interpreter on CPU) against the fp32 reference,
forward and every gradient, on awkward shapes. Tiles are 16 x 16 under the interpreter, so a few
dozen tokens cross several tiles, the diagonal and document boundaries inside a tile."""
import pytest
import torch

from deepwish.kernels.attention import flash_attention
from deepwish.kernels.attention import reference as ref
from deepwish.kernels.attention.decode import decode_attention

TOL = {torch.float32: 2e-5, torch.float16: 5e-3}


def _err(rel_err, want, got):
    """Relative RMS, or the absolute max where the reference is exactly zero (T = 1: a single
    visible key makes dq and dk vanish)."""
    if want.abs().max() == 0:
        return float((got.double() - want.double()).abs().max())
    return rel_err(want, got)


def _docs(B, T, lengths):
    """doc_ids [B, T] from a list of document lengths per row (the last one fills the row)."""
    ids = torch.zeros(B, T, dtype=torch.long)
    for b, lens in enumerate(lengths):
        cut = 0
        for d, n in enumerate(lens):
            ids[b, cut:cut + n] = d
            cut += n
        ids[b, cut:] = len(lens)
    return ids


CASES = [  # B, T, H, Hkv, Dqk, Dv, doc lengths per row (None: one document), window, softcap, dtype
    pytest.param(1, 1, 2, 2, 64, 64, None, 0, 0.0, torch.float32, id="T1"),
    pytest.param(2, 37, 4, 2, 64, 64, [[1, 1, 5, 1, 20], [36]], 0, 0.0, torch.float32, id="docs-len1-gqa2"),
    pytest.param(1, 33, 4, 1, 128, 128, [[3, 17]], 1, 0.0, torch.float16, id="window1-gqa4-fp16"),
    pytest.param(1, 21, 8, 1, 256, 256, None, 50, 20.0, torch.float32, id="window-gt-T-gqa8-d256-softcap"),
    pytest.param(1, 40, 2, 1, 192, 128, [[9, 1, 12]], 0, 0.0, torch.float16, id="dqk192-dv128"),
    pytest.param(2, 45, 2, 2, 128, 128, [[10, 30], [1, 2, 3]], 7, 5.0, torch.float32, id="docs-window-softcap"),
    pytest.param(1, 30, 6, 2, 32, 16, [[4, 1, 13]], 0, 0.0, torch.float32, id="gqa3-padded-heads-dqk-ne-dv"),
]


@pytest.mark.parametrize("dq_form", ["kernel", "atomic", "atomic_t"])
@pytest.mark.parametrize("B,T,H,Hkv,Dqk,Dv,lengths,window,softcap,dtype", CASES)
def test_flash_attention_matches_reference(rel_err, monkeypatch, B, T, H, Hkv, Dqk, Dv, lengths, window, softcap,
                                           dtype, dq_form):
    """Both backward forms (BACKWARD_DQ): dq from its own kernel, or added by the dK/dV kernel
    with atomics (the dQ kernel must then not run)."""
    from deepwish.kernels.attention import triton as tk
    monkeypatch.setattr(tk, "BACKWARD_DQ", dq_form)
    if dq_form != "kernel":
        monkeypatch.setattr(tk, "backward_dq", lambda *a, **k: pytest.fail("the dQ kernel ran in the atomic form"))
    scale = 0.7 * Dqk ** -0.5 if softcap else None  # a custom scale rides along with the softcap cases
    errs = _case_errors(rel_err, B, T, H, Hkv, Dqk, Dv, lengths, window, softcap, dtype, scale)
    assert max(errs.values()) < TOL[dtype], errs


def _case_errors(rel_err, B, T, H, Hkv, Dqk, Dv, lengths, window, softcap, dtype, scale=None) -> dict:
    """The relative errors of flash_attention's output and gradients (o, dq, dk, dv) against the
    reference on one CASES entry, random inputs of seed 0."""
    torch.manual_seed(0)
    q = torch.randn(B, T, H, Dqk, dtype=dtype, requires_grad=True)
    k = torch.randn(B, T, Hkv, Dqk, dtype=dtype, requires_grad=True)
    v = torch.randn(B, T, Hkv, Dv, dtype=dtype, requires_grad=True)
    ids = None if lengths is None else _docs(B, T, lengths)
    g = torch.randn(B, T, H, Dv)
    want = ref.attention(q, k, v, doc_ids=ids, window=window, softcap=softcap, scale=scale)
    got = flash_attention(q, k, v, doc_ids=ids, window=window, softcap=softcap, scale=scale)
    assert got.dtype == dtype and got.shape == want.shape
    wg = torch.autograd.grad((want.float() * g).sum(), (q, k, v))
    gg = torch.autograd.grad((got.float() * g).sum(), (q, k, v))
    return dict(zip(("o", "dq", "dk", "dv"), (_err(rel_err, a, b) for a, b in zip((want, *wg), (got, *gg)))))


@pytest.mark.parametrize("load", ["pointer", "tma"])
@pytest.mark.parametrize("B,T,H,Hkv,Dqk,Dv,lengths,window,softcap,dtype",
                         [c for c in CASES if c.values[-1] == torch.float16])
def test_kv_tile_load_forms_match_reference(rel_err, monkeypatch, B, T, H, Hkv, Dqk, Dv, lengths, window, softcap,
                                            dtype, load):
    """Both LOADS forms of 16-bit inputs: the forward's and the dQ kernel's K and V tiles through
    pointers, or through descriptors (rows past T and the padded head dim are the descriptor's
    zeros, not masked loads); "tma" must build its descriptors (two per kernel), not fall back."""
    from deepwish.kernels.attention import triton as tk
    for kind in ("fwd", "dq"):
        monkeypatch.setitem(tk.LOADS, kind, load)
    made = []
    real = tk._tile_descriptor
    monkeypatch.setattr(tk, "_tile_descriptor", lambda *a: made.append(real(*a)) or made[-1])
    errs = _case_errors(rel_err, B, T, H, Hkv, Dqk, Dv, lengths, window, softcap, dtype)
    assert len(made) == (4 if load == "tma" else 0) and all(d is not None for d in made)
    assert max(errs.values()) < TOL[dtype], errs


def test_tensor_descriptors_need_16bit_aligned_tiles():
    """What the copy engine cannot take (fp32, a base or stride off 16 bytes, a box side over 256)
    gets no descriptor: the kernels then load through pointers. An unknown load form is an error."""
    from deepwish.kernels.attention import triton as tk
    with pytest.raises(ValueError, match="LOADS"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(tk.LOADS, "fwd", "tensor")
            tk._kv_descriptors("fwd", None, None, 16, {})
    x = torch.zeros(1, 8, 2, 64, dtype=torch.float16)
    box = [1, 16, 1, 64]
    assert tk._tile_descriptor(x, box) is not None
    assert tk._tile_descriptor(x.float(), box) is None
    assert tk._tile_descriptor(torch.zeros(1, 8, 2, 65, dtype=torch.float16)[..., 1:], box) is None
    assert tk._tile_descriptor(torch.zeros(1, 8, 2, 68, dtype=torch.float16)[..., :64], box) is None
    assert tk._tile_descriptor(x, [1, 256, 1, 64]) is not None and tk._tile_descriptor(x, [1, 512, 1, 64]) is None


def test_documents_are_isolated():
    """Packed rows equal the documents run one by one (and a document's output ignores what
    follows it)."""
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 24, 2, 64), torch.randn(1, 24, 1, 64), torch.randn(1, 24, 1, 64)
    ids = _docs(1, 24, [[7, 9]])
    packed = flash_attention(q, k, v, doc_ids=ids)
    for a, b in ((0, 7), (7, 16), (16, 24)):
        alone = flash_attention(q[:, a:b], k[:, a:b], v[:, a:b])
        assert torch.allclose(packed[:, a:b], alone, atol=1e-6)


def test_precomputed_document_bounds_give_the_same_result():
    """`bounds` built once per batch (as the bench and a model would) equal the per-call ones;
    bounds of the wrong shape or dtype are an error."""
    from deepwish.kernels.attention.triton import document_bounds
    torch.manual_seed(6)
    q, k, v = torch.randn(2, 19, 2, 16), torch.randn(2, 19, 1, 16), torch.randn(2, 19, 1, 16)
    ids = _docs(2, 19, [[4, 1, 6], [18]])
    bounds = document_bounds(ids, 2, 19, q.device)
    assert bounds[0][0].tolist()[:12] == [0] * 4 + [4] + [5] * 6 + [11]
    assert bounds[1][0].tolist()[:12] == [4] * 4 + [5] + [11] * 6 + [19]
    assert torch.equal(flash_attention(q, k, v, doc_ids=ids), flash_attention(q, k, v, doc_ids=ids, bounds=bounds))
    with pytest.raises(ValueError, match="bounds"):
        flash_attention(q, k, v, doc_ids=ids, bounds=(bounds[0].long(), bounds[1]))


def test_unknown_backward_form_is_an_error(monkeypatch):
    from deepwish.kernels.attention import triton as tk
    monkeypatch.setattr(tk, "BACKWARD_DQ", "atomics")
    q = torch.randn(1, 3, 2, 16, requires_grad=True)
    with pytest.raises(ValueError, match="BACKWARD_DQ"):
        flash_attention(q, q.detach(), q.detach()).sum().backward()


@pytest.mark.parametrize("bad,match", [
    (dict(dtype=torch.float64), "dtype"),
    (dict(Dqk=512), "head dims"),
    (dict(Hkv=3), "multiple"),
    (dict(window=-1), "window"),
])
def test_flash_attention_rejects_bad_input(bad, match):
    o = dict(dtype=torch.float32, Dqk=32, Hkv=2, window=0)
    o.update(bad)
    q = torch.randn(1, 5, 4, o["Dqk"], dtype=o["dtype"])
    k = torch.randn(1, 5, o["Hkv"], o["Dqk"], dtype=o["dtype"])
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, k, window=o["window"])


@pytest.mark.parametrize("Tq,H,Hkv,window,dtype", [
    (1, 8, 2, 0, torch.float32),     # one new token, GQA 4
    (4, 4, 4, 0, torch.float16),     # k+1 = 4 speculative tokens, no grouping
    (3, 8, 1, 9, torch.float32),     # windowed layer over a plain cache, GQA 8
])
def test_decode_matches_reference_over_a_static_cache(rel_err, Tq, H, Hkv, window, dtype):
    torch.manual_seed(2)
    B, L, D = 2, 90, 64
    q = torch.randn(B, Tq, H, D, dtype=dtype)
    kc, vc = torch.randn(B, Hkv, L, D, dtype=dtype), torch.randn(B, Hkv, L, 32, dtype=dtype)
    q_pos = torch.stack([torch.arange(Tq) + 40, torch.arange(Tq) + L - Tq])  # rows at different lengths
    got = decode_attention(q, kc, vc, q_pos, None, window=window, softcap=3.0)
    want = ref.decode_attention(q, kc, vc, q_pos, torch.arange(L).expand(B, L), window=window, softcap=3.0)
    assert rel_err(want, got) < TOL[dtype]
    for splits in (1, 3):  # one split stored as it is; three merged by the merge kernel
        assert rel_err(want, decode_attention(q, kc, vc, q_pos, None, window=window, softcap=3.0, splits=splits)) < TOL[dtype]


@pytest.mark.parametrize("q_pos", [[[5, 6, 7]], [[150, 151, 152]], [[30, 90, 170]]],
                         ids=["window-before-start", "consecutive", "spread-positions"])
def test_windowed_decode_splits_the_window_not_the_cache(rel_err, q_pos):
    """A window much shorter than a plain cache: the splits tile the window's span from its first
    slot (a few chunks, not one per SM over the whole cache), and the last split takes whatever is
    left up to the last query, so queries farther apart than Tq still see their whole windows."""
    torch.manual_seed(4)
    B, L, H, Hkv, D, W = 1, 200, 4, 1, 32, 12
    q_pos = torch.tensor(q_pos)
    q = torch.randn(B, q_pos.shape[1], H, D)
    kc, vc = torch.randn(B, Hkv, L, D), torch.randn(B, Hkv, L, D)
    want = ref.decode_attention(q, kc, vc, q_pos, torch.arange(L).expand(B, L), window=W)
    got = decode_attention(q, kc, vc, q_pos, None, window=W)
    assert rel_err(want, got) < TOL[torch.float32]


def test_decode_over_a_ring_cache_matches_full_attention(rel_err):
    """A windowed layer decoding through a RingKVCache (wrapped several times, then a k+1 chunk)
    equals windowed attention over the whole sequence."""
    from deepwish.model.ring_cache import RingKVCache
    torch.manual_seed(3)
    B, H, Hkv, D, W, T = 1, 4, 2, 32, 6, 30
    q, k, v = torch.randn(B, T, H, D), torch.randn(B, T, Hkv, D), torch.randn(B, T, Hkv, D)
    full = ref.attention(q, k, v, window=W)
    cache = RingKVCache.empty(B, W, 3, Hkv, D)
    outs = []
    for t in range(T - 3):
        pos = torch.tensor([[t]])
        kk, vv, kp = cache.keys_for(pos, k[:, t:t + 1].transpose(1, 2), v[:, t:t + 1].transpose(1, 2))
        outs.append(decode_attention(q[:, t:t + 1], kk, vv, pos, kp, window=W))
    pos = torch.arange(T - 3, T)[None]
    kk, vv, kp = cache.keys_for(pos, k[:, -3:].transpose(1, 2), v[:, -3:].transpose(1, 2))
    outs.append(decode_attention(q[:, -3:], kk.contiguous(), vv.contiguous(), pos, kp, window=W))
    assert rel_err(full, torch.cat(outs, 1)) < 1e-5


def test_flex_forward_matches_reference(rel_err):
    """FlexAttention path (eager on the CPU, forward only there) with documents, window, softcap."""
    from deepwish.kernels.attention.flex import flex_attention
    torch.manual_seed(4)
    q, k, v = torch.randn(2, 40, 4, 16), torch.randn(2, 40, 2, 16), torch.randn(2, 40, 2, 16)
    ids = _docs(2, 40, [[5, 1, 20], [39]])
    want = ref.attention(q, k, v, doc_ids=ids, window=9, softcap=4.0)
    assert rel_err(want, flex_attention(q, k, v, doc_ids=ids, window=9, softcap=4.0)) < 1e-5


def test_flash_attention_traces_into_one_compiled_graph():
    """The trainer compiles each block: the kernels are custom ops, so torch.compile sees one graph
    (fullgraph) with their autograd, and gradients still match the reference."""
    torch.manual_seed(5)
    q, k, v = (torch.randn(1, 20, h, 16, requires_grad=True) for h in (4, 2, 2))
    ids = _docs(1, 20, [[8]])

    def loss(q, k, v):
        return flash_attention(q, k, v, doc_ids=ids, window=5).square().sum()

    got = torch.autograd.grad(torch.compile(loss, backend="aot_eager", fullgraph=True)(q, k, v), (q, k, v))
    want = torch.autograd.grad(ref.attention(q, k, v, doc_ids=ids, window=5).square().sum(), (q, k, v))
    for a, b in zip(want, got):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,rot,zero_centered", [(1, 16, False), (3, 8, False), (1, 8, True)])
def test_decode_prologue_matches_reference(dtype, T, rot, zero_centered, monkeypatch):
    """QK-norm, rotary (whole or partial) and the cache write of a decode step in one kernel: q,
    and both caches slot for slot (the written slots and every other one), as the reference."""
    from deepwish.kernels.attention.decode import decode_prologue
    B, H, Hkv, D, L = 2, 4, 2, 16, 12
    y = torch.randn(B, T, (H + 2 * Hkv) * D).to(dtype)
    wq, wk = (torch.randn(D) * 0.3 + (0.0 if zero_centered else 1.0)).to(dtype), torch.randn(D).to(dtype)
    angle = torch.rand(B, T, rot // 2) * 6.0
    cos, sin = angle.cos(), angle.sin()
    positions = torch.stack([torch.arange(T) + 5, torch.arange(T) + 2])  # rows at different offsets
    before = torch.randn(B, Hkv, L, D).to(dtype), torch.randn(B, Hkv, L, D).to(dtype)
    caches = [tuple(c.clone() for c in before) for _ in range(2)]
    q_ref = ref.decode_prologue(y, wq, wk, 1e-6, cos, sin, positions, *caches[0], H, zero_centered)
    q = decode_prologue(y, wq, wk, 1e-6, cos, sin, positions, *caches[1], H, zero_centered)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(q, q_ref, **tol)
    for got, want, old in zip(caches[1], caches[0], before):
        torch.testing.assert_close(got, want, **tol)
        assert not torch.equal(got, old)  # the step's slots were written
    with pytest.raises(ValueError, match="decode_prologue: y"):
        decode_prologue(y[..., :-D], wq, wk, 1e-6, cos, sin, positions, *caches[1], H)
    _stops_past_the_cache(monkeypatch, lambda: decode_prologue(y, wq, wk, 1e-6, cos, sin, positions + L - 2,
                                                                *caches[1], H))
    torch.testing.assert_close(caches[1][0], caches[0][0], **tol)  # and nothing written past it


@pytest.mark.parametrize("T,rot", [(1, 16), (3, 8)])
def test_decode_prologue_writes_the_unrotated_keys_for_nsa(T, rot):
    """NSA's form of the prologue (k_raw_cache): the same q and caches, and k normed but not rotated
    in its own cache, as the reference; without it nothing else changes."""
    from deepwish.kernels.attention.decode import decode_prologue
    torch.manual_seed(6)
    B, H, Hkv, D, L = 2, 4, 2, 16, 12
    y = torch.randn(B, T, (H + 2 * Hkv) * D, dtype=torch.float16)
    wq, wk = (torch.randn(D) * 0.3 + 1.0).half(), (torch.randn(D) * 0.3 + 1.0).half()
    angle = torch.rand(B, T, rot // 2) * 6.0
    cos, sin = angle.cos(), angle.sin()
    positions = torch.stack([torch.arange(T) + 5, torch.arange(T) + 2])
    before = [torch.randn(B, Hkv, L, D).half() for _ in range(3)]
    want, got = ([c.clone() for c in before] for _ in range(2))
    q_ref = ref.decode_prologue(y, wq, wk, 1e-6, cos, sin, positions, want[0], want[1], H, k_raw_cache=want[2])
    q = decode_prologue(y, wq, wk, 1e-6, cos, sin, positions, got[0], got[1], H, k_raw_cache=got[2])
    tol = dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(q, q_ref, **tol)
    for g, w, old in zip(got, want, before):
        torch.testing.assert_close(g, w, **tol)
        assert not torch.equal(g, old)
    assert not torch.allclose(got[2], got[0], **tol)   # the raw keys are not the rotated ones
    with pytest.raises(ValueError, match="k_cache's shape"):
        decode_prologue(y, wq, wk, 1e-6, cos, sin, positions, got[0], got[1], H, k_raw_cache=got[2][:, :1])


def test_decode_prologue_reads_cos_and_sin_laid_out_apart():
    """cos and sin as views with different strides (one transposed, one broadcast over the batch):
    the op lays them out alike before its kernel reads both with one set of strides."""
    from deepwish.kernels.attention.decode import decode_prologue
    torch.manual_seed(7)
    B, T, H, Hkv, D, L, rot = 2, 3, 4, 2, 16, 12, 16
    y = torch.randn(B, T, (H + 2 * Hkv) * D)
    wq, wk = torch.randn(D) * 0.3 + 1.0, torch.randn(D) * 0.3 + 1.0
    cos = (torch.rand(B, rot // 2, T) * 6.0).cos().transpose(1, 2)        # [B, T, R], stride (.., 1, T)
    sin = (torch.rand(1, T, rot // 2) * 6.0).sin().expand(B, T, rot // 2)  # batch stride 0
    assert cos.stride() != sin.stride() and cos.stride(-1) != 1
    positions = torch.stack([torch.arange(T) + 5, torch.arange(T) + 2])
    before = torch.randn(B, Hkv, L, D), torch.randn(B, Hkv, L, D)
    want, got = ([c.clone() for c in before] for _ in range(2))
    q_ref = ref.decode_prologue(y, wq, wk, 1e-6, cos.contiguous(), sin.contiguous(), positions, *want, H)
    q = decode_prologue(y, wq, wk, 1e-6, cos, sin, positions, *got, H)
    torch.testing.assert_close(q, q_ref, rtol=1e-5, atol=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def _stops_past_the_cache(monkeypatch, call):
    """A position past the cache: the kernel's device-side assertion (compiled in on the GPU by its
    debug flag; the interpreter honours assertions only in its debug options)."""
    import dataclasses

    from triton.runtime import interpreter
    builder = interpreter.interpreter_builder
    monkeypatch.setattr(builder, "options", dataclasses.replace(builder.options, debug=True))
    with pytest.raises(Exception, match="a position past the cache"):
        call()


def test_decode_kernels_name_a_tile_they_cannot_hold():
    """Too many query rows for one program, a head dim past 256: errors that say so."""
    k = torch.randn(1, 1, 8, 16)
    with pytest.raises(ValueError, match="Tq·G <= 128 rows; got Dqk=16, Dv=16, Tq=9, G=16"):
        decode_attention(torch.randn(1, 9, 16, 16), k, k, torch.zeros(1, 9, dtype=torch.long))
    big = torch.randn(1, 1, 8, 320)
    with pytest.raises(ValueError, match="head dims <= 256"):
        decode_attention(torch.randn(1, 1, 1, 320), big, big, torch.zeros(1, 1, dtype=torch.long))


@pytest.mark.parametrize("B,Hkv,L,wide", [(64, 8, 12, True), (1, 2, 64, False), (2, 2, 12, False)])
def test_split_launch_picks_the_wide_tile_and_bounds_the_prefetch(B, Hkv, L, wide, monkeypatch):
    """Host choices of the split launch: one split over a grid of more than DECODE_PROGRAMS_PER_SM
    programs a SM takes DECODE_DIRECT_TILE (batch 64: one wave, not two), anything else the usual
    tile; under PDL the keys' and values' L2 prefetch is on only while the whole cache takes at most
    PREFETCH_MAX_BYTES."""
    from deepwish.kernels.attention import decode
    launches = []

    class Recorder:
        def __init__(self, into):
            self.into = into

        def __getitem__(self, grid):
            return lambda *args, **kw: self.into.append((grid, kw))
    monkeypatch.setattr(decode, "_split_kernel", Recorder(launches))
    monkeypatch.setattr(decode, "_merge_kernel", Recorder([]))  # the recorded split kernel wrote no partials
    monkeypatch.setattr(decode, "launch_options", lambda pdl, device, name: (True, {}))  # as on a Hopper GPU
    monkeypatch.setattr(decode, "DECODE_DIRECT_TILE", (32, 4, 3))  # unlike the usual tile, so the pick shows
    q = torch.randn(B, 1, 2 * Hkv, 16)
    k, v = torch.randn(B, Hkv, L, 16), torch.randn(B, Hkv, L, 16)
    pos = torch.full((B, 1), L - 1)
    decode_attention(q, k, v, pos, pdl=True)
    grid, kw = launches[-1]
    assert (grid[0] == 1) == (B * Hkv > 1 and L <= decode.DECODE_CHUNK_UNIT)  # planned: one split here
    tile = (kw["BN"], kw["num_warps"], kw["num_stages"])
    assert tile == ((32, 4, 3) if wide else (decode.DECODE_BN, decode.DECODE_WARPS, decode.DECODE_STAGES))
    assert kw["PREFETCH"] is True  # a few KB of cache
    monkeypatch.setattr(decode, "PREFETCH_MAX_BYTES", B * Hkv * L * 32 * 4 - 16)  # one slot row over the bound
    decode_attention(q, k, v, pos, pdl=True)
    assert launches[-1][1]["PREFETCH"] is False
