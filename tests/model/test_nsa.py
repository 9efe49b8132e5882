"""The `nsa` mixer (model/nsa.py): config errors, document-aligned compression, no attention across
documents, cache paths equal to the full forward (prefill + token by token, batch rows, packed
rows, speculative = greedy), and `--init-from` a dense run. Tiny shapes on the torch kernels."""
import pytest
import torch

from deepwish.config import ConfigError, model_config
from deepwish.model.nsa import NEVER, NSACache, block_ends
from deepwish.model.rope import apply_rotary
from deepwish.model.transformer import Transformer

# qwen3_nsa_tiny at 2 layers: blocks of 16 every 8, 4 selection blocks of 16, a 32-token window
TINY = dict(n_layers=2, attn_backend="torch", nsa_backend="torch")


def tiny_model(**kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(model_config("qwen3_nsa_tiny", **{**TINY, **kw})).eval()


@pytest.mark.parametrize("bad, match", [
    (dict(nsa_cmp_len=20, nsa_cmp_stride=8), "nsa_cmp_len=20 must be a multiple of nsa_cmp_stride=8"),
    (dict(nsa_select_len=12), "nsa_select_len=12 must be a positive multiple of nsa_cmp_stride=8"),
    (dict(nsa_cmp_len=8, nsa_cmp_stride=16, nsa_select_len=16), "need 1 <= stride <= length"),
    (dict(nsa_n_select=2), r"nsa_n_select=2 must be >= nsa_n_local \+ 1 = 3"),
    (dict(nsa_gate="softmax"), "nsa_gate='softmax' is not sigmoid or sum"),
])
def test_impossible_nsa_settings_are_named(bad, match):
    with pytest.raises(ConfigError, match=match):
        model_config("qwen3_nsa_tiny", **bad)
    model_config("qwen3_tiny", **bad)  # a stack without nsa layers does not check them


def test_block_ends_per_document():
    # two documents of 20 and 13 tokens in one row; l = 8, d = 4: ends at doc positions 7, 11, 15, 19
    pos = torch.cat([torch.arange(20), torch.arange(13)])[None]
    rows, valid = block_ends(pos, 8, 4, 33 // 4 + 1)
    want = [7, 11, 15, 19, 20 + 7, 20 + 11]
    assert rows[0, :6].tolist() == want and valid[0].tolist() == [True] * 6 + [False] * 3


def test_chunk_block_ends_equal_the_general_rule():
    """The cached forward's closed form (consecutive positions from p0 in each row) finds the same
    block-ending rows, packed to the front, as the general rule, for chunks that start before the
    first block ends, on and off the stride, one token or many."""
    from deepwish.model.nsa import chunk_block_ends
    for l, d in ((4, 2), (16, 8), (5, 3), (3, 3)):
        for T in (1, 2, 7, 20):
            p0 = torch.arange(0, 40)[:, None]
            pos = p0 + torch.arange(T)
            n = T // d + 1
            rows, valid = block_ends(pos, l, d, n)
            got_rows, got_valid = chunk_block_ends(pos, l, d, n)
            assert torch.equal(valid, got_valid), (l, d, T)
            assert torch.equal(rows[valid], got_rows[valid]), (l, d, T)
            assert ((got_rows >= 0) & (got_rows < T)).all()


def test_compressed_tokens_follow_the_documents():
    """k_cmp of a packed row = φ over each document's own blocks, rotated at the block end."""
    m = tiny_model(n_layers=1)
    nsa = m.blocks[0].mixer
    l, d = nsa.cmp_len, nsa.cmp_stride
    lens = [40, 21]
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    k_raw = torch.randn(1, sum(lens), nsa.n_kv_heads, nsa.head_dim)
    v = torch.randn_like(k_raw)
    cos, sin = m.rotary(pos)
    rows, valid = block_ends(pos, l, d, sum(lens) // d + 1)
    at = rows[:, :, None].expand(-1, -1, cos.shape[-1])
    k_cmp, v_cmp = nsa.compress(k_raw.transpose(1, 2), v.transpose(1, 2), rows, cos.gather(1, at), sin.gather(1, at))
    i = 0
    start = 0
    for n in lens:
        for j in range((n - l) // d + 1):
            lo = start + j * d
            kb, vb = k_raw[0, lo:lo + l].transpose(0, 1), v[0, lo:lo + l].transpose(0, 1)  # [Hkv, l, D]
            e = lo + l - 1
            want_k = apply_rotary(nsa.k_compress(kb)[None, None], cos[:, e:e + 1], sin[:, e:e + 1])[0, 0]
            torch.testing.assert_close(k_cmp[0, i], want_k, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(v_cmp[0, i], nsa.v_compress(vb), atol=1e-5, rtol=1e-5)
            assert rows[0, i] == e and valid[0, i]
            i += 1
        start += n
    assert i == 4 + 1 and not valid[0, i:].any()  # 40 tokens: 4 blocks; 21 tokens: 1 block


def test_no_branch_reads_across_documents():
    m = tiny_model()
    lens = [50, 45]
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])[None]
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    ids = torch.randint(0, m.cfg.vocab_size, (1, sum(lens)))
    other = ids.clone()
    other[0, :lens[0]] = torch.randint(0, m.cfg.vocab_size, (lens[0],))
    a = m(ids, positions=pos, doc_ids=doc).logits
    b = m(other, positions=pos, doc_ids=doc).logits
    assert not torch.allclose(a[0, :lens[0]], b[0, :lens[0]])
    torch.testing.assert_close(a[0, lens[0]:], b[0, lens[0]:], atol=1e-5, rtol=1e-5)


def test_packed_equals_separate_rows():
    """Documents starting at multiples of the selection block: packed = separate (module docstring)."""
    m = tiny_model()
    lens = [48, 32, 29]
    ids = torch.randint(0, m.cfg.vocab_size, (1, sum(lens)))
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])[None]
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    packed = m(ids, positions=pos, doc_ids=doc).logits
    alone = torch.cat([m(part).logits for part in ids.split(lens, dim=1)], dim=1)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gate", ["sigmoid", "sum"])
def test_prefill_then_token_by_token_equals_the_full_forward(gate):
    m = tiny_model(nsa_gate=gate)
    assert (m.blocks[0].mixer.gate_proj is None) == (gate == "sum")
    B, T, first = 2, 75, 37
    ids = torch.randint(0, m.cfg.vocab_size, (B, T))
    full = m(ids).logits
    cache = m.make_cache(B, 96)
    assert isinstance(cache[0], NSACache) and cache[0].n_blocks == (96 - 16) // 8 + 1
    out = [m(ids[:, :first], cache=cache).logits]
    for t in range(first, T):
        out.append(m(ids[:, t:t + 1], positions=torch.full((B, 1), t), cache=cache).logits)
    torch.testing.assert_close(torch.cat(out, 1), full, atol=1e-5, rtol=1e-5)
    # the blocks that ended got their slot, the rest are never visible
    ends = cache[0].cmp_end[0]
    n_done = (T - 16) // 8 + 1
    assert ends[:n_done].tolist() == [16 - 1 + 8 * j for j in range(n_done)] and (ends[n_done:] == NEVER).all()


def test_the_torch_path_reads_nothing_back_from_the_device(monkeypatch):
    """The mixer hands the kernels the raw row length (S), so the torch kernels never read
    max(q_pos) back: no host synchronisation in a training forward, a prefill or a decoding step
    (a captured decode graph could not hold one)."""
    m = tiny_model()
    B, T = 2, 40
    ids = torch.randint(0, m.cfg.vocab_size, (B, T))
    cache = m.make_cache(B, 64)

    def read(*a, **k):
        raise AssertionError("a device value read back to the host")
    for name in ("__int__", "__index__", "item", "tolist", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, read)
    full = m(ids).logits
    pre = m(ids[:, :T - 1], cache=cache).logits
    step = m(ids[:, T - 1:], positions=torch.full((B, 1), T - 1), cache=cache).logits
    monkeypatch.undo()
    torch.testing.assert_close(torch.cat([pre, step], 1), full, atol=1e-5, rtol=1e-5)


def test_batch_rows_and_greedy_generate_equal_single_rows():
    from deepwish.generate import generate
    m = tiny_model()
    prompts = [torch.randint(0, m.cfg.vocab_size, (n,)).tolist() for n in (41, 23)]
    both = generate(m, prompts, 12, cache_len=80)
    alone = [generate(m, [p], 12, cache_len=80)[0] for p in prompts]
    assert both == alone and all(len(r) == 12 for r in both)


def test_speculative_equals_greedy():
    from deepwish.generate import generate
    from deepwish.speculative import speculative_generate
    target = tiny_model()
    torch.manual_seed(1)
    draft = Transformer(model_config("qwen3_nsa_tiny", **{**TINY, "n_layers": 1})).eval()
    prompt = torch.randint(0, target.cfg.vocab_size, (30,)).tolist()
    want = generate(target, [prompt], 24)[0]
    got, stats = speculative_generate(target, draft, prompt, 24, k=3, fallback=False)
    assert got == want and stats.rounds > 0


def test_nsa_trains_every_parameter_and_counts_flops():
    m = tiny_model().train()
    ids, targets = torch.randint(0, m.cfg.vocab_size, (2, 2, 64))
    out = m(ids, targets=targets)
    out.loss.backward()
    assert torch.isfinite(out.loss) and abs(out.loss.item() - torch.log(torch.tensor(2048.0)).item()) < 0.5
    silent = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert silent == []
    roles = m.param_roles()
    assert roles["blocks.0.mixer.gate_proj.weight"] == "gate" and roles["blocks.0.mixer.k_compress.pos"] == "embedding"
    dense = Transformer(model_config("qwen3_tiny", n_layers=2, attn_backend="torch"))
    assert m.flops_per_token(4096) < dense.flops_per_token(4096)  # sparse attention at long context


def test_init_from_dense_loads_shared_weights_and_names_the_new(tmp_path, one_thread, capsys):
    from deepwish.config import load_config
    from deepwish.train import loop
    from deepwish.train.checkpoint import load_checkpoint
    from deepwish.train.init_from import init_problems
    small = ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1", "model.head_dim=16",
             "model.d_ff=64", "train.seq_len=32", "train.batch_size=2", "train.eval_batches=1",
             "train.sample_tokens=0", "train.warmup_steps=1", "train.log_every=1", "train.steps=1",
             "train.save_every=1", "train.eval_every=1", "model.attn_backend=torch", "model.nsa_backend=torch"]
    src = tmp_path / "dense"
    loop.train(load_config("qwen3_tiny", small + [f"train.out_dir={src}"]), progress_bar=False)
    cfg = load_config("qwen3_nsa_tiny", small + [f"train.out_dir={tmp_path / 'nsa'}"])
    assert init_problems(src, cfg.model) == []
    wider = load_config("qwen3_nsa_tiny", small + ["model.d_ff=96"]).model
    assert "d_ff (64 in the weights vs 96 here)" in init_problems(src, wider)[0]
    seen = {}
    real = loop.build_optimizer

    def spy(model, tc, **kw):
        seen.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real(model, tc, **kw)

    loop.build_optimizer, saved = spy, loop.build_optimizer
    try:
        loop.train(cfg, init_from=str(src), progress_bar=False)
    finally:
        loop.build_optimizer = saved
    dense = load_checkpoint(src)["model"]
    assert all(torch.equal(seen[k], dense[k]) for k in dense)
    new = sorted(k for k in seen if k not in dense)
    assert new == sorted(f"blocks.0.mixer.{n}" for n in ("gate_proj.weight", "k_compress.down.weight",
                                                           "k_compress.pos", "k_compress.up.weight",
                                                           "v_compress.down.weight", "v_compress.pos",
                                                           "v_compress.up.weight"))
    assert ("newly initialised in 1 NSA layer(s) (not in the weights): gate_proj.weight, k_compress.down.weight"
            in capsys.readouterr().out)
    # the same from the dense run exported as an HF directory
    from deepwish.cli import main
    from deepwish.train.init_from import load_init
    assert main(["convert", str(src), str(tmp_path / "hf"), "--dtype", "fp32"]) == 0
    assert init_problems(tmp_path / "hf", cfg.model) == []
    model = Transformer(cfg.model)
    assert sorted(load_init(model, tmp_path / "hf")) == new
    assert torch.equal(model.blocks[0].mixer.q_proj.weight, dense["blocks.0.mixer.q_proj.weight"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_captured_decoder_equals_eager_on_gpu(dtype):
    """Greedy generation through CapturedDecoder equals eager; in bf16 the selected branch takes the
    small-group tile rows (G 2: the union kernel) at prefill and at every decoding step."""
    from deepwish.decode_graph import CapturedDecoder
    from deepwish.generate import generate
    torch.manual_seed(0)
    m = Transformer(model_config("qwen3_nsa_tiny")).cuda().eval().to(dtype)
    prompts = [torch.randint(0, m.cfg.vocab_size, (n,)).tolist() for n in (70, 33)]
    want = generate(m, prompts, 40, cache_len=160)
    cache = m.make_cache(2, 160)
    step = CapturedDecoder(m, cache)
    assert generate(m, prompts, 40, cache=cache, decode_fn=step) == want


def test_hf_export_refuses_nsa_layers(tmp_path):
    from deepwish.hf.io import CheckpointError, save_hf
    with pytest.raises(CheckpointError, match="Native Sparse Attention"):
        save_hf(tiny_model(n_layers=1), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.gpu
def test_triton_kernels_match_the_torch_path_in_the_model_on_gpu():
    """The model's loss and gradients with kernels/nsa's triton backend (and the attention kernels
    for the window) against the torch backends, fp32, packed documents."""
    torch.manual_seed(0)
    cfg = model_config("qwen3_nsa_tiny")
    fast = Transformer(cfg).cuda()
    slow = Transformer(model_config("qwen3_nsa_tiny", attn_backend="torch", nsa_backend="torch")).cuda()
    slow.load_state_dict(fast.state_dict())
    lens = [100, 60, 96]
    ids, targets = torch.randint(0, cfg.vocab_size, (2, 2, sum(lens)), device="cuda")
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)]).cuda().expand(2, -1)
    pos = torch.cat([torch.arange(n) for n in lens]).cuda().expand(2, -1)
    losses = []
    for m in (fast, slow):
        out = m(ids, positions=pos, doc_ids=doc, targets=targets)
        out.loss.backward()
        losses.append(out.loss.item())
    assert abs(losses[0] - losses[1]) < 2e-3  # the kernels may take TF32 for fp32 dot products
    for (n, a), b in zip(fast.named_parameters(), slow.parameters()):
        rel = (a.grad - b.grad).norm() / b.grad.norm().clamp_min(1e-12)
        assert rel < 2e-2, n


