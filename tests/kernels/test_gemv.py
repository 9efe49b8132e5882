"""kernels/gemv: the Triton matrix-vector product against the reference (CPU: the interpreter,
conftest), on awkward shapes; and `linear`'s dispatch."""
import pytest
import torch

from deepwish.kernels.gemv import linear, reference


@pytest.mark.parametrize("M", [1, 5, 16, 40, 64])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gemv_matches_reference(rel_err, M, bias, dtype):
    """fp16, not bf16: the rows kernel's native dot in bf16 is not exact in the interpreter (on the
    GPU: test_decode_fused_gpu)."""
    from deepwish.kernels.gemv.triton import gemv
    N, K = 37, 45
    x = torch.randn(M, K).to(dtype)
    w = torch.randn(N, K).to(dtype)
    b = torch.randn(N).to(dtype) if bias else None
    out = gemv(x, w, b)
    ref = reference.gemv(x, w, b)
    assert out.shape == (M, N) and out.dtype == dtype
    assert rel_err(ref, out) < (1e-6 if dtype == torch.float32 else 1e-2)


def test_gemv_leading_dims_and_errors():
    from deepwish.kernels.gemv.triton import gemv
    x = torch.randn(2, 1, 20)
    w = torch.randn(9, 20)
    assert torch.allclose(gemv(x, w), x @ w.t(), atol=1e-5)
    with pytest.raises(ValueError, match="rows"):
        gemv(torch.randn(65, 20), w)
    with pytest.raises(ValueError, match="weight"):
        gemv(x, torch.randn(9, 21))


def test_linear_dispatch(monkeypatch):
    x, w = torch.randn(1, 1, 20), torch.randn(9, 20)
    with torch.no_grad():
        assert torch.allclose(linear(x, w, backend="triton"), x @ w.t(), atol=1e-5)
        assert torch.equal(linear(x, w), torch.nn.functional.linear(x, w))
    # a prefill chunk of a few tokens (here 5) is not a decode step: cuBLAS, never the kernel
    import deepwish.kernels.gemv.triton as tk

    def no_kernel(*a, **k):
        raise AssertionError("the GEMV kernel ran for a prefill chunk")
    monkeypatch.setattr(tk, "gemv", no_kernel)
    with torch.no_grad():
        xs = torch.randn(1, 5, 20)
        assert torch.equal(linear(xs, w, backend="triton"), torch.nn.functional.linear(xs, w))
        with pytest.raises(AssertionError, match="prefill"):  # and the decode shape does reach it
            linear(x, w, backend="triton")
    # with gradients (training) the cuBLAS path, whatever the setting: the kernel has no backward
    w.requires_grad_(True)
    y = linear(x, w, backend="triton")
    y.sum().backward()
    assert w.grad is not None


def test_row_limits_follow_the_dtype_and_compilation(monkeypatch):
    """The model's steps reach the kernel up to MAX_ROWS_CAPTURED rows in bf16/fp16 when not
    compiled (measured), up to MAX_ROWS compiled or in fp32; the kernel itself takes 64."""
    from deepwish.kernels import gemv as gd
    assert (gd.MAX_ROWS, gd.MAX_ROWS_CAPTURED) == (16, 64)
    w16, w32 = torch.randn(9, 20).half(), torch.randn(9, 20)

    def takes(rows, w):
        return gd.takes_gemv(torch.randn(rows, 1, 20).to(w.dtype), w, "triton")
    with torch.no_grad():
        assert takes(64, w16) and not takes(65, w16)
        assert takes(16, w32) and not takes(17, w32)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert takes(16, w16) and not takes(17, w16)


