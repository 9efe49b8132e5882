"""Gated DeltaNet mixer and the Qwen3-Next hybrid stack (CPU, fp32), plus GPU checks (`-m gpu`).

CPU: cache equivalence (prefill in one or two pieces, then token-by-token decode == the full
forward), packed documents == the same documents run apart (no leak in conv or recurrence),
gated attention with partial rotary against an explicit formula, the two norms, the fp32 decay,
backend resolution, and the Triton backend under the interpreter against the torch backend.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from deepwish import Transformer, model_config
from deepwish.kernels.backend import BackendError
from deepwish.model.attention import Attention
from deepwish.model.cache import RecurrentCache
from deepwish.model.gated_deltanet import GatedDeltaNet, GatedRMSNorm, gate_log_decay, resolve_gdn_backend
from deepwish.model.norm import RMSNorm
from deepwish.model.rope import Rotary
from deepwish.model.transformer import ForwardContext

VOCAB = 256


def tiny_cfg(**kw):
    """qwen3_next_tiny, narrowed: 3 GDN layers (HV = 2H) + 1 gated attention, MoE + shared expert."""
    base = dict(vocab_size=VOCAB, d_model=64, d_ff=128, n_heads=4, n_kv_heads=2, head_dim=16,
                linear_n_k_heads=2, linear_n_v_heads=4, linear_k_head_dim=16, linear_v_head_dim=16,
                d_ff_expert=32, d_ff_shared=32, gdn_backend="torch")
    return model_config("qwen3_next_tiny", **{**base, **kw})


def randomise_norms(model: torch.nn.Module) -> None:
    """Norm weights start at 0 (zero-centred) or 1 (gated): perturb them so a swapped or
    missing norm would show."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))


def rel_err(ref, out):
    ref, out = ref.detach().double(), out.detach().double()
    return float((ref - out).norm() / ref.norm())


@pytest.fixture(scope="module")
def model():
    m = Transformer(tiny_cfg()).eval()
    randomise_norms(m)
    assert [k for k, _ in m.cfg.layer_types] == ["gdn", "gdn", "gdn", "gated_gqa"]
    return m


# ---- cache equivalence ----------------------------------------------------------------------

@pytest.mark.parametrize("pieces", [(80,), (50, 30), (7, 73)])
def test_prefill_in_pieces_equals_forward(model, pieces):
    B, T = 2, sum(pieces)
    x = torch.randint(0, VOCAB, (B, T))
    with torch.no_grad():
        full = model(x).logits
        cache = model.make_cache(B, T)
        outs, start = [], 0
        for n in pieces:
            pos = torch.arange(start, start + n).expand(B, n)
            outs.append(model(x[:, start:start + n], positions=pos, cache=cache).logits)
            start += n
    assert rel_err(full, torch.cat(outs, 1)) <= 1e-5


def test_token_by_token_decode_equals_forward(model):
    B, T, k = 2, 40, 5
    x = torch.randint(0, VOCAB, (B, T))
    with torch.no_grad():
        full = model(x).logits
        cache = model.make_cache(B, T)
        outs = [model(x[:, :k], positions=torch.arange(k).expand(B, k), cache=cache).logits]
        for t in range(k, T):
            outs.append(model(x[:, t:t + 1], positions=torch.full((B, 1), t), cache=cache).logits)
    assert rel_err(full, torch.cat(outs, 1)) <= 1e-5


def test_recurrent_cache_shapes_bytes_and_reset(model):
    cache = model.make_cache(3, 40)
    c = cache[0]
    assert isinstance(c, RecurrentCache)
    mixer = model.blocks[0].mixer
    assert tuple(c.conv_state.shape) == (3, mixer.conv_dim, 3)
    assert tuple(c.recurrent_state.shape) == (3, 4, 16, 16) and c.recurrent_state.dtype == torch.float32
    want = 0
    for layer in cache.layers:
        want += sum(t.numel() * t.element_size() for t in vars(layer).values())
    assert cache.nbytes() == want
    assert cache.nbytes() > 3 * (3 * 4 * 16 * 16 * 4)  # three GDN layers' fp32 states at least
    x = torch.randint(0, VOCAB, (3, 10))
    with torch.no_grad():
        first = model(x, cache=cache).logits
        cache.reset()
        assert c.recurrent_state.abs().sum() == 0 and c.conv_state.abs().sum() == 0
        assert torch.equal(model(x, cache=cache).logits, first)


