"""GPT-family switches (model/attention.py, block.py, transformer.py, mlp.py): each one, at its
neutral value, is the plain block; on, it computes its formula; every switch together keeps the
forward contract (prefill + decode = full forward, packed documents = separate documents)."""
from dataclasses import replace

import pytest
import torch

from deepwish.config import ConfigError, ModelConfig
from deepwish.kernels.attention import reference
from deepwish.model import Transformer
from deepwish.model.attention import causal_attention, resolve_attn_backend, scheduled_window
from deepwish.model.block import ForwardContext
from deepwish.model.objective import Objective

BASE = ModelConfig(family="gpt", vocab_size=97, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8,
                   d_ff=48, max_seq_len=512, rope_theta=10000.0, attn_backend="sdpa")
ALL_ON = dict(fused_qkv=True, n_kv_heads=4, attn_softcap=20.0, logit_softcap=15.0, window_pattern="SSL", window_short=1,
              window_long=0, residual_scales=True, unet_skips=True, value_embeds=1, gated_ffn=False,
              hidden_act="relu2", embed_norm=True, tie_embeddings=False)


def _pair(base=BASE, **switch):
    """A plain model and one with `switch`, sharing every parameter they both have."""
    torch.manual_seed(0)
    plain = Transformer(base).eval()
    torch.manual_seed(1)
    other = Transformer(replace(base, **switch)).eval()
    other.load_state_dict(plain.state_dict(), strict=False)
    return plain, other


def _ids(T=24, B=2):
    return torch.randint(0, BASE.vocab_size, (B, T))