@pytest.mark.parametrize("M", [1, 3, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("fusion", ["norm", "norm_zero_centered", "glu", "norm+glu", "residual", "norm+residual"])
def test_fused_gemv_matches_reference(rel_err, M, dtype, fusion):
    """The prologue (RMSNorm) and the epilogues (SwiGLU's silu(gate)·up of a gate/up projection,
    the residual add), on a K that is not a multiple of the tile; and the reference is the model's
    own ops (model/norm.py, model/mlp.py, the block's add), rounding where they round."""
    import torch.nn.functional as F

    from deepwish.kernels.gemv.triton import gemv
    from deepwish.model.norm import rms_norm
    N, K = 37, 45
    zc = fusion == "norm_zero_centered"
    glu = "glu" in fusion
    x = torch.randn(M, K).to(dtype)
    w = (0.2 * torch.randn(2 * N if glu else N, K)).to(dtype)
    nw = ((0.1 if zc else 1.0) + 0.3 * torch.randn(K)).to(dtype)
    r = torch.randn(M, N).to(dtype)
    kw = dict(norm=(nw, 1e-6, zc) if "norm" in fusion else None, glu=glu,
              residual=r if "residual" in fusion else None)
    want = reference.gemv(x, w, **kw)
    xin = rms_norm(x, nw, 1e-6, zc) if kw["norm"] else x
    ops = F.linear(xin, w)
    if glu:
        g, u = ops.chunk(2, dim=-1)
        ops = F.silu(g) * u
    ops = r + ops if kw["residual"] is not None else ops
    assert rel_err(ops, want) < (1e-6 if dtype == torch.float32 else 1e-3)
    got = gemv(x, w, **kw)
    assert got.shape == (M, N) and got.dtype == dtype
    assert rel_err(want, got) < (1e-6 if dtype == torch.float32 else 1e-2)
    assert rel_err(want, gemv(x, w[:N])) > 0.05  # the fusion changes the result: it ran


@pytest.mark.parametrize("M", [3, 64])
@pytest.mark.parametrize("fusion", ["plain", "norm", "glu+residual"])
def test_rows_kernel_native_dot_matches_tf32(rel_err, monkeypatch, M, fusion):
    """ROWS_DOT "native" (x's tile in x's dtype, W's as loaded) against the reference and the tf32
    form: a plain x is exact in x's dtype, the norm's w·x is rounded once (fp16: the interpreter's
    bf16 dot is not exact)."""
    from deepwish.kernels.gemv import triton as gk
    N, K = 37, 45
    g = torch.Generator().manual_seed(3)
    glu = fusion.startswith("glu")
    x = torch.randn(M, K, generator=g).half()
    w = (0.2 * torch.randn(2 * N if glu else N, K, generator=g)).half()
    kw = dict(norm=((1 + 0.3 * torch.randn(K, generator=g)).half(), 1e-6, False) if fusion == "norm" else None,
              glu=glu, residual=torch.randn(M, N, generator=g).half() if glu else None)
    want = reference.gemv(x, w, **kw)
    got = {}
    for form in ("tf32", "native"):
        monkeypatch.setattr(gk, "ROWS_DOT", form)
        got[form] = gk.gemv(x, w, **kw)
    assert rel_err(want, got["native"]) < 1e-2 and rel_err(got["tf32"], got["native"]) < 1e-2
    if fusion != "norm":  # exact operands, fp32 accumulation both ways: the same sums but for order
        assert rel_err(got["tf32"], got["native"]) < 1e-3


@pytest.mark.parametrize("M", [3, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("fusion", ["plain", "bias", "norm+glu", "norm_zero_centered+residual", "norm+row_sums"])
def test_rows_kernel_with_k_split_matches_reference(rel_err, monkeypatch, M, dtype, fusion):
    """ROWS_SPLIT_K: K cut into slices over grid axis 1, the last program of each N tile adding the
    partials up and applying the epilogue: the reference's result, call after call (the counts
    return to zero), with every fusion the kernel has (and the norm's statistics summed a row per
    tile, ROWS_NORM_ROW_SUMS)."""
    from deepwish.kernels.gemv import triton as gk
    from deepwish.kernels.grid import counters
    monkeypatch.setattr(gk, "ROWS_SPLIT_K", True)
    monkeypatch.setattr(gk, "ROWS_NORM_ROW_SUMS", "row_sums" in fusion)
    monkeypatch.setattr(gk._rows_kernel, "cache", {})
    N, K = 37, 45
    g = torch.Generator().manual_seed(5)
    glu = "glu" in fusion
    x = torch.randn(M, K, generator=g).to(dtype)
    w = (0.2 * torch.randn(2 * N if glu else N, K, generator=g)).to(dtype)
    kw = dict(bias=(0.5 * torch.randn(N, generator=g)).to(dtype) if fusion == "bias" else None,
              norm=((0.1 + 0.3 * torch.randn(K, generator=g)).to(dtype), 1e-6, "zero_centered" in fusion)
              if "norm" in fusion else None, glu=glu,
              residual=torch.randn(M, N, generator=g).to(dtype) if "residual" in fusion else None)
    slices = []
    real = gk._k_slices
    monkeypatch.setattr(gk, "_k_slices", lambda *a: slices.append(real(*a)) or slices[-1])
    want = reference.gemv(x, w, **kw)
    for _ in range(2):
        got = gk.gemv(x, w, **kw)
        assert rel_err(want, got) < (1e-6 if dtype == torch.float32 else 1e-2)
        assert not counters(x.device, "gemv (rows kernel, K split)", gk.ROWS_SPLIT_COUNTERS).any()
    assert slices and set(slices) == {3}  # the interpreter's tile (16 x 16): 3 N tiles x 3 slices of K


@pytest.mark.parametrize("M", [3, 33])
@pytest.mark.parametrize("zero_centered", [False, True])
def test_rows_kernel_norm_row_sums_match_reference(rel_err, monkeypatch, M, zero_centered):
    """ROWS_NORM_ROW_SUMS without the K split: the norm's statistics summed a row per tile give the
    reference's normed product (fp32: to its rounding), with SwiGLU after it too."""
    from deepwish.kernels.gemv import triton as gk
    monkeypatch.setattr(gk, "ROWS_NORM_ROW_SUMS", True)
    monkeypatch.setattr(gk._rows_kernel, "cache", {})
    kernel, launched = gk._rows_kernel, []

    class Spy:  # the launches' ROW_SUMS, then the kernel itself
        def __getitem__(self, grid):
            def launch(*args, **kw):
                launched.append(kw["ROW_SUMS"])
                return kernel[grid](*args, **kw)
            return launch
    monkeypatch.setattr(gk, "_rows_kernel", Spy())
    N, K = 37, 45
    g = torch.Generator().manual_seed(7)
    x = torch.randn(M, K, generator=g)
    nw = (0.1 if zero_centered else 1.0) + 0.3 * torch.randn(K, generator=g)
    for glu in (False, True):
        w = 0.2 * torch.randn(2 * N if glu else N, K, generator=g)
        kw = dict(norm=(nw, 1e-6, zero_centered), glu=glu)
        assert rel_err(reference.gemv(x, w, **kw), gk.gemv(x, w, **kw)) < 1e-6
    gk.gemv(x, 0.2 * torch.randn(N, K, generator=g))  # no norm: nothing to sum
    assert launched == [True, True, False]


def test_k_slices_fill_the_sms_without_empty_slices(monkeypatch):
    """_k_slices: about ROWS_SPLIT_PER_SM programs a SM, at most ROWS_SPLIT_MAX slices and one K
    tile each; every slice gets at least one tile (the kernel's slice length is cdiv(tiles, S))."""
    import triton

    from deepwish.kernels.gemv import triton as gk
    monkeypatch.setattr(gk, "sm_count", lambda device: 132)
    dev = torch.device("cpu")
    assert gk._k_slices(1024, 3072, 16, 256, dev) == 4  # 64 N tiles: 264 programs wanted, 4 slices at most
    assert gk._k_slices(4096, 1024, 32, 128, dev) == 3  # 128 tiles: 3 slices of 8 K tiles
    assert gk._k_slices(6144, 1024, 16, 128, dev) == 1  # 384 tiles fill the SMs already
    assert gk._k_slices(1024, 256, 16, 256, dev) == 1  # one K tile: nothing to cut
    for tiles in range(1, 40):
        for want in range(1, 9):
            monkeypatch.setattr(gk, "ROWS_SPLIT_MAX", want)
            S = gk._k_slices(16, tiles * 16, 16, 16, dev)
            per = triton.cdiv(tiles, S)
            assert 1 <= S <= want and (S - 1) * per < tiles <= S * per, (tiles, want, S)


def test_fused_gemv_errors():
    from deepwish.kernels.gemv.triton import gemv
    x, w = torch.randn(1, 20), torch.randn(9, 20)
    with pytest.raises(ValueError, match="glu"):
        gemv(x, w, glu=True)  # [W_gate; W_up]: an even row count
    with pytest.raises(ValueError, match="glu"):
        gemv(x, torch.randn(8, 20), torch.randn(4), glu=True)  # no bias with glu
    with pytest.raises(ValueError, match="norm"):
        gemv(x, w, norm=(torch.ones(19), 1e-6, False))
    with pytest.raises(ValueError, match="residual"):
        gemv(x, w, residual=torch.randn(1, 8))
    with pytest.raises(ValueError, match="residual"):  # glu's output has N = rows / 2 columns
        gemv(x, torch.randn(8, 20), glu=True, residual=torch.randn(1, 8))


def test_pdl_kernels_compile_for_hopper_with_the_wait_after_the_weight_prefetch():
    """decode_pdl's kernels compiled for sm_90 (no GPU needed: Triton's own ptxas, in a process
    without the interpreter): the GEMV issues its bulk L2 prefetch of its rows of W and its first
    weight loads before `griddepcontrol.wait` and reads nothing else before it; the decode kernels
    wait before any load, except the split kernel's PREFETCH (the query positions and the bulk
    prefetches of its keys and values); each lets the next kernel launch."""
    from tests.kernels.sm90 import run_compiled
    script = r'''
import json, re
from deepwish.kernels.attention import decode
from deepwish.kernels.gemv import triton as gk
from tests.kernels.sm90 import compile_ptx

def ptx(fn, const, fp32=(), ints=()):
    def arg_type(name):
        if name in fp32:
            return "fp32"
        if name.isupper() and name not in ints:
            return ("*i64" if "POS" in name else "*fp32" if name in ("OP", "LP", "COS", "SIN", "WS", "WSS")
                    else "*i32" if name == "CNT" else "*bf16")
        return "i32"
    lines = compile_ptx(fn, const, arg_type, num_stages=3)
    wait = next(i for i, l in enumerate(lines) if "griddepcontrol.wait" in l)
    launch = next(i for i, l in enumerate(lines) if "griddepcontrol.launch_dependents" in l)
    loads = [i for i, l in enumerate(lines) if re.search(r"\bld\.global", l)]
    bulk = [i for i, l in enumerate(lines) if "cp.async.bulk.prefetch.L2.global" in l]
    return dict(asserts=sum("__assertfail" in l for l in lines), before=sum(i < wait for i in loads), after=sum(i > wait for i in loads), launch_after_wait=launch > wait,
                prefetch_before_wait=len(bulk) > 0 and max(bulk) < wait, prefetches=len(bulk))

out = {}
g = dict(HAS_BIAS=False, NORM=1, GLU=False, RESIDUAL=True, PDL=True, PREFETCH=True, BN=8, BK=256)
out["one_row"] = ptx(gk._one_row_kernel.fn, g, fp32=("eps",), ints=("N", "K"))
rg = dict(g, SPLIT=False, SMAX=4, ROW_SUMS=False)
out["rows"] = ptx(gk._rows_kernel.fn, dict(rg, PREC="tf32", BM=16, BN=32, BK=128), fp32=("eps",), ints=("M", "N", "K"))
out["rows_native_64"] = ptx(gk._rows_kernel.fn, dict(rg, PREC="native", BM=64, BN=64, BK=128), fp32=("eps",),
                            ints=("M", "N", "K"))
out["rows_split"] = ptx(gk._rows_kernel.fn, dict(rg, PREC="native", BM=64, BN=16, BK=256, SPLIT=True, PREFETCH=False,
                        GLU=True, RESIDUAL=False, ROW_SUMS=True), fp32=("eps",), ints=("M", "N", "K"))
out["one_row_glu"] = ptx(gk._one_row_kernel.fn, dict(g, GLU=True, RESIDUAL=False), fp32=("eps",), ints=("N", "K"))
out["rows_glu"] = ptx(gk._rows_kernel.fn, dict(rg, GLU=True, RESIDUAL=False, PREC="native", BM=16, BN=32, BK=128),
                      fp32=("eps",), ints=("M", "N", "K"))
out["one_row_no_prefetch"] = ptx(gk._one_row_kernel.fn, dict(g, PREFETCH=False), fp32=("eps",), ints=("N", "K"))
out["split"] = ptx(decode._split_kernel, dict(CHUNK=256, BLOCK_DK=128, BLOCK_DV=128, BM=16, GP=2, SLOT_POS=True,
                   SOFTCAP=False, PREC="tf32", BN=64, PDL=True, PREFETCH=False, DIRECT=False, WIN_SPLITS=False),
                   fp32=("scale", "softcap"), ints=("TQ", "HKV", "G", "L", "W", "DQK", "DV", "SPLITS"))
out["split_window"] = ptx(decode._split_kernel, dict(CHUNK=128, BLOCK_DK=128, BLOCK_DV=128, BM=16, GP=16, SLOT_POS=True,
                          SOFTCAP=False, PREC="tf32", BN=64, PDL=True, PREFETCH=False, DIRECT=False,
                          WIN_SPLITS=True),
                          fp32=("scale", "softcap"), ints=("TQ", "HKV", "G", "L", "W", "DQK", "DV", "SPLITS"))
out["split_prefetch"] = ptx(decode._split_kernel, dict(CHUNK=256, BLOCK_DK=128, BLOCK_DV=128, BM=16, GP=2, SLOT_POS=True,
                            SOFTCAP=False, PREC="tf32", BN=64, PDL=True, PREFETCH=True, DIRECT=False,
                            WIN_SPLITS=False),
                            fp32=("scale", "softcap"), ints=("TQ", "HKV", "G", "L", "W", "DQK", "DV", "SPLITS"))
out["split_direct"] = ptx(decode._split_kernel, dict(CHUNK=256, BLOCK_DK=128, BLOCK_DV=128, BM=16, GP=2, SLOT_POS=True,
                          SOFTCAP=False, PREC="tf32", BN=64, PDL=True, PREFETCH=False, DIRECT=True,
                          WIN_SPLITS=False),
                          fp32=("scale", "softcap"), ints=("TQ", "HKV", "G", "L", "W", "DQK", "DV", "SPLITS"))
out["merge"] = ptx(decode._merge_kernel, dict(BLOCK_DV=128, BM=16, GP=2, BS=8, PDL=True),
                   ints=("TQ", "HKV", "G", "DV", "SPLITS"))
out["prologue"] = ptx(decode._prologue_kernel, dict(D=128, R=128, BLOCK_D=128, ZERO_CENTERED=False, PDL=True,
                      RAW=False), fp32=("eps",), ints=("T", "H", "HKV", "L"))
out["prologue_raw"] = ptx(decode._prologue_kernel, dict(D=128, R=128, BLOCK_D=128, ZERO_CENTERED=False, PDL=True,
                          RAW=True), fp32=("eps",), ints=("T", "H", "HKV", "L"))
print(json.dumps(out))
'''
    out = run_compiled(script)
    for name in ("one_row", "rows", "rows_native_64", "rows_split", "one_row_glu", "rows_glu", "one_row_no_prefetch"):
        # the first weight tile in flight before the wait,
        assert out[name]["before"] > 0 and out[name]["after"] > 0 and out[name]["launch_after_wait"], (name, out)
    # the program's rows of W sent towards L2 by one bulk prefetch before the wait (PREFETCH)
    assert out["one_row"]["prefetch_before_wait"] and out["rows"]["prefetch_before_wait"], out
    # glu: the gate rows' and the up rows' prefetches
    assert out["one_row_glu"]["prefetches"] == out["rows_glu"]["prefetches"] == 2 * out["one_row"]["prefetches"], out
    assert out["one_row_no_prefetch"]["prefetches"] == 0, out
    for name in ("split", "merge", "prologue", "split_direct", "split_window", "prologue_raw"):
        assert out[name]["before"] == 0 and out[name]["after"] > 0 and out[name]["launch_after_wait"], (name, out)
    # the split kernel's PREFETCH: the query positions read, the chunk's keys and values sent to L2
    # (two bulk prefetches), all before the wait; q and the tiles after it
    sp = out["split_prefetch"]
    assert sp["prefetch_before_wait"] and sp["prefetches"] == 2 and sp["after"] > 0 and sp["launch_after_wait"], sp
    assert 0 < sp["before"] < sp["after"], sp


def test_in_step_tiles_pick_measured_shapes_only(monkeypatch):
    """The autotuner's pruning hook: a measured (N, K) of 2-byte weights gets its one tile; any
    other shape, dtype, or the switch off, keeps the whole list to autotune."""
    import triton

    from deepwish.kernels.gemv import triton as gk
    configs = [triton.Config({"BN": 8, "BK": 256}, num_warps=4), triton.Config({"BN": 16, "BK": 512}, num_warps=8)]
    args = lambda N, K, dtype: dict(W=torch.empty(0, dtype=dtype), N=N, K=K)  # noqa: E731
    (got,) = gk._in_step_tiles(configs, args(1024, 2048, torch.bfloat16))
    assert (got.kwargs, got.num_warps, got.num_stages) == ({"BN": 2, "BK": 2048}, 8, 1)
    assert gk._in_step_tiles(configs, args(1024, 2047, torch.bfloat16)) is configs
    assert gk._in_step_tiles(configs, args(1024, 2048, torch.float32)) is configs
    monkeypatch.setattr(gk, "USE_IN_STEP_TILES", False)
    assert gk._in_step_tiles(configs, args(1024, 2048, torch.bfloat16)) is configs


@pytest.mark.parametrize("case", ["o+residual", "down+residual"])
def test_in_step_tiles_compute_the_product(rel_err, monkeypatch, case):
    """The measured tiles that differ most from the autotuned list (two rows a program with all
    of K in one tile; four rows with K in three tiles) at their own shapes,
    through the interpreter, against the reference (fp16: the interpreter's bf16 is not exact)."""
    import triton

    from deepwish.kernels.gemv import triton as gk
    N, K = (1024, 2048) if case == "o+residual" else (1024, 3072)
    bn, bk, w, s = gk.IN_STEP_TILES[(N, K)]
    kernel = gk._one_row_kernel
    monkeypatch.setattr(kernel, "configs", [triton.Config({"BN": bn, "BK": bk}, num_warps=w, num_stages=s)])
    monkeypatch.setattr(kernel, "cache", {})
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, K, generator=g).half()
    wt = (torch.randn(N, K, generator=g) * 0.02).half()
    r = torch.randn(1, N, generator=g).half()
    out = gk.gemv(x, wt, residual=r)
    ref = reference.gemv(x, wt, residual=r)
    assert kernel.best_config.kwargs == {"BN": bn, "BK": bk}
    assert rel_err(ref, out) < 1e-3
