"""Native Sparse Attention's compressed and selected branches, pure torch in fp32 with dense masks:
the CPU path and the test oracle of `triton.py`. (Yuan et al. 2025, "Native Sparse Attention:
Hardware-Aligned and Natively Trainable Sparse Attention", arXiv 2502.11089, §3.3.1–3.3.2.)

Shapes (G = H / Hkv query heads per KV group; head h reads KV head h // G):
    q       [B, T, H, D]      queries at row positions q_pos [B, T] (default: the last T, S - T + i)
    k, v    [B, S, Hkv, D|Dv] raw keys / values of the row (any strides)
    k_cmp   [B, N, Hkv, D]    compressed keys / values, one per compression block (made by the model)
    v_cmp   [B, N, Hkv, Dv]
    cmp_end [B, N] int        row position of the LAST token a block covers; the block covers
                              [cmp_end - cmp_len + 1, cmp_end]; a padding slot holds a huge value
    doc_ids [B, S] int        None = one document per row; a document is a maximal run of equal ids
                              (as in kernels/attention), a query's document is the one at q_pos
    sel_idx [B, T, Hkv, n]    int32 selection-block indices, -1 = unused slot

Visibility (doc_start(p) = first position of p's document):
    raw key s        visible to a query at p  iff  doc_start(p) <= s <= p
    compressed c     visible                  iff  doc_start(p) <= cmp_end[c] <= p
(the whole block is in the query's past; that it also starts inside the document is the model's
business: it makes the blocks). A query that sees nothing gets output 0, never NaN.

Block importance (the selection rule, exactly; both backends implement this):
 1. p_cmp[b, t, h, c] = softmax_c(scale · q·k_cmp) over the visible compressed tokens (0 elsewhere),
    the probabilities of the compressed branch itself (paper eq. 8).
 2. Summed over the G query heads of a KV group (paper eq. 10): P[b, t, g, c].
 3. Selection block j covers row positions [j·l', (j+1)·l' - 1] (l' = select_len, aligned to the
    row, not to documents). Every compressed token adds its P, with weight 1, to every selection
    block its range [cmp_end - cmp_len + 1, cmp_end] overlaps:
        score[j] = Σ_c P[c] · [cmp_end[c] - cmp_len + 1 <= (j+1)·l' - 1  and  cmp_end[c] >= j·l'].
    Deviation: the paper's eq. 9 sums l'/d + l/d - 1 neighbouring compressed tokens with triangular
    weights (1, 2, ..., 2, 1 counts of (m, n) pairs) at an index offset that does not match its
    own block geometry; the plain overlap rule is the geometric reading and needs no stride.
 4. Eligible: blocks holding at least one visible raw key, j in [doc_start(p) // l', p // l'].
    Forced (score +inf): the n_init blocks from the one holding the document start, and the
    n_local blocks ending with the one holding the query, all intersected with the eligible ones.
 5. The top n_select eligible blocks by score (paper eq. 11); ties go to the later block (exact
    ties happen: blocks no visible compressed token overlaps score exactly 0, forced ones +inf).
    sel_idx lists the chosen blocks in DESCENDING block index, then -1 for unused slots (fewer
    eligible blocks than n_select). The KV group shares the selection (the paper's GQA rule).

Selected branch: each query head attends, softmax over scale · q·k, to the raw keys of its KV
group's selected blocks that are visible to it. A block listed twice counts once here (dense mask);
the top-n never lists one twice.

The arithmetic is fp32 (float64 for float64 inputs, so the oracle itself can be checked).
"""
from __future__ import annotations

import torch

from deepwish.kernels.documents import document_starts

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ---- shared checks and helpers ------------------------------------------------------------------
def default_q_pos(B: int, T: int, S: int, device) -> torch.Tensor:
    """[B, T] int64: the last T positions of a row of S."""
    return torch.arange(S - T, S, device=device).expand(B, T)


def query_doc_start(q_pos: torch.Tensor, doc_ids: torch.Tensor | None) -> torch.Tensor:
    """[B, T] int64: doc_start(q_pos) (0 without doc_ids)."""
    if doc_ids is None:
        return torch.zeros_like(q_pos, dtype=torch.long)
    return document_starts(doc_ids).gather(1, q_pos.long())


def _check_qkv(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos, doc_ids, S_name: str) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{name}: q, k, v must be 4-d, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, T, H, D = q.shape
    if k.shape[0] != B or k.shape[3] != D or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"{name}: shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         f"(want q [B,T,H,D], k [B,{S_name},Hkv,D], v [B,{S_name},Hkv,Dv])")
    if H % k.shape[2]:
        raise ValueError(f"{name}: {H} query heads are not a multiple of {k.shape[2]} key/value heads")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name}: q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{name}: q, k, v on different devices ({q.device}, {k.device}, {v.device})")
    if q_pos is not None and (tuple(q_pos.shape) != (B, T) or q_pos.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"{name}: q_pos must be int [B, T] = {(B, T)}, got {q_pos.dtype} {tuple(q_pos.shape)}")
    if doc_ids is not None and (doc_ids.dim() != 2 or doc_ids.shape[0] != B):
        raise ValueError(f"{name}: doc_ids must be [B, S], got {tuple(doc_ids.shape)}")


