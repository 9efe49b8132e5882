"""NSA kernels on a GPU at the paper's sizes (64 query / 4 KV heads, D 128, l 32 / d 16, l' 64,
n 16), bf16, against the fp32 reference on short rows: forward and every gradient, packed
documents, a captured decode step, and offsets past 2³¹ elements."""
import pytest
import torch

from deepwish.bench.timing import capture
from deepwish.kernels.nsa import reference as ref

pytestmark = pytest.mark.gpu

H, HKV, D, L, STRIDE, SL, N = 64, 4, 128, 32, 16, 64, 16
NEVER = 2 ** 62


def _ends(lengths, device):
    """Compression block ends aligned to each document's start (the model's blocks)."""
    ends, start = [], 0
    for n in lengths:
        ends += [start + e for e in range(L - 1, n, STRIDE)]
        start += n
    return torch.tensor([ends], device=device)


def _selection_ok(sel, score):
    """Every forced block in, nothing ineligible, and no left-out block scoring above a chosen one
    by more than 1e-3 relative (bf16 inputs may reorder near-ties)."""
    NB = score.shape[-1]
    valid = sel >= 0
    chosen = torch.zeros(*sel.shape[:-1], NB + 1, dtype=torch.bool, device=sel.device)
    chosen = chosen.scatter_(-1, torch.where(valid, sel.long(), NB), True)[..., :NB]
    assert torch.equal(valid.sum(-1), (score > float("-inf")).sum(-1).clamp(max=sel.shape[-1]))
    assert not (chosen & (score == float("-inf"))).any() and not (~chosen & (score == float("inf"))).any()
    finite = score.clamp(-1e30, 1e30)
    worst_in = torch.where(chosen, finite, torch.full_like(finite, 1e30)).amin(-1)
    best_out = torch.where(~chosen & (score > float("-inf")), finite, torch.full_like(finite, -1e30)).amax(-1)
    assert (worst_in >= best_out - 1e-3 * best_out.abs().clamp_min(1)).all()


@pytest.mark.parametrize("lengths", [[1536], [300, 20, 700, 516]], ids=["one-doc", "packed"])
def test_bf16_branches_match_reference(cuda, rel_err, lengths):
    _branches_match_reference(cuda, rel_err, lengths)


# the launch options the tile sweep may pick (kernels/nsa/triton.py TILES), each one compiled and checked
OPTIONS = {
    # the scoring fused into the compressed attention (FUSED_SELECT, off by default) and its forms
    "fused-scoring": {"cmp_fwd": dict(FUSED_SELECT=True)},
    "fused-insertion-top-n": {"cmp_fwd": dict(FUSED_SELECT=True, SORT_MERGE=False)},
    "fused-scoring-bj32-bns16": {"cmp_fwd": dict(FUSED_SELECT=True, BJ=32, BNS=16)},
    "fused-vector-searches-jv16": {"cmp_fwd": dict(FUSED_SELECT=True, JV=16)},
    "fused-rank-top-n": {"cmp_fwd": dict(FUSED_SELECT=True, RANK_MERGE=True)},
    "fused-early-out-merges": {"cmp_fwd": dict(FUSED_SELECT=True, SKIP_MERGE=True), "cmp_split": dict(SKIP_MERGE=True)},
    # the separate scoring pass (the default) and its forms
    "insertion-top-n": {"cmp_sel": dict(SORT_MERGE=False)},
    "early-out-merges": {"cmp_sel": dict(SKIP_MERGE=True)},
    "separate-scoring-rank-early-out": {"cmp_fwd": dict(FUSED_SELECT=False),
                                        "cmp_sel": dict(RANK_MERGE=True, SKIP_MERGE=True)},
    "separate-scoring-bm128-jv16-early-out": {"cmp_fwd": dict(FUSED_SELECT=False),
                                              "cmp_sel": dict(BM=128, num_warps=8, JV=16, SKIP_MERGE=True)},
    "separate-scoring-bj64": {"cmp_fwd": dict(FUSED_SELECT=False), "cmp_sel": dict(BJ=64)},
    "cmp-gather": {"cmp_fwd": dict(TMA=False), "cmp_dq": dict(TMA=False)},
    "scoring-gather": {"cmp_sel": dict(TMA=False)},
    "dq-fused-into-dkdv": {"cmp_dkdv": dict(FUSE_DQ=True)},
    "dkdv-one-chunk": {"cmp_dkdv": dict(Q_CHUNK=1 << 20)},
    "slc-union-bt4": {"slc_fwd": dict(BT=4, TMA=False), "slc_dq": dict(BT=4, TMA=False)},
    "slc-gather": {"slc_fwd": dict(TMA=False), "slc_dq": dict(TMA=False)},
    "slc-tma-4-stages": {"slc_fwd": dict(TMA=True, num_stages=4), "slc_dq": dict(TMA=True, num_stages=4)},
    "slc-union-tma-bt8": {"slc_fwd": dict(BT=8, TMA=True), "slc_dq": dict(BT=8, TMA=True)},
}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_tile_options_match_reference(cuda, rel_err, option):
    import contextlib

    from deepwish.kernels.nsa import triton as nk
    with contextlib.ExitStack() as stack:
        for kind, change in OPTIONS[option].items():
            stack.enter_context(nk.override_tiles(kind, **change))
        _branches_match_reference(cuda, rel_err, [300, 20, 700, 516])


@pytest.mark.parametrize("bt", [1, 8])
def test_small_group_branches_match_reference(cuda, rel_err, bt):
    """Qwen3-0.6B's group (16 query / 8 KV heads, G 2: the small-group tile rows), one-token and
    union (BT 8: 16 rows) selected kernels, packed documents."""
    from deepwish.kernels.nsa import triton as nk
    with nk.override_tiles("slc_fwd", group=2, BT=bt), nk.override_tiles("slc_dq", group=2, BT=bt):
        _branches_match_reference(cuda, rel_err, [300, 20, 700, 516], heads=(16, 8))


def test_selected_backward_never_waits_for_the_device(cuda):
    """The selected branch's forward and backward (the inverse index included) read nothing back
    to the host: a wait there drains the queue and idles the GPU while the host catches up."""
    from deepwish.kernels.nsa import triton as nk
    T, S, NB = 512, 512, 512 // SL
    q = torch.randn(2, T, 16, D, device=cuda, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(2, S, 8, D, device=cuda, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    sel = torch.rand(2, T, 8, NB, device=cuda).argsort(-1)[..., :N].to(torch.int32).sort(-1, descending=True).values
    q_pos = torch.arange(T, device=cuda)[None].expand(2, T)
    out = nk.nsa_selected(q, k, v, sel, q_pos=q_pos, select_len=SL)   # compiles outside the guarded region
    torch.autograd.grad(out.float().sum(), (q, k, v))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = nk.nsa_selected(q, k, v, sel, q_pos=q_pos, select_len=SL)
        torch.autograd.grad(out.float().sum(), (q, k, v))
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _branches_match_reference(cuda, rel_err, lengths, heads=(H, HKV)):
    from deepwish.kernels.nsa import triton as nk
    torch.manual_seed(0)
    H, HKV = heads
    S = sum(lengths)
    ids = torch.tensor([[d for d, n in enumerate(lengths) for _ in range(n)]], device=cuda) if len(lengths) > 1 else None
    ends = _ends(lengths, cuda)
    mk = lambda *s: torch.randn(*s, device=cuda, dtype=torch.bfloat16).requires_grad_()  # noqa: E731
    q, k, v = mk(1, S, H, D), mk(1, S, HKV, D), mk(1, S, HKV, D)
    kc, vc = mk(1, ends.shape[1], HKV, D), mk(1, ends.shape[1], HKV, D)
    q_pos = torch.arange(S, device=cuda)[None]
    kw = dict(q_pos=q_pos, doc_ids=ids, cmp_len=L, select_len=SL, n_select=N, n_init=1, n_local=2)
    o_r, sel_r = ref.nsa_compressed(q, kc, vc, ends, S=S, **kw)
    o_t, sel_t = nk.nsa_compressed(q, kc, vc, ends, **kw)
    p = ref.compressed_probs(q.detach(), kc.detach(), ends, q_pos, ids, D ** -0.5)
    _selection_ok(sel_t, ref.block_scores(p, ends, q_pos, ids, n_kv_heads=HKV, S=S, cmp_len=L, select_len=SL,
                                          n_init=1, n_local=2))
    assert (sel_t == sel_r).all(-1).float().mean() > 0.95
    g = torch.randn(o_r.shape, device=cuda)
    errs = [rel_err(a, b) for a, b in zip((o_r, *torch.autograd.grad((o_r.float() * g).sum(), (q, kc, vc))),
                                          (o_t, *torch.autograd.grad((o_t.float() * g).sum(), (q, kc, vc))))]
    assert max(errs) < 2e-2, dict(zip(("o_cmp", "dq", "dk_cmp", "dv_cmp"), errs))
    skw = dict(q_pos=q_pos, doc_ids=ids, select_len=SL)
    s_r = ref.nsa_selected(q, k, v, sel_r, **skw)
    s_t = nk.nsa_selected(q, k, v, sel_r, **skw)
    errs = [rel_err(a, b) for a, b in zip((s_r, *torch.autograd.grad((s_r.float() * g).sum(), (q, k, v))),
                                          (s_t, *torch.autograd.grad((s_t.float() * g).sum(), (q, k, v))))]
    assert max(errs) < 2e-2, dict(zip(("o_slc", "dq", "dk", "dv"), errs))


DECODE_OPTIONS = {
    "default": {},
    "slc-two-block-chains-gather-4-warps": {"slc_split": dict(BLOCKS=2, TMA=False, num_warps=4)},
    "slc-unsplit": {"slc_split": dict(BLOCKS=0)},
    "ranges-by-searches-4-warps": {"cmp_split": dict(SCAN=0, MERGE_WARPS=4, SPLIT_TOKENS=256, num_warps=4)},
    "ranges-by-4096-wide-scans": {"cmp_split": dict(SCAN=4096)},
    "top-n-merge-16-warps": {"cmp_split": dict(MERGE_WARPS=16)},
    "top-n-merge-unpruned-8-warps": {"cmp_split": dict(MERGE_PRUNE=False, MERGE_WARPS=8)},
}


@pytest.mark.parametrize("option", list(DECODE_OPTIONS))
def test_captured_decode_step_equals_reference(cuda, rel_err, option):
    """One and three queries over a static 16,384-slot cache (more selection splits than n, so the
    default top-n merge prunes), replayed
    from CUDA graphs with the positions (and the cache) updated in place between replays, under each
    decoding launch option the bench times (the selected branch's slot splits; ranges by scans; the
    top-n merge's forms and warps)."""
    import contextlib

    from deepwish.kernels.nsa import triton as nk
    with contextlib.ExitStack() as stack:
        for kind, change in DECODE_OPTIONS[option].items():
            stack.enter_context(nk.override_tiles(kind, **change))
        _captured_decode_step(cuda, rel_err, C=16384)   # 32 selection splits: the merge sorts 16 of them


def _captured_decode_step(cuda, rel_err, C):
    from deepwish.kernels.nsa import triton as nk
    torch.manual_seed(1)
    mk = lambda *s: torch.randn(*s, device=cuda, dtype=torch.bfloat16)  # noqa: E731
    k, v = mk(1, C, HKV, D), mk(1, C, HKV, D)
    all_ends = torch.arange(L - 1, C, STRIDE, device=cuda)[None]
    kc, vc = mk(1, all_ends.shape[1], HKV, D), mk(1, all_ends.shape[1], HKV, D)
    for T in (1, 3):
        q = mk(1, T, H, D)
        q_pos = torch.zeros(1, T, dtype=torch.long, device=cuda)
        ends = torch.full_like(all_ends, NEVER)

        def step():
            o, sel = nk.nsa_compressed(q, kc, vc, ends, q_pos=q_pos, cmp_len=L, select_len=SL, n_select=N)
            return o, nk.nsa_selected(q, k, v, sel, q_pos=q_pos, select_len=SL), sel

        graph, (o_cmp, o_slc, sel) = capture(step)
        for last in (40, 1000, 2500, C - 1):
            q.copy_(mk(1, T, H, D))
            q_pos.copy_(torch.arange(last - T + 1, last + 1, device=cuda)[None])
            ends.copy_(torch.where(all_ends <= last, all_ends, NEVER))
            graph.replay()
            w_o, _ = ref.nsa_compressed(q, kc, vc, ends, q_pos=q_pos, S=C, cmp_len=L, select_len=SL, n_select=N)
            w_s = ref.nsa_selected(q, k, v, sel, q_pos=q_pos, select_len=SL)
            assert rel_err(w_o, o_cmp) < 1e-2 and rel_err(w_s, o_slc) < 1e-2, (T, last)
            p = ref.compressed_probs(q, kc, ends, q_pos, None, D ** -0.5)
            _selection_ok(sel, ref.block_scores(p, ends, q_pos, None, n_kv_heads=HKV, S=C, cmp_len=L, select_len=SL,
                                                n_init=1, n_local=2))


def test_offsets_past_2_31_elements(cuda, rel_err):
    """k, v of 1 · 4.2M · 4 · 128 > 2³¹ elements: queries at the end of the row read the first
    block and the last ones through int64 offsets."""
    from deepwish.kernels.nsa import triton as nk
    torch.manual_seed(2)
    S = (1 << 31) // (HKV * D) + 4096
    S -= S % SL
    k = torch.empty(1, S, HKV, D, device=cuda, dtype=torch.bfloat16)
    v = torch.empty_like(k)
    T = 8
    q = torch.randn(1, T, H, D, device=cuda, dtype=torch.bfloat16)
    q_pos = torch.arange(S - T, S, device=cuda)[None]
    NB = S // SL
    sel = torch.tensor([NB - 1, NB - 2, 0, -1], device=cuda, dtype=torch.int32).expand(1, T, HKV, 4).contiguous()
    rows = torch.cat([torch.arange(0, SL), torch.arange(S - 2 * SL, S)]).to(cuda)
    for x in (k, v):
        x[:, rows] = torch.randn(1, rows.numel(), HKV, D, device=cuda, dtype=torch.bfloat16)
    got = nk.nsa_selected(q, k, v, sel, q_pos=q_pos, select_len=SL)
    # the same attention on the three blocks alone, gathered into a short row
    small = torch.tensor([2, 1, 0, -1], device=cuda, dtype=torch.int32).expand(1, T, HKV, 4)
    want = ref.nsa_selected(q, k[:, rows], v[:, rows], small, q_pos=q_pos - (S - 3 * SL), select_len=SL)
    assert rel_err(want, got) < 1e-2