def test_packed_cache_is_refused(model):
    cache = model.make_cache(1, 8)
    with pytest.raises(ValueError, match="packed documents"):
        model(torch.zeros(1, 8, dtype=torch.long), doc_ids=torch.zeros(1, 8, dtype=torch.long), cache=cache).logits


# ---- packed documents -------------------------------------------------------------------------

def pack(rows: list[list[int]]):
    """Document lengths per row -> (positions, doc_ids) [B, T] with positions restarting per document."""
    pos, doc = [], []
    for lens in rows:
        pos.append(torch.cat([torch.arange(n) for n in lens]))
        doc.append(torch.cat([torch.full((n,), i) for i, n in enumerate(lens)]))
    return torch.stack(pos), torch.stack(doc)


def test_packed_documents_equal_separate_runs(model):
    rows = [[17, 40, 23], [3, 66, 11]]  # a 66-token document crosses a chunk boundary
    positions, doc_ids = pack(rows)
    x = torch.randint(0, VOCAB, positions.shape)
    with torch.no_grad():
        packed = model(x, positions=positions, doc_ids=doc_ids).logits
        unmasked = model(x, positions=positions).logits
        for b, lens in enumerate(rows):
            start = 0
            for n in lens:
                alone = model(x[b:b + 1, start:start + n]).logits[0]
                assert rel_err(alone, packed[b, start:start + n]) <= 1e-5, (b, start, n)
                start += n
    # the same stream without document ids does leak (so the check above can fail)
    assert rel_err(packed[0, 17:], unmasked[0, 17:]) > 1e-3


def test_gdn_layer_packed_no_leak_in_conv_or_recurrence():
    """The mixer alone (no attention to hide behind): every output of document 2 is independent
    of document 1's tokens, including the first W-1 tokens the conv would otherwise read."""
    cfg = tiny_cfg()
    mixer = GatedDeltaNet(cfg, 0).eval()
    rot = Rotary(cfg, cfg.rope_dim)
    positions, doc_ids = pack([[9, 21]])
    ctx = ForwardContext(positions, *rot(positions), doc_ids=doc_ids)
    x = torch.randn(1, 30, cfg.d_model)
    x2 = x.clone()
    x2[:, :9] = torch.randn(1, 9, cfg.d_model)  # change only document 1
    with torch.no_grad():
        y, y2 = mixer(x, ctx)[0], mixer(x2, ctx)[0]
    assert torch.allclose(y[:, 9:], y2[:, 9:], atol=1e-6)
    assert not torch.allclose(y[:, :9], y2[:, :9], atol=1e-3)


# ---- gated attention with partial rotary --------------------------------------------------------

