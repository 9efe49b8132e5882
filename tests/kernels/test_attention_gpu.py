"""Flash attention and split-KV decoding on the GPU at real sizes, bf16, against the fp32
reference (run with -m gpu on a CUDA machine)."""
import pytest
import torch

from deepwish.kernels.attention import flash_attention
from deepwish.kernels.attention import reference as ref
from deepwish.kernels.attention.decode import decode_attention

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("H,Hkv,Dqk,Dv,window,softcap", [
    (16, 8, 128, 128, 0, 0.0), (16, 2, 256, 256, 0, 0.0), (16, 2, 128, 128, 512, 0.0),
    (8, 8, 192, 128, 0, 0.0), (8, 1, 64, 64, 100, 30.0)])
def test_flash_attention_bf16_real_sizes(cuda, rel_err, H, Hkv, Dqk, Dv, window, softcap):
    _check_real_size(cuda, rel_err, H, Hkv, Dqk, Dv, window, softcap)


@pytest.mark.parametrize("load", ["pointer", "tma"])
@pytest.mark.parametrize("H,Hkv,Dqk,Dv,window,softcap", [
    (16, 8, 128, 128, 0, 0.0), (16, 2, 256, 256, 0, 0.0), (12, 4, 128, 128, 512, 0.0), (8, 8, 192, 128, 0, 0.0),
    (16, 4, 128, 128, 0, 0.0)])
def test_tile_load_forms_real_sizes(cuda, rel_err, monkeypatch, H, Hkv, Dqk, Dv, window, softcap, load):
    """Both load forms of the forward and dQ kernels (LOADS: pointers, or the copy engine's
    descriptors) at the GPU's tiles, T 1500 so the last tiles cross T, 192-wide keys in 256-wide
    tiles, groups of 1 to 8 heads. The pointer form is what 16-bit inputs the copy engine cannot
    take run."""
    from deepwish.kernels.attention import triton as tk
    for kind in ("fwd", "dq"):
        monkeypatch.setitem(tk.LOADS, kind, load)
    _check_real_size(cuda, rel_err, H, Hkv, Dqk, Dv, window, softcap)


@pytest.mark.parametrize("load", ["pointer", "tma"])
@pytest.mark.parametrize("H,Hkv,D", [(4, 2, 16), (4, 2, 32), (8, 1, 48)])
def test_flash_attention_bf16_small_head_dims(cuda, rel_err, monkeypatch, H, Hkv, D, load):
    """The tiny models' head widths (16-48: the hybrid model's GPU test runs 16), both load forms:
    a descriptor's rows are then 32-96 bytes, below every width the other tests cover."""
    from deepwish.kernels.attention import triton as tk
    for kind in ("fwd", "dq"):
        monkeypatch.setitem(tk.LOADS, kind, load)
    _check_real_size(cuda, rel_err, H, Hkv, D, D, 0, 0.0)


@pytest.mark.parametrize("form", ["atomic", "atomic_t"])
@pytest.mark.parametrize("H,Hkv,Dqk,Dv,window,softcap,dtype,tol", [
    (16, 8, 128, 128, 0, 0.0, torch.bfloat16, 1e-2), (16, 2, 256, 256, 0, 0.0, torch.bfloat16, 1e-2),
    (12, 4, 128, 128, 512, 0.0, torch.bfloat16, 1e-2),  # G = 3: padded head rows in every tile
    (8, 8, 192, 128, 0, 0.0, torch.bfloat16, 1e-2), (8, 1, 64, 64, 100, 30.0, torch.bfloat16, 1e-2),
    (4, 2, 128, 128, 300, 0.0, torch.float32, 1e-4)])
def test_flash_attention_atomic_dq_real_sizes(cuda, rel_err, monkeypatch, H, Hkv, Dqk, Dv, window, softcap, dtype,
                                              tol, form):
    """BACKWARD_DQ = "atomic" / "atomic_t" (dq added by the dK/dV kernel with fp32 atomics) at the
    GPU's tiles."""
    from deepwish.kernels.attention import triton as tk
    monkeypatch.setattr(tk, "BACKWARD_DQ", form)
    monkeypatch.setattr(tk, "backward_dq", lambda *a, **k: pytest.fail("the dQ kernel ran in the atomic form"))
    _check_real_size(cuda, rel_err, H, Hkv, Dqk, Dv, window, softcap, dtype, tol)


@pytest.mark.parametrize("kind,dcls,cfg,H,Hkv,D,window,softcap,form", [
    ("fwd", "d128", (128, 128, 8, 3, 8), 16, 8, 128, 0, 0.0, "kernel"),  # lazy rescale
    ("fwd", "d128", (128, 128, 8, 2, 8), 12, 4, 128, 512, 0.0, "kernel"),
    ("fwd", "d256", (128, 64, 8, 2, 8), 16, 2, 256, 0, 30.0, "kernel"),
    ("dkdv", "d128", (64, 128, 8, 3, 1), 12, 4, 128, 512, 0.0, "kernel"),  # dK and dV by separate programs
    ("dkdv", "d256", (32, 128, 8, 2, 1), 16, 2, 256, 0, 30.0, "kernel"),
    ("dkdvq", "d256", (16, 128, 8, 2, 1), 16, 2, 256, 100, 0.0, "atomic_t"),
    ("dkdvq", "d128", (64, 128, 8, 3, 1), 16, 8, 128, 0, 0.0, "atomic")])