INTERPRETED = pytest.mark.skipif(torch.cuda.is_available(),
                                 reason="the interpreter (tests/conftest.py) runs on CPU tensors; GPU: the gpu tests")


@INTERPRETED
def test_a_group_the_triton_kernels_cannot_tile_is_named():
    with pytest.raises(ConfigError, match=r"resolved to triton.*group size must be an integer <= 16"):
        Transformer(model_config("qwen3_nsa_tiny", n_layers=1, n_heads=34, n_kv_heads=2, nsa_backend="triton"))


@INTERPRETED
def test_the_triton_kernels_in_the_model_equal_the_torch_path_under_the_interpreter(monkeypatch):
    """Packed rows, then a prefill and decode steps over the cache (strided cache views, padding
    slots), through kernels/nsa's Triton kernels in the interpreter: the torch path's logits. The
    decode steps compress their blocks in one launch (kernels/nsa/compress.py; position 31 ends one)."""
    from deepwish.kernels.nsa import compress
    steps = []
    real = compress.compress_cache_blocks
    monkeypatch.setattr(compress, "compress_cache_blocks", lambda *a, **k: steps.append(a[2].tolist()) or real(*a, **k))
    fast = tiny_model(n_layers=1, nsa_backend="triton")
    slow = tiny_model(n_layers=1)
    slow.load_state_dict(fast.state_dict())
    lens = [20, 12]
    ids = torch.randint(0, fast.cfg.vocab_size, (1, sum(lens)))
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])[None]
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    torch.testing.assert_close(fast(ids, positions=pos, doc_ids=doc).logits,
                               slow(ids, positions=pos, doc_ids=doc).logits, atol=1e-5, rtol=1e-5)
    cache = fast.make_cache(1, 40)
    out = [fast(ids[:, :30], cache=cache).logits]
    for t in (30, 31):
        out.append(fast(ids[:, t:t + 1], positions=torch.full((1, 1), t), cache=cache).logits)
    torch.testing.assert_close(torch.cat(out, 1), slow(ids).logits, atol=1e-5, rtol=1e-5)
    assert steps == [[[30]], [[31]]]   # the decode steps; the 30-token prefill compresses in torch