def test_fused_qkv_is_the_three_projections():
    plain, fused = _pair(replace(BASE, n_kv_heads=4), fused_qkv=True)
    with torch.no_grad():
        for a, b in zip(plain.blocks, fused.blocks):
            a, b = a.mixer, b.mixer
            b.qkv_weight.copy_(torch.stack([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
    ids = _ids()
    torch.testing.assert_close(fused(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)


def test_muon_orthogonalises_the_fused_stack_per_matrix():
    """The optimizer sees q, k and v as three matrices: one Muon step on the stack equals one step on
    each of the three separately (not the orthogonalisation of one [3HD, d] matrix)."""
    from deepwish.train.muon import Muon
    stack = torch.nn.Parameter(torch.randn(3, 16, 32))
    before = stack.detach().clone()
    parts = [torch.nn.Parameter(before[i].clone()) for i in range(3)]
    g = torch.randn(3, 16, 32)
    stack.grad = g.clone()
    for i, p in enumerate(parts):
        p.grad = g[i].clone()
    Muon([stack], lr=0.1).step()
    Muon(parts, lr=0.1).step()
    torch.testing.assert_close(stack.detach(), torch.stack([p.detach() for p in parts]), rtol=1e-5, atol=1e-6)
    flat = torch.nn.Parameter(torch.zeros(48, 32))
    flat.grad = g.reshape(48, 32).clone()
    Muon([flat], lr=0.1).step()  # one [48, 32] matrix: another update
    assert (flat.detach().view(3, 16, 32) - (stack.detach() - before)).abs().max() > 1e-2


def test_residual_scales_at_init_and_their_formula():
    plain, scaled = _pair(residual_scales=True)
    ids = _ids()
    torch.testing.assert_close(scaled(ids).logits, plain(ids).logits)  # λ = (1, 0): the plain block
    with torch.no_grad():
        for b in scaled.blocks:
            b.residual_scales.copy_(torch.tensor([0.7, 0.4]))
    # by hand: each plain block applied to 0.7·x + 0.4·x0
    ctx = plain.context(ids)
    x0 = x = plain.embed(ids)
    for b in plain.blocks:
        x, _ = b(0.7 * x + 0.4 * x0, ctx)
    torch.testing.assert_close(scaled(ids).logits, plain.logits(plain.norm(x)), rtol=1e-5, atol=1e-5)


def test_unet_skips_at_zero_gates_and_their_formula():
    plain, skipped = _pair(unet_skips=True)
    ids = _ids()
    assert not torch.allclose(skipped(ids).logits, plain(ids).logits)  # gates start at 1
    with torch.no_grad():
        skipped.skips.gates.copy_(torch.tensor([0.5, -2.0]))
    ctx = plain.context(ids)
    x = plain.embed(ids)
    outs = []
    for i, b in enumerate(plain.blocks):  # 4 layers: 3 <- 0 (gate 0.5), 2 <- 1 (gate -2)
        if i == 2:
            x = x - 2.0 * outs[1]
        if i == 3:
            x = x + 0.5 * outs[0]
        x, _ = b(x, ctx)
        outs.append(x)
    torch.testing.assert_close(skipped(ids).logits, plain.logits(plain.norm(x)), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        skipped.skips.gates.zero_()
    torch.testing.assert_close(skipped(ids).logits, plain(ids).logits)


def test_value_embeddings_zero_tables_are_plain_and_reach_first_and_last_layers():
    plain, ve = _pair(value_embeds=1)
    assert set(ve.cfg.value_embed_layers) == {0, 3}
    assert [b.mixer.ve_gate is not None for b in ve.blocks] == [True, False, False, True]
    ids = _ids()
    assert not torch.allclose(ve(ids).logits, plain(ids).logits)
    with torch.no_grad():
        ve.value_embeds.tables[0].weight.zero_()
    torch.testing.assert_close(ve(ids).logits, plain(ids).logits)


def test_value_embedding_is_added_gated_to_the_values():
    cfg = replace(BASE, value_embeds=1, n_layers=2)
    model = Transformer(cfg).eval()
    attn = model.blocks[0].mixer
    ids = _ids(T=10)
    x = torch.randn(2, 10, cfg.d_model)
    ctx = model.context(ids)
    ctx.value_embeds = model.value_embeds(ids)
    ctx.value_embed = ctx.value_embeds[0]  # the stack sets each block's rows before running it
    y, _ = attn(x, ctx)
    # by hand: the same attention with v replaced by v + 2σ(W x[:12])·ve
    ve = ctx.value_embeds[0].view(2, 10, 2, 8)
    g = 2 * torch.sigmoid(x[..., :12] @ attn.ve_gate.weight.t())
    q = attn.q_norm(attn.q_proj(x).view(2, 10, 4, 8))
    k = attn.k_norm(attn.k_proj(x).view(2, 10, 2, 8))
    v = attn.v_proj(x).view(2, 10, 2, 8) + g[..., None] * ve
    from deepwish.model.rope import apply_rotary
    q, k = apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin)
    o = reference.attention(q, k, v, scale=8 ** -0.5)
    torch.testing.assert_close(y, attn.o_proj(o.reshape(2, 10, -1)), rtol=1e-5, atol=1e-5)


def test_relu2_mlp_formula():
    plain, mlp = _pair(gated_ffn=False, hidden_act="relu2")
    ffn = mlp.blocks[0].ffn
    x = torch.randn(3, 32)
    y, aux = ffn(x)
    assert aux == {}
    torch.testing.assert_close(y, torch.relu(x @ ffn.w_up.weight.t()).square() @ ffn.w_down.weight.t())
    assert ffn.w_up.weight.shape == (48, 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_relu2_backward_from_its_output_alone(dtype):
    """ReLU²'s backward reads relu(x)² only (2·relu(x) = 2·√y): the formula's gradient to y's
    rounding, and one tensor of the hidden's size saved instead of two."""
    from deepwish.model.mlp import relu2
    x = torch.randn(64, 96, dtype=torch.float64).to(dtype).requires_grad_()
    dy = torch.randn(64, 96, dtype=dtype)
    (g,) = torch.autograd.grad(relu2(x), x, dy)
    g_ref = 2 * torch.relu(x.detach().double()) * dy.double()  # the formula's gradient, in fp64
    assert (g[x.detach() <= 0] == 0).all()  # zero where relu is, negative inputs and zeros alike
    tol = {torch.float32: 1e-6, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(g.double(), g_ref, rtol=tol, atol=tol * dy.abs().max().item())

    def saved_elements(fn):
        n = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: n.append(t.numel()) or t, lambda t: t):
            fn(x)
        return sum(n)
    assert saved_elements(relu2) == x.numel()
    assert saved_elements(lambda t: torch.relu(t).square()) == 2 * x.numel()  # what autograd keeps otherwise


def test_logit_softcap_formula():
    plain, capped = _pair(logit_softcap=2.0)
    ids = _ids()
    torch.testing.assert_close(capped(ids).logits, 2.0 * torch.tanh(plain(ids).logits / 2.0))
    # the loss is taken on the capped logits
    out = capped(ids, targets=ids)
    ref = torch.nn.functional.cross_entropy(capped(ids).logits.reshape(-1, 97), ids.reshape(-1))
    torch.testing.assert_close(out.loss, ref)


@pytest.mark.parametrize("backend", ["sdpa", "torch"])
@pytest.mark.parametrize("window,softcap", [(0, 0.0), (5, 0.0), (0, 3.0), (7, 2.5)])
def test_windows_and_softcap_equal_the_reference(backend, window, softcap):
    B, T, H, Hkv, D = 2, 19, 4, 2, 8
    q, k, v = torch.randn(B, T, H, D), torch.randn(B, T, Hkv, D), torch.randn(B, T, Hkv, D)
    doc = torch.tensor([[0] * 9 + [1] * 10, [0] * 19])
    pos = torch.cat([torch.arange(9), torch.arange(10)]).expand(B, T).clone()
    pos[1] = torch.arange(T)
    ctx = ForwardContext(positions=pos, cos=None, sin=None, doc_ids=doc)
    out = causal_attention(q, k, v, ctx, window, D ** -0.5, resolve_attn_backend(backend, announce=False), softcap)
    ref = reference.attention(q, k, v, doc_ids=doc, window=window, softcap=softcap, scale=D ** -0.5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_window_pattern_gives_per_layer_windows_and_equals_swa():
    cfg = replace(BASE, n_layers=5, window_pattern="SSL", window_short=1, window_long=2)
    assert cfg.layer_windows == (128, 128, 256, 128, 128)
    assert replace(cfg, window_long=0).layer_windows == (128, 128, 0, 128, 128)
    # a pattern of S everywhere is the swa mixer at the same window
    torch.manual_seed(0)
    swa = Transformer(replace(BASE, mixer="swa", sliding_window=128)).eval()
    pat = Transformer(replace(BASE, window_pattern="S", window_short=1)).eval()
    pat.load_state_dict(swa.state_dict())
    ids = _ids(T=150, B=1)
    torch.testing.assert_close(pat(ids).logits, swa(ids).logits)
    assert not torch.allclose(pat(ids).logits, _plain_logits(swa, ids))  # the window does cut


def _plain_logits(model, ids):
    plain = Transformer(BASE).eval()
    plain.load_state_dict(model.state_dict())
    return plain(ids).logits


def test_window_schedule_caps_in_blocks():
    assert [scheduled_window(384, c) for c in (0, 1, 2, 3, 9)] == [384, 128, 256, 384, 384]
    assert scheduled_window(0, 1) == 0  # full attention is never capped
    # the forward takes the cap from the objective; cap 0 is the final windows
    torch.manual_seed(0)
    model = Transformer(replace(BASE, window_pattern="L", window_short=1, window_long=2)).eval()
    ids = _ids(T=300, B=1)
    early = model(ids, targets=ids, objective=Objective(window_blocks=1)).logits
    late = model(ids, targets=ids, objective=Objective(window_blocks=0)).logits
    assert not torch.allclose(early, late)
    torch.testing.assert_close(late, model(ids).logits)
    torch.manual_seed(0)
    one_block = Transformer(replace(BASE, window_pattern="L", window_short=1, window_long=1)).eval()
    one_block.load_state_dict(model.state_dict())
    torch.testing.assert_close(early, one_block(ids).logits)


def test_learned_positions_replace_rotary():
    torch.manual_seed(0)
    model = Transformer(replace(BASE, position="learned")).eval()
    assert model.pos_embed.weight.shape == (512, 32)
    assert model.context(_ids()).cos is None
    ids = _ids(T=12, B=1)
    base = model(ids).logits
    with torch.no_grad():
        model.pos_embed.weight[5].add_(1.0)
    changed = model(ids).logits
    torch.testing.assert_close(changed[:, :5], base[:, :5])  # causal: earlier positions untouched
    assert not torch.allclose(changed[:, 5:], base[:, 5:])


def test_embed_norm_rms_normalises_x0():
    _, model = _pair(embed_norm=True, residual_scales=True)
    ids = _ids()
    ctx = model.context(ids)
    x0 = model.embed_tokens(ids, ctx)
    assert ctx.x0 is x0
    e = model.embed(ids)
    torch.testing.assert_close(x0, e / (e.pow(2).mean(-1, keepdim=True) + model.cfg.norm_eps).sqrt())


def _all_on(**more):
    torch.manual_seed(0)
    return Transformer(replace(BASE, **{**ALL_ON, **more})).eval()


@pytest.mark.parametrize("more", [{}, {"position": "learned"}, {"n_experts": 4, "n_experts_per_tok": 2,
                                                                  "d_ff_expert": 16, "gated_ffn": True,
                                                                  "hidden_act": "silu"}])
def test_prefill_then_decode_equals_full_forward(more):
    model = _all_on(**more)
    T, P = 148, 144  # past the 128-token short window
    ids = _ids(T=T, B=2)
    full = model(ids).logits
    cache = model.make_cache(2, 160)
    pos = torch.arange(T).expand(2, T)
    pre = model(ids[:, :P], positions=pos[:, :P], cache=cache).logits
    steps = [model(ids[:, t:t + 1], positions=pos[:, t:t + 1], cache=cache).logits for t in range(P, T)]
    torch.testing.assert_close(torch.cat([pre] + steps, 1), full, rtol=1e-4, atol=1e-4)


def test_ring_cache_decoding_equals_full_forward():
    """The S layers' 128-token windows on ring caches of 128 + slack slots (model/ring_cache.py)."""
    from deepwish.model.ring_cache import RingKVCache, make_ring_cache
    model = _all_on()
    T, P = 150, 146
    ids = _ids(T=T, B=1)
    full = model(ids).logits
    cache = make_ring_cache(model, 1, 160)
    assert [isinstance(c, RingKVCache) for c in cache.layers] == [True, True, False, True]
    pos = torch.arange(T)[None]
    pre = model(ids[:, :P], positions=pos[:, :P], cache=cache).logits
    steps = [model(ids[:, t:t + 1], positions=pos[:, t:t + 1], cache=cache).logits for t in range(P, T)]
    torch.testing.assert_close(torch.cat([pre] + steps, 1), full, rtol=1e-4, atol=1e-4)


def test_packed_documents_equal_separate_documents():
    model = _all_on()
    a, b = _ids(T=9, B=1), _ids(T=14, B=1)
    packed = torch.cat([a, b], 1)
    doc = torch.tensor([[0] * 9 + [1] * 14])
    pos = torch.cat([torch.arange(9), torch.arange(14)])[None]
    out = model(packed, positions=pos, doc_ids=doc).logits
    torch.testing.assert_close(out[:, :9], model(a).logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 9:], model(b).logits, rtol=1e-5, atol=1e-5)


def test_every_gpt_parameter_has_its_role():
    roles = _all_on().param_roles()
    assert roles["skips.gates"] == "scalar"
    assert roles["blocks.0.residual_scales"] == "scalar"
    assert roles["blocks.0.mixer.ve_gate.weight"] == "gate"
    assert roles["value_embeds.tables.0.weight"] == "embedding"
    assert roles["blocks.0.mixer.qkv_weight"] == "matrix"
    assert roles["blocks.0.ffn.w_down.weight"] == "matrix_out"
    assert roles["lm_head.weight"] == "head"
    assert _all_on(position="learned").param_roles()["pos_embed.weight"] == "embedding"


def test_gpt_options_reject_other_mixers_and_bad_values():
    with pytest.raises(ConfigError, match="gqa/gated_gqa"):
        replace(BASE, mixer="gdn", attn_softcap=5.0)
    with pytest.raises(ConfigError, match="n_kv_heads == n_heads"):
        replace(BASE, fused_qkv=True)
    with pytest.raises(ConfigError, match="window_short"):
        replace(BASE, window_pattern="SL")
    with pytest.raises(ConfigError, match="only S, L and B"):
        replace(BASE, window_pattern="SX", window_short=1)
    with pytest.raises(ConfigError, match="2K <= n_layers"):
        replace(BASE, value_embeds=3)
    with pytest.raises(ConfigError, match="position"):
        replace(BASE, position="alibi")


def test_hf_export_refuses_the_gpt_family(tmp_path):
    from deepwish.hf.io import CheckpointError, save_hf
    with pytest.raises(CheckpointError, match="HF export is not supported for family 'gpt'"):
        save_hf(Transformer(BASE), tmp_path / "a")
    with pytest.raises(CheckpointError, match="fused_qkv, unet_skips"):
        save_hf(Transformer(replace(BASE, family="qwen3", fused_qkv=True, n_kv_heads=4, unet_skips=True)),
                tmp_path / "b")
    assert not (tmp_path / "a").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "sdpa"])
def test_captured_decoder_equals_eager_decoding(cuda, backend):
    """Every switch on, through the CUDA-graph-captured decode step (the softcap and windows reach
    the split-KV kernel on 'triton'): the same greedy tokens as eager decoding."""
    from deepwish.decode_graph import CapturedDecoder
    from deepwish.generate import generate
    model = _all_on(attn_backend=backend).to(cuda)
    prompt = torch.randint(0, BASE.vocab_size, (140,)).tolist()  # past the 128-token short window
    eager = generate(model, [prompt], 16, cache=model.make_cache(1, 192))[0]
    cache = model.make_cache(1, 192)
    assert generate(model, [prompt], 16, cache=cache, decode_fn=CapturedDecoder(model, cache))[0] == eager


@pytest.mark.gpu
def test_triton_windows_and_softcap_equal_sdpa_training_forward(cuda, rel_err):
    """The own kernel (windows, softcap, documents) against the explicit path, bf16 autocast."""
    ids = _ids(T=300, B=2).to(cuda)
    doc = torch.tensor([[0] * 100 + [1] * 200, [0] * 300], device=cuda)
    pos = torch.cat([torch.arange(100), torch.arange(200)]).to(cuda).expand(2, 300).clone()
    pos[1] = torch.arange(300, device=cuda)
    outs = []
    for backend in ("triton", "sdpa"):
        model = _all_on(attn_backend=backend, head_dim=16).to(cuda)
        with torch.autocast("cuda", torch.bfloat16):
            outs.append(model(ids, positions=pos, doc_ids=doc).logits.float())
    assert rel_err(outs[1], outs[0]) < 2e-2


def test_value_embedding_layers_share_one_compiled_graph():
    """Layers 0 and 3 both take value-embedding rows (model.value_embeds=1 on 4 layers); the stack
    hands each block its rows, so the compiled Block.forward is one graph for both (and one for the
    two plain layers), not one per layer index: a GPT run's many scheduled shapes times one graph
    per layer ran past dynamo's recompile limit (then eager)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = Transformer(replace(BASE, value_embeds=1)).eval()
    assert sorted(model.cfg.value_embed_layers) == [0, 3]
    counter = CompileCounter()
    ids = _ids()
    with torch.no_grad():
        want = model(ids).logits
        for i in range(len(model.blocks)):
            model.blocks[i] = torch.compile(model.blocks[i], backend=counter)
        got = model(ids).logits
    torch.testing.assert_close(got, want)
    assert counter.frame_count == 2


def test_embed_backend_triton_equals_the_modules(monkeypatch):
    """model.embed_backend=triton: the token embedding and the value-embedding tables looked up
    together, their gradients from one sort (kernels/embedding; interpreter on the CPU): the same
    logits and parameter gradients as the per-table modules."""
    from deepwish.kernels.embedding import triton as kernel
    calls = []
    real = kernel.table_grads
    monkeypatch.setattr(kernel, "table_grads", lambda ids, gs, V: calls.append(len(gs)) or real(ids, gs, V))
    ids = _ids(T=40)
    grads = {}
    for backend in ("torch", "triton"):
        model = _all_on(value_embeds=2, embed_backend=backend).train()
        loss = model(ids, targets=ids).loss
        loss.backward()
        grads[backend] = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    (l_t, g_t), (l_k, g_k) = grads["torch"], grads["triton"]
    assert calls == [3]  # one backward for the three tables
    assert torch.equal(l_t, l_k) and g_t.keys() == g_k.keys()
    assert {"embed.weight", "value_embeds.tables.0.weight", "value_embeds.tables.1.weight"} <= g_k.keys()
    for name in g_t:
        torch.testing.assert_close(g_k[name], g_t[name], rtol=1e-5, atol=1e-6, msg=name)


def test_training_compiles_the_stack_modules_and_they_compute_the_same(monkeypatch):
    """With train.compile on, parallelize compiles the modules the stack runs between the blocks (final
    norm, x0 norm, skip entry) as it compiles the blocks; compiled (aot_eager here), the GPT model's
    loss and gradients are those of the eager model."""
    from deepwish.config import load_config
    from deepwish.model.block import Block
    from deepwish.train.parallel import Dist, parallelize, validate
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append((self, k)))
    rc = load_config("gpt_tiny", ["train.compile='on'", "train.compile_mode=max-autotune-no-cudagraphs"])
    model = Transformer(rc.model)
    parallelize(model, rc, Dist(0, 1, 0, torch.device("cpu"), None))
    glue = model.stack_modules()
    assert len(glue) == 3 and [m for m, _ in compiled if not isinstance(m, Block)] == glue
    # inductor's mode reaches every compiled module, blocks and glue alike
    assert len(compiled) == len(model.blocks) + 3
    assert all(k == {"mode": "max-autotune-no-cudagraphs"} for _, k in compiled)
    # coordinate-descent is an inductor option no mode names alone: it reaches them as options
    compiled.clear()
    rc = load_config("gpt_tiny", ["train.compile='on'", "train.compile_mode=coordinate-descent"])
    parallelize(Transformer(rc.model), rc, Dist(0, 1, 0, torch.device("cpu"), None))
    assert len(compiled) == len(model.blocks) + 3
    assert all(k == {"options": {"coordinate_descent_tuning": True}} for _, k in compiled)
    with pytest.raises(ConfigError, match="compile_mode='reduce-overhead': is not one of default, coordinate-descent, "
                                          "max-autotune-no"):
        validate(load_config("gpt_tiny", ["train.compile_mode=reduce-overhead"]).train)
    monkeypatch.undo()

    torch._dynamo.reset()
    ids = _ids(T=40)
    runs = []
    for compile_ in (False, True):
        model = _all_on(unet_skips=True, embed_norm=True).train()
        if compile_:
            for m in [*model.blocks, *model.stack_modules()]:
                m.compile(backend="aot_eager")
        loss = model(ids, targets=ids).loss
        loss.backward()
        runs.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (l_e, g_e), (l_c, g_c) = runs
    torch.testing.assert_close(l_c, l_e)
    assert g_e["skips.gates"] is not None
    for name, g in g_e.items():
        torch.testing.assert_close(g_c[name], g, rtol=1e-5, atol=1e-6, msg=name)