def test_flash_attention_tile_options_real_sizes(cuda, rel_err, monkeypatch, kind, dcls, cfg, H, Hkv, D, window,
                                                 softcap, form):
    """The launch options of attention_tiles' FOCUS candidates (forward SLACK, dK/dV SPLIT)
    against the reference, at the GPU's tiles."""
    from deepwish.kernels.attention import triton as tk
    monkeypatch.setitem(tk.TILES, (kind, dcls, "16bit", "short"), cfg)
    monkeypatch.setattr(tk, "BACKWARD_DQ", form)
    _check_real_size(cuda, rel_err, H, Hkv, D, D, window, softcap)


def _check_real_size(cuda, rel_err, H, Hkv, Dqk, Dv, window, softcap, dtype=torch.bfloat16, tol=1e-2):
    torch.manual_seed(0)
    B, T = 2, 1500
    q = torch.randn(B, T, H, Dqk, device=cuda, dtype=dtype, requires_grad=True)
    k = torch.randn(B, T, Hkv, Dqk, device=cuda, dtype=dtype, requires_grad=True)
    v = torch.randn(B, T, Hkv, Dv, device=cuda, dtype=dtype, requires_grad=True)
    ids = torch.zeros(B, T, dtype=torch.long, device=cuda)
    ids[0, 300:] += 1
    ids[0, 301:] += 1
    ids[1, 1000:] += 1
    g = torch.randn(B, T, H, Dv, device=cuda)
    want = ref.attention(q, k, v, doc_ids=ids, window=window, softcap=softcap)
    got = flash_attention(q, k, v, doc_ids=ids, window=window, softcap=softcap)
    wg = torch.autograd.grad((want.float() * g).sum(), (q, k, v))
    gg = torch.autograd.grad((got.float() * g).sum(), (q, k, v))
    errs = [rel_err(a, b) for a, b in zip((want, *wg), (got, *gg))]
    assert max(errs) < tol, dict(zip(("o", "dq", "dk", "dv"), errs))


@pytest.mark.parametrize("B,Tq,L", [(1, 1, 32768), (8, 4, 4096)])
def test_decode_bf16_real_sizes(cuda, rel_err, B, Tq, L):
    torch.manual_seed(1)
    q = torch.randn(B, Tq, 16, 128, device=cuda, dtype=torch.bfloat16)
    kc = torch.randn(B, 8, L, 128, device=cuda, dtype=torch.bfloat16)
    vc = torch.randn(B, 8, L, 128, device=cuda, dtype=torch.bfloat16)
    q_pos = (torch.arange(Tq, device=cuda) + L - Tq - 7).expand(B, Tq).contiguous()
    want = ref.decode_attention(q, kc, vc, q_pos, torch.arange(L, device=cuda).expand(B, L))
    assert rel_err(want, decode_attention(q, kc, vc, q_pos)) < 1e-2


@pytest.mark.parametrize("H,Hkv,Tq", [(64, 4, 1), (16, 8, 4)])
def test_windowed_decode_bf16_real_sizes(cuda, rel_err, H, Hkv, Tq):
    """A 512-token window over a 65,536-slot plain cache (NSA's window branch at the paper's heads and
    at Qwen3-0.6B's): the splits over the window's span, the window whole or cut by the row start."""
    torch.manual_seed(3)
    L, W = 65536, 512
    q = torch.randn(2, Tq, H, 128, device=cuda, dtype=torch.bfloat16)
    kc = torch.randn(2, Hkv, L, 128, device=cuda, dtype=torch.bfloat16)
    vc = torch.randn(2, Hkv, L, 128, device=cuda, dtype=torch.bfloat16)
    q_pos = torch.stack([torch.arange(Tq) + 200, torch.arange(Tq) + 40000]).to(cuda)
    want = ref.decode_attention(q, kc, vc, q_pos, torch.arange(L, device=cuda).expand(2, L), window=W)
    got = decode_attention(q, kc, vc, q_pos, window=W)
    assert rel_err(want, got) < 1e-2


def test_decode_kernels_compile_once_for_steps_and_chunks(cuda):
    """The token count is not specialised: a one-token step and prefill chunks of 5 and 8 tokens (the
    same 16-row tile at 2 query heads per KV head) run the same compiled split and merge kernels
    (before, the first prefill after a captured step's warm-up compiled both again, ~a second before
    the first token)."""
    from deepwish.kernels.attention import decode
    B, H, Hkv, D, L = 1, 16, 8, 128, 256
    k, v = (torch.randn(B, Hkv, L, D, device=cuda, dtype=torch.bfloat16) for _ in range(2))
    kernels = (decode._split_kernel, decode._merge_kernel)
    dev = torch.cuda.current_device()

    def compiled():
        return [len(kern.device_caches[dev][0]) for kern in kernels]
    for T in (1, 5, 8):
        q = torch.randn(B, T, H, D, device=cuda, dtype=torch.bfloat16)
        pos = torch.arange(100, 100 + T, device=cuda)[None]
        decode_attention(q, k, v, pos, None)
        if T == 1:
            after_step = compiled()
    torch.cuda.synchronize()
    assert compiled() == after_step