def test_decode_prologue_kernel_in_the_model_equals_the_torch_path(monkeypatch):
    """With the window on the split-KV kernel (attn_backend triton, the interpreter), a cached step
    writes q's keys and values through the dense layers' decode prologue kernel, the keys before
    rotary included (model.decode_prologue): a prefill and decode steps equal the torch path's logits,
    and the kernel ran for the one-token steps; so did the gated sum's kernel for every cached forward
    without gradients (kernels/nsa/gates.py)."""
    from deepwish.kernels.attention import decode
    from deepwish.kernels.nsa import gates
    calls, sums = [], []
    real, real_sum = decode.decode_prologue, gates.gated_sum
    monkeypatch.setattr(decode, "decode_prologue", lambda *a, **k: calls.append(a[0].shape[1]) or real(*a, **k))
    monkeypatch.setattr(gates, "gated_sum", lambda *a, **k: sums.append(a[1].shape[1]) or real_sum(*a, **k))
    cached_steps_equal_the_torch_path(attn_backend="triton")
    assert calls and all(T <= 33 for T in calls) and calls.count(1) == 3, calls
    assert sums == [33, 1, 1, 1], sums


def cached_steps_equal_the_torch_path(attn_bias=False, **kw):
    """A 33-token prefill and three one-token steps over the cache of a 1-layer model with kernels/nsa's
    Triton kernels (and `kw`) under the interpreter: the torch path's logits of the whole rows."""
    fast = tiny_model(n_layers=1, nsa_backend="triton", attn_bias=attn_bias, **kw)
    slow = tiny_model(n_layers=1, attn_bias=attn_bias)
    slow.load_state_dict(fast.state_dict())
    ids = torch.randint(0, fast.cfg.vocab_size, (2, 36))
    cache = fast.make_cache(2, 40)
    with torch.no_grad():
        out = [fast(ids[:, :33], cache=cache).logits]
        for t in (33, 34, 35):
            out.append(fast(ids[:, t:t + 1], positions=torch.full((2, 1), t), cache=cache).logits)
        want = slow(ids).logits
    torch.testing.assert_close(torch.cat(out, 1), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn_bias", [False, True])   # True: q, k, v with biases, the gates not fused
def test_fused_decode_step_in_the_model_equals_the_torch_path(monkeypatch, attn_bias):
    """model.decode_fusion with the GEMV (decode_matmul triton, the interpreter): a one-token step
    of an NSA block is x + NSA(norm(x)) with the norm in the projections' prologues and the add in
    o_proj's epilogue (NSA.residual_forward): a prefill and decode steps equal the torch path's
    logits, and the fused form served exactly the one-token steps."""
    from deepwish.model.nsa import NSA
    taken = []
    real = NSA.residual_forward
    monkeypatch.setattr(NSA, "residual_forward",
                        lambda self, x, *a: (lambda out: taken.append(out is not None) or out)(real(self, x, *a)))
    cached_steps_equal_the_torch_path(attn_backend="triton", decode_matmul="triton", attn_bias=attn_bias)
    assert taken == [False, True, True, True, False], taken   # the prefill, three steps; the torch model


@pytest.mark.parametrize("attn_bias", [False, True])
def test_the_gates_join_the_fused_projection_where_no_projection_has_a_bias(attn_bias):
    """model.fuse_projections: W_g's 3H rows follow q, k and v in the one fused weight (a decoding
    step's gates come out of the same matmul), still the parameter gate_proj.weight; with biases
    on q, k and v (W_g has none) the gates keep their own matmul."""
    m = tiny_model(n_layers=1, attn_bias=attn_bias).blocks[0].mixer
    H, Hkv, D = m.n_heads, m.n_kv_heads, m.head_dim
    with torch.no_grad():
        w, _ = m._fused_qkv()
    assert w.shape[0] == (H + 2 * Hkv) * D + (0 if attn_bias else 3 * H)
    assert (m.gate_proj.weight.data_ptr() == w[-3 * H:].data_ptr()) != attn_bias


def test_compiled_decoding_steps_trace_the_decode_kernels_and_equal_eager():
    """torch.compile of one-token steps (AOT tracing, eager execution, the interpreter's kernels): the
    traced graphs hold the compression and the gated sum as custom ops, and the steps give eager's
    logits and caches; position 31 ends a block. (The ops' fake forms and declared mutations: their
    opcheck tests in tests/kernels.)"""
    import copy

    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    seen = []

    def record(gm, example_inputs):
        seen.append(gm.code)
        return make_boxed_func(gm.forward)

    m = tiny_model(n_layers=1, nsa_backend="triton", attn_backend="triton", decode_matmul="triton")
    ids = torch.randint(0, m.cfg.vocab_size, (2, 36))
    eager_cache = m.make_cache(2, 40)
    with torch.no_grad():
        m(ids[:, :31], cache=eager_cache)
    compiled_cache = copy.deepcopy(eager_cache)
    torch._dynamo.reset()
    step = torch.compile(lambda i, p, c: m(i, positions=p, cache=c).logits,
                         backend=aot_autograd(fw_compiler=record))
    with torch.no_grad():
        for t in (31, 32):
            pos = torch.full((2, 1), t)
            want = m(ids[:, t:t + 1], positions=pos, cache=eager_cache).logits
            torch.testing.assert_close(step(ids[:, t:t + 1], pos, compiled_cache), want, atol=1e-6, rtol=1e-6)
    torch._dynamo.reset()
    code = "\n".join(seen)
    assert "nsa_compress_blocks" in code and "nsa_gated_sum" in code, code[:2000]
    for name in ("k", "v", "k_raw", "k_cmp", "v_cmp", "cmp_end"):
        assert torch.equal(getattr(eager_cache.layers[0], name), getattr(compiled_cache.layers[0], name)), name
