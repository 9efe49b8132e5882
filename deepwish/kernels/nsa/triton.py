"""NSA's compressed and selected branches in Triton: forward and backward, packed documents, any
query positions (training, prefill and decoding share the entry points).

Same semantics as `reference.py` (read it first: visibility and the exact selection rule).
Shape legend: B batch, T queries, S raw keys, N compressed tokens, H query heads, Hkv KV heads,
G = H / Hkv, GP = G rounded up to a power of two, NB = ceil(S / l') selection blocks, n = n_select.

Compressed branch (one kernel for the forward, `_cmp_fwd_kernel`):
- A program owns one KV head and BT = BM / GP consecutive queries; its BM rows are (query,
  head of the group) pairs, as in kernels/attention (`_rows`): every compressed K/V tile serves
  the whole group.
- Pass 1 is flash attention over the compressed tokens the tile can see, saving the row
  log-sum-exp (base 2). The range of compressed tokens is found by binary search in the prefix
  max and suffix min of cmp_end (torch, once per call), so it is exact for any order of cmp_end
  and tight for the usual ascending one (padding last); queries at positions before a block's end
  never visit it.
- Pass 2 (the selection) recomputes the probabilities with the saved lse, never storing the
  [T, N] matrix: it walks the selection blocks the tile can select in tiles of BJ = 16 blocks; for
  each, the compressed tokens overlapping those blocks (again by binary search; BNS per step),
  p = exp2(s - lse) summed over the G heads of each query (a reshape and sum: exact fp32), and
  mapped onto the blocks by an fp32 product with the 0/1 overlap matrix [BNS, BJ] built from
  cmp_end (a dot when the tile has >= 16 queries, a broadcast sum otherwise; both exact fp32).
  Forced blocks get +inf, ineligible ones -inf. Each (score, block) becomes one int64 key whose
  integer order is the selection's total order (score, then the later block): the fp32 bits of a
  score >= 0 order as integers, so key = bits << 32 | block. Each query keeps its running top BJ
  keys in registers; a tile of BJ new keys is merged by one bitonic sort of the 2·BJ candidates
  (15 compare-exchange stages for BJ 16; SORT_MERGE) or inserted key by key (BJ serial steps of
  two row reductions, the minimum replaced when beaten: keys are unique, so the minimum is one
  slot); which is faster is the tile sweep's to say. RANK_MERGE (option): the merge by ranks
  (each candidate's rank = the number of candidates above it; slot r takes rank r), two wide
  reductions instead of the dependent bitonic stages (compiled for sm_90 it is the longer form:
  544 instructions per [8, 32] merge against the bitonic's 256, so it stays a sweep candidate).
  SKIP_MERGE (option): a tile none of whose keys beats its row's current n-th best (which only
  grows) cannot change the final top n and is not merged: one compare and reduction per tile
  saves the merge when the tile's queries agree on their best blocks (trained models); on
  independent random queries a tile of 8 queries almost always has one row to merge. The per-block insertion this replaces took
  three reductions and a float/index pair per block; at 64k a query tile walks up to 1024 blocks,
  so this serial part grows as T² over the whole branch. The first n keys give sel_idx
  (descending block index). Each scoring tile needs its compressed-token range: two searches of
  ~2 dependent loads each, latency no other work hides (up to 64 tiles per program at 64k);
  JV > 0 (option) searches the ranges of JV tiles at once (`_first_ge_vec`).
- Decoding (T <= DECODE_MAX_T queries per row): a (query tile, KV head) pair alone would walk a
  long context serially, so both passes are split over NSPLIT programs (`_cmp_split_attend_kernel`
  over the compressed tokens, `_cmp_split_select_kernel` over the selectable blocks, each with its
  own running top-n), and one program per row merges the partial softmax states and the partial
  top-n lists (`_merge_attend_kernel`, `_merge_select_kernel`: one sort of the splits' keys, the
  same total order). Fixed shapes, no host sync; 2 merge launches instead of ~25 torch ops.
  Positions and block ends arrive as the caller holds them (int64 in the model's cache), cast and
  clamped at the kernels' loads, and no document starts without documents: no launch before them.
  The selection pass has its own split count (SEL_TILES scoring tiles per split, `_select_splits`):
  a split is a serial chain of scoring tiles, the attention's 256-token splits left it 4 tiles.
- TMA (a tile option of cmp_fwd / cmp_dq and of cmp_sel, the separate scoring pass's key tiles;
  on for 16-bit inputs): the compressed K/V tiles [BN, D] of one KV head through
  tensor descriptors instead of masked loads (as the selected branch and kernels/attention do);
  slots past the range a tile may see are fetched and masked by their cmp_end, so compressed
  tokens must be finite. The fused scoring (FUSED_SELECT) keeps pointer loads (its BNS-wide steps
  are not the attention's box).
- Backward: delta = rowsum(dO·O) (kernels/attention's kernel), dQ per query tile over the same
  compressed range, dK/dV per (compressed tile, chunk of queries) over the query tiles of the
  chunk that can see it (binary search in the prefix max of q_pos and the suffix min of the
  queries' document starts). A compressed tile is seen by every later query, so one program per
  tile would walk up to T / BT query tiles alone on a grid of only N / BN · Hkv programs (32 at
  T 8k, most SMs idle); the chunks (at least Q_CHUNK queries, at most MAX_CHUNKS of them) give
  the grid N / BN · Hkv · chunks programs, whose partial dK/dV are added to fp32 buffers by
  atomic add (one per element per program; one chunk stores directly). FUSE_DQ (a tile option
  for the sweep): the dK/dV kernel also adds dQ = dS·k (its dSᵀ tile transposed) to an fp32
  [B, T, H, D] buffer by atomic add and the dQ kernel is skipped: 5 matmuls per (query tile,
  compressed tile) instead of 3 + 4, for avg N/(2·BN) atomic adds per dQ element. The selection
  has no gradient (sel_idx is discrete).

Selected branch:
- Forward (`_slc_fwd_kernel`): a program owns one query and one KV group; its rows are the G
  query heads (padded to 16 for the tensor cores), so each selected K/V block, loaded once,
  serves the whole group: the matmul's M dimension is the group. Slots with index -1 are
  masked, not branched around (a branch in the loop body stops software pipelining: each block's
  index and K/V loads would wait for the previous block's math); positions after the query or
  before its document start are masked. Bound: each selected block brings 2·64·D·2 bytes of K/V
  for 4·16·64·D FLOPs (16 FLOP/byte; fla's design has the same), so the branch runs at the
  L2 bandwidth of gathered blocks, not at tensor-core rates.
- Decoding (T <= DECODE_MAX_T): the same kernel with the slots split (`_slc_splits`): B·T·Hkv
  programs (4 at B 1 with 4 KV heads) would each walk all n selected blocks in a serial chain on
  4 SMs, so each split walks BLOCKS of them (the tile row "slc_split") until the grid holds about
  PROGRAMS programs, and `_merge_attend_kernel` merges the partial softmax states (one launch).
- dQ: the same program shape, with the saved lse and delta.
- TMA (a tile option of slc_fwd / slc_dq, on for 16-bit inputs): each selected block's K and
  V through a tensor descriptor (the block is a contiguous [SEL_LEN, D] tile at a data-dependent
  row; the copy engine zero-fills an unused slot's negative start and rows past S). Compiled for
  sm_90 (Triton 3.7) the pointer form's masked gather is not multi-buffered (22.5 KB of shared
  memory whatever the stage count), the descriptor form is (72 KB at 3 stages; 150 -> 107
  registers in the forward).
- BT > 1 (a tile option of slc_fwd / slc_dq, `_slc_union_kernel`): a program owns BT adjacent
  tokens (rows: BT · GP) and walks the union of their selections once (deduplicated by an
  [BT·n, BT·n] comparison and compacted by a prefix sum, in registers), each K/V block loaded
  once for all of them and masked for the tokens that did not select it. Bytes fall by the
  overlap of adjacent tokens' selections (the forced first and local blocks always; on trained
  models most blocks), matmul work rises by the rows that are masked; the branch is bound by
  gathered bytes at 16 FLOP/B, far below the tensor cores' balance, so the sweep decides. At
  small groups (G < 16: the ("…", "16bit", "small_group") tile rows) it is the default: a one-token
  program there fills G of its 16 dot rows and fetches every block for G heads only (at
  qwen3_0.6b_nsa's G 2, T 2048 the union tiles run the forward 4.5x, dQ + dK/dV 2.3x faster).
- dK/dV through an inverse index, built on device without a host sync (`inverse_index`): the
  (batch, KV head, block) key of every valid sel_idx entry is sorted (argsort), counted
  (a scatter-add; torch.bincount would read the maximum back) and cut into work items of at most
  CH queries each; a program per work item loads its K/V block once and iterates over the gathered queries (BQ queries · GP heads as the
  columns of transposed scores), accumulating dK, dV in registers, then adds them to fp32
  buffers with one atomic add per element per work item (not per query). Chunking keeps the
  initial block, chosen by every query of its document, from serialising on one program. The
  number of work items is bounded by ceil(B·T·Hkv·n / CH) + B·Hkv·NB, a fixed grid whose
  surplus programs exit at once.

Offsets are int64 (B·S·Hkv·D passes 2³¹ at long S); positions are int32 (S < 2³¹). Accumulation
is fp32; fp32 inputs take IEEE dots. The selection scoring always runs in fp32 IEEE arithmetic.

Simplifications: G <= 16 (the tested sizes; config checks call `check_group`);
head dims up to 256, padded to a power of two; a block listed twice in sel_idx counts twice (the
top-n never lists one twice).
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from deepwish.kernels.attention.triton import _kv_pair_descriptors, _rows, backward_delta
from deepwish.kernels.nsa.reference import check_compressed, check_selected, default_q_pos, query_doc_start
from deepwish.kernels.online_softmax import online_softmax_step
from deepwish.kernels.pdl import launch_options, setting, wait_for_inputs

MAX_HEAD_DIM = 256
# entries one step of `_first_ge` loads; 4 under the interpreter so tiny tests take several steps
FANOUT = tl.constexpr(4 if os.environ.get("TRITON_INTERPRET", "0") == "1" else 64)
MAX_GROUP = 16
POS_MAX = 2 ** 31 - 1  # a padding slot's cmp_end, clamped to int32: beyond every position

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Fixed launch configurations (no autotuner: it compiles every candidate per shape class).
# (kind, "16bit" | "fp32"): dict of tile sizes and warps. Compressed kernels: BM rows = BT·GP
# (BT = BM / GP queries per tile, at least 1), BN compressed tokens per tile, BJ selection blocks
# per scoring tile. Selected kernels: rows = max(16, GP); ROWS = BQ·GP gathered (query, head)
# columns per dK/dV step, CH queries per work item. The 16-bit rows: first choices for an H200 at
# D 128 (the register budget of kernels/attention's 128-row tiles), then the sweeps' picks where a
# comment says so (H100; cmp_sel swept at 64k and kept; cmp_dkdv and slc_dkdv not yet swept).
TILES = {
    # FUSED_SELECT off: the scoring as its own launch (cmp_sel below), timed at T 64k, H 64 / 4 KV heads,
    # D 128 (H100, 2026-12-06): the compressed forward 95.2 -> 52.6 ms; TMA on: 52.4 -> 51.0 ms
    # (reports/nsa.md "Third run")
    ("cmp_fwd", "16bit"): dict(BM=128, BN=64, BNS=32, BJ=16, FUSED_SELECT=False, SORT_MERGE=True, RANK_MERGE=False,
                               SKIP_MERGE=False, JV=0, TMA=True, num_warps=8, num_stages=2),
    # the separate scoring pass (FUSED_SELECT False): 4 queries x 16 heads, 4 warps, 165 registers:
    # 3 programs per SM (BM 128 / 8 warps: 153 registers x 256 threads, 1 program per SM); TMA on
    # (key tiles through a descriptor): 50.7 -> 48.9 ms at 64k (H100, reports/nsa.md "Fourth run")
    ("cmp_sel", "16bit"): dict(BM=64, BN=32, BJ=16, SORT_MERGE=True, RANK_MERGE=False, SKIP_MERGE=False, JV=0,
                               TMA=True, num_warps=4, num_stages=2),
    # TMA on, 3 stages: the compressed backward (dQ + dK/dV) at 64k 65.8 -> 63.8 ms (same sweep)
    ("cmp_dq", "16bit"): dict(BM=128, BN=64, TMA=True, num_warps=8, num_stages=3),
    ("cmp_dkdv", "16bit"): dict(BM=128, BN=64, Q_CHUNK=512, MAX_CHUNKS=16, FUSE_DQ=False, num_warps=8,
                                num_stages=2),
    # TMA on: the sweep at T 16k, H 64 / 4 KV heads, D 128 (H100, 2026-12-06): forward 5.06 -> 4.00 ms,
    # dQ 13.86 -> 12.68 ms (reports/nsa.md "Third run")
    ("slc_fwd", "16bit"): dict(BT=1, TMA=True, num_warps=4, num_stages=3),
    ("slc_dq", "16bit"): dict(BT=1, TMA=True, num_warps=4, num_stages=3),
    ("slc_dkdv", "16bit"): dict(ROWS=128, CH=1024, num_warps=8, num_stages=2),
    # decoding (T <= DECODE_MAX_T): the one-token kernel with its slots split into chains of BLOCKS
    # blocks until the grid has about PROGRAMS programs (`_slc_splits`; BLOCKS 0: no split). The
    # decode bench at B 1, 64 / 4 heads, D 128 (H100, 2026-12-06): the split 56.2 -> 44.9 µs a step at
    # 64k (slc 6.3 µs); 8 warps (4 spill 104 bytes at D 128, sm_90 offline compile) in the set below.
    # Both decoding branches leave the merge of their splits to `_merge_attend_kernel`; merged by each
    # group's last split program instead (one launch fewer; removed), the step was slower (H100, 2026-12-07:
    # qwen3_0.6b_nsa's captured step at 4k 1,690 -> 1,877 µs; one layer at 64k 29.1 -> 40.5 µs)
    ("slc_split", "16bit"): dict(BLOCKS=1, PROGRAMS=128, TMA=True, num_warps=8, num_stages=2),
    # small groups (G < 16, e.g. Qwen3-0.6B's 16 query / 8 KV heads): a one-token program fills
    # G of its 16 dot rows and loads each block for G heads only; the union kernel (BT > 1) fills
    # the rows with adjacent tokens (`_tile_key`). Swept at qwen3_0.6b_nsa's shape (B 8, T 2048,
    # 16 / 8 heads, D 128; H100, 2026-12-06): forward 7.78 -> 1.71 ms, dQ + dK/dV 11.24 -> 4.99 ms
    # (BT 8: 1.72 / 5.00, the same launch at G 2: rows = max(16, BT·GP), so BT 4 runs 8 tokens a
    # program there; BT 16: 8.4 / 27.1) (reports/nsa.md "Fourth run"). G 1, 4 and 8 are not timed
    # (G 1 runs 16 tokens a program, G 4 4 and G 8 4 with 32 rows).
    ("slc_fwd", "16bit", "small_group"): dict(BT=4, TMA=True, num_warps=4, num_stages=3),
    ("slc_dq", "16bit", "small_group"): dict(BT=4, TMA=True, num_warps=4, num_stages=3),
    ("cmp_fwd", "fp32"): dict(BM=64, BN=32, BNS=32, BJ=16, FUSED_SELECT=True, SORT_MERGE=True, RANK_MERGE=False,
                              SKIP_MERGE=False, JV=0, TMA=False, num_warps=8, num_stages=1),
    ("cmp_sel", "fp32"): dict(BM=64, BN=32, BJ=16, SORT_MERGE=True, RANK_MERGE=False, SKIP_MERGE=False, JV=0,
                              TMA=False, num_warps=8, num_stages=1),
    ("cmp_dq", "fp32"): dict(BM=64, BN=32, TMA=False, num_warps=8, num_stages=1),
    ("cmp_dkdv", "fp32"): dict(BM=64, BN=32, Q_CHUNK=512, MAX_CHUNKS=16, FUSE_DQ=False, num_warps=8,
                              num_stages=1),
    ("slc_fwd", "fp32"): dict(BT=1, TMA=False, num_warps=4, num_stages=1),
    ("slc_dq", "fp32"): dict(BT=1, TMA=False, num_warps=4, num_stages=1),
    ("slc_dkdv", "fp32"): dict(ROWS=64, CH=1024, num_warps=8, num_stages=1),
    ("slc_split", "fp32"): dict(BLOCKS=1, PROGRAMS=128, TMA=False, num_warps=4, num_stages=1),
    # decoding (T <= DECODE_MAX_T): rows = T·GP up to MAX_BM, SPLIT_TOKENS compressed tokens per split
    # SEL_TILES: scoring tiles per split of the selection pass (its own split count, `_select_splits`);
    # 0: the attention pass's splits
    # MERGE_WARPS: the top-n merge's warps (one program a row sorts the splits' NSP·NP keys: 1,024 at 64k);
    # MERGE_PRUNE: only the NP lists that can hold a top key sorted (NP·NP keys; `_merge_select_kernel`)
    # SCAN > 0: the compressed-token ranges from passes over the ends, SCAN slots a load (`_end_scan`),
    # not from searches of prefix max / suffix min arrays (and no launch to build them)
    # The decode bench's variants at B 1, 64 / 4 heads, D 128 (H100, 2026-12-06; reports/nsa.md "Fifth
    # run"), µs a step (cmp + slc) at 8k / 64k / 128k: the previous set (256-token splits, 4 warps, the
    # merge at 4 warps, searches) 31.5 / 44.9 / 53.9; this one (with slc_split's 8 warps) 25.4 / 36.8 /
    # 49.3; a tree of pairwise merges (removed) instead of 8 warps 25.9 / 40.5 / 53.3; 4096-wide scans lose at 128k.
    # The sixth run (same card and shape): the top-n merge pruned to the 16 lists that can win, at 4 warps,
    # 25.1 / 36.2 / 48.7 -> 24.6 / 32.2 / 43.9 (pruned at 8 warps 24.9 / 32.5 / 44.1)
    ("cmp_split", "16bit"): dict(MAX_BM=128, BN=64, BJ=16, SPLIT_TOKENS=128, SEL_TILES=1, SORT_MERGE=True,
                                 RANK_MERGE=False, SKIP_MERGE=False, JV=0, MERGE_WARPS=4, MERGE_PRUNE=True,
                                 SCAN=1024, num_warps=8, num_stages=2),
    ("cmp_split", "fp32"): dict(MAX_BM=64, BN=32, BJ=16, SPLIT_TOKENS=256, SEL_TILES=1, SORT_MERGE=True,
                                RANK_MERGE=False, SKIP_MERGE=False, JV=0, MERGE_WARPS=4, MERGE_PRUNE=False,
                                SCAN=0, num_warps=4, num_stages=1),
}
DECODE_MAX_T = 16  # up to this many queries per row take the split (decoding) path
MAX_SPLITS = 64
# the interpreter: small tiles, so a test of a few dozen tokens crosses several of each (and
# G = 16 takes the broadcast mapping of the scores, G <= 4 the dot)
INTERPRET_TILES = {
    "cmp_fwd": dict(BM=64, BN=16, BNS=16, BJ=16, FUSED_SELECT=False, SORT_MERGE=True, RANK_MERGE=False,
                    SKIP_MERGE=False, JV=0, TMA=False, num_warps=1, num_stages=1),
    "cmp_sel": dict(BM=32, BN=16, BJ=16, SORT_MERGE=True, RANK_MERGE=False, SKIP_MERGE=False, JV=0, TMA=False,
                    num_warps=1, num_stages=1),
    "cmp_dq": dict(BM=64, BN=16, TMA=False, num_warps=1, num_stages=1),
    "cmp_dkdv": dict(BM=32, BN=16, Q_CHUNK=8, MAX_CHUNKS=3, FUSE_DQ=False, num_warps=1, num_stages=1),
    "slc_fwd": dict(BT=1, TMA=False, num_warps=1, num_stages=1),
    "slc_dq": dict(BT=1, TMA=False, num_warps=1, num_stages=1),
    "slc_dkdv": dict(ROWS=16, CH=3, num_warps=1, num_stages=1),
    "slc_split": dict(BLOCKS=1, PROGRAMS=8, TMA=False, num_warps=1, num_stages=1),
    "cmp_split": dict(MAX_BM=64, BN=16, BJ=16, SPLIT_TOKENS=5, SEL_TILES=1, SORT_MERGE=True, RANK_MERGE=False,
                      SKIP_MERGE=False, JV=0, MERGE_WARPS=1, MERGE_PRUNE=False,
                      SCAN=16, num_warps=1, num_stages=1),
}


def _tile_key(kind: str, dtype: torch.dtype, group: int) -> tuple:
    """TILES key of one kernel kind: (kind, precision), or (kind, "16bit", "small_group") where
    that row exists and the group fills fewer than MAX_GROUP rows."""
    key = (kind, "fp32" if dtype == torch.float32 else "16bit")
    small = (*key, "small_group")
    return small if triton.next_power_of_2(group) < MAX_GROUP and small in TILES else key


def tile_config(kind: str, dtype: torch.dtype, group: int = 1) -> dict:
    """Launch configuration of one kernel; BM grows to GP when a group alone has more rows."""
    cfg = dict(INTERPRET_TILES[kind] if _INTERPRET else TILES[_tile_key(kind, dtype, group)])
    if "BM" in cfg:
        cfg["BM"] = max(cfg["BM"], triton.next_power_of_2(group))
    return cfg


@contextlib.contextmanager
def override_tiles(kind: str, group: int = MAX_GROUP, **cfg):
    """Within the block, the 16-bit (under the interpreter: the interpreter's) launch configuration
    of one kernel kind at group size `group` updated with cfg: how the bench's tile sweep tries
    candidates. The winners belong in TILES (fixed configurations, no autotuner)."""
    key = kind if _INTERPRET else _tile_key(kind, torch.bfloat16, group)
    table = INTERPRET_TILES if _INTERPRET else TILES
    unknown = set(cfg) - set(table[key])
    if unknown:
        raise ValueError(f"override_tiles: {kind} has no option(s) {sorted(unknown)}; it has {sorted(table[key])}")
    saved = table[key]
    table[key] = dict(saved, **cfg)
    try:
        yield
    finally:
        table[key] = saved


def check_group(n_heads: int, n_kv_heads: int) -> None:
    """The group sizes the Triton kernels tile (a config check for model code)."""
    if n_heads % n_kv_heads or n_heads // n_kv_heads > MAX_GROUP:
        raise ValueError(f"nsa (triton): {n_heads} query heads over {n_kv_heads} KV heads: the group size must be an "
                         f"integer <= {MAX_GROUP}")


# ---- small device helpers -----------------------------------------------------------------------
@triton.jit
def _first_ge(A, base, n, x):
    """First i in [0, n) with A[base + i] >= x (A non-decreasing there), n if none. A FANOUT-way
    search: each step loads FANOUT evenly spaced entries at once and keeps the gap holding the
    answer, so a search costs log_FANOUT(n) + 1 dependent loads (2 for 4096 entries) instead of
    log2(n): the scoring pass runs two searches per tile of selection blocks."""
    lo = n * 0
    hi = n
    k = tl.arange(0, FANOUT)
    while lo < hi:
        stride = (hi - lo + FANOUT - 1) // FANOUT
        idx = lo + k * stride
        ok = idx < hi
        below = ok & (tl.load(A + base + idx, mask=ok, other=0) < x)
        cnt = tl.sum(below.to(tl.int32), 0)
        n_ok = tl.sum(ok.to(tl.int32), 0)
        # the answer lies in (idx[cnt - 1], idx[cnt]] (idx[-1] = lo - 1, idx[n_ok] = hi)
        new_lo = tl.where(cnt > 0, lo + (cnt - 1) * stride + 1, lo)
        hi = tl.where(cnt < n_ok, lo + cnt * stride, hi)
        lo = new_lo
    return lo


@triton.jit
def _load_end(END, at, ok):
    """cmp_end at `at` as int32, from any integer dtype (a padding slot's NEVER clamps to POS_MAX):
    the caller's tensor as it is, no clamp and cast launched before each decoding step."""
    return tl.minimum(tl.load(END + at, mask=ok, other=2147483647), 2147483647).to(tl.int32)


@triton.jit
def _load_pos(QPOS, QDS, at, ok, other):
    """(position, document start) int32 of the queries at `at`: q_pos of any integer dtype, and
    QDS None for one document a row (start 0): no cast or zeros launched before each step."""
    p = tl.load(QPOS + at, mask=ok, other=other).to(tl.int32)
    if QDS is None:
        ds = p * 0
    else:
        ds = tl.load(QDS + at, mask=ok, other=0).to(tl.int32)
    return p, ds


@triton.jit
def _load_pos1(QPOS, QDS, at):
    """_load_pos for one query."""
    p = tl.load(QPOS + at).to(tl.int32)
    if QDS is None:
        ds = p * 0
    else:
        ds = tl.load(QDS + at).to(tl.int32)
    return p, ds


@triton.jit
def _cmp_visible(p, ds, end):
    """[rows, tokens]: compressed token visible iff doc_start(p) <= cmp_end <= p."""
    return (end[None, :] <= p[:, None]) & (end[None, :] >= ds[:, None])


@triton.jit
def _row_span(p, ds, ok):
    """(lowest document start, highest position) of the rows (p, ds) that `ok` keeps."""
    return tl.min(tl.where(ok, ds, 2147483647)), tl.max(tl.where(ok, p, -1))


@triton.jit
def _cmp_range(CMAX, CMIN, END, cbase, N, p, ds, ok, SCAN: tl.constexpr):
    """[c_lo, c_hi) of the compressed tokens any of the rows (p, ds, ok) may see: two searches of
    the prefix max / suffix min arrays, or (SCAN > 0) one pass over the ends (`_end_scan`)."""
    ds_min, p_max = _row_span(p, ds, ok)
    if SCAN > 0:
        c_lo, c_hi = _end_scan(END, cbase, N, ds_min, p_max, SCAN)
    else:
        c_lo = _first_ge(CMAX, cbase, N, ds_min)
        c_hi = _first_ge(CMIN, cbase, N, p_max + 1)
    return c_lo, c_hi


@triton.jit
def _end_scan(END, cbase, N, ge, le, W: tl.constexpr):
    """(min{j : end[j] >= ge}, N if none; 1 + max{j : end[j] <= le}, 0 if none) over a row's N
    compressed slots, W at a time: what `_first_ge` finds on the prefix max of the ends (>= ge) and
    on their suffix min (>= le + 1), without those arrays. A decoding step (SCAN, a tile option of
    cmp_split) trades the searches' chains of dependent loads (two per range at N 4096) and the
    launch that builds the arrays for N / W independent wide loads per range."""
    w = tl.arange(0, W)
    first = tl.full([W], 2147483647, tl.int32)
    last = tl.full([W], -1, tl.int32)
    for c0 in range(0, N, W):
        c = c0 + w
        ok = c < N
        end = _load_end(END, cbase + c, ok)
        first = tl.minimum(first, tl.where(ok & (end >= ge), c, 2147483647))
        last = tl.maximum(last, tl.where(ok & (end <= le), c, -1))
    return tl.minimum(tl.min(first, 0), N), tl.max(last, 0) + 1


# ---- compressed branch --------------------------------------------------------------------------
@triton.jit
def _kv_rows(X, XD, x_base, sx_n, b32, hkv, r0, rows, ok, dx, DX, BR: tl.constexpr, BLOCK: tl.constexpr,
             TMA: tl.constexpr):
    """[BR, BLOCK] keys (or values) of one KV head: the rows r0.. (`rows`, int32) of compressed
    tokens or of a selected block. With TMA the copy engine fetches the tile from the descriptor
    XD (rows past the tensor's end, a negative start's rows and channels past DX arrive as zeros;
    rows that `ok` leaves out hold data, which the scores' mask removes: a zero probability times a
    finite value, so K/V must be finite, as the reference's dense p·v needs); otherwise a masked
    load of the rows `ok` keeps."""
    if TMA:
        x = tl.reshape(XD.load([b32, r0, hkv, 0]), [BR, BLOCK])
    else:
        x = tl.load(X + x_base + tl.cast(rows, tl.int64)[:, None] * sx_n + dx[None, :],
                    mask=ok[:, None] & (dx < DX)[None, :], other=0.0)
    return x


@triton.jit
def _cmp_attend(acc, m_i, l_i, q, KC, VC, KD, VD, END, cbase, k_base, v_base, sk_n, sv_n, p_row, ds_row, c_a, c_b,
                qk_scale, b32, hkv, dk, dv, DQK, DV, BN: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
                PREC: tl.constexpr, TMA: tl.constexpr):
    """Online softmax of the rows over compressed tokens [c_a, c_b) (base 2); TMA: K/V tiles
    through the descriptors KD, VD (`_kv_rows`)."""
    for c0 in range(c_a, c_b, BN):
        c = c0 + tl.arange(0, BN)
        c_ok = c < c_b
        end = _load_end(END, cbase + c, c_ok)
        k = _kv_rows(KC, KD, k_base, sk_n, b32, hkv, c0, c, c_ok, dk, DQK, BN, BLOCK_DK, TMA)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        s = tl.where(_cmp_visible(p_row, ds_row, end), s, float("-inf"))
        v = _kv_rows(VC, VD, v_base, sv_n, b32, hkv, c0, c, c_ok, dv, DV, BN, BLOCK_DV, TMA)
        acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, s, v, PREC)
    return acc, m_i, l_i


@triton.jit
def _tile_blocks(QPOS, QDS, qbase, m0, T, SEL_LEN, BT: tl.constexpr):
    """Per query of the tile: (tok_ok, sb = block of the document start, qb = block of the query),
    and [j_lo, j_hi), the blocks any of them may select."""
    tt = m0 + tl.arange(0, BT)
    tok_ok = tt < T
    qp, ds = _load_pos(QPOS, QDS, qbase + tt, tok_ok, 0)
    sb = ds // SEL_LEN
    qb = qp // SEL_LEN
    j_lo = tl.min(tl.where(tok_ok, sb, 2147483647))
    j_hi = tl.max(tl.where(tok_ok, qb, -1)) + 1
    return tok_ok, sb, qb, j_lo, j_hi


@triton.jit
def _first_ge_vec(A, base, n, x, V: tl.constexpr):
    """`_first_ge` for V thresholds x [V] at once (each step loads [V, FANOUT] entries): the
    searches of V scoring tiles in one chain of dependent loads instead of V chains."""
    lo = tl.zeros([V], dtype=tl.int32) + n * 0
    hi = lo + n
    k = tl.arange(0, FANOUT)
    while tl.sum((lo < hi).to(tl.int32), 0) > 0:
        stride = (hi - lo + FANOUT - 1) // FANOUT
        idx = lo[:, None] + k[None, :] * stride[:, None]
        ok = idx < hi[:, None]
        below = ok & (tl.load(A + base + idx, mask=ok, other=0) < x[:, None])
        cnt = tl.sum(below.to(tl.int32), 1)
        n_ok = tl.sum(ok.to(tl.int32), 1)
        new_lo = tl.where(cnt > 0, lo + (cnt - 1) * stride + 1, lo)
        hi = tl.where(cnt < n_ok, lo + cnt * stride, hi)
        lo = new_lo
    return lo


@triton.jit
def _cmp_select(key, q, lse, KC, KD, END, CMAX, CMIN, cbase, k_base, sk_n, N, p_row, ds_row, c_lo, c_hi,
                tok_ok, sb, qb, j_a, j_b, qk_scale, b32, hkv, dk, DQK, CMP_LEN, SEL_LEN, N_INIT, N_LOCAL,
                BT: tl.constexpr, GP: tl.constexpr, BN: tl.constexpr, BJ: tl.constexpr, NP: tl.constexpr,
                SORT_MERGE: tl.constexpr, RANK_MERGE: tl.constexpr, SKIP_MERGE: tl.constexpr, JV: tl.constexpr,
                PREC: tl.constexpr, BLOCK_DK: tl.constexpr, TMA: tl.constexpr, SCAN: tl.constexpr):
    """Pass 2 over selection blocks [j_a, j_b): each query's block importance (the group-summed
    probabilities exp2(s - lse) of the compressed tokens overlapping each block), +inf forced,
    -inf ineligible, merged into its running top-BJ `key` [BT, BJ] (`_block_key`; start from
    `_empty_keys`; `_top_keys` orders them at the end). Each tile of BJ blocks needs the range of
    compressed tokens overlapping it (two searches); JV > 0 runs the searches of JV tiles at once.
    TMA: the [BN, D] key tiles through the descriptor KD (`_kv_rows`). SCAN > 0: each tile's range
    from one pass over END (`_end_scan`) instead of the searches (JV is then not used), and c_lo,
    c_hi are then the rows' position bounds (`_row_span`), not indices: min{j : end[j] >= x} and
    max{j : end[j] <= x} grow with x for any END, so the tile's range intersected with the rows'
    is the scan against the tighter of each pair of bounds."""
    if SCAN > 0:
        for j0 in range(j_a, j_b, BJ):
            ca, cb = _end_scan(END, cbase, N, tl.maximum(j0 * SEL_LEN, c_lo),
                               tl.minimum((j0 + BJ) * SEL_LEN + CMP_LEN - 2, c_hi), SCAN)
            key = _score_tile(key, j0, ca, cb, q, lse, KC, KD, END, cbase, k_base,
                              sk_n, p_row, ds_row, tok_ok, sb, qb, j_b, qk_scale, b32, hkv, dk, DQK, CMP_LEN, SEL_LEN,
                              N_INIT, N_LOCAL, BT, GP, BN, BJ, NP, SORT_MERGE, RANK_MERGE, SKIP_MERGE, PREC, BLOCK_DK,
                              TMA)
    elif JV == 0:
        for j0 in range(j_a, j_b, BJ):
            # compressed tokens overlapping blocks [j0, j0 + BJ): end >= j0·l', end - l + 1 <= (j0 + BJ)·l' - 1
            ca = tl.maximum(c_lo, _first_ge(CMAX, cbase, N, j0 * SEL_LEN))
            cb = tl.minimum(c_hi, _first_ge(CMIN, cbase, N, (j0 + BJ) * SEL_LEN + CMP_LEN - 1))
            key = _score_tile(key, j0, ca, cb, q, lse, KC, KD, END, cbase, k_base, sk_n, p_row, ds_row, tok_ok, sb,
                              qb, j_b, qk_scale, b32, hkv, dk, DQK, CMP_LEN, SEL_LEN, N_INIT, N_LOCAL, BT, GP, BN, BJ,
                              NP, SORT_MERGE, RANK_MERGE, SKIP_MERGE, PREC, BLOCK_DK, TMA)
    else:
        jv = tl.arange(0, JV)
        for jc in range(j_a, j_b, BJ * JV):
            jt = jc + jv * BJ
            ca_v = tl.maximum(c_lo, _first_ge_vec(CMAX, cbase, N, jt * SEL_LEN, JV))
            cb_v = tl.minimum(c_hi, _first_ge_vec(CMIN, cbase, N, (jt + BJ) * SEL_LEN + CMP_LEN - 1, JV))
            for x in range(0, tl.minimum(JV, (j_b - jc + BJ - 1) // BJ)):
                ca = tl.sum(tl.where(jv == x, ca_v, 0), 0)
                cb = tl.sum(tl.where(jv == x, cb_v, 0), 0)
                key = _score_tile(key, jc + x * BJ, ca, cb, q, lse, KC, KD, END, cbase, k_base, sk_n, p_row, ds_row,
                                  tok_ok, sb, qb, j_b, qk_scale, b32, hkv, dk, DQK, CMP_LEN, SEL_LEN, N_INIT, N_LOCAL,
                                  BT, GP, BN, BJ, NP, SORT_MERGE, RANK_MERGE, SKIP_MERGE, PREC, BLOCK_DK, TMA)
    return key


@triton.jit
def _score_tile(key, j0, ca, cb, q, lse, KC, KD, END, cbase, k_base, sk_n, p_row, ds_row, tok_ok, sb, qb, j_b,
                qk_scale, b32, hkv, dk, DQK, CMP_LEN, SEL_LEN, N_INIT, N_LOCAL, BT: tl.constexpr, GP: tl.constexpr,
                BN: tl.constexpr, BJ: tl.constexpr, NP: tl.constexpr, SORT_MERGE: tl.constexpr,
                RANK_MERGE: tl.constexpr, SKIP_MERGE: tl.constexpr, PREC: tl.constexpr, BLOCK_DK: tl.constexpr,
                TMA: tl.constexpr):
    """One scoring tile: blocks [j0, j0 + BJ) from the compressed tokens [ca, cb), merged into key."""
    MAP_DOT: tl.constexpr = BT >= 16
    j = j0 + tl.arange(0, BJ)
    score = tl.zeros([BT, BJ], dtype=tl.float32)
    for c0 in range(ca, cb, BN):
        c = c0 + tl.arange(0, BN)
        c_ok = c < cb
        end = _load_end(END, cbase + c, c_ok)
        k = _kv_rows(KC, KD, k_base, sk_n, b32, hkv, c0, c, c_ok, dk, DQK, BN, BLOCK_DK, TMA)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        p = tl.where(_cmp_visible(p_row, ds_row, end), tl.exp2(s - lse[:, None]), 0.0)
        pg = tl.sum(tl.reshape(p, [BT, GP, BN]), 1)                    # [BT, BN]: the group's sum
        first = tl.maximum(end - CMP_LEN + 1, 0) // SEL_LEN
        last = end // SEL_LEN
        ov = ((j[None, :] >= first[:, None]) & (j[None, :] <= last[:, None]) & c_ok[:, None]).to(tl.float32)
        if MAP_DOT:
            score = tl.dot(pg, ov, score, input_precision="ieee")
        else:  # fewer than 16 queries per tile (large groups): a broadcast product, as exact
            score += tl.sum(pg[:, :, None] * ov[None, :, :], 1)
    elig = (j[None, :] >= sb[:, None]) & (j[None, :] <= qb[:, None]) & (j[None, :] < j_b) & tok_ok[:, None]
    forced = elig & ((j[None, :] < sb[:, None] + N_INIT) | (j[None, :] > qb[:, None] - N_LOCAL))
    score = tl.where(forced, float("inf"), score)
    new = _block_key(score, j[None, :] + tl.zeros([BT, BJ], dtype=tl.int32), elig)
    if RANK_MERGE:   # the rank form needs unique keys: ineligible ones below the list's empty slots
        new = tl.where(new >= 0, new, -1 - BJ - tl.cast(tl.arange(0, BJ), tl.int64)[None, :])
    if SKIP_MERGE:
        # a key at or below the row's current n-th best can never reach the final top n (the n-th
        # best only grows): merge only when some row has a new key above its own
        if tl.max(tl.max((new > _nth_key(key, BJ, NP, SORT_MERGE, RANK_MERGE)[:, None]).to(tl.int32), 1), 0) > 0:
            key = _merge_keys(key, new, BT, BJ, SORT_MERGE, RANK_MERGE)
    else:
        key = _merge_keys(key, new, BT, BJ, SORT_MERGE, RANK_MERGE)
    return key


@triton.jit
def _merge_keys(key, new, BT: tl.constexpr, BJ: tl.constexpr, SORT_MERGE: tl.constexpr, RANK_MERGE: tl.constexpr):
    """The running top-BJ list merged with a tile of BJ new keys, in the chosen form."""
    if RANK_MERGE:
        return _rank_top(key, new, BT, BJ)
    elif SORT_MERGE:
        return _merge_top(key, new, BT, BJ)
    else:
        return _insert_top(key, new, BJ)


@triton.jit
def _nth_key(key, BJ: tl.constexpr, NP: tl.constexpr, SORT_MERGE: tl.constexpr, RANK_MERGE: tl.constexpr):
    """[BT] a lower bound of each row's NP-th best key: slot NP - 1 of a descending list (sort and
    rank forms), the minimum of an unordered one (the insertion form)."""
    if RANK_MERGE:
        return tl.sum(tl.where(tl.arange(0, BJ)[None, :] == NP - 1, key, 0), 1)
    elif SORT_MERGE:
        return tl.sum(tl.where(tl.arange(0, BJ)[None, :] == NP - 1, key, 0), 1)
    else:
        return tl.min(key, 1)


@triton.jit
def _rank_top(key, new, BT: tl.constexpr, BJ: tl.constexpr):
    """The top BJ of key [BT, BJ] and new [BT, BJ] per row, in descending order, by ranks instead
    of a sort: each of the 2·BJ candidates' rank is the number of candidates above it ([BT, 2·BJ,
    2·BJ] compares and one sum), and slot r takes the candidate of rank r (a [BT, 2·BJ, BJ] select
    and sum). Two wide reductions instead of log2(2·BJ)·(log2(2·BJ) + 1) / 2 dependent bitonic
    stages (15 for BJ 16) on a [BT, 2·BJ] tensor of BT·2·BJ elements (one per thread at BT 8).
    Needs unique keys (the caller's)."""
    both = tl.reshape(tl.join(key, new), [BT, 2 * BJ])
    rank = tl.sum((both[:, None, :] > both[:, :, None]).to(tl.int32), 2)                      # [BT, 2·BJ]
    slot = tl.arange(0, BJ)
    return tl.sum(tl.where(rank[:, :, None] == slot[None, None, :], both[:, :, None], 0), 1)   # [BT, BJ]


@triton.jit
def _empty_keys(BT: tl.constexpr, BJ: tl.constexpr):
    """An empty running top list: distinct negative keys (-1 - slot), below every real key and
    never equal to each other (the insertion replaces the unique minimum)."""
    return -1 - tl.cast(tl.arange(0, BJ), tl.int64)[None, :] + tl.zeros([BT, BJ], dtype=tl.int64)


@triton.jit
def _insert_top(key, new, BJ: tl.constexpr):
    """The insertion form of the merge: the BJ new keys one at a time, each replacing the row's
    minimum when larger (two reductions per block; keys are unique, so the minimum is one slot)."""
    jj = tl.arange(0, BJ)
    for x in range(0, BJ):
        k_x = tl.sum(tl.where(jj[None, :] == x, new, 0), 1)                # [BT]
        m = tl.min(key, 1)
        take = (k_x > m) & (k_x >= 0)
        key = tl.where((key == m[:, None]) & take[:, None], k_x[:, None], key)
    return key


@triton.jit
def _top_keys(key, SORT_MERGE: tl.constexpr, RANK_MERGE: tl.constexpr):
    """The running top list in descending order (the insertion form leaves it unordered)."""
    if RANK_MERGE:
        return key
    elif SORT_MERGE:
        return key
    else:
        return tl.sort(key, dim=1, descending=True)


@triton.jit
def _block_key(score, j, ok):
    """int64 keys whose integer order is the selection's total order, (score, then later block):
    the fp32 bits of a score >= 0 (+inf included) order as integers, so (bits << 32) | j; a block
    that is not eligible gets -1 (below every real key)."""
    bits = tl.cast(score, tl.int32, bitcast=True) & 0x7FFFFFFF                 # -0.0 -> +0.0
    return tl.where(ok, (tl.cast(bits, tl.int64) << 32) | tl.cast(j, tl.int64), -1)


@triton.jit
def _merge_top(key, new, BT: tl.constexpr, BJ: tl.constexpr):
    """The top BJ of key [BT, BJ] and new [BT, BJ] per row, in descending order: one bitonic sort
    of the 2·BJ candidates (no per-block insertion loop)."""
    both = tl.sort(tl.reshape(tl.join(key, new), [BT, 2 * BJ]), dim=1, descending=True)
    hi, lo = tl.split(tl.permute(tl.reshape(both, [BT, 2, BJ]), (0, 2, 1)))
    return hi


@triton.jit
def _key_block(key):
    """Block index of a key, -1 for an empty or ineligible slot."""
    return tl.where(key >= 0, tl.cast(key & 0x7FFFFFFF, tl.int32), -1)   # block < 2³¹: bit 31 is 0


@triton.jit
def _key_score(key):
    """Score of a key (-inf for an empty or ineligible slot)."""
    bits = tl.cast(tl.cast(key >> 32, tl.int32), tl.float32, bitcast=True)
    return tl.where(key >= 0, bits, float("-inf"))


@triton.jit
def _first_slots(x, BT: tl.constexpr, BJ: tl.constexpr, NP: tl.constexpr):
    """x[:, :NP] of x [BT, BJ] (NP <= BJ, powers of two)."""
    if NP == BJ:
        return x
    else:
        part = tl.reshape(x, [BT, BJ // NP, NP])
        first = (tl.arange(0, BJ // NP) == 0)[None, :, None]
        return tl.sum(tl.where(first, part, 0), 1)


@triton.jit
def _cmp_fwd_kernel(Q, KC, VC, KD, VD, END, CMAX, CMIN, QPOS, QDS, O, LSE, SEL,
                    sq_b, sq_t, sq_h, sk_b, sk_n, sk_h, sv_b, sv_n, sv_h, so_b, so_t, so_h,
                    T, N, H, HKV, G, DQK, DV, scale, CMP_LEN, SEL_LEN, N_SELECT, N_INIT, N_LOCAL,
                    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, GP: tl.constexpr, BM: tl.constexpr,
                    BN: tl.constexpr, BNS: tl.constexpr, BJ: tl.constexpr, NP: tl.constexpr,
                    SELECT: tl.constexpr, SORT_MERGE: tl.constexpr, RANK_MERGE: tl.constexpr,
                    SKIP_MERGE: tl.constexpr, JV: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr):
    """Training / prefill: pass 1 and pass 2 in one program per (query tile, KV head); TMA: pass
    1's K/V tiles through the descriptors KD, VD."""
    BT: tl.constexpr = BM // GP
    qk_scale = scale * 1.4426950408889634
    m0 = tl.program_id(0) * BT
    bh = tl.program_id(1)
    b32 = bh // HKV
    b = tl.cast(b32, tl.int64)
    hkv = bh % HKV
    t, r, row_ok = _rows(m0, T, G, GP, BM)
    h = hkv * G + r
    t64, h64 = tl.cast(t, tl.int64), tl.cast(h, tl.int64)
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    p_row, ds_row = _load_pos(QPOS, QDS, b * T + t, row_ok, 0)
    q = tl.load(Q + b * sq_b + t64[:, None] * sq_t + h64[:, None] * sq_h + dk[None, :],
                mask=row_ok[:, None] & (dk < DQK)[None, :], other=0.0)
    cbase = b * N
    c_lo, c_hi = _cmp_range(CMAX, CMIN, END, cbase, N, p_row, ds_row, row_ok, 0)
    k_base = b * sk_b + tl.cast(hkv, tl.int64) * sk_h
    v_base = b * sv_b + tl.cast(hkv, tl.int64) * sv_h
    acc = tl.zeros([BM, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([BM], -1.0e30, dtype=tl.float32)  # finite: a row that sees nothing stays NaN-free
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc, m_i, l_i = _cmp_attend(acc, m_i, l_i, q, KC, VC, KD, VD, END, cbase, k_base, v_base, sk_n, sv_n, p_row,
                                ds_row, c_lo, c_hi, qk_scale, b32, hkv, dk, dv, DQK, DV, BN, BLOCK_DK, BLOCK_DV, PREC,
                                TMA)
    seen = l_i > 0.0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    tl.store(O + b * so_b + t64[:, None] * so_t + h64[:, None] * so_h + dv[None, :], o.to(O.dtype.element_ty),
             mask=row_ok[:, None] & (dv < DV)[None, :])
    # a row that sees nothing (or a padding row) gets lse = +inf: every p = exp2(s - lse) is 0
    lse = tl.where(seen & row_ok, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("inf"))
    tl.store(LSE + (b * T + t64) * H + h64, lse, mask=row_ok)
    if SELECT:
        tok_ok, sb, qb, j_lo, j_hi = _tile_blocks(QPOS, QDS, b * T, m0, T, SEL_LEN, BT)
        # the scoring's key tiles are BNS wide, the descriptors' boxes BN: pointer loads here
        key = _cmp_select(_empty_keys(BT, BJ), q, lse, KC, KC, END, CMAX, CMIN, cbase, k_base, sk_n, N, p_row, ds_row,
                          c_lo, c_hi, tok_ok, sb, qb, j_lo, j_hi, qk_scale, b32, hkv, dk, DQK, CMP_LEN, SEL_LEN, N_INIT,
                          N_LOCAL, BT, GP, BNS, BJ, NP, SORT_MERGE, RANK_MERGE, SKIP_MERGE, JV, PREC, BLOCK_DK, False, 0)
        key = _top_keys(key, SORT_MERGE, RANK_MERGE)
        _store_sel(SEL, key, b, T, m0, tok_ok, hkv, HKV, N_SELECT, BT, BJ, NP)


@triton.jit
def _store_sel(SEL, key, b, T, m0, tok_ok, hkv, HKV, N_SELECT, BT: tl.constexpr, BJ: tl.constexpr,
               NP: tl.constexpr):
    """sel_idx rows of the tile from the running top keys: the first n blocks, in descending block
    index, -1 for empty slots."""
    slot = tl.arange(0, NP)
    live = slot < N_SELECT
    best_i = tl.where(live[None, :], _key_block(_first_slots(key, BT, BJ, NP)), -2)  # surplus -2, sorted last
    best_i = tl.sort(best_i, dim=1, descending=True)
    tt64 = tl.cast(m0 + tl.arange(0, BT), tl.int64)
    tl.store(SEL + ((b * T + tt64[:, None]) * HKV + hkv) * N_SELECT + slot[None, :], best_i,
             mask=tok_ok[:, None] & live[None, :])


@triton.jit
def _split_range(lo, hi, split, NSPLIT):
    """The split-th of NSPLIT near-equal parts of [lo, hi)."""
    n = tl.maximum(hi - lo, 0)
    part = (n + NSPLIT - 1) // NSPLIT
    a = tl.minimum(lo + split * part, hi)
    return a, tl.minimum(a + part, hi)


@triton.jit
def _cmp_split_attend_kernel(Q, KC, VC, END, CMAX, CMIN, QPOS, QDS, M_PART, L_PART, ACC_PART,
                             sq_b, sq_t, sq_h, sk_b, sk_n, sk_h, sv_b, sv_n, sv_h,
                             T, N, H, HKV, G, DQK, DV, scale, NSPLIT,
                             BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, GP: tl.constexpr, BM: tl.constexpr,
                             BN: tl.constexpr, PREC: tl.constexpr, SCAN: tl.constexpr, PDL: tl.constexpr):
    """Decoding, pass 1: one program per (query tile, KV head, split of the compressed range)
    writes its partial (m, l, acc) [NSPLIT, B·T·H(, DV)]; `_merge_attend_kernel` merges them.
    SCAN > 0: the range from a pass over END (CMAX, CMIN unused)."""
    wait_for_inputs(PDL)  # under PDL (decoding): every input written, before any read or write
    BT: tl.constexpr = BM // GP
    qk_scale = scale * 1.4426950408889634
    m0 = tl.program_id(0) * BT
    bh = tl.program_id(1)
    split = tl.program_id(2)
    b = tl.cast(bh // HKV, tl.int64)
    hkv = bh % HKV
    t, r, row_ok = _rows(m0, T, G, GP, BM)
    h = hkv * G + r
    t64, h64 = tl.cast(t, tl.int64), tl.cast(h, tl.int64)
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    p_row, ds_row = _load_pos(QPOS, QDS, b * T + t, row_ok, 0)
    q = tl.load(Q + b * sq_b + t64[:, None] * sq_t + h64[:, None] * sq_h + dk[None, :],
                mask=row_ok[:, None] & (dk < DQK)[None, :], other=0.0)
    cbase = b * N
    c_lo, c_hi = _cmp_range(CMAX, CMIN, END, cbase, N, p_row, ds_row, row_ok, SCAN)
    c_a, c_b = _split_range(c_lo, c_hi, split, NSPLIT)
    acc = tl.zeros([BM, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([BM], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc, m_i, l_i = _cmp_attend(acc, m_i, l_i, q, KC, VC, KC, VC, END, cbase, b * sk_b + tl.cast(hkv, tl.int64) * sk_h,
                                b * sv_b + tl.cast(hkv, tl.int64) * sv_h, sk_n, sv_n, p_row, ds_row, c_a, c_b,
                                qk_scale, 0, hkv, dk, dv, DQK, DV, BN, BLOCK_DK, BLOCK_DV, PREC, False)
    R = (tl.num_programs(1) // HKV) * T * H
    row = split * R + (b * T + t64) * H + h64
    tl.store(M_PART + row, m_i, mask=row_ok)
    tl.store(L_PART + row, l_i, mask=row_ok)
    tl.store(ACC_PART + row[:, None] * DV + dv[None, :], acc, mask=row_ok[:, None] & (dv < DV)[None, :])


@triton.jit
def _cmp_split_select_kernel(Q, KC, KD, END, CMAX, CMIN, QPOS, QDS, LSE, S_PART, I_PART, SEL,
                             sq_b, sq_t, sq_h, sk_b, sk_n, sk_h,
                             T, N, H, HKV, G, DQK, scale, CMP_LEN, SEL_LEN, N_SELECT, N_INIT, N_LOCAL, NSPLIT,
                             BLOCK_DK: tl.constexpr, GP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                             BJ: tl.constexpr, NP: tl.constexpr, FINAL: tl.constexpr, SORT_MERGE: tl.constexpr,
                             RANK_MERGE: tl.constexpr, SKIP_MERGE: tl.constexpr, JV: tl.constexpr,
                             PREC: tl.constexpr, TMA: tl.constexpr, SCAN: tl.constexpr, PDL: tl.constexpr):
    """Decoding, pass 2: one program per (query tile, KV head, split of the selectable blocks)
    writes its partial top-n (scores, indices) [NSPLIT, B, T, HKV, NP]; `_merge_select_kernel`
    merges them. Empty slots are (-inf, -1). FINAL (one split, the training path's
    separate scoring pass): sel_idx itself. TMA: the key tiles through the descriptor KD.
    SCAN > 0: every range from passes over END (`_end_scan`; CMAX, CMIN unused)."""
    wait_for_inputs(PDL)  # under PDL (decoding): every input written, before any read or write
    BT: tl.constexpr = BM // GP
    qk_scale = scale * 1.4426950408889634
    m0 = tl.program_id(0) * BT
    bh = tl.program_id(1)
    split = tl.program_id(2)
    b32 = bh // HKV
    b = tl.cast(b32, tl.int64)
    hkv = bh % HKV
    t, r, row_ok = _rows(m0, T, G, GP, BM)
    h = hkv * G + r
    t64, h64 = tl.cast(t, tl.int64), tl.cast(h, tl.int64)
    dk = tl.arange(0, BLOCK_DK)
    p_row, ds_row = _load_pos(QPOS, QDS, b * T + t, row_ok, 0)
    q = tl.load(Q + b * sq_b + t64[:, None] * sq_t + h64[:, None] * sq_h + dk[None, :],
                mask=row_ok[:, None] & (dk < DQK)[None, :], other=0.0)
    lse = tl.load(LSE + (b * T + t64) * H + h64, mask=row_ok, other=float("inf"))
    cbase = b * N
    if SCAN > 0:  # position bounds: each tile scans the ends once against them (`_cmp_select`)
        c_lo, c_hi = _row_span(p_row, ds_row, row_ok)
    else:
        c_lo, c_hi = _cmp_range(CMAX, CMIN, END, cbase, N, p_row, ds_row, row_ok, 0)
    tok_ok, sb, qb, j_lo, j_hi = _tile_blocks(QPOS, QDS, b * T, m0, T, SEL_LEN, BT)
    j_a, j_b = _split_range(j_lo, j_hi, split, NSPLIT)
    key = _cmp_select(_empty_keys(BT, BJ), q, lse, KC, KD, END, CMAX, CMIN, cbase,
                      b * sk_b + tl.cast(hkv, tl.int64) * sk_h, sk_n, N, p_row, ds_row, c_lo, c_hi, tok_ok, sb, qb,
                      j_a, j_b, qk_scale, b32, hkv, dk, DQK, CMP_LEN, SEL_LEN, N_INIT, N_LOCAL, BT, GP, BN, BJ, NP,
                      SORT_MERGE, RANK_MERGE, SKIP_MERGE, JV, PREC, BLOCK_DK, TMA, SCAN)
    key = _top_keys(key, SORT_MERGE, RANK_MERGE)
    if FINAL:   # one split: the selection itself
        _store_sel(SEL, key, b, T, m0, tok_ok, hkv, HKV, N_SELECT, BT, BJ, NP)
    else:
        key = _first_slots(key, BT, BJ, NP)
        slot = tl.arange(0, NP)
        keep = (slot < N_SELECT)[None, :] & (key >= 0)
        tt64 = tl.cast(m0 + tl.arange(0, BT), tl.int64)
        at = (((split * (tl.num_programs(1) // HKV) + b) * T + tt64[:, None]) * HKV + hkv) * NP + slot[None, :]
        tl.store(S_PART + at, tl.where(keep, _key_score(key), float("-inf")), mask=tok_ok[:, None])
        tl.store(I_PART + at, tl.where(keep, _key_block(key), -1), mask=tok_ok[:, None])


@triton.jit
def _cmp_dq_kernel(Q, KC, VC, KD, VD, DO, LSE, DELTA, END, CMAX, CMIN, QPOS, QDS, DQO,
                   sq_b, sq_t, sq_h, sk_b, sk_n, sk_h, sv_b, sv_n, sv_h, sdo_b, sdo_t, sdo_h, sdq_b, sdq_t, sdq_h,
                   T, N, H, HKV, G, DQK, DV, scale,
                   BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, GP: tl.constexpr, BM: tl.constexpr,
                   BN: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr):
    """TMA: the K/V tiles through the descriptors KD, VD (`_kv_rows`)."""
    BT: tl.constexpr = BM // GP
    qk_scale = scale * 1.4426950408889634
    m0 = tl.program_id(0) * BT
    bh = tl.program_id(1)
    b32 = bh // HKV
    b = tl.cast(b32, tl.int64)
    hkv = bh % HKV
    t, r, row_ok = _rows(m0, T, G, GP, BM)
    h = hkv * G + r
    t64, h64 = tl.cast(t, tl.int64), tl.cast(h, tl.int64)
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    p_row, ds_row = _load_pos(QPOS, QDS, b * T + t, row_ok, 0)
    q = tl.load(Q + b * sq_b + t64[:, None] * sq_t + h64[:, None] * sq_h + dk[None, :],
                mask=row_ok[:, None] & (dk < DQK)[None, :], other=0.0)
    do = tl.load(DO + b * sdo_b + t64[:, None] * sdo_t + h64[:, None] * sdo_h + dv[None, :],
                 mask=row_ok[:, None] & (dv < DV)[None, :], other=0.0)
    row = (b * T + t64) * H + h64
    lse = tl.load(LSE + row, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + row, mask=row_ok, other=0.0)
    cbase = b * N
    c_lo, c_hi = _cmp_range(CMAX, CMIN, END, cbase, N, p_row, ds_row, row_ok, 0)
    k_base = b * sk_b + tl.cast(hkv, tl.int64) * sk_h
    v_base = b * sv_b + tl.cast(hkv, tl.int64) * sv_h
    dq_acc = tl.zeros([BM, BLOCK_DK], dtype=tl.float32)
    for c0 in range(c_lo, c_hi, BN):
        c = c0 + tl.arange(0, BN)
        c_ok = c < c_hi
        end = _load_end(END, cbase + c, c_ok)
        k = _kv_rows(KC, KD, k_base, sk_n, b32, hkv, c0, c, c_ok, dk, DQK, BN, BLOCK_DK, TMA)
        v = _kv_rows(VC, VD, v_base, sv_n, b32, hkv, c0, c, c_ok, dv, DV, BN, BLOCK_DV, TMA)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        p = tl.where(_cmp_visible(p_row, ds_row, end), tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        dsc = p * (dp - delta[:, None])
        dq_acc = tl.dot(dsc.to(k.dtype), k, dq_acc, input_precision=PREC)
    tl.store(DQO + b * sdq_b + t64[:, None] * sdq_t + h64[:, None] * sdq_h + dk[None, :],
             (dq_acc * scale).to(DQO.dtype.element_ty), mask=row_ok[:, None] & (dk < DQK)[None, :])


@triton.jit
def _cmp_dkdv_kernel(Q, KC, VC, DO, LSE, DELTA, END, QPOS, QDS, QPMAX, QDSMIN, DKO, DVO, DQACC,
                     sq_b, sq_t, sq_h, sk_b, sk_n, sk_h, sv_b, sv_n, sv_h, sdo_b, sdo_t, sdo_h,
                     sdk_b, sdk_n, sdk_h, sdv_b, sdv_n, sdv_h,
                     T, N, H, HKV, G, DQK, DV, scale, Q_CHUNK,
                     BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, GP: tl.constexpr, BM: tl.constexpr,
                     BN: tl.constexpr, ATOMIC: tl.constexpr, FUSE_DQ: tl.constexpr, PREC: tl.constexpr):
    """Compressed tokens are rows here: sᵀ [BN, BM] = k · qᵀ (as kernels/attention's dK/dV).
    Program (tile, KV head, chunk) walks the queries of [chunk·Q_CHUNK, (chunk+1)·Q_CHUNK) that may
    see the tile; with several chunks (ATOMIC) the partial dK/dV go to fp32 buffers by atomic add.
    FUSE_DQ: dQ as well, (dSᵀ)ᵀ · k added to the fp32 buffer DQACC [B, T, H, DQK] by atomic add
    (5 matmuls per step for dQ, dK, dV instead of 3 + 4 in two kernels)."""
    BT: tl.constexpr = BM // GP
    qk_scale = scale * 1.4426950408889634
    n0 = tl.program_id(0) * BN
    bh = tl.program_id(1)
    q_a = tl.program_id(2) * Q_CHUNK
    b = tl.cast(bh // HKV, tl.int64)
    hkv = bh % HKV
    hkv64 = tl.cast(hkv, tl.int64)
    c = n0 + tl.arange(0, BN)
    c_ok = c < N
    c64 = tl.cast(c, tl.int64)
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    end = _load_end(END, b * N + c, c_ok)
    k = tl.load(KC + b * sk_b + hkv64 * sk_h + c64[:, None] * sk_n + dk[None, :],
                mask=c_ok[:, None] & (dk < DQK)[None, :], other=0.0)
    v = tl.load(VC + b * sv_b + hkv64 * sv_h + c64[:, None] * sv_n + dv[None, :],
                mask=c_ok[:, None] & (dv < DV)[None, :], other=0.0)
    # queries that may see this tile: from the first with q_pos >= min end, while doc_start <= max end
    real = c_ok & (end < 2147483647)
    e_min = tl.min(tl.where(real, end, 2147483647))
    e_max = tl.max(tl.where(real, end, -1))
    t_lo = tl.maximum(_first_ge(QPMAX, b * T, T, e_min), q_a)
    t_hi = tl.minimum(_first_ge(QDSMIN, b * T, T, e_max + 1), q_a + Q_CHUNK)
    dk_acc = tl.zeros([BN, BLOCK_DK], dtype=tl.float32)
    dv_acc = tl.zeros([BN, BLOCK_DV], dtype=tl.float32)
    for m0 in range(t_lo, t_hi, BT):
        t, r, row_ok = _rows(m0, t_hi, G, GP, BM)
        t64, h64 = tl.cast(t, tl.int64), tl.cast(hkv * G + r, tl.int64)
        p_row, ds_row = _load_pos(QPOS, QDS, b * T + t, row_ok, 0)
        q_t = tl.load(Q + b * sq_b + t64[None, :] * sq_t + h64[None, :] * sq_h + dk[:, None],
                      mask=row_ok[None, :] & (dk < DQK)[:, None], other=0.0)            # [BLOCK_DK, BM]
        row = (b * T + t64) * H + h64
        lse = tl.load(LSE + row, mask=row_ok, other=float("inf"))
        s_t = tl.dot(k, q_t, input_precision=PREC) * qk_scale
        vis_t = (end[:, None] <= p_row[None, :]) & (end[:, None] >= ds_row[None, :]) & row_ok[None, :]
        p_t = tl.where(vis_t, tl.exp2(s_t - lse[None, :]), 0.0)
        do = tl.load(DO + b * sdo_b + t64[:, None] * sdo_t + h64[:, None] * sdo_h + dv[None, :],
                     mask=row_ok[:, None] & (dv < DV)[None, :], other=0.0)
        dv_acc = tl.dot(p_t.to(do.dtype), do, dv_acc, input_precision=PREC)
        delta = tl.load(DELTA + row, mask=row_ok, other=0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk_acc = tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), dk_acc, input_precision=PREC)
        if FUSE_DQ:
            dq_part = tl.dot(tl.trans(ds_t.to(k.dtype)), k, input_precision=PREC)            # [BM, BLOCK_DK]
            tl.atomic_add(DQACC + row[:, None] * DQK + dk[None, :], dq_part * scale,
                          mask=row_ok[:, None] & (dk < DQK)[None, :], sem="relaxed")
    dk_ptr = DKO + b * sdk_b + hkv64 * sdk_h + c64[:, None] * sdk_n + dk[None, :]
    dv_ptr = DVO + b * sdv_b + hkv64 * sdv_h + c64[:, None] * sdv_n + dv[None, :]
    if ATOMIC:
        if t_lo < t_hi:  # a chunk that sees none of the tile adds nothing
            tl.atomic_add(dk_ptr, dk_acc * scale, mask=c_ok[:, None] & (dk < DQK)[None, :], sem="relaxed")
            tl.atomic_add(dv_ptr, dv_acc, mask=c_ok[:, None] & (dv < DV)[None, :], sem="relaxed")
    else:
        tl.store(dk_ptr, (dk_acc * scale).to(DKO.dtype.element_ty), mask=c_ok[:, None] & (dk < DQK)[None, :])
        tl.store(dv_ptr, dv_acc.to(DVO.dtype.element_ty), mask=c_ok[:, None] & (dv < DV)[None, :])


# ---- selected branch ----------------------------------------------------------------------------
@triton.jit
def _slc_fwd_kernel(Q, K, V, KD, VD, SEL, QPOS, QDS, O, LSE, M_PART, L_PART, ACC_PART,
                    sq_b, sq_t, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, so_b, so_t, so_h,
                    T, S, H, HKV, G, DQK, DV, scale, SEL_LEN, N_SEL, PER_SPLIT,
                    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, RP: tl.constexpr, BS: tl.constexpr,
                    PREC: tl.constexpr, TMA: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr):
    """TMA: each selected block's K and V through the descriptors KD, VD (the tile option TMA).
    SPLIT (decoding): program (t, b·hkv, split) walks the slots [split·PER_SPLIT, +PER_SPLIT) and
    writes its partial (m, l, acc) [NSPLIT, B·T·H(, DV)] for `_merge_attend_kernel`; otherwise
    the program stores its o and lse itself."""
    wait_for_inputs(PDL)  # under PDL (decoding): every input written, before any read or write
    qk_scale = scale * 1.4426950408889634
    t = tl.program_id(0)
    bh = tl.program_id(1)
    split = tl.program_id(2)
    b32 = bh // HKV
    b = tl.cast(b32, tl.int64)
    hkv = bh % HKV
    hkv64 = tl.cast(hkv, tl.int64)
    r = tl.arange(0, RP)
    row_ok = r < G
    h64 = tl.cast(hkv * G + r, tl.int64)
    t64 = tl.cast(t, tl.int64)
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    pos, ds = _load_pos1(QPOS, QDS, b * T + t)
    q = tl.load(Q + b * sq_b + t64 * sq_t + h64[:, None] * sq_h + dk[None, :],
                mask=row_ok[:, None] & (dk < DQK)[None, :], other=0.0)
    k_base = b * sk_b + hkv64 * sk_h
    v_base = b * sv_b + hkv64 * sv_h
    sel_base = ((b * T + t64) * HKV + hkv) * N_SEL
    i_s = tl.arange(0, BS)
    acc = tl.zeros([RP, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([RP], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([RP], dtype=tl.float32)
    # branch-free (an unused slot -1 masks its whole block): the loop stays one software-pipelined
    # body, the next block's index and K/V loads issued while this block computes
    i_lo = split * PER_SPLIT
    for i in range(i_lo, tl.minimum(i_lo + PER_SPLIT, N_SEL)):
        j = tl.load(SEL + sel_base + i)
        s_pos = j * SEL_LEN + i_s
        key_ok = (i_s < SEL_LEN) & (s_pos <= pos) & (s_pos >= ds) & (s_pos < S) & (j >= 0)
        k = _kv_rows(K, KD, k_base, sk_s, b32, hkv, j * SEL_LEN, s_pos, key_ok, dk, DQK, BS, BLOCK_DK, TMA)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        s = tl.where(key_ok[None, :], s, float("-inf"))
        v = _kv_rows(V, VD, v_base, sv_s, b32, hkv, j * SEL_LEN, s_pos, key_ok, dv, DV, BS, BLOCK_DV, TMA)
        acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, s, v, PREC)
    if SPLIT:
        R = (tl.num_programs(1) // HKV) * T * H
        row = split * R + (b * T + t64) * H + h64
        tl.store(M_PART + row, m_i, mask=row_ok)
        tl.store(L_PART + row, l_i, mask=row_ok)
        tl.store(ACC_PART + row[:, None] * DV + dv[None, :], acc, mask=row_ok[:, None] & (dv < DV)[None, :])
    else:
        seen = l_i > 0.0
        o = acc / tl.where(seen, l_i, 1.0)[:, None]
        tl.store(O + b * so_b + t64 * so_t + h64[:, None] * so_h + dv[None, :], o.to(O.dtype.element_ty),
                 mask=row_ok[:, None] & (dv < DV)[None, :])
        lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("inf"))
        tl.store(LSE + (b * T + t64) * H + h64, lse, mask=row_ok)


@triton.jit
def _slc_dq_kernel(Q, K, V, KD, VD, DO, LSE, DELTA, SEL, QPOS, QDS, DQO,
                   sq_b, sq_t, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, sdo_b, sdo_t, sdo_h, sdq_b, sdq_t, sdq_h,
                   T, S, H, HKV, G, DQK, DV, scale, SEL_LEN, N_SEL,
                   BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, RP: tl.constexpr, BS: tl.constexpr,
                   PREC: tl.constexpr, TMA: tl.constexpr):
    """TMA: as the forward's."""
    qk_scale = scale * 1.4426950408889634
    t = tl.program_id(0)
    bh = tl.program_id(1)
    b32 = bh // HKV
    b = tl.cast(b32, tl.int64)
    hkv = bh % HKV
    hkv64 = tl.cast(hkv, tl.int64)
    r = tl.arange(0, RP)
    row_ok = r < G
    h64 = tl.cast(hkv * G + r, tl.int64)
    t64 = tl.cast(t, tl.int64)
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    pos, ds = _load_pos1(QPOS, QDS, b * T + t)
    q = tl.load(Q + b * sq_b + t64 * sq_t + h64[:, None] * sq_h + dk[None, :],
                mask=row_ok[:, None] & (dk < DQK)[None, :], other=0.0)
    do = tl.load(DO + b * sdo_b + t64 * sdo_t + h64[:, None] * sdo_h + dv[None, :],
                 mask=row_ok[:, None] & (dv < DV)[None, :], other=0.0)
    row = (b * T + t64) * H + h64
    lse = tl.load(LSE + row, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + row, mask=row_ok, other=0.0)
    k_base = b * sk_b + hkv64 * sk_h
    v_base = b * sv_b + hkv64 * sv_h
    sel_base = ((b * T + t64) * HKV + hkv) * N_SEL
    i_s = tl.arange(0, BS)
    dq_acc = tl.zeros([RP, BLOCK_DK], dtype=tl.float32)
    for i in range(0, N_SEL):   # branch-free, as the forward
        j = tl.load(SEL + sel_base + i)
        s_pos = j * SEL_LEN + i_s
        key_ok = (i_s < SEL_LEN) & (s_pos <= pos) & (s_pos >= ds) & (s_pos < S) & (j >= 0)
        k = _kv_rows(K, KD, k_base, sk_s, b32, hkv, j * SEL_LEN, s_pos, key_ok, dk, DQK, BS, BLOCK_DK, TMA)
        v = _kv_rows(V, VD, v_base, sv_s, b32, hkv, j * SEL_LEN, s_pos, key_ok, dv, DV, BS, BLOCK_DV, TMA)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        p = tl.where(key_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        dsc = p * (dp - delta[:, None])
        dq_acc = tl.dot(dsc.to(k.dtype), k, dq_acc, input_precision=PREC)
    tl.store(DQO + b * sdq_b + t64 * sdq_t + h64[:, None] * sdq_h + dk[None, :],
             (dq_acc * scale).to(DQO.dtype.element_ty), mask=row_ok[:, None] & (dk < DQK)[None, :])


@triton.jit
def _union_blocks(SEL, sel_base, tok_ok, N_SEL, BT: tl.constexpr, NP: tl.constexpr):
    """The selections of BT tokens (sel_base [BT] offsets into SEL) and their union: (sel [BT, NP]
    with -1 padding, the distinct valid blocks compacted to the front of a [BT·NP] vector, their
    number). Order is free: the online softmax does not depend on it."""
    L: tl.constexpr = BT * NP
    slot = tl.arange(0, NP)
    sel = tl.load(SEL + sel_base[:, None] + slot[None, :], mask=tok_ok[:, None] & (slot < N_SEL)[None, :], other=-1)
    u = tl.reshape(sel, [L])
    i = tl.arange(0, L)
    # keep the first occurrence of each valid block: an [L, L] comparison, no sort
    dup = tl.max(((u[:, None] == u[None, :]) & (i[None, :] < i[:, None])).to(tl.int32), 1) > 0
    keep = (u >= 0) & ~dup
    at = tl.cumsum(keep.to(tl.int32), 0) - 1
    compact = tl.sum(tl.where(keep[:, None] & (at[:, None] == i[None, :]), u[:, None], 0), 0)
    return sel, compact, tl.sum(keep.to(tl.int32), 0)


@triton.jit
def _union_rows_hit(sel, j, BT: tl.constexpr, GP: tl.constexpr):
    """[BT·GP] rows (token, head) whose token selected block j."""
    hit = tl.max((sel == j).to(tl.int32), 1)                                 # [BT]
    return tl.reshape(tl.broadcast_to(hit[:, None], [BT, GP]), [BT * GP]) > 0


@triton.jit
def _slc_union_kernel(Q, K, V, KD, VD, DO, LSE, DELTA, SEL, QPOS, QDS, O, DQO,
                      sq_b, sq_t, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, sdo_b, sdo_t, sdo_h,
                      so_b, so_t, so_h, T, S, H, HKV, G, DQK, DV, scale, SEL_LEN, N_SEL,
                      BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, GP: tl.constexpr, BM: tl.constexpr,
                      BS: tl.constexpr, NP: tl.constexpr, DQ: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr):
    """Selected branch over a tile of BT = BM / GP adjacent tokens (rows: token × head of the
    group): one pass over the UNION of their selected blocks, each block's K/V loaded once for all
    of them, rows of tokens that did not select it masked. DQ false: the forward (writes O, LSE);
    DQ: dQ from DO, LSE, DELTA (writes DQO). Fewer K/V bytes per token when adjacent tokens share
    blocks; more masked matmul work when they do not. TMA: the blocks through descriptors, as the
    one-token kernels'."""
    BT: tl.constexpr = BM // GP
    qk_scale = scale * 1.4426950408889634
    m0 = tl.program_id(0) * BT
    bh = tl.program_id(1)
    b32 = bh // HKV
    b = tl.cast(b32, tl.int64)
    hkv = bh % HKV
    hkv64 = tl.cast(hkv, tl.int64)
    t, r, row_ok = _rows(m0, T, G, GP, BM)
    h = hkv * G + r
    t64, h64 = tl.cast(t, tl.int64), tl.cast(h, tl.int64)
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    p_row, ds_row = _load_pos(QPOS, QDS, b * T + t, row_ok, -1)
    q = tl.load(Q + b * sq_b + t64[:, None] * sq_t + h64[:, None] * sq_h + dk[None, :],
                mask=row_ok[:, None] & (dk < DQK)[None, :], other=0.0)
    tt = m0 + tl.arange(0, BT)
    tok_ok = tt < T
    sel, compact, n_u = _union_blocks(SEL, ((b * T + tl.cast(tt, tl.int64)) * HKV + hkv) * N_SEL, tok_ok, N_SEL,
                                      BT, NP)
    k_base = b * sk_b + hkv64 * sk_h
    v_base = b * sv_b + hkv64 * sv_h
    i_s = tl.arange(0, BS)
    iu = tl.arange(0, BT * NP)
    row = (b * T + t64) * H + h64
    if DQ:
        do = tl.load(DO + b * sdo_b + t64[:, None] * sdo_t + h64[:, None] * sdo_h + dv[None, :],
                     mask=row_ok[:, None] & (dv < DV)[None, :], other=0.0)
        lse = tl.load(LSE + row, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + row, mask=row_ok, other=0.0)
        dq_acc = tl.zeros([BM, BLOCK_DK], dtype=tl.float32)
    else:
        acc = tl.zeros([BM, BLOCK_DV], dtype=tl.float32)
        m_i = tl.full([BM], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BM], dtype=tl.float32)
    for u in range(0, n_u):
        j = tl.sum(tl.where(iu == u, compact, 0), 0)
        s_pos = j * SEL_LEN + i_s
        key_ok = (i_s < SEL_LEN) & (s_pos < S)
        vis = _union_rows_hit(sel, j, BT, GP)[:, None] & key_ok[None, :] & \
            (s_pos[None, :] <= p_row[:, None]) & (s_pos[None, :] >= ds_row[:, None])
        k = _kv_rows(K, KD, k_base, sk_s, b32, hkv, j * SEL_LEN, s_pos, key_ok, dk, DQK, BS, BLOCK_DK, TMA)
        v = _kv_rows(V, VD, v_base, sv_s, b32, hkv, j * SEL_LEN, s_pos, key_ok, dv, DV, BS, BLOCK_DV, TMA)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        if DQ:
            p = tl.where(vis, tl.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            dq_acc = tl.dot((p * (dp - delta[:, None])).to(k.dtype), k, dq_acc, input_precision=PREC)
        else:
            s = tl.where(vis, s, float("-inf"))
            acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, s, v, PREC)
    if DQ:
        tl.store(DQO + b * so_b + t64[:, None] * so_t + h64[:, None] * so_h + dk[None, :],
                 (dq_acc * scale).to(DQO.dtype.element_ty), mask=row_ok[:, None] & (dk < DQK)[None, :])
    else:
        seen = l_i > 0.0
        o = acc / tl.where(seen, l_i, 1.0)[:, None]
        tl.store(O + b * so_b + t64[:, None] * so_t + h64[:, None] * so_h + dv[None, :], o.to(O.dtype.element_ty),
                 mask=row_ok[:, None] & (dv < DV)[None, :])
        tl.store(LSE + row, tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("inf")), mask=row_ok)


@triton.jit
def _slc_dkdv_kernel(Q, K, V, DO, LSE, DELTA, QPOS, QDS, W_BLK, W_START, W_LEN, TOK, DKACC, DVACC,
                     sq_b, sq_t, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, sdo_b, sdo_t, sdo_h,
                     T, S, H, HKV, G, NB, DQK, DV, scale, SEL_LEN,
                     BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, GP: tl.constexpr, BQ: tl.constexpr,
                     BS: tl.constexpr, PREC: tl.constexpr):
    """One work item: a KV block and up to CH of the queries that selected it (inverse index).
    K/V rows are the block's keys; the columns are (gathered query, head) pairs: sᵀ = k · qᵀ."""
    BM: tl.constexpr = BQ * GP
    qk_scale = scale * 1.4426950408889634
    w = tl.program_id(0)
    n_q = tl.load(W_LEN + w)
    if n_q > 0:
        blk = tl.load(W_BLK + w)
        start = tl.load(W_START + w)
        j = blk % NB
        bh = blk // NB
        b = tl.cast(bh // HKV, tl.int64)
        hkv = bh % HKV
        hkv64 = tl.cast(hkv, tl.int64)
        i_s = tl.arange(0, BS)
        s_pos = j * SEL_LEN + i_s
        key_ok = (i_s < SEL_LEN) & (s_pos < S)
        s64 = tl.cast(s_pos, tl.int64)
        dk = tl.arange(0, BLOCK_DK)
        dv = tl.arange(0, BLOCK_DV)
        k = tl.load(K + b * sk_b + hkv64 * sk_h + s64[:, None] * sk_s + dk[None, :],
                    mask=key_ok[:, None] & (dk < DQK)[None, :], other=0.0)
        v = tl.load(V + b * sv_b + hkv64 * sv_h + s64[:, None] * sv_s + dv[None, :],
                    mask=key_ok[:, None] & (dv < DV)[None, :], other=0.0)
        dk_acc = tl.zeros([BS, BLOCK_DK], dtype=tl.float32)
        dv_acc = tl.zeros([BS, BLOCK_DV], dtype=tl.float32)
        col = tl.arange(0, BM)
        for i0 in range(0, n_q, BQ):
            ii = i0 + col // GP
            r = col % GP
            ok = (ii < n_q) & (r < G)
            t = tl.load(TOK + start + ii, mask=ok, other=0)
            t64 = tl.cast(t, tl.int64)
            h64 = tl.cast(hkv * G + r, tl.int64)
            pos, ds = _load_pos(QPOS, QDS, b * T + t64, ok, -1)
            q_t = tl.load(Q + b * sq_b + t64[None, :] * sq_t + h64[None, :] * sq_h + dk[:, None],
                          mask=ok[None, :] & (dk < DQK)[:, None], other=0.0)             # [BLOCK_DK, BM]
            row = (b * T + t64) * H + h64
            lse = tl.load(LSE + row, mask=ok, other=float("inf"))
            s_t = tl.dot(k, q_t, input_precision=PREC) * qk_scale
            vis_t = key_ok[:, None] & (s_pos[:, None] <= pos[None, :]) & (s_pos[:, None] >= ds[None, :]) & ok[None, :]
            p_t = tl.where(vis_t, tl.exp2(s_t - lse[None, :]), 0.0)
            do = tl.load(DO + b * sdo_b + t64[:, None] * sdo_t + h64[:, None] * sdo_h + dv[None, :],
                         mask=ok[:, None] & (dv < DV)[None, :], other=0.0)
            dv_acc = tl.dot(p_t.to(do.dtype), do, dv_acc, input_precision=PREC)
            delta = tl.load(DELTA + row, mask=ok, other=0.0)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
            ds_t = p_t * (dp_t - delta[None, :])
            dk_acc = tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), dk_acc, input_precision=PREC)
        # fp32 accumulators, contiguous [B, S, Hkv, D]
        acc_row = ((b * S + s64) * HKV + hkv64)
        tl.atomic_add(DKACC + acc_row[:, None] * DQK + dk[None, :], dk_acc * scale,
                      mask=key_ok[:, None] & (dk < DQK)[None, :], sem="relaxed")
        tl.atomic_add(DVACC + acc_row[:, None] * DV + dv[None, :], dv_acc,
                      mask=key_ok[:, None] & (dv < DV)[None, :], sem="relaxed")


# ---- host side ----------------------------------------------------------------------------------
def _check_triton(name: str, q: torch.Tensor, v: torch.Tensor, H: int, Hkv: int) -> None:
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        raise ValueError(f"{name} (triton): head dims must be <= {MAX_HEAD_DIM}, got D={q.shape[-1]}, Dv={v.shape[-1]}")
    check_group(H, Hkv)
    if not _INTERPRET and not q.is_cuda:
        raise ValueError(f"{name} (triton): the kernels need CUDA tensors (use backend='torch' on CPU)")


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernels take any strides but a unit stride in the head dim (a copy otherwise)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _dims(q, v) -> dict:
    return dict(DQK=q.shape[-1], DV=v.shape[-1], BLOCK_DK=max(16, triton.next_power_of_2(q.shape[-1])),
                BLOCK_DV=max(16, triton.next_power_of_2(v.shape[-1])), PREC=_prec(q.dtype))


def query_positions(q: torch.Tensor, q_pos, doc_ids, S: int | None):
    """(q_pos [B, T] contiguous, of its integer dtype; doc_start(q_pos) int32 [B, T], or None
    without doc_ids): the kernels cast at their loads (`_load_pos`), so a decoding step's
    contiguous positions reach them with no launch."""
    B, T = q.shape[:2]
    qp = (default_q_pos(B, T, S, q.device) if q_pos is None else q_pos).contiguous()
    if doc_ids is None:
        return qp, None
    return qp, query_doc_start(qp, doc_ids).to(torch.int32).contiguous()


@triton.jit
def _max_op(a, b):
    return tl.maximum(a, b)


@triton.jit
def _min_op(a, b):
    return tl.minimum(a, b)


@triton.jit
def _prefix_max_suffix_min_kernel(A, B, PMAX, SMIN, N, BLOCK: tl.constexpr, CARRY: tl.constexpr):
    """Row b, chunk c of BLOCK entries: PMAX = running max of A from the left, SMIN = running min of
    B from the right (int32 [rows, N], contiguous; A, B of any integer dtype, clamped to POS_MAX;
    B None: all zeros). Chunks are independent programs: each reduces the entries before it (for
    the max) and after it (for the min) in CARRY-wide loads, then scans its own, so no program
    waits on another (one program carrying chunk after chunk took 12 µs at N 4096 on an H100,
    a quarter of a 64k decoding step)."""
    row = tl.cast(tl.program_id(0), tl.int64) * N
    c0 = tl.program_id(1) * BLOCK
    w = tl.arange(0, CARRY)
    before = tl.full([CARRY], -2147483648, tl.int32)
    after = tl.full([CARRY], 2147483647, tl.int32)
    for s0 in range(0, N, CARRY):
        idx = s0 + w
        ok = idx < c0
        a = tl.minimum(tl.load(A + row + idx, mask=ok, other=-2147483648), 2147483647).to(tl.int32)
        before = tl.maximum(before, a)
        if B is not None:
            ok = (idx >= c0 + BLOCK) & (idx < N)
            x = tl.minimum(tl.load(B + row + idx, mask=ok, other=2147483647), 2147483647).to(tl.int32)
            after = tl.minimum(after, x)
    i = c0 + tl.arange(0, BLOCK)
    ok = i < N
    a = tl.minimum(tl.load(A + row + i, mask=ok, other=-2147483648), 2147483647).to(tl.int32)
    tl.store(PMAX + row + i, tl.maximum(tl.associative_scan(a, 0, _max_op), tl.max(before, 0)), mask=ok)
    if B is None:
        tl.store(SMIN + row + i, i * 0, mask=ok)
    else:
        x = tl.minimum(tl.load(B + row + i, mask=ok, other=2147483647), 2147483647).to(tl.int32)
        tl.store(SMIN + row + i, tl.minimum(tl.associative_scan(x, 0, _min_op, reverse=True), tl.min(after, 0)),
                 mask=ok)


def _prefix_max_suffix_min(a: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(running max of a from the left, running min of b from the right) along dim 1, int32; a, b
    integer [rows, N] contiguous, b None for zeros (one launch, `_prefix_max_suffix_min_kernel`)."""
    rows, n = a.shape
    pmax, smin = (torch.empty(rows, n, dtype=torch.int32, device=a.device) for _ in range(2))
    block = 16 if _INTERPRET else min(1024, max(16, triton.next_power_of_2(n)))
    carry = 16 if _INTERPRET else min(4096, max(16, triton.next_power_of_2(n)))
    _prefix_max_suffix_min_kernel[(rows, triton.cdiv(n, block))](a, b, pmax, smin, n, BLOCK=block, CARRY=carry,
                                                                 num_warps=1 if _INTERPRET else 4)
    return pmax, smin


def compressed_forward(q, k_cmp, v_cmp, end, qpos, qds, scale, cmp_len, select_len, n_select, n_init, n_local,
                       pdl: str = "off", select: bool = True):
    """(o [B, T, H, Dv], lse [B, T, H] base 2, sel_idx [B, T, Hkv, n] int32 or None). end, qpos: any
    integer dtype; qds int32 or None (`query_positions`).
    Up to DECODE_MAX_T queries take the split path (decoding, its launches under `pdl`:
    kernels/pdl.py), more the fused kernel."""
    if q.shape[1] <= DECODE_MAX_T:
        return compressed_forward_split(q, k_cmp, v_cmp, end, qpos, qds, scale, cmp_len, select_len, n_select,
                                        n_init, n_local, select, pdl)
    B, T, H, _ = q.shape
    N, Hkv = k_cmp.shape[1], k_cmp.shape[2]
    G = H // Hkv
    GP = triton.next_power_of_2(G)
    cfg = tile_config("cmp_fwd", q.dtype, G)
    o = torch.empty(B, T, H, v_cmp.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(B, T, H, dtype=torch.float32, device=q.device)
    sel = torch.empty(B, T, Hkv, n_select, dtype=torch.int32, device=q.device)
    NP = triton.next_power_of_2(n_select)
    cfg["BJ"] = max(cfg["BJ"], NP)   # the running top list is one scoring tile wide
    fused = cfg.pop("FUSED_SELECT")
    dims = _dims(q, v_cmp)
    kd, vd = _cmp_descriptors(cfg, k_cmp, v_cmp, dims)
    grid = (triton.cdiv(T, cfg["BM"] // GP), B * Hkv)
    cmax, cmin = _prefix_max_suffix_min(end, end)
    _cmp_fwd_kernel[grid](q, k_cmp, v_cmp, kd, vd, end, cmax, cmin, qpos, qds, o, lse, sel,
                          *q.stride()[:3], *k_cmp.stride()[:3], *v_cmp.stride()[:3], *o.stride()[:3],
                          T, N, H, Hkv, G, scale=scale, CMP_LEN=cmp_len, SEL_LEN=select_len, N_SELECT=n_select,
                          N_INIT=n_init, N_LOCAL=n_local, GP=GP,
                          NP=NP, SELECT=select and fused, TMA=kd is not None, **dims, **cfg)
    if select and not fused:   # the scoring pass as its own launch (its own tiles and warps)
        cfg = tile_config("cmp_sel", q.dtype, G)
        cfg["BJ"] = max(cfg["BJ"], NP)
        kd, _ = _cmp_descriptors(cfg, k_cmp, v_cmp, dims)
        dims = {k_: v_ for k_, v_ in dims.items() if k_ not in ("BLOCK_DV", "DV")}
        _cmp_split_select_kernel[(triton.cdiv(T, cfg["BM"] // GP), B * Hkv, 1)](
            q, k_cmp, kd, end, cmax, cmin, qpos, qds, lse, lse, sel, sel, *q.stride()[:3], *k_cmp.stride()[:3],
            T, N, H, Hkv, G, scale=scale, CMP_LEN=cmp_len, SEL_LEN=select_len, N_SELECT=n_select, N_INIT=n_init,
            N_LOCAL=n_local, NSPLIT=1, GP=GP, NP=NP, FINAL=True, TMA=kd is not None, SCAN=0, PDL=False, **dims,
            **cfg)
    return o, lse, (sel if select else None)


def _split_config(q, T: int, G: int, N: int) -> dict:
    """Decoding launch: the T queries of a row in one tile when they fit (BM = T·GP rows, at least
    16), NSPLIT programs per (tile, KV head) over the compressed tokens and over the blocks."""
    cfg = tile_config("cmp_split", q.dtype, G)
    GP = triton.next_power_of_2(G)
    cfg["BM"] = max(16, GP, min(cfg.pop("MAX_BM"), triton.next_power_of_2(T * GP)))
    cfg["NSPLIT"] = max(1, min(MAX_SPLITS, triton.cdiv(N, cfg.pop("SPLIT_TOKENS"))))
    return cfg


def _select_splits(ns: int, sel_tiles: int, N: int, cmp_len: int, select_len: int, bj: int) -> int:
    """Splits of the decoding selection pass. Its programs are serial chains of scoring tiles
    (~11 µs each on the H200 by a fit of the compressed forward's 8k and 64k timings,
    reports/nsa.md), so each split walks at most sel_tiles tiles of bj blocks: the row's blocks are bounded without a host
    sync by N·l / l' (N compressed slots of stride <= l; 2x the blocks at the defaults l 32, d 16).
    At 64k that is 64 splits of 16 blocks instead of 16 of 64. sel_tiles 0: the attention's ns.
    Any count is exact (disjoint block ranges, merged in the key order)."""
    if sel_tiles <= 0:
        return ns
    return max(ns, min(MAX_SPLITS, triton.cdiv(triton.cdiv(N * cmp_len, select_len), bj * sel_tiles)))


@triton.jit
def _merge_attend_kernel(M_PART, L_PART, ACC_PART, O, LSE, R, NS, DV, NSP: tl.constexpr, BLOCK_DV: tl.constexpr,
                         PDL: tl.constexpr):
    """(o, lse) of one row (b, t, h) from the splits' partial online-softmax states
    [NS, R(, DV)] (R = B·T·H rows): one launch instead of a dozen small torch ops per step."""
    wait_for_inputs(PDL)  # under PDL (decoding): every input written, before any read or write
    row = tl.cast(tl.program_id(0), tl.int64)
    sp = tl.arange(0, NSP)
    ok = sp < NS
    dv = tl.arange(0, BLOCK_DV)
    at = tl.cast(sp, tl.int64) * R + row
    m = tl.load(M_PART + at, mask=ok, other=float("-inf"))
    l = tl.load(L_PART + at, mask=ok, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.exp2(m - m_max)
    total = tl.sum(w * l, 0)
    acc = tl.load(ACC_PART + at[:, None] * DV + dv[None, :], mask=ok[:, None] & (dv < DV)[None, :], other=0.0)
    seen = total > 0.0
    o = tl.sum(w[:, None] * acc, 0) / tl.where(seen, total, 1.0)
    tl.store(O + row * DV + dv, o.to(O.dtype.element_ty), mask=dv < DV)
    tl.store(LSE + row, tl.where(seen, m_max + tl.log2(tl.where(seen, total, 1.0)), float("inf")))


@triton.jit
def _merge_select_kernel(S_PART, I_PART, SEL, R, NS, N_SELECT, NSP: tl.constexpr, NP: tl.constexpr,
                         PRUNE: tl.constexpr, PDL: tl.constexpr):
    """sel_idx of one row (b, t, hkv) from the splits' partial top-n lists [NS, R, NP] (disjoint
    blocks, each in descending key order): the top n by (score, then later block) as
    `_block_key`s, listed in descending block index, -1 for empty slots: one sort of the NS·NP
    candidates (1,024 keys at 64k). PRUNE (NSP > NP): only the NP splits with the largest first
    keys can hold a top-NP key (a key of any other split has NP splits' first keys above it), so
    their lists alone are sorted: NP·NP keys (256 at n 16). (A tree of pairwise bitonic merges of
    the sorted lists was slower on an H100: reports/nsa.md "Fifth run".)"""
    wait_for_inputs(PDL)  # under PDL (decoding): every input written, before any read or write
    row = tl.cast(tl.program_id(0), tl.int64)
    sp = tl.arange(0, NSP)
    slot = tl.arange(0, NP)
    if PRUNE:
        at0 = (tl.cast(sp, tl.int64) * R + row) * NP                            # each list's first key
        idx0 = tl.load(I_PART + at0, mask=sp < NS, other=-1)
        first = _block_key(tl.load(S_PART + at0, mask=sp < NS, other=float("-inf")), idx0, idx0 >= 0)
        # each split's rank by its first key, equal keys (empty lists) by split index: a permutation
        above = (first[None, :] > first[:, None]) | ((first[None, :] == first[:, None]) & (sp[None, :] < sp[:, None]))
        rank = tl.sum(above.to(tl.int32), 1)
        split = tl.sum(tl.where(rank[None, :] == slot[:, None], sp[None, :], 0), 1)   # [NP]: the split of rank r
    else:
        split = sp
    at = (tl.cast(split, tl.int64)[:, None] * R + row) * NP + slot[None, :]
    ok = (split < NS)[:, None] & (slot < NP)[None, :]
    score = tl.load(S_PART + at, mask=ok, other=float("-inf"))
    idx = tl.load(I_PART + at, mask=ok, other=-1)
    key = _block_key(score, idx, idx >= 0)                                       # [L, NP]
    L: tl.constexpr = NP if PRUNE else NSP
    key = tl.reshape(tl.sort(tl.reshape(key, [L * NP]), dim=0, descending=True), [L, NP])
    top = tl.sum(tl.where((tl.arange(0, L) == 0)[:, None], key, 0), 0)          # the first NP keys
    live = slot < N_SELECT
    best = tl.sort(tl.where(live, _key_block(top), -2), dim=0, descending=True)
    tl.store(SEL + row * N_SELECT + slot, best, mask=live)


def compressed_forward_split(q, k_cmp, v_cmp, end, qpos, qds, scale, cmp_len, select_len, n_select, n_init,
                             n_local, select: bool = True, pdl: str = "off"):
    """compressed_forward for a few queries (decoding): the compressed tokens and the selectable
    blocks are split over NSPLIT programs per (query tile, KV head), then merged by one program
    per row (`_merge_attend_kernel`, `_merge_select_kernel`). Fixed shapes, no host synchronisation.
    pdl: the four launches with programmatic dependent launch (kernels/pdl.py)."""
    P, launch = launch_options(pdl, q.device, "nsa_compressed")
    B, T, H, _ = q.shape
    N, Hkv = k_cmp.shape[1], k_cmp.shape[2]
    G = H // Hkv
    GP = triton.next_power_of_2(G)
    cfg = _split_config(q, T, G, N)
    NS = cfg.pop("NSPLIT")
    sel_tiles = cfg.pop("SEL_TILES")
    merge_warps = cfg.pop("MERGE_WARPS")
    merge_prune = cfg.pop("MERGE_PRUNE")
    BJ = cfg.pop("BJ")
    merge = {o: cfg.pop(o) for o in ("SORT_MERGE", "RANK_MERGE", "SKIP_MERGE", "JV")}
    grid = (triton.cdiv(T, cfg["BM"] // GP), B * Hkv, NS)
    if cfg["SCAN"]:   # the ranges from passes over the ends: no prefix max / suffix min arrays
        cfg["SCAN"] = min(cfg["SCAN"], max(16, triton.next_power_of_2(N)))
        cmax = cmin = end
    else:
        cmax, cmin = _prefix_max_suffix_min(end, end)
    m = torch.empty(NS, B, T, H, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty(NS, B, T, H, v_cmp.shape[-1], dtype=torch.float32, device=q.device)
    o = torch.empty(B, T, H, v_cmp.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(B, T, H, dtype=torch.float32, device=q.device)
    dims = _dims(q, v_cmp)
    _cmp_split_attend_kernel[grid](q, k_cmp, v_cmp, end, cmax, cmin, qpos, qds, m, l, acc,
                                   *q.stride()[:3], *k_cmp.stride()[:3], *v_cmp.stride()[:3],
                                   T, N, H, Hkv, G, scale=scale, NSPLIT=NS, GP=GP, PDL=P, **dims, **cfg, **launch)
    _merge_attend_kernel[(B * T * H,)](m, l, acc, o, lse, B * T * H, NS, v_cmp.shape[-1],
                                       NSP=triton.next_power_of_2(NS), BLOCK_DV=dims["BLOCK_DV"], PDL=P,
                                       num_warps=4 if not _INTERPRET else 1, **launch)
    if not select:
        return o, lse, None
    NP = triton.next_power_of_2(n_select)
    BJ = max(BJ, NP)
    NS = _select_splits(NS, sel_tiles, N, cmp_len, select_len, BJ)
    NSP = triton.next_power_of_2(NS)
    grid = (grid[0], grid[1], NS)
    s_part = torch.empty(NS, B, T, Hkv, NP, dtype=torch.float32, device=q.device)
    i_part = torch.empty(NS, B, T, Hkv, NP, dtype=torch.int32, device=q.device)
    del dims["BLOCK_DV"], dims["DV"]
    _cmp_split_select_kernel[grid](q, k_cmp, k_cmp, end, cmax, cmin, qpos, qds, lse, s_part, i_part, s_part,
                                   *q.stride()[:3], *k_cmp.stride()[:3], T, N, H, Hkv, G, scale=scale,
                                   CMP_LEN=cmp_len, SEL_LEN=select_len, N_SELECT=n_select, N_INIT=n_init,
                                   N_LOCAL=n_local, NSPLIT=NS, GP=GP, BJ=BJ, NP=NP, FINAL=False, TMA=False,
                                   PDL=P, **merge, **dims, **cfg, **launch)
    sel = torch.empty(B, T, Hkv, n_select, dtype=torch.int32, device=q.device)
    prune = merge_prune and NSP > NP
    _merge_select_kernel[(B * T * Hkv,)](s_part, i_part, sel, B * T * Hkv, NS, n_select, NSP=NSP, NP=NP,
                                         PRUNE=prune, PDL=P, num_warps=merge_warps, **launch)
    return o, lse, sel


def compressed_backward(q, k_cmp, v_cmp, o, lse, do, end, qpos, qds, scale):
    B, T, H, _ = q.shape
    N, Hkv = k_cmp.shape[1], k_cmp.shape[2]
    G = H // Hkv
    GP = triton.next_power_of_2(G)
    delta = backward_delta(o, do)
    dims = _dims(q, v_cmp)
    cfg = tile_config("cmp_dkdv", q.dtype, G)
    fuse_dq = cfg.pop("FUSE_DQ")
    if fuse_dq:   # dQ summed by the dK/dV kernel into an fp32 buffer [B, T, H, D]
        dq = torch.zeros(B, T, H, q.shape[-1], dtype=torch.float32, device=q.device)
    else:
        dq = torch.empty_like(q)
        cmax, cmin = _prefix_max_suffix_min(end, end)
        dq_cfg = tile_config("cmp_dq", q.dtype, G)
        kd, vd = _cmp_descriptors(dq_cfg, k_cmp, v_cmp, dims)
        _cmp_dq_kernel[(triton.cdiv(T, dq_cfg["BM"] // GP), B * Hkv)](
            q, k_cmp, v_cmp, kd, vd, do, lse, delta, end, cmax, cmin, qpos, qds, dq,
            *q.stride()[:3], *k_cmp.stride()[:3], *v_cmp.stride()[:3], *do.stride()[:3], *dq.stride()[:3],
            T, N, H, Hkv, G, scale=scale, GP=GP, TMA=kd is not None, **dims, **dq_cfg)
    n_chunks, q_chunk = _query_chunks(T, cfg.pop("Q_CHUNK"), cfg.pop("MAX_CHUNKS"), cfg["BM"] // GP)
    atomic = n_chunks > 1
    # several query chunks per tile: fp32 buffers summed by atomic add, cast once at the end
    buf = dict(dtype=torch.float32) if atomic else dict(dtype=k_cmp.dtype)
    dkc = (torch.zeros if atomic else torch.empty)(k_cmp.shape, device=q.device, **buf)
    dvc = (torch.zeros if atomic else torch.empty)(v_cmp.shape, device=q.device, **buf)
    _cmp_dkdv_kernel[(triton.cdiv(N, cfg["BN"]), B * Hkv, n_chunks)](
        q, k_cmp, v_cmp, do, lse, delta, end, qpos, qds, *_prefix_max_suffix_min(qpos, qds), dkc, dvc, dq,
        *q.stride()[:3], *k_cmp.stride()[:3], *v_cmp.stride()[:3], *do.stride()[:3], *dkc.stride()[:3],
        *dvc.stride()[:3], T, N, H, Hkv, G, scale=scale, Q_CHUNK=q_chunk, GP=GP, ATOMIC=atomic, FUSE_DQ=fuse_dq,
        **dims, **cfg)
    if atomic:
        dkc, dvc = dkc.to(k_cmp.dtype), dvc.to(v_cmp.dtype)
    return (dq.to(q.dtype) if fuse_dq else dq), dkc, dvc


def _cmp_descriptors(cfg: dict, k_cmp, v_cmp, dims: dict):
    """(k, v) descriptors of one KV head's [BN, head dim] tile of compressed tokens where the tile
    option TMA (taken out of cfg) is on and the copy engine can take k_cmp and v_cmp, else
    (None, None): one form per launch."""
    return _kv_pair_descriptors(k_cmp, v_cmp, cfg["BN"], dims) if cfg.pop("TMA") else (None, None)


def _query_chunks(T: int, q_chunk: int, max_chunks: int, bt: int) -> tuple[int, int]:
    """(number of chunks, queries per chunk, a multiple of the tile's bt queries) of the dK/dV
    kernel's query axis: chunks of at least q_chunk queries, at most max_chunks of them (more
    chunks: more programs for few compressed tiles, but more atomic adds)."""
    n = max(1, min(max_chunks, triton.cdiv(T, q_chunk)))
    size = triton.cdiv(triton.cdiv(T, n), bt) * bt
    return triton.cdiv(T, size), size


def _slc_meta(q, k, v, select_len):
    H, Hkv = q.shape[2], k.shape[2]
    G = H // Hkv
    return dict(T=q.shape[1], S=k.shape[1], H=H, HKV=Hkv, G=G, RP=max(16, triton.next_power_of_2(G)),
                BS=max(16, triton.next_power_of_2(select_len)), SEL_LEN=select_len, **_dims(q, v))


def selected_forward(q, k, v, sel, qpos, qds, scale, select_len, pdl: str = "off"):
    """(o [B, T, H, Dv], lse [B, T, H] base 2); sel contiguous int32. Decoding (T <= DECODE_MAX_T):
    the slots are split over programs (`_slc_splits`) and merged by `_merge_attend_kernel`, both
    launched under `pdl` (kernels/pdl.py)."""
    B, T, H, _ = q.shape
    o = torch.empty(B, T, H, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(B, T, H, dtype=torch.float32, device=q.device)
    meta = _slc_meta(q, k, v, select_len)
    n_sel = sel.shape[-1]
    decoding = T <= DECODE_MAX_T
    cfg = tile_config("slc_split" if decoding else "slc_fwd", q.dtype, meta["G"])
    kd, vd = _slc_descriptors(cfg, k, v, meta)
    if not decoding and cfg["BT"] > 1:
        _slc_union(q, k, v, kd, vd, None, lse, None, sel, qpos, qds, o, scale, meta, cfg)
        return o, lse
    ns, per = _slc_splits(n_sel, B * T * k.shape[2], cfg.pop("BLOCKS", 0), cfg.pop("PROGRAMS", 0))
    cfg.pop("BT", None)
    P, launch = launch_options(pdl, q.device, "nsa_selected") if decoding else (False, {})
    if ns > 1:
        m_part = torch.empty(ns, B, T, H, dtype=torch.float32, device=q.device)
        part = (m_part, torch.empty_like(m_part), torch.empty(*m_part.shape, v.shape[-1], dtype=torch.float32,
                                                                device=q.device))
    else:
        part = (lse, lse, lse)
    _slc_fwd_kernel[(T, B * k.shape[2], ns)](q, k, v, kd, vd, sel, qpos, qds, o, lse, *part, *q.stride()[:3],
                                             *k.stride()[:3], *v.stride()[:3], *o.stride()[:3], scale=scale,
                                             N_SEL=n_sel, PER_SPLIT=per, TMA=kd is not None, SPLIT=ns > 1,
                                             PDL=P, **meta, **cfg, **launch)
    if ns > 1:
        R = B * T * H
        _merge_attend_kernel[(R,)](*part, o, lse, R, ns, v.shape[-1], NSP=triton.next_power_of_2(ns),
                                   BLOCK_DV=meta["BLOCK_DV"], PDL=P, num_warps=4 if not _INTERPRET else 1, **launch)
    return o, lse


def _slc_splits(n_sel: int, programs: int, blocks: int, target: int) -> tuple[int, int]:
    """(splits, slots per split) of the selected forward: a decoding step has B·T·Hkv programs
    (4 at B 1 with 4 KV heads), each a serial chain of n_sel gathered blocks; splitting the slots
    brings the grid to about `target` programs of at least `blocks` slots each. blocks 0: one split."""
    if blocks <= 0:
        return 1, n_sel
    ns = min(triton.cdiv(n_sel, blocks), max(1, triton.cdiv(target, programs)))
    per = triton.cdiv(n_sel, ns)
    return triton.cdiv(n_sel, per), per


def _slc_descriptors(cfg: dict, k, v, meta: dict):
    """(k, v) descriptors of one selected block [BS, head dim] where the tile option TMA (taken out
    of cfg) is on and the copy engine can take k and v, else (None, None)."""
    if not cfg.pop("TMA"):
        return None, None
    return _kv_pair_descriptors(k, v, meta["BS"], meta)


def _slc_union(q, k, v, kd, vd, do, lse, delta, sel, qpos, qds, out, scale, meta, cfg):
    """`_slc_union_kernel` launch: the forward (do None; out = o, lse written) or dQ (out = dq)."""
    B, T = q.shape[:2]
    GP = triton.next_power_of_2(meta["G"])
    BM = max(16, cfg.pop("BT") * GP)
    sel_len = meta["SEL_LEN"]
    meta = {k_: v_ for k_, v_ in meta.items() if k_ not in ("RP", "T", "S", "H", "HKV", "G", "SEL_LEN")}
    dq = do is not None
    _slc_union_kernel[(triton.cdiv(T, BM // GP), B * k.shape[2])](
        q, k, v, kd, vd, do if dq else q, lse, delta if dq else lse, sel, qpos, qds, out, out,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *(do if dq else q).stride()[:3], *out.stride()[:3],
        T, k.shape[1], q.shape[2], k.shape[2], q.shape[2] // k.shape[2], scale=scale, SEL_LEN=sel_len,
        N_SEL=sel.shape[-1], GP=GP, BM=BM, NP=triton.next_power_of_2(sel.shape[-1]), DQ=dq, TMA=kd is not None,
        **meta, **cfg)


def inverse_index(sel: torch.Tensor, S: int, select_len: int, chunk: int):
    """The queries that selected each KV block, cut into work items, on device and without a host
    sync (fixed shapes). sel [B, T, Hkv, n] -> (w_blk, w_start, w_len) [W] int32 and tok [E] int32:
    work item w covers tok[w_start : w_start + w_len], the query indices (in [0, T)) that selected
    block key w_blk = (b·Hkv + hkv)·NB + j; w_len = 0 marks a spare item. W = ceil(E / chunk) + B·Hkv·NB."""
    B, T, Hkv, n = sel.shape
    NB = triton.cdiv(S, select_len)
    NBLK = B * Hkv * NB
    dev = sel.device
    j = sel.long()
    valid = (j >= 0) & (j < NB)
    bh = (torch.arange(B, device=dev)[:, None, None, None] * Hkv + torch.arange(Hkv, device=dev)[None, None, :, None])
    key = torch.where(valid, bh * NB + j, NBLK).reshape(-1)
    order = torch.argsort(key, stable=True)
    tok = ((order // (Hkv * n)) % T).to(torch.int32)
    # a scatter-add, not torch.bincount: on CUDA bincount reads the key's maximum back to the host
    counts = torch.zeros(NBLK + 1, dtype=torch.long, device=dev).scatter_add_(0, key, torch.ones_like(key))[:NBLK]
    starts = torch.cumsum(counts, 0) - counts
    n_chunks = (counts + chunk - 1) // chunk
    chunk_end = torch.cumsum(n_chunks, 0)
    W = triton.cdiv(key.numel(), chunk) + NBLK
    w = torch.arange(W, device=dev)
    blk = torch.searchsorted(chunk_end, w, right=True)
    spare = blk >= NBLK
    blk = blk.clamp(max=NBLK - 1)
    k_in = w - (chunk_end[blk] - n_chunks[blk])
    w_start = starts[blk] + k_in * chunk
    w_len = torch.where(spare, 0, (counts[blk] - k_in * chunk).clamp(0, chunk))
    return blk.to(torch.int32), w_start.to(torch.int32), w_len.to(torch.int32), tok


def selected_backward(q, k, v, o, lse, do, sel, qpos, qds, scale, select_len):
    B, T, H, _ = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    meta = _slc_meta(q, k, v, select_len)
    delta = backward_delta(o, do)
    dq = torch.empty_like(q)
    cfg = tile_config("slc_dq", q.dtype, meta["G"])
    kd, vd = _slc_descriptors(cfg, k, v, meta)
    if cfg["BT"] > 1:
        _slc_union(q, k, v, kd, vd, do, lse, delta, sel, qpos, qds, dq, scale, meta, cfg)
    else:
        del cfg["BT"]
        _slc_dq_kernel[(T, B * Hkv)](q, k, v, kd, vd, do, lse, delta, sel, qpos, qds, dq, *q.stride()[:3],
                                     *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dq.stride()[:3],
                                     scale=scale, N_SEL=sel.shape[-1], TMA=kd is not None, **meta, **cfg)
    cfg = tile_config("slc_dkdv", q.dtype, meta["G"])
    w_blk, w_start, w_len, tok = inverse_index(sel, S, select_len, cfg.pop("CH"))
    GP = triton.next_power_of_2(meta["G"])
    BQ = max(1, cfg.pop("ROWS") // GP)
    dk_acc = torch.zeros(B, S, Hkv, q.shape[-1], dtype=torch.float32, device=q.device)
    dv_acc = torch.zeros(B, S, Hkv, v.shape[-1], dtype=torch.float32, device=q.device)
    del meta["RP"]
    _slc_dkdv_kernel[(w_blk.shape[0],)](q, k, v, do, lse, delta, qpos, qds, w_blk, w_start, w_len, tok, dk_acc, dv_acc,
                                        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
                                        NB=triton.cdiv(S, select_len), scale=scale, GP=GP, BQ=BQ, **meta, **cfg)
    return dq, dk_acc.to(k.dtype), dv_acc.to(v.dtype)


# ---- autograd and entry points ------------------------------------------------------------------
# Custom ops (as kernels/attention): torch.compile treats the kernels as opaque calls with known
# output shapes instead of tracing into the launchers; autograd is registered on the forward op.
@torch.library.custom_op("deepwish::nsa_cmp_fwd", mutates_args=())
def _cmp_fwd_op(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, end: torch.Tensor, qpos: torch.Tensor,
                qds: torch.Tensor | None, scale: float, cmp_len: int, select_len: int, n_select: int, n_init: int,
                n_local: int, pdl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return compressed_forward(q, k_cmp, v_cmp, end, qpos, qds, scale, cmp_len, select_len, n_select, n_init, n_local,
                              pdl)


@_cmp_fwd_op.register_fake
def _(q, k_cmp, v_cmp, end, qpos, qds, scale, cmp_len, select_len, n_select, n_init, n_local, pdl):
    B, T, H, _ = q.shape
    return (q.new_empty(B, T, H, v_cmp.shape[-1]), q.new_empty(B, T, H, dtype=torch.float32),
            q.new_empty(B, T, k_cmp.shape[2], n_select, dtype=torch.int32))


@torch.library.custom_op("deepwish::nsa_cmp_bwd", mutates_args=())
def _cmp_bwd_op(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                do: torch.Tensor, end: torch.Tensor, qpos: torch.Tensor, qds: torch.Tensor | None,
                scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return compressed_backward(q, k_cmp, v_cmp, o, lse, do, end, qpos, qds, scale)


@_cmp_bwd_op.register_fake
def _(q, k_cmp, v_cmp, o, lse, do, end, qpos, qds, scale):
    return torch.empty_like(q), torch.empty_like(k_cmp), torch.empty_like(v_cmp)


def _cmp_setup(ctx, inputs, output):
    q, k_cmp, v_cmp, end, qpos, qds, scale = inputs[:7]
    o, lse, _ = output
    ctx.save_for_backward(q, k_cmp, v_cmp, o, lse, end, qpos, qds)
    ctx.scale = scale


def _cmp_backward(ctx, do, _dlse, _dsel):
    q, k_cmp, v_cmp, o, lse, end, qpos, qds = ctx.saved_tensors
    dq, dkc, dvc = _cmp_bwd_op(q, k_cmp, v_cmp, o, lse, do.contiguous(), end, qpos, qds, ctx.scale)
    return dq, dkc, dvc, *([None] * 10)


_cmp_fwd_op.register_autograd(_cmp_backward, setup_context=_cmp_setup)


@torch.library.custom_op("deepwish::nsa_slc_fwd", mutates_args=())
def _slc_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sel: torch.Tensor, qpos: torch.Tensor,
                qds: torch.Tensor | None, scale: float, select_len: int, pdl: str) -> tuple[torch.Tensor, torch.Tensor]:
    return selected_forward(q, k, v, sel, qpos, qds, scale, select_len, pdl)


@_slc_fwd_op.register_fake
def _(q, k, v, sel, qpos, qds, scale, select_len, pdl):
    B, T, H, _ = q.shape
    return q.new_empty(B, T, H, v.shape[-1]), q.new_empty(B, T, H, dtype=torch.float32)


@torch.library.custom_op("deepwish::nsa_slc_bwd", mutates_args=())
def _slc_bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                do: torch.Tensor, sel: torch.Tensor, qpos: torch.Tensor, qds: torch.Tensor | None, scale: float,
                select_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return selected_backward(q, k, v, o, lse, do, sel, qpos, qds, scale, select_len)


@_slc_bwd_op.register_fake
def _(q, k, v, o, lse, do, sel, qpos, qds, scale, select_len):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _slc_setup(ctx, inputs, output):
    q, k, v, sel, qpos, qds, scale, select_len, _pdl = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, sel, qpos, qds)
    ctx.opts = (scale, select_len)


def _slc_backward(ctx, do, _dlse):
    q, k, v, o, lse, sel, qpos, qds = ctx.saved_tensors
    dq, dk, dv = _slc_bwd_op(q, k, v, o, lse, do.contiguous(), sel, qpos, qds, *ctx.opts)
    return dq, dk, dv, *([None] * 6)


_slc_fwd_op.register_autograd(_slc_backward, setup_context=_slc_setup)


def nsa_compressed(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, cmp_end: torch.Tensor, *,
                   q_pos: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None, cmp_len: int,
                   select_len: int = 64, n_select: int = 16, n_init: int = 1, n_local: int = 2,
                   scale: float | None = None, pdl: bool | str = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(o_cmp [B, T, H, Dv], sel_idx [B, T, Hkv, n_select] int32), as reference.nsa_compressed.
    No host synchronisation (graph-capturable at fixed shapes); differentiable in q, k_cmp, v_cmp.
    pdl: the decoding launches (T <= DECODE_MAX_T) with programmatic dependent launch (kernels/pdl.py)."""
    check_compressed(q, k_cmp, v_cmp, cmp_end, q_pos, doc_ids, cmp_len, select_len, n_select, n_init, n_local)
    _check_triton("nsa_compressed", q, v_cmp, q.shape[2], k_cmp.shape[2])
    qpos, qds = query_positions(q, q_pos, doc_ids, None if doc_ids is None else doc_ids.shape[1])
    end = cmp_end.contiguous()   # any integer dtype: the kernels clamp and cast at their loads (`_load_end`)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, k_cmp, v_cmp = (_last_dim_contiguous(x) for x in (q, k_cmp, v_cmp))
    o, _, sel = _cmp_fwd_op(q, k_cmp, v_cmp, end, qpos, qds, scale, int(cmp_len), int(select_len), int(n_select),
                            int(n_init), int(n_local), setting(pdl, "nsa_compressed"))
    return o, sel


def nsa_selected(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sel_idx: torch.Tensor, *,
                 q_pos: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None, select_len: int = 64,
                 scale: float | None = None, pdl: bool | str = False) -> torch.Tensor:
    """o_slc [B, T, H, Dv], as reference.nsa_selected. No host synchronisation; differentiable in q, k, v.
    pdl: the decoding launches with programmatic dependent launch (kernels/pdl.py)."""
    check_selected(q, k, v, sel_idx, q_pos, doc_ids, select_len)
    _check_triton("nsa_selected", q, v, q.shape[2], k.shape[2])
    qpos, qds = query_positions(q, q_pos, doc_ids, k.shape[1])
    sel = sel_idx.to(torch.int32).contiguous()
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    return _slc_fwd_op(q, k, v, sel, qpos, qds, scale, int(select_len), setting(pdl, "nsa_selected"))[0]
