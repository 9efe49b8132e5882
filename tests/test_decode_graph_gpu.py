"""CUDA-graph decode equals the eager decode (run on the device machine: pytest -m gpu).

Same prefill into two caches, then the same tokens through the eager step and the captured
step: logits close at every step and greedy `generate` identical. Capture itself fails if
anything in the step synchronises with the host, so every case is also a no-sync check.
"""
import pytest
import torch

from deepwish.config import model_config
from deepwish.decode_graph import CapturedDecoder
from deepwish.generate import decode_one_token, generate, prefill
from deepwish.model.transformer import Transformer

pytestmark = pytest.mark.gpu

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _model(preset, dtype, device, **kw):
    torch.manual_seed(0)
    cfg = model_config(preset, **kw)
    return Transformer(cfg).eval().to(device=device, dtype=dtype)


def _stepwise(model, step_fn, cache, prompt, steps):
    """Prefill `prompt` [B, T], then feed the eager-greedy token stream `steps` [B, S] one at a time."""
    out = [prefill(model, prompt, cache)]
    B, T = prompt.shape
    for s in range(steps.shape[1]):
        out.append(step_fn(model, steps[:, s].contiguous(), torch.full((B,), T + s, device=prompt.device), cache).clone())
    return torch.stack(out, 1)


def _no_host_sync(model, batch):
    """One eager step under CUDA sync-debug 'error' mode: names the op if anything in the step
    waits for the device (capture would fail on it with a less helpful message)."""
    dev = model.embed.weight.device
    scratch = model.make_cache(batch, 8)
    tok = torch.zeros(batch, dtype=torch.long, device=dev)
    decode_one_token(model, tok, tok, scratch)  # first call outside: lazy initialisations may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        decode_one_token(model, tok, tok + 1, scratch)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _check(model, batch, dtype, rel_err, compile=False, n=12):
    V = model.cfg.vocab_size
    dev = model.embed.weight.device
    if not compile:
        _no_host_sync(model, batch)
    prompt = torch.randint(0, V, (batch, 9), device=dev)
    feed = torch.randint(0, V, (batch, n), device=dev)
    eager_cache = model.make_cache(batch, 9 + n)
    ref = _stepwise(model, decode_one_token, eager_cache, prompt, feed)
    cache = model.make_cache(batch, 9 + n)
    step = CapturedDecoder(model, cache, compile=compile)
    assert all(float(t.abs().max()) == 0 for layer in cache.layers for t in vars(layer).values()
               if isinstance(t, torch.Tensor)), "capture must leave the cache zeroed"
    got = _stepwise(model, step, cache, prompt, feed)
    if compile and dtype == torch.bfloat16:
        # Inductor keeps fused intermediates in fp32 where eager rounds each op to bf16, and in an
        # MoE a near-tie in the router then picks other experts: compiled and eager bf16 legitimately
        # differ. Both are held to the fp32 model instead: compiled may not be much further off.
        import copy
        fp32 = copy.deepcopy(model).float()
        exact = _stepwise(fp32, decode_one_token, fp32.make_cache(batch, 9 + n), prompt, feed)
        assert rel_err(exact, got) <= 2 * rel_err(exact, ref) + 1e-2
    else:
        assert rel_err(ref, got) < TOL[dtype]
    return step, cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("preset", ["qwen3_tiny", "qwen3_moe_tiny"])
@pytest.mark.parametrize("batch", [1, 5, 64])
def test_captured_equals_eager(cuda, rel_err, preset, dtype, batch):
    model = _model(preset, dtype, cuda, init_std=0.1)
    step, cache = _check(model, batch, dtype, rel_err)
    prompts = [[int(t) for t in torch.randint(0, model.cfg.vocab_size, (3 + b % 4,))] for b in range(batch)]
    eager = generate(model, prompts, 16, cache=model.make_cache(batch, cache.max_len))  # same shapes
    cache.reset()
    graphed = generate(model, prompts, 16, cache=cache, decode_fn=step)
    assert graphed == eager


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_then_captured(cuda, rel_err, dtype):
    model = _model("qwen3_moe_tiny", dtype, cuda, init_std=0.1)
    _check(model, 4, dtype, rel_err, compile=True)