def check_compressed(q, k_cmp, v_cmp, cmp_end, q_pos, doc_ids, cmp_len, select_len, n_select, n_init,
                     n_local) -> None:
    """Shape/option checks of nsa_compressed (no look at values: no host sync)."""
    _check_qkv("nsa_compressed", q, k_cmp, v_cmp, q_pos, doc_ids, "N")
    B, N = k_cmp.shape[:2]
    if tuple(cmp_end.shape) != (B, N) or cmp_end.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"nsa_compressed: cmp_end must be int [B, N] = {(B, N)}, got {cmp_end.dtype} "
                         f"{tuple(cmp_end.shape)}")
    if q_pos is None and doc_ids is None:
        raise ValueError("nsa_compressed: the row length S is unknown: pass q_pos or doc_ids")
    if cmp_len < 1 or select_len < 1:
        raise ValueError(f"nsa_compressed: cmp_len={cmp_len} and select_len={select_len} must be >= 1")
    if n_init < 0 or n_local < 0 or n_select < 1 or n_init + n_local > n_select:
        raise ValueError(f"nsa_compressed: need n_select >= 1, n_init, n_local >= 0 and n_init + n_local <= "
                         f"n_select, got n_select={n_select}, n_init={n_init}, n_local={n_local}")


def check_selected(q, k, v, sel_idx, q_pos, doc_ids, select_len) -> None:
    """Shape/option checks of nsa_selected (no look at values)."""
    _check_qkv("nsa_selected", q, k, v, q_pos, doc_ids, "S")
    B, T, H, _ = q.shape
    if sel_idx.dim() != 4 or tuple(sel_idx.shape[:3]) != (B, T, k.shape[2]) or \
            sel_idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"nsa_selected: sel_idx must be int [B, T, Hkv, n] = [{B}, {T}, {k.shape[2]}, n], got "
                         f"{sel_idx.dtype} {tuple(sel_idx.shape)}")
    if doc_ids is not None and doc_ids.shape[1] != k.shape[1]:
        raise ValueError(f"nsa_selected: doc_ids must be [B, S] = {(B, k.shape[1])}, got {tuple(doc_ids.shape)}")
    if select_len < 1:
        raise ValueError(f"nsa_selected: select_len={select_len} must be >= 1")


