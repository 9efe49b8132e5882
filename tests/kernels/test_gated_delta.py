"""Gated delta rule: the three torch references agree with each other and with HF transformers, and
the Triton kernels (run by the interpreter on CPU, fp32, tiny shapes) match them in the forward and
in every gradient, with packed sequences, grouped value heads and initial / final states."""
import pytest
import torch
import torch.nn.functional as F

from deepwish.kernels.gated_delta import (chunk_gated_delta_rule, chunk_gated_delta_rule_ref,
                                          fused_recurrent_gated_delta_step, naive_recurrent_gated_delta_rule,
                                          recurrent_gated_delta_step_ref)
from deepwish.kernels.gated_delta.reference import l2norm


def make_inputs(B, T, H, HV, K, V, N=None, decay="mild", dtype=torch.float32):
    """Random valid inputs: q, k unit-norm, beta in (0, 1), g <= 0. `mild` decay keeps the initial
    state visible after ~100 steps; `strong` decay drives exp(G) to underflow inside a chunk."""
    N = B if N is None else N
    q = l2norm(torch.randn(B, T, H, K))
    k = l2norm(torch.randn(B, T, H, K))
    v = torch.randn(B, T, HV, V)
    if decay == "mild":
        g = F.logsigmoid(torch.randn(B, T, HV) + 4.0)
    else:
        g = -torch.rand(B, T, HV) * 30.0
    beta = torch.sigmoid(torch.randn(B, T, HV))
    h0 = torch.randn(N, HV, K, V)
    return [x.to(dtype) for x in (q, k, v, g, beta)] + [h0]


