"""model.attn_backend: the own Triton kernel (interpreter on CPU) gives the same model as the
explicit torch softmax on every attending mixer, packed documents equal separate runs on it, and
the cached decode step through the split-KV kernel equals the uncached forward (plain and ring
caches). A representative subset: the kernel tests cover the shapes."""
import pytest
import torch

from deepwish.config import model_config
from deepwish.generate import decode_one_token
from deepwish.kernels.backend import BackendError
from deepwish.model.attention import resolve_attn_backend
from deepwish.model.ring_cache import make_ring_cache
from deepwish.model.transformer import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(name, **kw):
    """The same weights under attn_backend torch and triton."""
    torch.manual_seed(0)
    ref = Transformer(model_config(name, attn_backend="torch", **kw)).eval()
    tri = Transformer(model_config(name, attn_backend="triton", **kw)).eval()
    tri.load_state_dict(ref.state_dict())
    return ref, tri


def _packed(vocab, lens):
    x = torch.randint(0, vocab, (1, sum(lens)))
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])[None]
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    return x, doc, pos


@pytest.mark.parametrize("name,kw", [
    ("qwen3_tiny", dict(n_layers=2)),                                              # gqa
    ("qwen3_tiny", dict(n_layers=2, mixer="swa", sliding_window=5)),               # swa
    ("deepseek_v3_tiny", dict(n_layers=1)),                                         # MLA naive (Dqk != Dv)
])
def test_triton_backend_equals_torch_and_packs(rel_err, name, kw):
    ref, tri = _pair(name, **kw)
    V = ref.cfg.vocab_size
    x, doc, pos = _packed(V, [7, 1, 12])
    # the flash kernel's document bounds are made once per forward (Transformer.context), not per layer
    assert tri.context(x, pos, doc).doc_bounds is not None and ref.context(x, pos, doc).doc_bounds is None
    with torch.no_grad():
        want = ref(x, positions=pos, doc_ids=doc).logits
        got = tri(x, positions=pos, doc_ids=doc).logits
        assert rel_err(want, got) < 1e-4
        alone = tri(x[:, 8:], positions=pos[:, 8:]).logits
        assert rel_err(alone, got[:, 8:]) < 1e-4


def test_triton_backend_gradients_equal_torch(rel_err):
    ref, tri = _pair("qwen3_tiny", n_layers=1)
    x, doc, pos = _packed(ref.cfg.vocab_size, [9, 14])
    for m in (ref, tri):
        m.train()
        m(x, positions=pos, doc_ids=doc).logits.float().square().mean().backward()
    for (n, a), b in zip(ref.named_parameters(), tri.parameters()):
        assert rel_err(a.grad, b.grad) < 1e-4, n


@pytest.mark.parametrize("ring", [False, True])
def test_decode_kernel_in_cached_steps_equals_forward(rel_err, ring):
    """Prefill, then one-token steps and a 3-token (speculative) chunk, all on the triton backend."""
    kw = dict(n_layers=2, vocab_size=64, max_seq_len=64, mixer="swa", sliding_window=6) if ring else \
        dict(n_layers=2, vocab_size=64, max_seq_len=64)
    _, tri = _pair("qwen3_tiny", **kw)
    x = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        full = tri(x).logits
        cache = make_ring_cache(tri, 2, 40, slack=3) if ring else tri.make_cache(2, 40)
        outs = [tri(x[:, :10], positions=torch.arange(10).expand(2, 10), cache=cache).logits]
        for t in range(10, 17):
            outs.append(decode_one_token(tri, x[:, t], torch.full((2,), t), cache)[:, None])
        outs.append(tri(x[:, 17:], positions=torch.arange(17, 20).expand(2, 3), cache=cache).logits)
    assert rel_err(full, torch.cat(outs, 1)) < 1e-4


def test_decode_prologue_kernel_equals_the_separate_ops(monkeypatch):
    """model.decode_prologue: the decode steps' QK-norm, rotary and cache write in one kernel give
    the logits and the cache of the separate ops (prefill chunk, single tokens, a 3-token chunk), and
    the kernel is what runs (its op is called once per layer and step)."""
    from unittest import mock

    from deepwish.kernels.attention import decode
    torch.manual_seed(0)
    models = [Transformer(model_config("qwen3_tiny", attn_backend="triton", n_layers=2, vocab_size=64,
                                       max_seq_len=64, decode_prologue=on)).eval() for on in (False, True)]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    x = torch.randint(0, 64, (2, 16))
    runs = []
    for model in models:
        cache = model.make_cache(2, 24)
        with torch.no_grad(), mock.patch.object(decode, "_prologue_op", wraps=decode._prologue_op) as op:
            outs = [model(x[:, :8], positions=torch.arange(8).expand(2, 8), cache=cache).logits]
            outs += [decode_one_token(model, x[:, t], torch.full((2,), t), cache)[:, None] for t in range(8, 13)]
            outs.append(model(x[:, 13:], positions=torch.arange(13, 16).expand(2, 3), cache=cache).logits)
        runs.append((torch.cat(outs, 1), cache, op.call_count))
    (plain, c0, n0), (pro, c1, n1) = runs
    assert (n0, n1) == (0, 2 * 7)  # 2 layers x (prefill + 5 steps + the chunk)
    torch.testing.assert_close(pro, plain, rtol=1e-5, atol=1e-5)
    for a, b in zip(c0.layers, c1.layers):
        torch.testing.assert_close(b.k[:, :, :16], a.k[:, :, :16], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.v[:, :, :16], a.v[:, :, :16], rtol=1e-5, atol=1e-5)


def test_backend_names_are_checked():
    with pytest.raises(ValueError, match="attn_backend"):
        model_config("qwen3_tiny", attn_backend="flash")
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="flex"):
            resolve_attn_backend("flex", announce=False)
        assert resolve_attn_backend("auto", announce=False) == ("sdpa", "sdpa", "sdpa")
    assert resolve_attn_backend("torch", announce=False) == ("torch", "torch", "torch")


def test_kernel_paths_get_one_dtype_as_sdpa_would():
    """Under autocast QK-norm and rotary return fp32 while v comes from a bf16 matmul; the kernel
    paths (not on autocast's list) get them cast to autocast's dtype, else to the promoted dtype
    (on a GPU the trainer's packed path failed on mixed inputs before this)."""
    from deepwish.model.attention import kernel_inputs
    q, k = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8)
    v = torch.randn(1, 4, 2, 8, dtype=torch.bfloat16)
    assert {t.dtype for t in kernel_inputs(q, k, v)} == {torch.float32}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert {t.dtype for t in kernel_inputs(q, k, v)} == {torch.bfloat16}


def test_auto_takes_the_measured_paths_on_cuda(monkeypatch):
    """auto on a CUDA machine (probed, not run): own kernel for packed input at every head dim,
    unequal q·k / value dims included; SDPA flash for plain causal; split-KV kernel for decode."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for dims in ((128, None), (256, None), (192, 128)):
        assert resolve_attn_backend("auto", dims[0], announce=False, v_head_dim=dims[1]) == ("triton", "sdpa", "triton")
