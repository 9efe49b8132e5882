"""The NSA oracle (kernels/nsa/reference.py) on hand-computable cases: which compressed tokens a
query sees, the block-importance rule, forced initial/local blocks, -1 padding, ties, and packed
documents behaving as separate rows."""
import pytest
import torch

from deepwish.kernels.nsa import nsa_compressed, nsa_selected, reference

NEVER = 2 ** 62


def one_head(x, H=1):
    """[S] values -> [1, S, H, 1]."""
    return torch.as_tensor(x, dtype=torch.float32).reshape(1, -1, 1, 1).expand(1, -1, H, 1).contiguous()


def test_compressed_visibility_and_empty_rows():
    # uniform scores (q = 0): o_cmp at p is the mean of the values of tokens whose block ended by p
    S = 8
    q = torch.zeros(1, S, 1, 1)
    v_cmp = one_head([1.0, 2.0, 3.0, 100.0])
    cmp_end = torch.tensor([[1, 3, 5, NEVER]])
    o, sel = nsa_compressed(q, torch.zeros_like(v_cmp), v_cmp, cmp_end, q_pos=torch.arange(S)[None], cmp_len=2,
                            select_len=2, n_select=4, backend="torch")
    want = torch.tensor([0.0, 1.0, 1.0, 1.5, 1.5, 2.0, 2.0, 2.0])
    torch.testing.assert_close(o[0, :, 0, 0], want)
    assert torch.isfinite(o).all()


def test_forced_blocks_top_n_and_padding():
    # cmp_len = select_len = 2, blocks end at 1, 3, ..., 15: compressed token c covers exactly block c.
    S, N = 16, 8
    q = torch.ones(1, S, 2, 1)                      # two query heads, one KV group
    k_cmp = torch.zeros(1, N, 1, 1)
    k_cmp[0, 3] = 30.0                              # token 3 takes (almost) all the probability
    v_cmp = torch.randn(1, N, 1, 1)
    cmp_end = torch.arange(1, S, 2)[None]
    _, sel = nsa_compressed(q, k_cmp, v_cmp, cmp_end, q_pos=torch.arange(S)[None], cmp_len=2, select_len=2,
                            n_select=4, n_init=1, n_local=2, backend="torch")
    sel = sel[0, :, 0].tolist()
    assert sel[15] == [7, 6, 3, 0]                  # init 0, local 6 and 7 forced, then block 3
    assert sel[7] == [3, 2, 1, 0]                   # every eligible block
    assert sel[4] == [2, 1, 0, -1]                  # fewer eligible blocks than n_select
    assert sel[0] == [0, -1, -1, -1]
    assert sel[9] == [4, 3, 2, 0]                   # blocks 0..4 eligible: forced 0, 3, 4, then the best of 1, 2
    # ... which is the later one on a tie: tokens 1 and 2 have the same (tiny) probability


def test_ties_go_to_the_later_block():
    q = torch.randn(1, 1, 1, 4)
    k_cmp = torch.randn(1, 2, 1, 4)
    cmp_end = torch.tensor([[NEVER, NEVER]])        # nothing visible: every eligible block scores 0
    _, sel = nsa_compressed(q, k_cmp, k_cmp, cmp_end, q_pos=torch.tensor([[15]]), cmp_len=4, select_len=4,
                            n_select=2, n_init=0, n_local=0, backend="torch")
    assert sel[0, 0, 0].tolist() == [3, 2]


def test_block_scores_overlap_rule():
    # one compressed token with end 5 and length 4 covers [2, 5]: select blocks of 2 -> blocks 1 and 2;
    # its probability 1 per head, summed over the group's 2 heads, adds 2 to each.
    p_cmp = torch.ones(1, 1, 2, 1)
    score = reference.block_scores(p_cmp, torch.tensor([[5]]), torch.tensor([[7]]), None, n_kv_heads=1, S=8,
                                   cmp_len=4, select_len=2, n_init=0, n_local=0)
    assert score[0, 0, 0].tolist() == [0.0, 2.0, 2.0, 0.0]
    score = reference.block_scores(p_cmp, torch.tensor([[5]]), torch.tensor([[5]]), None, n_kv_heads=1, S=8,
                                   cmp_len=4, select_len=2, n_init=1, n_local=1)
    inf = float("inf")
    assert score[0, 0, 0].tolist() == [inf, 2.0, inf, -inf]   # block 3 is in the future