def run_with_grads(fn, inputs, use_h0, seed, cu_seqlens=None, **kw):
    """Forward with initial and final state, backward of a random projection (drawn from `seed`, so
    that two implementations see the same one) of both outputs.
    Returns (o, final_state, grads of q, k, v, g, beta[, h0])."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    q, k, v, g, beta, h0 = leaves
    o, ht = fn(q, k, v, g, beta, initial_state=h0 if use_h0 else None, output_final_state=True,
               cu_seqlens=cu_seqlens, **kw)
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=gen)
    dht = torch.randn(ht.shape, generator=gen)
    wrt = leaves[:5] + ([h0] if use_h0 else [])
    grads = torch.autograd.grad((o * do).sum() + (ht * dht).sum(), wrt)
    return [o.detach(), ht.detach(), *grads]


def fresh_seed():
    return int(torch.randint(0, 2**31 - 1, ()).item())


NAMES = ["o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "dh0"]


def assert_all_close(rel_err, ref, out, tol):
    for name, a, b in zip(NAMES, ref, out):
        err = rel_err(a, b)
        assert err < tol, f"{name}: rel_rms {err:.2e} >= {tol:.0e}"


# ---------------------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk_size", [16, 64])
def test_chunk_reference_matches_recurrent(rel_err, chunk_size):
    inputs = make_inputs(B=2, T=45, H=1, HV=2, K=8, V=6)
    seed = fresh_seed()
    ref = run_with_grads(naive_recurrent_gated_delta_rule, inputs, True, seed)
    out = run_with_grads(lambda *a, **kw: chunk_gated_delta_rule_ref(*a, chunk_size=chunk_size, **kw),
                         inputs, True, seed)
    assert_all_close(rel_err, ref, out, 1e-5)
    # the initial state must matter, or the test above proves nothing about it
    o_no_h0, _ = naive_recurrent_gated_delta_rule(*inputs[:5])
    assert rel_err(ref[0], o_no_h0) > 1e-2


def test_recurrent_reference_matches_hf(rel_err):
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_recurrent_gated_delta_rule
    q, k, v, g, beta, h0 = make_inputs(B=2, T=20, H=2, HV=4, K=8, V=8)
    o, ht = naive_recurrent_gated_delta_rule(q * 3, k * 2, v, g, beta, initial_state=h0, output_final_state=True,
                                             use_qk_l2norm=True)
    # HF expects the key heads already repeated to the value heads (grouped, like repeat_interleave)
    o_hf, ht_hf = torch_recurrent_gated_delta_rule(q.repeat_interleave(2, 2) * 3, k.repeat_interleave(2, 2) * 2,
                                                   v, g, beta, initial_state=h0, output_final_state=True,
                                                   use_qk_l2norm_in_kernel=True)
    assert rel_err(o_hf, o) < 1e-5
    assert rel_err(ht_hf, ht) < 1e-5


@pytest.mark.parametrize("fn", [naive_recurrent_gated_delta_rule, chunk_gated_delta_rule_ref])
def test_reference_packed_equals_separate(rel_err, fn):
    lens = [5, 0, 19]
    q, k, v, g, beta, h0 = make_inputs(B=1, T=sum(lens), H=1, HV=2, K=8, V=4, N=len(lens))
    cu = torch.tensor([0, 5, 5, 24])
    o, ht = fn(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    for n in range(len(lens)):
        s = slice(int(cu[n]), int(cu[n + 1]))
        o_n, ht_n = fn(q[:, s], k[:, s], v[:, s], g[:, s], beta[:, s], initial_state=h0[n:n + 1],
                       output_final_state=True)
        if lens[n]:
            assert rel_err(o_n, o[:, s]) < 1e-6
        assert rel_err(ht_n, ht[n:n + 1]) < 1e-6
    assert torch.equal(ht[1], h0[1])    # an empty sequence hands its state through


def test_step_reference_matches_recurrent(rel_err):
    q, k, v, g, beta, h0 = make_inputs(B=2, T=6, H=1, HV=2, K=8, V=4)
    o, ht = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    S = h0.clone()
    for t in range(6):
        o_t, S_new = recurrent_gated_delta_step_ref(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], S)
        assert rel_err(o[:, t], o_t) < 1e-6
        S = S_new
    assert rel_err(ht, S) < 1e-6


def test_bad_inputs_raise():
    q, k, v, g, beta, h0 = make_inputs(B=2, T=4, H=2, HV=4, K=8, V=4)
    with pytest.raises(ValueError, match="multiple of key heads"):
        naive_recurrent_gated_delta_rule(q, k, v[:, :, :3], g[:, :, :3], beta[:, :, :3])
    with pytest.raises(ValueError, match="requires B == 1"):
        chunk_gated_delta_rule_ref(q, k, v, g, beta, cu_seqlens=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="initial_state"):
        chunk_gated_delta_rule_ref(q, k, v, g, beta, initial_state=h0[:1])
    with pytest.raises(ValueError, match="beta"):
        chunk_gated_delta_rule(q, k, v, g, beta[..., :2])
    with pytest.raises(ValueError, match="state must be a contiguous fp32"):
        fused_recurrent_gated_delta_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], h0.double())


# ---------------------------------------------------------------------------------------------------
# Triton (interpreter on CPU)
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("B,T,H,HV,K,V,use_h0,decay", [
    (2, 63, 2, 4, 32, 16, True, "mild"),     # one partial chunk, grouped heads, initial state
    (1, 130, 1, 2, 16, 32, False, "mild"),   # three chunks, the last one partial
    (1, 70, 1, 1, 16, 16, True, "strong"),   # exp(G) underflows inside a chunk
])
def test_triton_chunk_matches_reference(rel_err, B, T, H, HV, K, V, use_h0, decay):
    inputs = make_inputs(B, T, H, HV, K, V, decay=decay)
    seed = fresh_seed()
    ref = run_with_grads(naive_recurrent_gated_delta_rule, inputs, use_h0, seed)
    out = run_with_grads(chunk_gated_delta_rule, inputs, use_h0, seed)
    assert_all_close(rel_err, ref, out, 1e-4)


def test_triton_chunk_packed(rel_err):
    cu = torch.tensor([0, 10, 10, 85, 150])
    inputs = make_inputs(B=1, T=150, H=1, HV=2, K=16, V=16, N=4)
    seed = fresh_seed()
    ref = run_with_grads(chunk_gated_delta_rule_ref, inputs, True, seed, cu_seqlens=cu)
    out = run_with_grads(chunk_gated_delta_rule, inputs, True, seed, cu_seqlens=cu)
    assert_all_close(rel_err, ref, out, 1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ut_transform_matches_torch_per_chunk(rel_err, dtype):
    """The UT transform's kernels (A formed block by block over K slices, its inverse by forward and
    block forward substitution) store what torch computes chunk by chunk: G = cumsum(g), the read part of
    Ai = (I + A)^{-1}, and w = Ai (beta exp(G) k), on a packed batch with partial chunks (a document of
    10, one of 75: a partial chunk in the middle of the row; 150 rows: a last chunk of 22 with rows in
    three of its four 16-row blocks), K = 48 (two K slices of 32, the second half masked), grouped
    value heads; and the whole forward matches the reference."""
    from deepwish.kernels.gated_delta import triton as kernels
    cu = torch.tensor([0, 10, 85, 150])
    q, k, v, g, beta, _ = make_inputs(B=1, T=150, H=1, HV=2, K=48, V=16, N=3, dtype=dtype)
    layout = kernels._chunk_layout(1, 150, cu, q.device)
    o, _, (G, Ai, w, h, v_new) = kernels._fwd(q, k, v, g, beta, 0.25, None, False, layout)
    assert Ai.dtype == dtype and w.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    starts = [t for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()) for t in range(s, e, kernels.BT)]
    ends = [min(t + kernels.BT, e) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()) for t in range(s, e, kernels.BT)]
    for t0, t1 in zip(starts, ends):
        n = t1 - t0
        for hv in range(2):
            kc, bc = k[0, t0:t1, 0].double(), beta[0, t0:t1, hv].double()
            Gc = g[0, t0:t1, hv].double().cumsum(0)
            A = (bc[:, None] * (kc @ kc.T) * (Gc[:, None] - Gc[None, :]).exp()).tril(-1)
            Ai_want = torch.linalg.inv(torch.eye(n, dtype=torch.float64) + A)
            w_want = Ai_want @ ((bc * Gc.exp())[:, None] * kc)
            assert rel_err(Gc, G[0, t0:t1, hv].double()) < 1e-6
            assert rel_err(Ai_want, Ai[0, t0:t1, hv, :n].double().tril()) < tol, (t0, hv)
            assert rel_err(w_want, w[0, t0:t1, hv].double()) < tol, (t0, hv)
    want, _ = chunk_gated_delta_rule_ref(q.float(), k.float(), v.float(), g.float(), beta.float(), scale=0.25,
                                         cu_seqlens=cu)
    assert rel_err(want, o.float()) < (1e-4 if dtype == torch.float32 else 1e-2)


def test_wy_backward_walks_k_in_slices(rel_err, monkeypatch):
    """The UT transform's backward walks K in slices twice (the sums over K, then dk): at K = 48 in
    slices of 32 (the second half masked), on a packed batch with partial chunks and grouped value
    heads, every gradient matches the reference."""
    from deepwish.kernels.gated_delta import triton as kernels
    monkeypatch.setattr(kernels, "WY_BWD_BKS", 32)
    cu = torch.tensor([0, 10, 85, 150])
    inputs = make_inputs(B=1, T=150, H=1, HV=2, K=48, V=16, N=3)
    seed = fresh_seed()
    ref = run_with_grads(chunk_gated_delta_rule_ref, inputs, True, seed, cu_seqlens=cu)
    out = run_with_grads(chunk_gated_delta_rule, inputs, True, seed, cu_seqlens=cu)
    assert_all_close(rel_err, ref, out, 1e-4)


@pytest.mark.parametrize("HV", [1, 2])
def test_fp16_gradients_leave_in_the_input_dtype(rel_err, HV):
    """fp16 inputs: the kernels store dq, dk and dv in fp16 (grouped value heads: dq and dk summed in
    fp32 first), each near the fp32 reference's gradient, on a packed batch with partial chunks."""
    cu = torch.tensor([0, 10, 85, 150])
    inputs = make_inputs(B=1, T=150, H=1, HV=HV, K=16, V=16, N=3, dtype=torch.float16)
    inputs[-1] = inputs[-1].float()
    seed = fresh_seed()
    got = run_with_grads(chunk_gated_delta_rule, inputs, True, seed, cu_seqlens=cu)
    want = run_with_grads(chunk_gated_delta_rule_ref, [x.float() for x in inputs], True, seed, cu_seqlens=cu)
    assert [x.dtype for x in got[2:5]] == [torch.float16] * 3
    assert_all_close(rel_err, want, [x.float() for x in got], 1e-2)