@pytest.mark.parametrize("preset", ["deepseek_v3_tiny", "deepseek_v32_tiny", "qwen3_next_tiny"])
@pytest.mark.parametrize("batch", [1, 6])
def test_later_mixers_capture(cuda, rel_err, preset, batch):
    """MLA / DSA latent caches and Gated DeltaNet recurrent caches (+ gated attention, MoE)."""
    model = _model(preset, torch.bfloat16, cuda, init_std=0.1)
    step, cache = _check(model, batch, torch.bfloat16, rel_err)
    prompts = [[int(t) for t in torch.randint(0, model.cfg.vocab_size, (4 + b % 3,))] for b in range(batch)]
    eager = generate(model, prompts, 12, cache=model.make_cache(batch, cache.max_len))
    cache.reset()  # recurrent states are not overwritten by slot: a reused cache must be reset
    assert generate(model, prompts, 12, cache=cache, decode_fn=step) == eager


def test_bound_to_its_cache(cuda):
    model = _model("qwen3_tiny", torch.float32, cuda)
    cache = model.make_cache(2, 16)
    step = CapturedDecoder(model, cache)
    other = model.make_cache(2, 16)
    tok = torch.zeros(2, dtype=torch.long, device=cuda)
    with pytest.raises(ValueError, match="bound"):
        step(model, tok, tok, other)
    with pytest.raises(ValueError, match="batch 2"):
        step(model, tok[:1], tok[:1], cache)


@pytest.mark.parametrize("target_preset", ["qwen3_tiny", "qwen3_next_tiny", "deepseek_v3_tiny"])
def test_speculative_with_captured_steps(cuda, target_preset):
    """Verification (k+1 tokens) and draft steps replayed from graphs; fp32 so that the chunked
    verification and the one-token decode agree to argmax."""
    from deepwish.decode_graph import CapturedSteps
    from deepwish.speculative import speculative_generate
    target = _model(target_preset, torch.float32, cuda, init_std=0.1)
    draft = _model("qwen3_tiny", torch.float32, cuda, n_layers=1, init_std=0.1,
                   vocab_size=target.cfg.vocab_size)
    prompt = list(range(1, 8))
    ref = generate(target, [prompt], 40)[0]
    for d in (draft, target):
        tc, dc = target.make_cache(1, 64), d.make_cache(1, 64)
        ts = CapturedSteps(target, tc, lengths=(1, 5))
        ds = CapturedSteps(d, dc, lengths=(1, 2))
        out, st = speculative_generate(target, d, prompt, 40, k=4, fallback=False, target_cache=tc,
                                       draft_cache=dc, target_step=ts, draft_step=ds)
        assert out == ref, st.summary()
    assert st.acceptance_rate == 1.0  # self-draft


def test_mtp_speculation_on_gpu(cuda):
    from deepwish.speculative import mtp_speculative_generate
    model = _model("deepseek_v3_tiny", torch.float32, cuda, init_std=0.1, n_mtp=2)
    prompt = list(range(3, 12))
    out, st = mtp_speculative_generate(model, prompt, 30, fallback=False)
    assert out == generate(model, [prompt], 30)[0], st.summary()


@pytest.mark.parametrize("preset", ["qwen3_moe_tiny", "qwen3_next_tiny"])
def test_bf16_decode_is_bit_reproducible(cuda, preset):
    """bf16, default init (flat logits, top-2 ties common): the eager step run twice and the
    captured step give the same logits bit for bit. The step's only cross-thread accumulation was
    the MoE combine's index_add_ (atomics, order varying run to run); nothing may reintroduce one."""
    model = _model(preset, torch.bfloat16, cuda)
    V = model.cfg.vocab_size
    prompt = torch.randint(0, V, (2, 9), device=cuda)
    feed = torch.randint(0, V, (2, 24), device=cuda)
    first = _stepwise(model, decode_one_token, model.make_cache(2, 33), prompt, feed)
    again = _stepwise(model, decode_one_token, model.make_cache(2, 33), prompt, feed)
    cache = model.make_cache(2, 33)
    graphed = _stepwise(model, CapturedDecoder(model, cache), cache, prompt, feed)
    assert torch.equal(first, again)
    assert torch.equal(first, graphed)