def _ct(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _softmax_or_zero(s: torch.Tensor) -> torch.Tensor:
    """softmax over the last axis with -inf masks; an all -inf row gives zeros, not NaN."""
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    e = torch.exp(s - m)
    z = e.sum(-1, keepdim=True)
    return e / torch.where(z == 0, torch.ones_like(z), z)


# ---- compressed branch and block scoring --------------------------------------------------------
def compressed_probs(q, k_cmp, cmp_end, q_pos, doc_ids, scale) -> torch.Tensor:
    """p_cmp [B, T, H, N] in the compute dtype: softmax over the visible compressed tokens."""
    B, T, H, D = q.shape
    G = H // k_cmp.shape[2]
    ct = _ct(q)
    end = cmp_end.long()
    ds = query_doc_start(q_pos, doc_ids)
    vis = (end[:, None, :] <= q_pos.long()[:, :, None]) & (end[:, None, :] >= ds[:, :, None])   # [B, T, N]
    s = torch.einsum("bthd,bnhd->bthn", q.to(ct), k_cmp.to(ct).repeat_interleave(G, 2)) * scale
    s = s.masked_fill(~vis[:, :, None, :], float("-inf"))
    return _softmax_or_zero(s)


def block_scores(p_cmp, cmp_end, q_pos, doc_ids, *, n_kv_heads: int, S: int, cmp_len: int, select_len: int,
                 n_init: int, n_local: int) -> torch.Tensor:
    """score [B, T, Hkv, NB] (NB = ceil(S / select_len)), the module docstring's rule: the group-summed
    compressed probabilities mapped onto overlapped selection blocks; +inf forced, -inf ineligible."""
    B, T, H, N = p_cmp.shape
    NB = -(-S // select_len)
    P = p_cmp.reshape(B, T, n_kv_heads, H // n_kv_heads, N).sum(3)                          # [B, T, Hkv, N]
    end = cmp_end.long()
    j = torch.arange(NB, device=p_cmp.device)
    # block j overlaps [end - l + 1, end]  (a padding slot's huge end overlaps nothing here)
    overlap = (end[:, :, None] >= j * select_len) & (end[:, :, None] - cmp_len + 1 <= (j + 1) * select_len - 1)
    score = torch.einsum("btgn,bnj->btgj", P, overlap.to(P.dtype))
    qb = (q_pos.long() // select_len)[:, :, None]                                            # [B, T, 1]
    sb = (query_doc_start(q_pos, doc_ids) // select_len)[:, :, None]
    eligible = (j >= sb) & (j <= qb)                                                          # [B, T, NB]
    forced = eligible & ((j < sb + n_init) | (j > qb - n_local))
    score = score.masked_fill(forced[:, :, None, :], float("inf"))
    return score.masked_fill(~eligible[:, :, None, :], float("-inf"))


def select_top(score: torch.Tensor, n_select: int) -> torch.Tensor:
    """sel_idx [..., n_select] int32 from score [..., NB]: the top n by score, ties to the later
    block, -inf never chosen; listed in descending block index, then -1."""
    NB = score.shape[-1]
    # a stable descending sort of the reversed axis puts the later block first among equals
    order = torch.sort(score.flip(-1), dim=-1, descending=True, stable=True).indices[..., :n_select]
    idx = NB - 1 - order
    ok = torch.gather(score, -1, idx) > float("-inf")
    idx = torch.where(ok, idx, torch.full_like(idx, -1))
    if idx.shape[-1] < n_select:                                     # fewer blocks in the row than n
        pad = idx.new_full((*idx.shape[:-1], n_select - idx.shape[-1]), -1)
        idx = torch.cat([idx, pad], -1)
    return idx.sort(-1, descending=True).values.to(torch.int32)


def nsa_compressed(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, cmp_end: torch.Tensor, *,
                   q_pos: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None, cmp_len: int,
                   select_len: int = 64, n_select: int = 16, n_init: int = 1, n_local: int = 2,
                   scale: float | None = None, S: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(o_cmp [B, T, H, Dv] in q's dtype, sel_idx [B, T, Hkv, n_select] int32); module docstring.

    S, the raw row length (it bounds the selection blocks), is taken from doc_ids, else from
    max(q_pos) + 1 (the last query's block is the last one any query can select)."""
    check_compressed(q, k_cmp, v_cmp, cmp_end, q_pos, doc_ids, cmp_len, select_len, n_select, n_init, n_local)
    B, T, H, D = q.shape
    if S is None:
        S = doc_ids.shape[1] if doc_ids is not None else int(q_pos.max()) + 1
    q_pos = default_q_pos(B, T, S, q.device) if q_pos is None else q_pos.long()
    scale = D ** -0.5 if scale is None else scale
    p = compressed_probs(q, k_cmp, cmp_end, q_pos, doc_ids, scale)
    o = torch.einsum("bthn,bnhd->bthd", p, v_cmp.to(p.dtype).repeat_interleave(H // k_cmp.shape[2], 2))
    with torch.no_grad():
        score = block_scores(p.detach(), cmp_end, q_pos, doc_ids, n_kv_heads=k_cmp.shape[2], S=S,
                             cmp_len=cmp_len, select_len=select_len, n_init=n_init, n_local=n_local)
        sel_idx = select_top(score, n_select)
    return o.to(q.dtype), sel_idx


# ---- selected branch ----------------------------------------------------------------------------
def selected_mask(sel_idx: torch.Tensor, q_pos: torch.Tensor, doc_ids, S: int, select_len: int) -> torch.Tensor:
    """[B, T, Hkv, S] bool: raw key s is attended by the group iff its block is selected (a dense
    mask built with scatter_) and it is visible (doc_start(p) <= s <= p)."""
    B, T, Hkv, n = sel_idx.shape
    NB = -(-S // select_len)
    keep = torch.zeros(B, T, Hkv, NB + 1, dtype=torch.bool, device=sel_idx.device)
    idx = sel_idx.long()
    keep.scatter_(3, torch.where((idx >= 0) & (idx < NB), idx, NB), True)   # -1 goes to the spare column NB
    s = torch.arange(S, device=sel_idx.device)
    m = keep[..., s // select_len]                                             # [B, T, Hkv, S]
    ds = query_doc_start(q_pos, doc_ids)
    vis = (s <= q_pos.long()[:, :, None]) & (s >= ds[:, :, None])               # [B, T, S]
    return m & vis[:, :, None, :]


def nsa_selected(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sel_idx: torch.Tensor, *,
                 q_pos: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None, select_len: int = 64,
                 scale: float | None = None) -> torch.Tensor:
    """o_slc [B, T, H, Dv] in q's dtype (module docstring). Differentiable in q, k, v (autograd)."""
    check_selected(q, k, v, sel_idx, q_pos, doc_ids, select_len)
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    q_pos = default_q_pos(B, T, S, q.device) if q_pos is None else q_pos.long()
    scale = D ** -0.5 if scale is None else scale
    ct = _ct(q)
    m = selected_mask(sel_idx, q_pos, doc_ids, S, select_len).repeat_interleave(G, 2)   # [B, T, H, S]
    s = torch.einsum("bthd,bshd->bths", q.to(ct), k.to(ct).repeat_interleave(G, 2)) * scale
    p = _softmax_or_zero(s.masked_fill(~m, float("-inf")))
    return torch.einsum("bths,bshd->bthd", p, v.to(ct).repeat_interleave(G, 2)).to(q.dtype)