def test_triton_chunk_without_states_and_l2norm(rel_err):
    q, k, v, g, beta, _ = make_inputs(B=1, T=40, H=1, HV=2, K=16, V=16)
    q, k = 2.5 * q, 0.5 * k
    o_ref, _ = naive_recurrent_gated_delta_rule(q, k, v, g, beta, scale=0.3, use_qk_l2norm=True)
    o, ht = chunk_gated_delta_rule(q, k, v, g, beta, scale=0.3, use_qk_l2norm=True)
    assert ht is None
    assert rel_err(o_ref, o) < 1e-4


@pytest.mark.parametrize("use_qk_l2norm", [False, True])
def test_triton_decode_step_in_place(rel_err, use_qk_l2norm):
    B, H, HV, K, V = 3, 2, 4, 32, 48
    q, k = torch.randn(B, H, K), torch.randn(B, H, K)
    if not use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    v, g, beta = torch.randn(B, HV, V), -torch.rand(B, HV), torch.rand(B, HV)
    state = torch.randn(B, HV, K, V)
    o_ref, state_ref = recurrent_gated_delta_step_ref(q, k, v, g, beta, state, use_qk_l2norm=use_qk_l2norm)
    state_before = state.clone()
    storage = state.data_ptr()
    o = fused_recurrent_gated_delta_step(q, k, v, g, beta, state, use_qk_l2norm=use_qk_l2norm)
    assert state.data_ptr() == storage
    assert rel_err(o_ref, o) < 1e-5
    assert rel_err(state_ref, state) < 1e-5
    assert rel_err(state_ref, state_before) > 1e-3     # it really changed in place


def test_package_imports_without_triton():
    """The references work on a machine without Triton; the Triton entry points say what is missing."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, deepwish.kernels.gated_delta as G\n"
            "assert G.chunk_gated_delta_rule_ref is not None\n"
            "try:\n"
            "    G.fused_recurrent_gated_delta_step(*[torch.zeros(1)] * 6)\n"
            "except ImportError as e:\n"
            "    assert 'needs the `triton` package' in str(e)\n"
            "else:\n"
            "    raise AssertionError('no error')\n")
    subprocess.run([sys.executable, "-c", code], check=True)