def test_document_start_is_the_initial_block():
    S = 12
    doc_ids = torch.tensor([[0] * 5 + [1] * 7])     # the second document starts at 5, in block 2 (of 2)
    q = torch.zeros(1, S, 1, 1)
    k_cmp = torch.zeros(1, 1, 1, 1)
    _, sel = nsa_compressed(q, k_cmp, k_cmp, torch.tensor([[NEVER]]), q_pos=torch.arange(S)[None], doc_ids=doc_ids,
                            cmp_len=2, select_len=2, n_select=3, n_init=1, n_local=1, backend="torch")
    sel = sel[0, :, 0].tolist()
    assert sel[4] == [2, 1, 0]                      # first document: blocks 0..2
    assert sel[5] == [2, -1, -1]                    # its start and own block coincide
    assert sel[11] == [5, 4, 2]                     # forced 2 (document start) and 5, then the later of 3, 4


def test_selected_hand_case():
    v = one_head([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    q = torch.zeros(1, 2, 1, 1)
    sel = torch.tensor([[[[2, 0, -1]], [[2, 0, -1]]]], dtype=torch.int32)
    o = nsa_selected(q, torch.zeros_like(v), v, sel, q_pos=torch.tensor([[5, 4]]), select_len=2, backend="torch")
    torch.testing.assert_close(o[0, :, 0, 0], torch.tensor([(1 + 2 + 5 + 6) / 4, (1 + 2 + 5) / 3]))
    # nothing selected: zero output and finite gradients
    q = torch.randn(1, 1, 1, 1, requires_grad=True)
    o = nsa_selected(q, v, v, torch.full((1, 1, 1, 2), -1, dtype=torch.int32), q_pos=torch.tensor([[5]]),
                     select_len=2, backend="torch")
    o.sum().backward()
    assert o.abs().sum() == 0 and torch.isfinite(q.grad).all()


def test_last_queries_equal_full_rows():
    torch.manual_seed(0)
    S, T, H, Hkv, D, l, d, sl = 24, 5, 4, 2, 8, 4, 2, 4
    q = torch.randn(1, S, H, D)
    k, v = torch.randn(1, S, Hkv, D), torch.randn(1, S, Hkv, D)
    cmp_end = torch.arange(l - 1, S, d)[None]
    k_cmp, v_cmp = torch.randn(1, cmp_end.shape[1], Hkv, D), torch.randn(1, cmp_end.shape[1], Hkv, D)
    kw = dict(cmp_len=l, select_len=sl, n_select=3, backend="torch")
    o_full, sel_full = nsa_compressed(q, k_cmp, v_cmp, cmp_end, q_pos=torch.arange(S)[None], **kw)
    o_last, sel_last = nsa_compressed(q[:, -T:], k_cmp, v_cmp, cmp_end, q_pos=torch.arange(S - T, S)[None], **kw)
    torch.testing.assert_close(o_last, o_full[:, -T:])
    assert torch.equal(sel_last, sel_full[:, -T:])
    s_full = nsa_selected(q, k, v, sel_full, select_len=sl, backend="torch")
    s_last = nsa_selected(q[:, -T:], k, v, sel_last, select_len=sl, backend="torch")   # default q_pos: last T
    torch.testing.assert_close(s_last, s_full[:, -T:])


def _doc_blocks(lengths, l, d):
    """Compression block ends (row positions) aligned to each document's start."""
    ends, start = [], 0
    for n in lengths:
        ends += [start + e for e in range(l - 1, n, d)]
        start += n
    return torch.tensor([ends])


def test_packed_documents_equal_separate_rows():
    torch.manual_seed(1)
    lengths, H, Hkv, D, l, d, sl, n = [8, 12], 4, 2, 8, 4, 2, 4, 3   # boundary at 8: a multiple of sl
    S = sum(lengths)
    q, k, v = torch.randn(1, S, H, D), torch.randn(1, S, Hkv, D), torch.randn(1, S, Hkv, D)
    cmp_end = _doc_blocks(lengths, l, d)
    k_cmp, v_cmp = torch.randn(1, cmp_end.shape[1], Hkv, D), torch.randn(1, cmp_end.shape[1], Hkv, D)
    doc_ids = torch.tensor([[0] * lengths[0] + [1] * lengths[1]])
    kw = dict(cmp_len=l, select_len=sl, n_select=n, backend="torch")
    o_p, sel_p = nsa_compressed(q, k_cmp, v_cmp, cmp_end, q_pos=torch.arange(S)[None], doc_ids=doc_ids, **kw)
    s_p = nsa_selected(q, k, v, sel_p, doc_ids=doc_ids, select_len=sl, backend="torch")
    start, c0 = 0, 0
    for n_tok in lengths:
        rows = slice(start, start + n_tok)
        ends = _doc_blocks([n_tok], l, d)
        cs = slice(c0, c0 + ends.shape[1])
        o_s, sel_s = nsa_compressed(q[:, rows], k_cmp[:, cs], v_cmp[:, cs], ends, q_pos=torch.arange(n_tok)[None], **kw)
        s_s = nsa_selected(q[:, rows], k[:, rows], v[:, rows], sel_s, select_len=sl, backend="torch")
        torch.testing.assert_close(o_p[:, rows], o_s)
        torch.testing.assert_close(s_p[:, rows], s_s)
        shifted = torch.where(sel_s >= 0, sel_s + start // sl, sel_s)
        assert torch.equal(sel_p[:, rows], shifted)
        start, c0 = start + n_tok, c0 + ends.shape[1]


def test_no_branch_reads_across_documents():
    # boundary at 7 (not a multiple of the selection block): changing the first document's keys and
    # values changes nothing for the second document's queries
    torch.manual_seed(2)
    S, H, Hkv, D, sl = 16, 2, 1, 4, 4
    doc_ids = torch.tensor([[0] * 7 + [1] * 9])
    q, k, v = torch.randn(1, S, H, D), torch.randn(1, S, Hkv, D), torch.randn(1, S, Hkv, D)
    sel = torch.arange(3, -1, -1, dtype=torch.int32).expand(1, S, Hkv, 4)   # every block
    k2, v2 = k.clone(), v.clone()
    k2[:, :7], v2[:, :7] = torch.randn(1, 7, Hkv, D), torch.randn(1, 7, Hkv, D)
    a = nsa_selected(q, k, v, sel, doc_ids=doc_ids, select_len=sl, backend="torch")
    b = nsa_selected(q, k2, v2, sel, doc_ids=doc_ids, select_len=sl, backend="torch")
    torch.testing.assert_close(a[:, 7:], b[:, 7:])
    assert not torch.allclose(a[:, :7], b[:, :7])


def test_bad_inputs_are_named():
    q = torch.zeros(1, 4, 3, 8)
    kc = torch.zeros(1, 2, 2, 8)
    with pytest.raises(ValueError, match="not a multiple"):
        nsa_compressed(q, kc, kc, torch.zeros(1, 2, dtype=torch.long), q_pos=torch.zeros(1, 4, dtype=torch.long),
                       cmp_len=2, backend="torch")
    q = torch.zeros(1, 4, 2, 8)
    with pytest.raises(ValueError, match="n_init \\+ n_local"):
        nsa_compressed(q, kc, kc, torch.zeros(1, 2, dtype=torch.long), q_pos=torch.zeros(1, 4, dtype=torch.long),
                       cmp_len=2, n_select=2, n_local=2, backend="torch")
    with pytest.raises(ValueError, match="sel_idx"):
        nsa_selected(q, kc, kc, torch.zeros(1, 4, 2, dtype=torch.int32), backend="torch")