def reference_gated_attention(att: Attention, x, positions, theta: float, eps: float):
    """Qwen3-Next gated attention written out: per head q_proj gives [query | gate]; zero-centred
    RMSNorm on q and k; rotary (half split) on the first quarter of each head; causal softmax;
    output scaled by sigmoid(gate) before o_proj."""
    B, T, _ = x.shape
    H, Hkv, D = att.n_heads, att.n_kv_heads, att.head_dim
    qg = (x @ att.q_proj.weight.t()).view(B, T, H, 2 * D)
    q, gate = qg[..., :D], qg[..., D:]
    k = (x @ att.k_proj.weight.t()).view(B, T, Hkv, D)
    v = (x @ att.v_proj.weight.t()).view(B, T, Hkv, D)

    def rms0(t, w):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * (1 + w)

    q, k = rms0(q, att.q_norm.weight), rms0(k, att.k_norm.weight)
    R = D // 4
    inv = 1.0 / theta ** (torch.arange(0, R, 2, dtype=torch.float64) / R)
    ang = positions.double()[..., None] * inv  # [B, T, R/2]
    c, s = ang.cos()[:, :, None].float(), ang.sin()[:, :, None].float()

    def rope(t):
        x1, x2, rest = t[..., :R // 2], t[..., R // 2:R], t[..., R:]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, rest], -1)

    q, k = rope(q), rope(k)
    k, v = k.repeat_interleave(H // Hkv, 2), v.repeat_interleave(H // Hkv, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    o = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v) * torch.sigmoid(gate)
    return o.reshape(B, T, H * D) @ att.o_proj.weight.t()


def test_gated_attention_gate_and_partial_rotary():
    cfg = tiny_cfg(head_dim=32)  # rotary covers 8 of 32 channels
    att = Attention(cfg, 3, gated=True).eval()
    randomise_norms(att)
    rot = Rotary(cfg, cfg.rope_dim)
    assert cfg.rope_dim == 8 and att.q_proj.out_features == 2 * cfg.n_heads * 32
    x = torch.randn(2, 12, cfg.d_model)
    positions = torch.arange(5, 17).expand(2, 12)
    ctx = ForwardContext(positions, *rot(positions))
    with torch.no_grad():
        out = att(x, ctx)[0]
        ref = reference_gated_attention(att, x, positions, cfg.rope_theta, cfg.norm_eps)
    assert rel_err(ref, out) <= 1e-5


# ---- norms and the decay ------------------------------------------------------------------------

def test_zero_centred_norm_vs_plain_and_gated_norm():
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRMSNorm, Qwen3NextRMSNormGated
    d = 24
    x, z = torch.randn(3, 5, d), torch.randn(3, 5, d)
    zc, plain, gated = RMSNorm(d, 1e-6, zero_centered=True), RMSNorm(d, 1e-6), GatedRMSNorm(d, 1e-6)
    assert torch.all(zc.weight == 0) and torch.all(plain.weight == 1) and torch.all(gated.weight == 1)
    w = 0.3 * torch.randn(d)
    with torch.no_grad():
        zc.weight.copy_(w)
        plain.weight.copy_(1 + w)
        gated.weight.copy_(1 + w)
    xhat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert torch.allclose(zc(x), xhat * (1 + w), atol=1e-6)
    assert torch.allclose(zc(x), plain(x), atol=1e-6)
    assert torch.allclose(gated(x, z), xhat * (1 + w) * F.silu(z), atol=1e-6)
    # and against HF's own modules, in fp32 and (zero-centred, exactly) in bf16
    hf_zc, hf_gated = Qwen3NextRMSNorm(d, 1e-6), Qwen3NextRMSNormGated(d, 1e-6)
    with torch.no_grad():
        hf_zc.weight.copy_(w)
        hf_gated.weight.copy_(1 + w)
    assert torch.allclose(hf_zc(x), zc(x), atol=1e-6)
    assert torch.allclose(hf_gated(x, z), gated(x, z), atol=1e-6)
    xb = x.bfloat16()
    assert torch.equal(hf_zc(xb), zc(xb))


def test_decay_is_fp32_and_matches_formula():
    HV = 6
    a = (3 * torch.randn(2, 9, HV)).bfloat16()
    A_log = torch.empty(HV).uniform_(1, 16).log().bfloat16()
    dt_bias = torch.randn(HV).bfloat16()
    g = gate_log_decay(a, A_log, dt_bias)
    assert g.dtype == torch.float32 and g.shape == a.shape
    want = -A_log.double().exp() * F.softplus(a.double() + dt_bias.double())
    assert rel_err(want, g) <= 1e-6
    assert torch.all(g <= 0)
    # fp16: exp(A_log) itself would round; the decay must still be fp32-exact
    g16 = gate_log_decay(a.half(), A_log.half(), dt_bias.half())
    assert g16.dtype == torch.float32
    assert rel_err(-A_log.half().double().exp() * F.softplus(a.half().double() + dt_bias.half().double()), g16) <= 1e-6


def test_init_ranges():
    m = GatedDeltaNet(tiny_cfg(linear_n_v_heads=64, linear_n_k_heads=32), 0)
    A = m.A_log.exp()
    dt = F.softplus(m.dt_bias)
    assert A.min() >= 1 - 1e-5 and A.max() <= 16 + 1e-4
    assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
    assert torch.all(m.norm.weight == 1)


# ---- backends -------------------------------------------------------------------------------------

def test_backend_resolution_without_cuda(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendError, match="fla"):
        resolve_gdn_backend("fla")
    with pytest.raises(BackendError, match="unknown backend"):
        resolve_gdn_backend("cuda")
    capsys.readouterr()
    m = Transformer(tiny_cfg(gdn_backend="auto"))
    err = capsys.readouterr().err
    assert err.count("gated_delta: backend auto -> torch") == 1  # once per model, not per layer
    assert {b.mixer.backend for b in m.blocks if b.mixer_kind == "gdn"} == {"torch"}


def _copy(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    dst.load_state_dict(src.state_dict())


def test_triton_backend_matches_torch():
    """One GDN layer with the explicit 'triton' backend (under TRITON_INTERPRET=1, set by conftest
    on CPU machines; on CUDA where there is one): packed forward + every gradient, then prefill +
    decode steps, against the torch backend, in fp32 (tf32 matmuls on GPU: looser bound)."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tol = 1e-4 if dev.type == "cpu" else 1e-2
    assert resolve_gdn_backend("triton") == "triton"
    cfg = tiny_cfg(linear_n_k_heads=1, linear_n_v_heads=2, d_model=32)
    ref = GatedDeltaNet(cfg, 0).to(dev)
    tri = GatedDeltaNet(tiny_cfg(linear_n_k_heads=1, linear_n_v_heads=2, d_model=32, gdn_backend="triton"), 0).to(dev)
    _copy(tri, ref)
    assert (ref.backend, tri.backend) == ("torch", "triton")
    rot = Rotary(cfg, cfg.rope_dim).to(dev)
    positions, doc_ids = (t.to(dev) for t in pack([[23, 50], [73]]))
    ctx = ForwardContext(positions, *rot(positions), doc_ids=doc_ids)
    x = torch.randn(2, 73, 32, device=dev)
    xr, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yt = ref(xr, ctx)[0], tri(xt, ctx)[0]
    assert rel_err(yr, yt) <= tol
    dy = torch.randn_like(yr)
    yr.backward(dy)
    yt.backward(dy)
    assert rel_err(xr.grad, xt.grad) <= tol
    for (name, pr), (_, pt) in zip(ref.named_parameters(), tri.named_parameters()):
        assert rel_err(pr.grad, pt.grad) <= tol, name
    # cached: prefill 20 tokens, then 3 decode steps
    ctx_full = ForwardContext(positions[:1, :23], *rot(positions[:1, :23]))
    with torch.no_grad():
        cr, ct = ref.make_cache(1, 23, torch.float32, dev), tri.make_cache(1, 23, torch.float32, dev)
        pre = ForwardContext(positions[:1, :20], *rot(positions[:1, :20]))
        outs_r, outs_t = [ref(x[:1, :20], pre, cr)[0]], [tri(x[:1, :20], pre, ct)[0]]
        for t in range(20, 23):
            p = positions[:1, t:t + 1]
            step = ForwardContext(p, *rot(p))
            outs_r.append(ref(x[:1, t:t + 1], step, cr)[0])
            outs_t.append(tri(x[:1, t:t + 1], step, ct)[0])
        full = ref(x[:1, :23], ctx_full)[0]
    assert rel_err(full, torch.cat(outs_r, 1)) <= 1e-5
    assert rel_err(full, torch.cat(outs_t, 1)) <= tol
    assert rel_err(cr.recurrent_state, ct.recurrent_state) <= tol


# ---- GPU (run by the lead: pytest -m gpu tests/model/test_gated_deltanet.py) ------------------------

def _bf16_step(model, x, positions=None, doc_ids=None):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(x, positions=positions, doc_ids=doc_ids).logits
    loss = F.cross_entropy(logits.float()[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    loss.backward()
    return logits.float(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.gpu
def test_gpu_triton_matches_torch_bf16(cuda):
    """Tiny hybrid model on CUDA under bf16 autocast: triton backend vs torch backend, forward and
    every gradient, with packed documents; then triton prefill + decode == triton full forward.
    Dense FFNs: with bf16 noise a random router's near-ties would pick different experts."""
    ref = Transformer(tiny_cfg(vocab_size=1024, n_experts=0)).to(cuda)
    tri = Transformer(tiny_cfg(vocab_size=1024, n_experts=0, gdn_backend="triton")).to(cuda)
    randomise_norms(ref)
    _copy(tri, ref)
    positions, doc_ids = pack([[300, 500, 224], [1024]])
    positions, doc_ids = positions.to(cuda), doc_ids.to(cuda)
    x = torch.randint(0, 1024, positions.shape, device=cuda)
    lr, gr = _bf16_step(ref, x, positions, doc_ids)
    lt, gt = _bf16_step(tri, x, positions, doc_ids)
    errs = {n: rel_err(gr[n], gt[n]) for n in gr}
    print(f"logits rel err {rel_err(lr, lt):.2e}; worst grad {max(errs, key=errs.get)} {max(errs.values()):.2e}")
    assert rel_err(lr, lt) <= 2e-2
    # bf16 kernel intermediates vs the fp32 reference: typical ~1e-2, tiny gradients noisier
    assert sorted(errs.values())[len(errs) // 2] <= 2e-2
    assert max(errs.values()) <= 1e-1
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        T = 200
        y = x[:1, :T]
        full = tri(y).logits.float()
        cache = tri.make_cache(1, T)
        outs = [tri(y[:, :150], cache=cache).logits.float()]
        for t in range(150, T):
            outs.append(tri(y[:, t:t + 1], positions=torch.full((1, 1), t, device=cuda), cache=cache).logits.float())
    assert rel_err(full, torch.cat(outs, 1)) <= 2e-2


@pytest.mark.gpu
def test_gpu_fla_backend_forward_and_decode(cuda):
    """gdn_backend='fla' (flash-linear-attention must be installed): forward and cached decode
    against the torch backend in bf16. Backward is not checked (fla 0.6 refuses it on Hopper with
    Triton < 3.7.1, see GPU.md)."""
    ref = Transformer(tiny_cfg(vocab_size=1024, n_experts=0)).to(cuda).eval()
    fla = Transformer(tiny_cfg(vocab_size=1024, n_experts=0, gdn_backend="fla")).to(cuda).eval()
    randomise_norms(ref)
    _copy(fla, ref)
    positions, doc_ids = pack([[100, 156], [256]])
    positions, doc_ids = positions.to(cuda), doc_ids.to(cuda)
    x = torch.randint(0, 1024, positions.shape, device=cuda)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        a = ref(x, positions=positions, doc_ids=doc_ids).logits.float()
        b = fla(x, positions=positions, doc_ids=doc_ids).logits.float()
        cache = fla.make_cache(2, 256)
        outs = [fla(x[:, :200], cache=cache).logits.float()]
        for t in range(200, 256):
            outs.append(fla(x[:, t:t + 1], positions=torch.full((2, 1), t, device=cuda), cache=cache).logits.float())
        full = fla(x).logits.float()
    print(f"fla vs torch logits rel err {rel_err(a, b):.2e}; fla cached vs full {rel_err(full, torch.cat(outs, 1)):.2e}")
    assert rel_err(a, b) <= 2e-2
    assert rel_err(full, torch.cat(outs, 1)) <= 2e-2


@pytest.mark.gpu
def test_gpu_bench_shape_trains_one_step(cuda):
    """qwen3_next_bench (the GPU.md shape) with auto backend: one bf16 forward + backward of a
    packed [1, 2048] batch is finite; prints the step time (not a benchmark, a smoke test)."""
    import time
    model = Transformer(model_config("qwen3_next_bench")).to(cuda)
    positions, doc_ids = pack([[700, 1000, 348]])
    positions, doc_ids = positions.to(cuda), doc_ids.to(cuda)
    x = torch.randint(0, model.cfg.vocab_size, positions.shape, device=cuda)
    for i in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits, grads = _bf16_step(model, x, positions, doc_ids)
        torch.cuda.synchronize()
        print(f"step {i}: {1e3 * (time.perf_counter() - t0):.1f} ms, backend {model.blocks[0].mixer.backend}")
    assert torch.isfinite(logits).all()
    assert all(torch.isfinite(g).all() for g in grads.values())


# ---- training through the trainer -----------------------------------------------------------------

@pytest.mark.slow
def test_qwen3_next_tiny_trains_through_the_loop(tmp_path):
    """30 steps of a narrowed qwen3_next_tiny (GDN + gated attention + MoE) on the embedded corpus
    with packed documents: the loss falls well below its start. The full-size CPU run is
    `deepwish train --preset qwen3_next_tiny --set train.steps=30` (see reports/gdn.md)."""
    from deepwish.config import load_config
    from deepwish.train import loop
    narrow = ["model.d_model=64", "model.head_dim=16", "model.d_ff=128", "model.linear_k_head_dim=16",
              "model.linear_v_head_dim=16", "model.d_ff_expert=32", "model.d_ff_shared=32",
              "model.gdn_backend=torch", "train.steps=30", "train.seq_len=64", "train.batch_size=4",
              "train.eval_every=30", "train.save_every=30", "train.eval_batches=1", "train.sample_tokens=4",
              "train.log_every=10", "train.warmup_steps=3", "train.lr=0.01", "train.muon_lr=0.05",
              f"train.out_dir={tmp_path / 'run'}"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny ops: a second intra-op thread only adds waiting
    try:
        s = loop.train(load_config("qwen3_next_tiny", narrow), progress_bar=False)
    finally:
        torch.set_num_threads(threads)
    losses = [s["train_losses"][k] for k in sorted(s["train_losses"])]
    assert len(losses) == 30
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses
