"""NSA's Triton kernels (interpreter on CPU) against the fp32 reference: the compressed branch
(output, gradients, the selection), the selected branch (output, gradients), the inverse index,
and decoding over a static cache (prefill, then one token and k+1 tokens at a time, equal to the
full forward). Tiles are 16 wide under the interpreter and the dK/dV work items hold 3 queries,
so tiny shapes cross several of each."""
import pytest
import torch

from deepwish.kernels.attention import triton as attn_triton
from deepwish.kernels.nsa import reference as ref
from deepwish.kernels.nsa import triton as tri

NEVER = 2 ** 62
TOL = {torch.float32: 1e-4, torch.float16: 1e-2}


def doc_ids_of(lengths):
    """doc_ids [B, S] from document lengths per row."""
    return torch.tensor([[d for d, n in enumerate(row) for _ in range(n)] for row in lengths])


def block_ends(lengths, l, d, pad):
    """cmp_end [B, N]: compression blocks aligned to each document's start (as the model makes
    them), ascending, then `pad` padding slots (and as many as rows need to be equal length)."""
    rows = []
    for row in lengths:
        ends, start = [], 0
        for n in row:
            ends += [start + e for e in range(l - 1, n, d)]
            start += n
        rows.append(ends)
    N = max(len(r) for r in rows) + pad
    return torch.tensor([r + [NEVER] * (N - len(r)) for r in rows])


def assert_selection_ok(sel, score, n):
    """sel [B, T, Hkv, n] is a correct top-n of the reference scores [B, T, Hkv, NB] (+inf forced,
    -inf ineligible), up to near-ties: every forced block in, nothing ineligible, as many blocks as
    eligible (up to n), the worst chosen score >= the best left out (1e-5 relative), listed in
    descending order with -1 last."""
    NB = score.shape[-1]
    valid = sel >= 0
    eligible = (score > float("-inf")).sum(-1)
    assert torch.equal(valid.sum(-1), eligible.clamp(max=n))
    srt = torch.where(valid, sel, -1)
    assert torch.equal(srt, srt.sort(-1, descending=True).values)
    chosen = torch.zeros(*sel.shape[:-1], NB + 1, dtype=torch.bool).scatter_(-1, torch.where(valid, sel.long(), NB), True)
    chosen = chosen[..., :NB]
    assert torch.equal(chosen.sum(-1), valid.sum(-1)), "a block listed twice"
    assert not (chosen & (score == float("-inf"))).any()
    assert not (~chosen & (score == float("inf"))).any()
    finite = score.clamp(-1e30, 1e30)
    worst_in = torch.where(chosen, finite, torch.full_like(finite, 1e30)).amin(-1)
    best_out = torch.where(~chosen & (score > float("-inf")), finite, torch.full_like(finite, -1e30)).amax(-1)
    assert (worst_in >= best_out - 1e-5 * best_out.abs().clamp_min(1)).all()


def rel(rel_err, want, got):
    if want.abs().max() == 0:
        return float((got.detach().double() - want.detach().double()).abs().max())
    return rel_err(want, got)


CASES = [  # B, lengths per row (sum = S), T (last T queries), H, Hkv, D, l, d, l', n, n_local, docs, dtype
    pytest.param(1, [[5]], 5, 1, 1, 16, 8, 4, 16, 2, 1, False, torch.float32, id="T-shorter-than-a-block-g1"),
    pytest.param(1, [[27]], 27, 4, 1, 32, 8, 4, 16, 3, 2, False, torch.float32, id="T27-g4"),
    pytest.param(2, [[5, 3, 9], [17]], 17, 4, 1, 16, 8, 4, 8, 3, 1, True, torch.float16, id="docs-shorter-than-blocks-g4"),
    pytest.param(1, [[17]], 17, 16, 1, 24, 4, 2, 8, 6, 2, False, torch.float16, id="n-beyond-past-blocks-g16-d24"),
    pytest.param(1, [[11, 22]], 7, 2, 2, 16, 8, 8, 16, 2, 1, True, torch.float32, id="last-queries-g1-docs"),
]


def make_inputs(B, lengths, T, H, Hkv, D, l, d, dtype):
    S = sum(lengths[0])
    q = torch.randn(B, T, H, D, dtype=dtype, requires_grad=True)
    k = torch.randn(B, S, Hkv, D, dtype=dtype, requires_grad=True)
    v = torch.randn(B, S, Hkv, D, dtype=dtype, requires_grad=True)
    ends = block_ends(lengths, l, d, pad=2)
    N = ends.shape[1]
    k_cmp = torch.randn(B, N, Hkv, D, dtype=dtype, requires_grad=True)
    v_cmp = torch.randn(B, N, Hkv, D, dtype=dtype, requires_grad=True)
    q_pos = torch.arange(S - T, S).expand(B, T)
    return q, k, v, k_cmp, v_cmp, ends, q_pos


@pytest.mark.parametrize("B,lengths,T,H,Hkv,D,l,d,sl,n,n_local,docs,dtype", CASES)
def test_compressed_and_selected_match_reference(rel_err, B, lengths, T, H, Hkv, D, l, d, sl, n, n_local, docs, dtype):
    torch.manual_seed(0)
    q, k, v, k_cmp, v_cmp, ends, q_pos = make_inputs(B, lengths, T, H, Hkv, D, l, d, dtype)
    S = k.shape[1]
    ids = doc_ids_of(lengths) if docs else None
    kw = dict(q_pos=q_pos, doc_ids=ids, cmp_len=l, select_len=sl, n_select=n, n_init=1, n_local=n_local)
    o_want, sel_want = ref.nsa_compressed(q, k_cmp, v_cmp, ends, S=S, **kw)
    o_got, sel_got = tri.nsa_compressed(q, k_cmp, v_cmp, ends, **kw)
    assert o_got.dtype == dtype and sel_got.dtype == torch.int32 and sel_got.shape == sel_want.shape
    # the selection: a correct top-n of the reference's own scores (fp16 may reorder near-ties)
    p = ref.compressed_probs(q.detach(), k_cmp.detach(), ends, q_pos, ids, D ** -0.5)
    score = ref.block_scores(p, ends, q_pos, ids, n_kv_heads=Hkv, S=S, cmp_len=l, select_len=sl, n_init=1,
                             n_local=n_local)
    assert_selection_ok(sel_got, score, n)
    if dtype == torch.float32:
        assert torch.equal(sel_got, sel_want)
    g = torch.randn(o_want.shape)
    wg = torch.autograd.grad((o_want.float() * g).sum(), (q, k_cmp, v_cmp))
    gg = torch.autograd.grad((o_got.float() * g).sum(), (q, k_cmp, v_cmp))
    errs = [rel(rel_err, a, b) for a, b in zip((o_want, *wg), (o_got, *gg))]
    assert max(errs) < TOL[dtype], dict(zip(("o_cmp", "dq", "dk_cmp", "dv_cmp"), errs))
    # the selected branch on the reference's selection
    skw = dict(q_pos=q_pos, doc_ids=ids, select_len=sl)
    s_want = ref.nsa_selected(q, k, v, sel_want, **skw)
    s_got = tri.nsa_selected(q, k, v, sel_want, **skw)
    wg = torch.autograd.grad((s_want.float() * g).sum(), (q, k, v))
    gg = torch.autograd.grad((s_got.float() * g).sum(), (q, k, v))
    errs = [rel(rel_err, a, b) for a, b in zip((s_want, *wg), (s_got, *gg))]
    assert max(errs) < TOL[dtype], dict(zip(("o_slc", "dq", "dk", "dv"), errs))


@pytest.mark.parametrize("n,lengths,fused,sort,jv,rank,skip", [
    (16, [36], True, True, 0, False, False), (5, [20, 16], True, True, 0, False, False),
    (16, [20, 16], False, True, 0, False, False), (5, [36], True, False, 2, False, False),
    (16, [20, 16], False, False, 2, False, False), (16, [36], True, True, 0, True, False),
    (5, [20, 16], False, True, 0, True, True), (5, [20, 16], True, True, 0, False, True),
    (16, [36], True, False, 2, False, True)],
    ids=["n16-one-doc", "n5-docs", "n16-docs-separate-pass", "n5-insertion-jv2", "n16-docs-separate-pass-insertion-jv2",
         "n16-rank", "n5-docs-separate-pass-rank-skip", "n5-docs-sort-skip", "n16-insertion-jv2-skip"])
def test_selection_merges_several_scoring_tiles(rel_err, n, lengths, fused, sort, jv, rank, skip):
    """36 selection blocks of one token (more than two scoring tiles of 16): the running top list
    is merged tile after tile and still equals the reference's top-n (fp32: exact), in the
    forward kernel and in the separate scoring pass (FUSED_SELECT off), by the sort merge, by
    the insertion form (SORT_MERGE off) and by ranks (RANK_MERGE), each with and without the
    early-out (SKIP_MERGE: a tile none of whose keys beats a row's n-th best is not merged),
    with one search per tile or the searches of JV = 2 tiles at once (3 tiles: a full group of
    2 and a partial one)."""
    torch.manual_seed(8)
    S, H, Hkv, D = sum(lengths), 2, 1, 16
    q = torch.randn(1, S, H, D)
    ends = block_ends([lengths], 2, 1, pad=1)
    kc, vc = torch.randn(1, ends.shape[1], Hkv, D), torch.randn(1, ends.shape[1], Hkv, D)
    kw = dict(q_pos=torch.arange(S)[None], doc_ids=doc_ids_of([lengths]), cmp_len=2, select_len=1, n_select=n,
              n_init=1, n_local=2)
    o_want, sel_want = ref.nsa_compressed(q, kc, vc, ends, **kw)
    opts = dict(SORT_MERGE=sort, RANK_MERGE=rank, SKIP_MERGE=skip, JV=jv)
    with tri.override_tiles("cmp_fwd", FUSED_SELECT=fused, **opts), tri.override_tiles("cmp_sel", **opts):
        o_got, sel_got = tri.nsa_compressed(q, kc, vc, ends, **kw)
    assert torch.equal(sel_got, sel_want) and rel_err(o_want, o_got) < 1e-5


def test_early_out_merges_equal_the_full_merges_on_a_long_walk():
    """The last 20 queries of a row of 48 blocks of 1 token: one query tile walking 3 scoring
    tiles of 16 blocks. With queries sharing a direction and the compressed keys of the first
    blocks along it, the middle tile beats no row's n-th best (the early-out skips its merge: the
    case it is for, scores peaked on the same blocks); with independent queries it does not. The
    rank merges with the early-out give the reference's selection in both (the other forms with
    the early-out, and the decoding path's splits: the tests above and the tie test)."""
    torch.manual_seed(12)
    S, H, Hkv, D = 48, 2, 1, 16
    base = torch.randn(D)
    ends = block_ends([[S]], 2, 1, pad=1)
    kc, vc = torch.randn(1, ends.shape[1], Hkv, D), torch.randn(1, ends.shape[1], Hkv, D)
    peaked = kc.clone()
    peaked[:, :15] = base * 2 + 0.1 * torch.randn(1, 15, Hkv, D)
    shared = base * 2 + 0.1 * torch.randn(1, S, H, D)
    kw = dict(q_pos=torch.arange(S - 20, S)[None], cmp_len=2, select_len=1, n_select=8, n_init=1, n_local=2)
    for q, k in ((shared, peaked), (torch.randn(1, S, H, D), kc)):
        _, sel_want = ref.nsa_compressed(q[:, -20:], k, vc, ends, **kw)
        for fused in (True, False):   # the scoring in the forward kernel, and as its own pass
            opts = dict(RANK_MERGE=True, SKIP_MERGE=True)
            with tri.override_tiles("cmp_fwd", FUSED_SELECT=fused, **opts), tri.override_tiles("cmp_sel", **opts):
                _, sel_got = tri.nsa_compressed(q[:, -20:], k, vc, ends, **kw)
            assert torch.equal(sel_got, sel_want), fused
        if k is peaked:   # the premise: apart from the 2 local blocks, every pick is in the first tile
            assert (sel_want[..., 2:] < 16).all()


def test_compressed_backward_with_dq_fused_into_dkdv(rel_err):
    """FUSE_DQ: the dK/dV kernel also sums dQ (fp32 atomic adds), over query chunks and packed
    documents (and a query row that sees no compressed token): every gradient equals the reference's."""
    torch.manual_seed(9)
    lengths, H, Hkv, D = [3, 11, 16], 4, 2, 16
    S = sum(lengths)
    q = torch.randn(1, S, H, D, requires_grad=True)
    ends = block_ends([lengths], 4, 2, pad=1)
    kc = torch.randn(1, ends.shape[1], Hkv, D, requires_grad=True)
    vc = torch.randn(1, ends.shape[1], Hkv, D, requires_grad=True)
    kw = dict(q_pos=torch.arange(S)[None], doc_ids=doc_ids_of([lengths]), cmp_len=4, select_len=8, n_select=3)
    o_want, _ = ref.nsa_compressed(q, kc, vc, ends, **kw)
    with tri.override_tiles("cmp_dkdv", FUSE_DQ=True):
        o_got, _ = tri.nsa_compressed(q, kc, vc, ends, **kw)
        g = torch.randn(o_want.shape)
        want = torch.autograd.grad((o_want * g).sum(), (q, kc, vc))
        got = torch.autograd.grad((o_got * g).sum(), (q, kc, vc))
    for name, a, b in zip(("dq", "dk_cmp", "dv_cmp"), want, got):
        assert rel_err(a, b) < 1e-5, name


def selected_inputs(lengths, H, Hkv, sl, n, D=16):
    """(q, k, v, sel_idx, keyword arguments) of the selected branch over one row of packed
    documents: n distinct random blocks per (token, KV head), some slots -1 (unused)."""
    S = sum(lengths)
    q = torch.randn(1, S, H, D, requires_grad=True)
    k = torch.randn(1, S, Hkv, D, requires_grad=True)
    v = torch.randn(1, S, Hkv, D, requires_grad=True)
    sel = (torch.rand(1, S, Hkv, -(-S // sl) + 1).argsort(-1)[..., :n] - 1).to(torch.int32)
    return q, k, v, sel, dict(q_pos=torch.arange(S)[None], doc_ids=doc_ids_of([lengths]), select_len=sl)


@pytest.mark.parametrize("bt,lengths,H,Hkv", [(2, [9, 14], 4, 2), (4, [19], 2, 2)], ids=["bt2-g2-docs", "bt4-g1"])
def test_selected_branch_over_the_union_of_adjacent_selections(rel_err, bt, lengths, H, Hkv):
    """BT > 1: one program per tile of adjacent tokens walks the union of their selections:
    output and every gradient equal the reference's, with packed documents, a partial last tile,
    unused slots and a G = 1 group (rows padded to 16); a block listed twice counts once in the
    output and dQ, as in the reference's dense mask."""
    torch.manual_seed(10)
    q, k, v, sel, kw = selected_inputs(lengths, H, Hkv, sl=4, n=3)
    g = torch.randn_like(q)
    with tri.override_tiles("slc_fwd", BT=bt), tri.override_tiles("slc_dq", BT=bt):
        for twice in (False, True):
            if twice:
                sel[0, 3, 0] = torch.tensor([2, 2, -1], dtype=torch.int32)
            want = ref.nsa_selected(q, k, v, sel, **kw)
            got = tri.nsa_selected(q, k, v, sel, **kw)
            gw = torch.autograd.grad((want * g).sum(), (q, k, v))
            gg = torch.autograd.grad((got * g).sum(), (q, k, v))
            assert rel_err(want, got) < 1e-5
            for name, a, b in list(zip(("dq", "dk", "dv"), gw, gg))[:1 if twice else 3]:
                assert rel_err(a, b) < 1e-5, (name, twice)


@pytest.mark.parametrize("blocks", [0, 1, 2])
def test_selected_decoding_splits_its_slots(rel_err, blocks):
    """A few queries (the decoding path): the 5 slots split into chains of 1 or 2 blocks (5 or 3
    splits, the last one short) or not at all (BLOCKS 0), merged: output and every gradient (the
    backward reads the merged lse) equal the reference's, with packed documents and unused slots."""
    torch.manual_seed(11)
    n, Hkv = 5, 2
    q, k, v, sel, kw = selected_inputs([7, 6], 4, Hkv, sl=4, n=n)
    S = q.shape[1]
    assert tri._slc_splits(n, 1, blocks, 8) == {0: (1, 5), 1: (5, 1), 2: (3, 2)}[blocks]
    assert tri._slc_splits(n, 8, blocks, 8) == (1, 5)   # the grid is full unsplit
    g = torch.randn_like(q)
    with tri.override_tiles("slc_split", BLOCKS=blocks, PROGRAMS=10 ** 3):
        want = ref.nsa_selected(q, k, v, sel, **kw)
        got = tri.nsa_selected(q, k, v, sel, **kw)
    assert tri._slc_splits(n, S * Hkv, blocks, 10 ** 3)[0] == {0: 1, 1: 5, 2: 3}[blocks]
    assert rel_err(want, got) < 1e-5
    for name, a, b in zip(("dq", "dk", "dv"), torch.autograd.grad((want * g).sum(), (q, k, v)),
                          torch.autograd.grad((got * g).sum(), (q, k, v))):
        assert rel_err(a, b) < 1e-5, name


def test_compressed_branch_through_tensor_descriptors(rel_err, monkeypatch):
    """The tile option TMA of cmp_fwd / cmp_sel / cmp_dq: the compressed K/V tiles through descriptors
    (slots past the visible range hold data the mask removes; slots past N arrive as zeros), with
    packed documents and padding slots, N not a multiple of the 16-slot tile: output, selection
    and every gradient equal the reference's (fp16), and the descriptors are built, not skipped."""
    torch.manual_seed(13)
    lengths, H, Hkv, D = [[40, 29]], 4, 2, 16
    S = sum(lengths[0])
    ends = block_ends(lengths, 4, 2, pad=3)
    q = torch.randn(1, S, H, D, dtype=torch.float16, requires_grad=True)
    kc = torch.randn(1, ends.shape[1], Hkv, D, dtype=torch.float16, requires_grad=True)
    vc = torch.randn(1, ends.shape[1], Hkv, D, dtype=torch.float16, requires_grad=True)
    assert ends.shape[1] % 16
    kw = dict(q_pos=torch.arange(S)[None], doc_ids=doc_ids_of(lengths), cmp_len=4, select_len=8, n_select=3,
              n_init=1, n_local=1)
    g = torch.randn(1, S, H, D)
    made = []
    real = attn_triton._tile_descriptor   # every descriptor NSA's launches build comes from it
    monkeypatch.setattr(attn_triton, "_tile_descriptor", lambda *a: made.append(real(*a)) or made[-1])
    o_want, sel_want = ref.nsa_compressed(q, kc, vc, ends, **kw)
    with tri.override_tiles("cmp_fwd", TMA=True), tri.override_tiles("cmp_sel", TMA=True), \
            tri.override_tiles("cmp_dq", TMA=True):
        o_got, sel_got = tri.nsa_compressed(q, kc, vc, ends, **kw)
        gw = torch.autograd.grad((o_want.float() * g).sum(), (q, kc, vc))
        gg = torch.autograd.grad((o_got.float() * g).sum(), (q, kc, vc))
    assert len(made) == 6 and all(d is not None for d in made)   # k and v of each launch
    assert torch.equal(sel_got, sel_want)
    assert rel_err(o_want, o_got) < TOL[torch.float16]
    for name, a, b in zip(("dq", "dk", "dv"), gw, gg):
        assert rel_err(a, b) < TOL[torch.float16], name


@pytest.mark.parametrize("sl,bt", [(4, 1), (16, 1), (4, 4)], ids=["block-lt-box", "block-eq-box", "union-bt4"])
def test_selected_branch_through_tensor_descriptors(rel_err, monkeypatch, sl, bt):
    """The tile option TMA of slc_fwd / slc_dq: each selected block's K and V through descriptors
    (a block of 4 in a 16-row box holds its neighbours' rows, which the mask removes; an unused
    slot's negative start and rows past S arrive as zeros), with packed documents and a partial
    last block, in the one-token kernels and (BT 4) the union kernel: output and dQ equal the
    reference's (fp16), and the descriptors are built, not skipped."""
    torch.manual_seed(11)
    lengths, H, Hkv, D, n = [21, 30], 4, 2, 16, 3
    S = sum(lengths)
    NB = -(-S // sl)
    q = torch.randn(1, S, H, D, dtype=torch.float16, requires_grad=True)
    k = torch.randn(1, S, Hkv, D, dtype=torch.float16, requires_grad=True)
    v = torch.randn(1, S, Hkv, D, dtype=torch.float16, requires_grad=True)
    sel = (torch.rand(1, S, Hkv, NB + 1).argsort(-1)[..., :n] - 1).to(torch.int32)   # distinct, -1 = unused
    kw = dict(q_pos=torch.arange(S)[None], doc_ids=doc_ids_of([lengths]), select_len=sl)
    g = torch.randn(1, S, H, D)
    made = []
    real = attn_triton._tile_descriptor   # every descriptor NSA's launches build comes from it
    monkeypatch.setattr(attn_triton, "_tile_descriptor", lambda *a: made.append(real(*a)) or made[-1])
    with tri.override_tiles("slc_fwd", TMA=True, BT=bt), tri.override_tiles("slc_dq", TMA=True, BT=bt):
        want = ref.nsa_selected(q, k, v, sel, **kw)
        got = tri.nsa_selected(q, k, v, sel, **kw)
        gw = torch.autograd.grad((want.float() * g).sum(), (q, k, v))
        gg = torch.autograd.grad((got.float() * g).sum(), (q, k, v))
    assert len(made) == 4 and all(d is not None for d in made)
    assert rel_err(want, got) < TOL[torch.float16]
    for name, a, b in zip(("dq", "dk", "dv"), gw, gg):
        assert rel_err(a, b) < TOL[torch.float16], name


def test_strided_inputs_and_unsorted_cmp_end(rel_err):
    """k/v as transposes of a [B, Hkv, L, D] cache, and compressed tokens in a shuffled order with
    padding in the middle: the kernels read strides and search exact ranges."""
    torch.manual_seed(3)
    B, S, H, Hkv, D, l, d, sl = 1, 26, 4, 2, 16, 4, 2, 8
    q = torch.randn(B, S, H, D)
    k = torch.randn(B, Hkv, S, D).transpose(1, 2)
    v = torch.randn(B, Hkv, S, D).transpose(1, 2)
    ends = block_ends([[S]], l, d, pad=3)
    perm = torch.randperm(ends.shape[1])
    ends = ends[:, perm]
    k_cmp = torch.randn(B, Hkv, ends.shape[1], D).transpose(1, 2)
    v_cmp = torch.randn(B, Hkv, ends.shape[1], D).transpose(1, 2)
    kw = dict(q_pos=torch.arange(S)[None], cmp_len=l, select_len=sl, n_select=3)
    o_want, sel_want = ref.nsa_compressed(q, k_cmp, v_cmp, ends, **kw)
    o_got, sel_got = tri.nsa_compressed(q, k_cmp, v_cmp, ends, **kw)
    assert rel_err(o_want, o_got) < 1e-5 and torch.equal(sel_want, sel_got)
    s_want = ref.nsa_selected(q, k, v, sel_want, select_len=sl)
    s_got = tri.nsa_selected(q, k, v, sel_want, select_len=sl)
    assert rel_err(s_want, s_got) < 1e-5


def test_inverse_index_lists_every_query_once():
    torch.manual_seed(4)
    B, T, Hkv, n, S, sl = 2, 7, 3, 4, 40, 8
    NB = S // sl
    sel = torch.randint(-1, NB + 1, (B, T, Hkv, n), dtype=torch.int32)   # NB: out of range, dropped
    w_blk, w_start, w_len, tok = tri.inverse_index(sel, S, sl, chunk=3)
    assert (w_len <= 3).all()
    got = []
    for blk, st, ln in zip(w_blk.tolist(), w_start.tolist(), w_len.tolist()):
        got += [(blk, t) for t in tok[st:st + ln].tolist()]
    want = [((b * Hkv + h) * NB + j, t) for b in range(B) for t in range(T) for h in range(Hkv) for j in sel[b, t, h].tolist()
            if 0 <= j < NB]
    assert sorted(got) == sorted(want)


def test_a_decoding_step_launches_only_its_kernels(monkeypatch):
    """One query over a cache as the model holds it (int64 positions, int64 block ends with NEVER
    in the unwritten slots): both branches dispatch no torch computation (no casts, clamps or
    zeros before the kernels: each would be a launch of its own in every step), only
    allocations and views, and the Triton kernels of the two split passes and their merges (the
    default ranges by scans of the ends: no launch for prefix arrays)."""
    import collections

    import triton.runtime.interpreter as interp
    from torch.utils._python_dispatch import TorchDispatchMode
    torch.manual_seed(2)
    C, H, Hkv, D, l, d, sl, n = 64, 4, 2, 16, 4, 2, 8, 3
    k, v = torch.randn(1, C, Hkv, D), torch.randn(1, C, Hkv, D)
    ends = torch.arange(l - 1, C, d)[None]
    kc, vc = torch.randn(1, ends.shape[1], Hkv, D), torch.randn(1, ends.shape[1], Hkv, D)
    q, q_pos = torch.randn(1, 1, H, D), torch.tensor([[40]])
    ends = torch.where(ends <= 40, ends, NEVER)
    free = {"empty", "empty_like", "empty_strided", "new_empty", "view", "_unsafe_view", "expand", "slice",
            "select", "unsqueeze", "squeeze", "permute", "transpose", "t", "alias", "as_strided", "detach",
            "lift_fresh"}
    computed, launched, ops, in_kernel = collections.Counter(), collections.Counter(), {}, []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in ("nsa_cmp_fwd", "nsa_slc_fwd"):
                ops[name] = args   # the op's body runs outside this mode: replayed below
            elif name not in free and not in_kernel:   # the interpreter's own copies are not the step's
                computed[name] += 1
            return func(*args, **(kwargs or {}))

    with Count():   # the entry points: their two ops and nothing else
        o, sel = tri.nsa_compressed(q, kc, vc, ends, q_pos=q_pos, cmp_len=l, select_len=sl, n_select=n)
        s = tri.nsa_selected(q, k, v, sel, q_pos=q_pos, select_len=sl)
    assert not computed and sorted(ops) == ["nsa_cmp_fwd", "nsa_slc_fwd"], dict(computed)
    run = interp.InterpretedFunction.run

    def counted_run(self, *a, **kw):
        launched[self.fn.__name__] += 1
        in_kernel.append(1)
        try:
            return run(self, *a, **kw)
        finally:
            in_kernel.pop()
    monkeypatch.setattr(interp.InterpretedFunction, "run", counted_run)
    with Count():   # the ops' bodies (the launchers) on the arguments the ops received
        tri.compressed_forward(*ops["nsa_cmp_fwd"])
        tri.selected_forward(*ops["nsa_slc_fwd"])
    assert not computed, dict(computed)
    assert dict(launched) == {"_cmp_split_attend_kernel": 1, "_merge_attend_kernel": 2, "_cmp_split_select_kernel": 1,
                              "_merge_select_kernel": 1, "_slc_fwd_kernel": 1}   # ranges by scans: no prefix arrays
    kw = dict(q_pos=q_pos, cmp_len=l, select_len=sl, n_select=n)
    o_r, sel_r = ref.nsa_compressed(q, kc, vc, ends, S=C, **kw)
    assert torch.equal(sel, sel_r) and (o - o_r).abs().max() < 1e-4
    assert (s - ref.nsa_selected(q, k, v, sel_r, q_pos=q_pos, select_len=sl)).abs().max() < 1e-4


@pytest.mark.parametrize("scan", [0, 4], ids=["searches", "scans"])
def test_decode_over_a_static_cache_equals_the_full_forward(rel_err, scan):
    """Prefill 11 tokens, then 1 token at a time and one k+1 = 3 chunk, over a cache of fixed
    length whose future slots hold garbage and whose unwritten compressed slots are padding:
    every step equals the full-sequence reference at its rows (output and selection), with the
    compressed-token ranges from the prefix arrays' searches or from 4-wide scans of the ends."""
    with tri.override_tiles("cmp_split", SCAN=scan):
        _decode_over_a_static_cache(rel_err)


def _decode_over_a_static_cache(rel_err):
    torch.manual_seed(5)
    B, L, H, Hkv, D, l, d, sl, n = 1, 20, 4, 2, 16, 4, 2, 8, 3
    q = torch.randn(B, L, H, D)
    k, v = torch.randn(B, L, Hkv, D), torch.randn(B, L, Hkv, D)
    ends = torch.arange(l - 1, L, d).expand(B, -1)
    k_cmp, v_cmp = torch.randn(B, ends.shape[1], Hkv, D), torch.randn(B, ends.shape[1], Hkv, D)
    kw = dict(cmp_len=l, select_len=sl, n_select=n)
    o_full, sel_full = ref.nsa_compressed(q, k_cmp, v_cmp, ends, q_pos=torch.arange(L).expand(B, L), **kw)
    s_full = ref.nsa_selected(q, k, v, sel_full, select_len=sl, q_pos=torch.arange(L).expand(B, L))
    chunks = [(0, 11), (11, 12), (12, 15)]   # up to 16 queries: the split (decoding) path
    for a, b in chunks:
        q_pos = torch.arange(a, b).expand(B, -1)
        # the cache as a decoder holds it: slots after b - 1 garbage, blocks ending after b - 1 unwritten
        kc, vc = k.clone(), v.clone()
        kc[:, b:], vc[:, b:] = 1e3, -1e3
        e = torch.where(ends < b, ends, NEVER)
        o, sel = tri.nsa_compressed(q[:, a:b], k_cmp, v_cmp, e, q_pos=q_pos, **kw)
        s = tri.nsa_selected(q[:, a:b], kc, vc, sel, q_pos=q_pos, select_len=sl)
        assert torch.equal(sel, sel_full[:, a:b]), (a, b)
        assert rel_err(o_full[:, a:b], o) < 1e-5 and rel_err(s_full[:, a:b], s) < 1e-5, (a, b)


@pytest.mark.parametrize("sel_tiles", [0, 1, 2])
def test_decoding_selection_splits_of_their_own(sel_tiles):
    """One query over 64 blocks of 1 token with one attention split (SPLIT_TOKENS large): the
    selection pass on the attention's split (SEL_TILES 0: one program walks 4 scoring tiles) or on
    splits of its own of 1 or 2 scoring tiles (8 / 4 splits, merged by key) gives the reference's
    selection and output."""
    torch.manual_seed(13)
    S, H, Hkv, D = 64, 2, 1, 16
    q = torch.randn(1, 1, H, D)
    ends = block_ends([[S]], 2, 1, pad=1)
    kc, vc = torch.randn(1, ends.shape[1], Hkv, D), torch.randn(1, ends.shape[1], Hkv, D)
    kw = dict(q_pos=torch.tensor([[S - 1]]), cmp_len=2, select_len=1, n_select=5, n_init=1, n_local=2)
    o_want, sel_want = ref.nsa_compressed(q, kc, vc, ends, **kw)
    assert tri._select_splits(1, sel_tiles, ends.shape[1], 2, 1, 16) == [1, 8, 4][sel_tiles]
    with tri.override_tiles("cmp_split", SPLIT_TOKENS=1000, SEL_TILES=sel_tiles):
        o_got, sel_got = tri.nsa_compressed(q, kc, vc, ends, **kw)
    assert torch.equal(sel_got, sel_want)
    assert (o_got - o_want).abs().max() < 1e-5


@pytest.mark.parametrize("S", [160, 40], ids=["20-splits", "5-splits"])
def test_top_n_merge_pruned_to_the_lists_that_can_win(S):
    """MERGE_PRUNE: of the selection splits' sorted lists only the NP with the largest first keys
    are merged (20 splits of 16 blocks, NP 8: 8 of 32 padded lists; at 5 splits, not more lists
    than NP, the plain merge): the reference's selection and output, the best blocks given one
    split's range or spread over many."""
    torch.manual_seed(17)
    H, Hkv, D = 2, 1, 16
    ends = block_ends([[S]], 2, 1, pad=1)
    kc, vc = torch.randn(1, ends.shape[1], Hkv, D), torch.randn(1, ends.shape[1], Hkv, D)
    kw = dict(q_pos=torch.tensor([[S - 1]]), cmp_len=2, select_len=1, n_select=5, n_init=1, n_local=2)
    assert tri._select_splits(1, 1, ends.shape[1], 2, 1, 16) == {160: 20, 40: 5}[S]
    for concentrated in (False, True):
        q = torch.randn(1, 1, H, D)
        if concentrated:   # blocks 50..60 score far above the rest: every top block in one or two splits
            kc[0, 50:61] = 4 * q[0, 0].mean(0)
        o_want, sel_want = ref.nsa_compressed(q, kc, vc, ends, **kw)
        with tri.override_tiles("cmp_split", SPLIT_TOKENS=1000, MERGE_PRUNE=True):
            o_got, sel_got = tri.nsa_compressed(q, kc, vc, ends, **kw)
        assert torch.equal(sel_got, sel_want), concentrated
        assert (o_got - o_want).abs().max() < 1e-5


@pytest.mark.parametrize("scan", [0, 4], ids=["searches", "scans"])
def test_decoding_ranges_with_documents_and_unordered_ends(scan):
    """The split (decoding) path with packed documents and a padding slot between real ones (the
    ends not sorted, as the model's training forward leaves a block that crosses a document
    boundary): the ranges from searches of the prefix arrays or from scans of the ends give the
    reference's selection and output."""
    torch.manual_seed(16)
    lengths, H, Hkv, D, l, d = [9, 7], 4, 2, 16, 4, 2
    S = sum(lengths)
    ends = block_ends([lengths], l, d, pad=1)
    ends = torch.cat([ends[:, :3], torch.full((1, 1), NEVER), ends[:, 3:]], 1)
    q = torch.randn(1, S, H, D)
    kc, vc = torch.randn(1, ends.shape[1], Hkv, D), torch.randn(1, ends.shape[1], Hkv, D)
    kw = dict(q_pos=torch.arange(S)[None], doc_ids=doc_ids_of([lengths]), cmp_len=l, select_len=4, n_select=3)
    o_want, sel_want = ref.nsa_compressed(q, kc, vc, ends, **kw)
    with tri.override_tiles("cmp_split", SCAN=scan):
        o_got, sel_got = tri.nsa_compressed(q, kc, vc, ends, **kw)
    assert torch.equal(sel_got, sel_want)
    assert (o_got - o_want).abs().max() < 1e-5


def test_prefix_max_and_suffix_min_in_one_launch():
    """The range searches' prefix max / suffix min (one Triton launch, a program per chunk of 16
    under the interpreter, each reducing the chunks before and after it 16 at a time) equal
    torch's cummax / flipped cummin, on unsorted rows of lengths that are and are not multiples
    of the chunk, padding values included; int64 inputs (NEVER clamps to POS_MAX) and no b (zeros)."""
    torch.manual_seed(14)
    for n in (1, 16, 37, 70):
        a = torch.randint(-50, 50, (3, n), dtype=torch.int32)
        b = torch.randint(-50, 50, (3, n), dtype=torch.int32)
        b[0, -1] = tri.POS_MAX
        pmax, smin = tri._prefix_max_suffix_min(a, b)
        assert torch.equal(pmax, torch.cummax(a, 1).values)
        assert torch.equal(smin, torch.cummin(b.flip(1), 1).values.flip(1))
        a64 = torch.where(a > 40, NEVER, a.long())
        pmax, smin = tri._prefix_max_suffix_min(a64, None)
        assert pmax.dtype == smin.dtype == torch.int32
        assert torch.equal(pmax, torch.cummax(a64.clamp(max=tri.POS_MAX), 1).values.int()) and not smin.any()


def test_group_too_large_is_named():
    q = torch.zeros(1, 4, 32, 16)
    kc = torch.zeros(1, 2, 1, 16)
    with pytest.raises(ValueError, match="group size"):
        tri.nsa_compressed(q, kc, kc, torch.zeros(1, 2, dtype=torch.long), q_pos=torch.zeros(1, 4, dtype=torch.long),
                           cmp_len=2)


@pytest.mark.parametrize("merge", [{}, dict(RANK_MERGE=True, SKIP_MERGE=True), dict(SORT_MERGE=False, SKIP_MERGE=True)],
                         ids=["sort", "rank-skip", "insertion-skip"])
def test_ties_go_to_the_later_block(merge):
    """No compressed token visible (all padding but one far in the future): every eligible block
    scores exactly 0 and the top-n takes the latest ones, as the reference does, in the fused
    kernel and the separate scoring pass (40 queries) and across the merged splits of the decoding
    path (one query), by each merge form (with the early-out, a tile of equal scores still wins by
    its later blocks)."""
    for fused in (True, False):
        with tri.override_tiles("cmp_fwd", FUSED_SELECT=fused, **merge), tri.override_tiles("cmp_sel", **merge), \
                tri.override_tiles("cmp_split", **merge):
            _ties_go_to_the_later_block()


def _ties_go_to_the_later_block():
    S, sl = 40, 4
    q = torch.randn(1, S, 2, 16)
    kc = torch.randn(1, 10, 1, 16)
    ends = torch.tensor([[S - 1] + [NEVER] * 9])
    for n_init, n_local in ((0, 0), (1, 1)):
        kw = dict(cmp_len=8, select_len=sl, n_select=3, n_init=n_init, n_local=n_local)
        _, want = ref.nsa_compressed(q, kc, kc, ends, q_pos=torch.arange(S)[None], **kw)
        _, got = tri.nsa_compressed(q, kc, kc, ends, q_pos=torch.arange(S)[None], **kw)
        assert torch.equal(got, want)
        assert got[0, 30, 0].tolist() == ([7, 6, 5] if n_init == 0 else [7, 6, 0])
        _, one = tri.nsa_compressed(q[:, 30:31], kc, kc, ends, q_pos=torch.tensor([[30]]), **kw)
        assert torch.equal(one[0, 0], got[0, 30])


def test_fanout_search_equals_searchsorted():
    """`_first_ge` and its vector form `_first_ge_vec` (FANOUT = 4 here: several narrowing steps)
    against torch.searchsorted, on sorted arrays with repeats, every boundary value and the empty
    array."""
    import triton
    import triton.language as tl

    @triton.jit
    def probe(A, X, OUT, n):
        i = tl.program_id(0)
        tl.store(OUT + i, tri._first_ge(A, 0, n, tl.load(X + i)))

    @triton.jit
    def probe_vec(A, X, OUT, n, V: tl.constexpr):
        i = tl.arange(0, V)
        tl.store(OUT + i, tri._first_ge_vec(A, 0, n, tl.load(X + i), V))

    torch.manual_seed(6)
    for n in (0, 5, 40):
        a = torch.randint(0, 30, (max(n, 1),), dtype=torch.int32).sort().values[:n].contiguous()
        x = torch.arange(-1, 32, dtype=torch.int32)
        out = torch.empty_like(x)
        probe[(x.numel(),)](a if n else torch.zeros(1, dtype=torch.int32), x, out, n)
        assert torch.equal(out, torch.searchsorted(a, x, right=False).to(torch.int32)), n
        xv = x[:32].contiguous()
        outv = torch.empty_like(xv)
        probe_vec[(1,)](a if n else torch.zeros(1, dtype=torch.int32), xv, outv, n, V=32)
        assert torch.equal(outv, torch.searchsorted(a, xv, right=False).to(torch.int32)), n


def test_compiles_as_opaque_custom_ops():
    """torch.compile (fullgraph, aot_eager) traces both entry points as custom ops with fake
    shapes: the same output and gradients as eager."""
    torch.manual_seed(7)
    S, H, Hkv, D = 24, 4, 1, 16
    q, k, v = torch.randn(1, S, H, D), torch.randn(1, S, Hkv, D), torch.randn(1, S, Hkv, D)
    ends = torch.arange(3, S, 2)[None]
    kc, vc = torch.randn(1, ends.shape[1], Hkv, D), torch.randn(1, ends.shape[1], Hkv, D)
    ins = [x.requires_grad_() for x in (q, k, v, kc, vc)]
    q_pos = torch.arange(S)[None]

    def f(q, k, v, kc, vc):
        o, sel = tri.nsa_compressed(q, kc, vc, ends, q_pos=q_pos, cmp_len=4, select_len=8, n_select=3)
        return o + tri.nsa_selected(q, k, v, sel, q_pos=q_pos, select_len=8)

    want = f(*ins)
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(*ins)
    assert torch.equal(want, got)
    for a, b in zip(torch.autograd.grad(want.sum(), ins), torch.autograd.grad(got.sum(), ins)):
        assert torch.equal(a, b)


def test_small_groups_take_their_own_tile_rows():
    """Groups filling fewer than 16 dot rows read the selected kernels' small-group rows (the union
    kernel's token tiles); full groups, fp32 and kinds without such a row read the plain ones."""
    assert tri._tile_key("slc_fwd", torch.bfloat16, 2) == ("slc_fwd", "16bit", "small_group")
    assert tri._tile_key("slc_dq", torch.float16, 8) == ("slc_dq", "16bit", "small_group")
    assert tri._tile_key("slc_fwd", torch.bfloat16, 16) == ("slc_fwd", "16bit")
    assert tri._tile_key("slc_fwd", torch.float32, 2) == ("slc_fwd", "fp32")
    assert tri._tile_key("cmp_fwd", torch.bfloat16, 2) == ("cmp_fwd", "16bit")


def test_decoding_kernels_compile_for_hopper_with_pdl_waiting_first():
    """model.decode_pdl's NSA kernels (the compressed branch's four decoding launches, the selected
    branch's split and merge, the gated sum, the block compression with W_1 in 8 slices) compiled
    for sm_90 in a process without the interpreter (Triton's own ptxas, no GPU): `griddepcontrol.wait`
    before every global load, store and atomic, and the next kernel let launch after it. (A program
    that read or wrote before the wait, or returned without it, would break kernels/pdl.py's chain.)"""
    from tests.kernels.sm90 import run_compiled
    script = r'''
import json, re
from deepwish.kernels.nsa import compress, gates, triton as nk
from tests.kernels.sm90 import compile_ptx

PTR = {"END": "*i64", "CMAX": "*i32", "CMIN": "*i32", "QPOS": "*i64", "QDS": "*i32", "POS": "*i64", "SEL": "*i32",
       "I_PART": "*i32", "CNT": "*i32", "M_PART": "*fp32", "L_PART": "*fp32", "ACC_PART": "*fp32", "LSE": "*fp32",
       "S_PART": "*fp32", "WS": "*fp32", "COS": "*fp32", "SIN": "*fp32"}
SCALARS = {"T", "N", "H", "HKV", "G", "DQK", "DV", "NSPLIT", "CMP_LEN", "SEL_LEN", "N_SELECT", "N_INIT", "N_LOCAL",
           "R", "NS", "N_SEL", "PER_SPLIT", "S", "STRIDE", "D"}

def ptx(fn, const, ptrs=()):
    def arg_type(name):
        if name == "scale":
            return "fp32"
        if name.isupper() and (name not in SCALARS or name in ptrs):
            return PTR.get(name, "*bf16")
        return "i32"
    lines = compile_ptx(fn, const, arg_type)
    wait = [i for i, l in enumerate(lines) if "griddepcontrol.wait" in l]
    launch = [i for i, l in enumerate(lines) if "griddepcontrol.launch_dependents" in l]
    access = [i for i, l in enumerate(lines) if re.search(r"\b(ld|st|atom|red)\.global", l)]
    return dict(waits=len(wait), before=sum(i < min(wait, default=0) for i in access), after=len(access),
                launch_after_wait=bool(wait and launch and min(launch) > min(wait)))

d = dict(BLOCK_DK=128, BLOCK_DV=128, GP=16, BM=16, BN=64, PREC="tf32", PDL=True)
out = {}
out["cmp_attend"] = ptx(nk._cmp_split_attend_kernel, dict(d, SCAN=64))
out["cmp_select"] = ptx(nk._cmp_split_select_kernel, dict(d, BJ=16, NP=16, FINAL=False, SORT_MERGE=True,
                        RANK_MERGE=False, SKIP_MERGE=True, JV=8, TMA=False, SCAN=64))
out["merge_attend"] = ptx(nk._merge_attend_kernel, dict(NSP=16, BLOCK_DV=128, PDL=True))
out["merge_select"] = ptx(nk._merge_select_kernel, dict(NSP=32, NP=16, PRUNE=True, PDL=True))
out["slc"] = ptx(nk._slc_fwd_kernel, dict(BLOCK_DK=128, BLOCK_DV=128, RP=16, BS=64, PREC="tf32", TMA=False,
                 SPLIT=True, PDL=True))
out["gated_sum"] = ptx(gates._gated_sum_kernel, dict(BH=16, BLOCK_D=128, PDL=True), ptrs=("G",))
out["compress"] = ptx(compress._compress_kernel, dict(D=128, CMP_LEN=32, BLOCK_D=128, BH=16, R=128, ROPE=True,
                      PREC="tf32", S=8, PDL=True))
out["compress_off"] = ptx(compress._compress_kernel, dict(D=128, CMP_LEN=32, BLOCK_D=128, BH=16, R=128, ROPE=True,
                          PREC="tf32", S=8, PDL=False))
print(json.dumps(out))
'''
    out = run_compiled(script)
    for name in ("cmp_attend", "cmp_select", "merge_attend", "merge_select", "slc", "gated_sum", "compress"):
        r = out[name]
        assert r["waits"] >= 1 and r["before"] == 0 and r["after"] > 0 and r["launch_after_wait"], (name, r)
    assert out["compress_off"]["waits"] == 0 and out["compress_off"]["after"] > 0, out["compress_off"]
