"""NSA's block compression on the cache path in one launch: every compression block that ends inside
a cached chunk (a decoding step, a k+1 verification) is compressed by φ and written into NSACache's
compressed slots (model/nsa.py: the module docstring's φ, `NSA.compress` and `NSACache.write_blocks`
are the reference).

    compress_cache_blocks(k_raw, v, positions, k_phi, v_phi, cos, sin, k_cmp, v_cmp, cmp_end, stride=d)

Why a kernel: the torch form runs on every step, a block ending or not (a static graph cannot
branch), about twenty ops a layer: the block ends' closed form, the gathers of l cached rows, φ's
two matmuls for keys and for values (the first reads a [D, l·D] weight, 1 MB at D 128 and l 32, in
bf16) on the trash block, rotary, the slot arithmetic and three cache writes. One token ends a
block every d steps; here a program finds from the chunk's first position whether its block exists
and returns at once when it does not, so the other steps cost one launch.

Grid: (batch row × candidate block of the chunk, keys / values, tile of KV heads); T tokens of
consecutive positions p0 .. p0 + T − 1 hold at most T // d + 1 block ends (`chunk_block_ends`'s
closed form). A program with a block computes φ for its KV heads (rows of one tl.dot, padded to
16): x_i = c_i + p_i over the block's l cached rows c_i, then mean_i(x_i) + W_2·silu(W_1·[x_1 … x_l])
with W_1's l column blocks of D accumulated one row at a time, rounded where the torch form rounds
(x, W_1·x, silu, W_2·…, the mean and the sum, in the cache's dtype), then, for keys, rotary at the
block end's position (its row of cos / sin; the partner channels read back from the slot just
written, after a CTA barrier). Blocks that do not exist write nothing: the torch form sends them to
the trash slot, whose end stays NEVER either way.

W_1 is the step's one large read (l·D² values: 1 MB a kind at D 128, l 32), and one program streaming
it alone took ~35 µs a layer on a block-ending step (one SM's share of the bandwidth). So W_1's l
column blocks are cut into SPLITS slices over the grid's second axis (with the kind): each slice's
program stores its partial W_1·x and Σ x (fp32), and the last of its group (kernels/grid.py's
last-block reduction) adds them up in slice order and finishes φ. Those fp32 sums run in another
order than one program's, so a bf16 rounding of W_1·x can land one step away (the torch form's
matmul sums in an order of its own too).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from deepwish.kernels.grid import arrive_last, counters, reset_count
from deepwish.kernels.pdl import launch_options, setting, wait_for_inputs

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HEAD_TILE = 16  # KV heads a program: the M of its tl.dot (16 is the smallest tile)
SPLITS = 8      # slices of W_1's l column blocks (module docstring); 1: one program finishes φ alone
COUNTERS = 4096  # groups (row × block × kind × head tile) a launch may count; more take one slice


@triton.jit
def _phi(SRC, P, W1, W2, OUT, COS, SIN, WS, CNT, group, split, b, h, h_ok, row0, r, slot, s_sb, s_sh, s_sl, s_ob,
         s_os, s_oh, s_cb, s_ct, D: tl.constexpr, CMP_LEN: tl.constexpr, BLOCK_D: tl.constexpr, BH: tl.constexpr,
         R: tl.constexpr, ROPE: tl.constexpr, PREC: tl.constexpr, S: tl.constexpr):
    """φ of one block for the KV heads h [BH] (module docstring), stored at OUT[b, slot, h]: this
    program's slice `split` of W_1's S slices, the group's last slice finishing."""
    dt = OUT.dtype.element_ty
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    ok = h_ok[:, None] & d_ok[None, :]
    w_ok = d_ok[:, None] & d_ok[None, :]
    src = SRC + b * s_sb + h[:, None] * s_sh + d[None, :]
    acc = tl.zeros([BH, BLOCK_D], dtype=tl.float32)    # W_1 · [x_1 … x_l] (this slice's column blocks)
    total = tl.zeros([BH, BLOCK_D], dtype=tl.float32)  # Σ_i x_i (this slice's)
    for i in range(split * (CMP_LEN // S), (split + 1) * (CMP_LEN // S)):
        i64 = tl.cast(i, tl.int64)
        c = tl.load(src + (row0 + i64) * s_sl, mask=ok, other=0.0).to(tl.float32)
        p = tl.load(P + i64 * D + d, mask=d_ok, other=0.0).to(tl.float32)
        x = (c + p[None, :]).to(dt)
        total += x.to(tl.float32)
        # W_1[o, i·D + c] as a [c, o] tile: the column block of x_i
        w = tl.load(W1 + d[None, :] * (CMP_LEN * D) + i64 * D + d[:, None], mask=w_ok, other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PREC)
    if S > 1:  # the group's partials, fp32 [S, 2, BH, BLOCK_D] at WS[group]; the last slice adds them up
        hd = tl.arange(0, BH)[:, None] * BLOCK_D + d[None, :]
        part = WS + (group * S + split) * (2 * BH * BLOCK_D) + hd
        tl.store(part, acc, mask=ok)
        tl.store(part + BH * BLOCK_D, total, mask=ok)
        if arrive_last(CNT, group, S):   # (no early return: Triton does not lower one out of a helper's branch)
            acc = tl.zeros([BH, BLOCK_D], dtype=tl.float32)
            total = tl.zeros([BH, BLOCK_D], dtype=tl.float32)
            for t in range(S):  # in slice order (.cg: never a stale L1 line)
                part = WS + (group * S + t) * (2 * BH * BLOCK_D) + hd
                acc += tl.load(part, mask=ok, other=0.0, cache_modifier=".cg")
                total += tl.load(part + BH * BLOCK_D, mask=ok, other=0.0, cache_modifier=".cg")
            reset_count(CNT, group)
            _phi_finish(acc, total, W2, OUT, COS, SIN, b, h, h_ok, r, slot, s_ob, s_os, s_oh, s_cb, s_ct, D,
                        CMP_LEN, BLOCK_D, R, ROPE, PREC)
    else:
        _phi_finish(acc, total, W2, OUT, COS, SIN, b, h, h_ok, r, slot, s_ob, s_os, s_oh, s_cb, s_ct, D,
                    CMP_LEN, BLOCK_D, R, ROPE, PREC)


@triton.jit
def _phi_finish(acc, total, W2, OUT, COS, SIN, b, h, h_ok, r, slot, s_ob, s_os, s_oh, s_cb, s_ct, D: tl.constexpr,
                CMP_LEN: tl.constexpr, BLOCK_D: tl.constexpr, R: tl.constexpr, ROPE: tl.constexpr, PREC: tl.constexpr):
    """φ from W_1·[x_1 … x_l] (acc) and Σ x_i (total), fp32 [BH, BLOCK_D]: silu, W_2, the mean, stored
    at OUT[b, slot, h], then rotated for keys (ROPE)."""
    dt = OUT.dtype.element_ty
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    ok = h_ok[:, None] & d_ok[None, :]
    w_ok = d_ok[:, None] & d_ok[None, :]
    hid = acc.to(dt).to(tl.float32)
    hid = (hid * tl.sigmoid(hid)).to(dt)
    w2 = tl.load(W2 + d[None, :] * D + d[:, None], mask=w_ok, other=0.0)
    down = tl.dot(hid, w2, input_precision=PREC).to(dt).to(tl.float32)
    y = ((total / CMP_LEN).to(dt).to(tl.float32) + down).to(dt)
    out = OUT + b * s_ob + slot * s_os + h[:, None] * s_oh + d[None, :]
    tl.store(out, y, mask=ok)
    if ROPE:  # rotary at the block end (row r of the chunk): channel j < R with its partner j ± R/2
        tl.debug_barrier()  # the slot's values, stored by every thread of the program, read back
        first = d < R // 2
        rot = d < R
        partner = tl.where(first, d + R // 2, d - R // 2)
        yp = tl.load(OUT + b * s_ob + slot * s_os + h[:, None] * s_oh + partner[None, :],
                     mask=h_ok[:, None] & (rot & d_ok)[None, :], other=0.0).to(tl.float32)
        jj = tl.where(first, d, d - R // 2)
        cs = b * s_cb + r * s_ct + jj
        cos = tl.load(COS + cs, mask=rot, other=1.0)[None, :]
        sin = tl.load(SIN + cs, mask=rot, other=0.0)[None, :]
        yf = y.to(tl.float32)
        yr = tl.where(rot[None, :], tl.where(first[None, :], yf * cos - yp * sin, yf * cos + yp * sin), yf)
        tl.debug_barrier()  # every partner read before any channel is overwritten
        tl.store(out, yr.to(dt), mask=ok)


@triton.jit(do_not_specialize=["T"])
def _compress_kernel(K_SRC, V_SRC, POS, PK, W1K, W2K, PV, W1V, W2V, COS, SIN, K_OUT, V_OUT, END, WS, CNT,
                     s_sb, s_sh, s_sl, s_vb, s_vh, s_vl, s_ob, s_os, s_oh, s_pb, s_eb, s_cb, s_ct,
                     T, HKV, N, STRIDE, NS,
                     D: tl.constexpr, CMP_LEN: tl.constexpr, BLOCK_D: tl.constexpr, BH: tl.constexpr,
                     R: tl.constexpr, ROPE: tl.constexpr, PREC: tl.constexpr, S: tl.constexpr, PDL: tl.constexpr):
    # under PDL every program waits first, those without a block too: a kernel that completed before
    # the one it follows would let the next kernel read that one's outputs unwritten (kernels/pdl.py)
    wait_for_inputs(PDL)
    pid = tl.program_id(0)
    b = tl.cast(pid // NS, tl.int64)
    j = pid % NS
    kind = tl.program_id(1) // S
    split = tl.program_id(1) % S
    group = (pid * 2 + kind) * tl.num_programs(2) + tl.program_id(2)
    p0 = tl.load(POS + b * s_pb)
    before = CMP_LEN - 1 - p0
    first = tl.maximum(((before % STRIDE) + STRIDE) % STRIDE, before)  # chunk_block_ends' closed form
    r = first + j * STRIDE  # the chunk row of this program's block end
    if r >= T:
        return
    end = p0 + r
    slot = (end - (CMP_LEN - 1)) // STRIDE
    if slot >= N:  # beyond the cache's last block (its rows were never written)
        return
    h = tl.program_id(2) * BH + tl.arange(0, BH)
    h_ok = h < HKV
    h = tl.cast(h, tl.int64)
    row0 = end - (CMP_LEN - 1)
    if kind == 0:
        if (tl.program_id(2) == 0) & (split == 0):
            tl.store(END + b * s_eb + slot, end)
        _phi(K_SRC, PK, W1K, W2K, K_OUT, COS, SIN, WS, CNT, group, split, b, h, h_ok, row0, r, slot, s_sb, s_sh,
             s_sl, s_ob, s_os, s_oh, s_cb, s_ct, D, CMP_LEN, BLOCK_D, BH, R, ROPE, PREC, S)
    else:
        _phi(V_SRC, PV, W1V, W2V, V_OUT, COS, SIN, WS, CNT, group, split, b, h, h_ok, row0, r, slot, s_vb, s_vh,
             s_vl, s_ob, s_os, s_oh, s_cb, s_ct, D, CMP_LEN, BLOCK_D, BH, R, False, PREC, S)


def _launch(k_raw, v, positions, pk, w1k, w2k, pv, w1v, w2v, cos, sin, k_cmp, v_cmp, cmp_end, stride, pdl):
    B, Hkv, _, D = k_raw.shape
    T = positions.shape[1]
    l = pk.shape[0]
    rope = cos is not None
    # The kernel reads both with cos's strides; checked inside the op, where strides are plain integers
    # (as in attention/decode.py decode_prologue: torch 2.11's dynamo cannot compare symbolic strides).
    if rope and (cos.stride() != sin.stride() or cos.stride(-1) != 1):
        cos, sin = cos.contiguous(), sin.contiguous()
    cos_t = cos if rope else positions   # never read without ROPE
    sin_t = sin if rope else positions
    ns = T // stride + 1
    bh = HEAD_TILE
    tiles = triton.cdiv(Hkv, bh)
    P, launch = launch_options(pdl, k_raw.device, "nsa_compress_blocks")
    groups = B * ns * 2 * tiles
    splits = SPLITS if l % SPLITS == 0 and groups <= COUNTERS else 1
    if splits > 1:
        ws = torch.empty(groups, splits, 2, bh, triton.next_power_of_2(D), dtype=torch.float32, device=k_raw.device)
        cnt = counters(k_raw.device, "nsa_compress_blocks", COUNTERS)
    else:
        ws = cnt = positions  # never read with one slice
    _compress_kernel[(B * ns, 2 * splits, tiles)](
        k_raw, v, positions, pk, w1k, w2k, pv, w1v, w2v, cos_t, sin_t, k_cmp, v_cmp, cmp_end, ws, cnt,
        k_raw.stride(0), k_raw.stride(1), k_raw.stride(2), v.stride(0), v.stride(1), v.stride(2),
        k_cmp.stride(0), k_cmp.stride(1), k_cmp.stride(2), positions.stride(0), cmp_end.stride(0),
        cos_t.stride(0) if rope else 0, cos_t.stride(1) if rope else 0,
        T, Hkv, cmp_end.shape[1] - 1, stride, ns,
        D=D, CMP_LEN=l, BLOCK_D=triton.next_power_of_2(D), BH=bh, R=2 * cos.shape[-1] if rope else 0, ROPE=rope,
        PREC="ieee" if k_raw.dtype == torch.float32 else "tf32", S=splits, PDL=P, num_warps=1 if _INTERPRET else 8,
        **launch)


@torch.library.custom_op("deepwish::nsa_compress_blocks", mutates_args=("k_cmp", "v_cmp", "cmp_end"))
def _compress_op(k_raw: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, pk: torch.Tensor, w1k: torch.Tensor,
                 w2k: torch.Tensor, pv: torch.Tensor, w1v: torch.Tensor, w2v: torch.Tensor, cos: torch.Tensor | None,
                 sin: torch.Tensor | None, k_cmp: torch.Tensor, v_cmp: torch.Tensor, cmp_end: torch.Tensor,
                 stride: int, pdl: str) -> None:
    _launch(k_raw, v, positions, pk, w1k, w2k, pv, w1v, w2v, cos, sin, k_cmp, v_cmp, cmp_end, stride, pdl)


@_compress_op.register_fake
def _(k_raw, v, positions, pk, w1k, w2k, pv, w1v, w2v, cos, sin, k_cmp, v_cmp, cmp_end, stride, pdl):
    return None


def compress_cache_blocks(k_raw: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, k_phi, v_phi,
                          cos: torch.Tensor | None, sin: torch.Tensor | None, k_cmp: torch.Tensor,
                          v_cmp: torch.Tensor, cmp_end: torch.Tensor, stride: int, *, pdl: bool | str = False) -> None:
    """Compress the blocks ending in a chunk of consecutive positions (module docstring) in place.

    k_raw, v [B, Hkv, L, D]: the cache's keys before rotary and values, the chunk's rows already
    written; positions [B, T] (consecutive in each row); k_phi, v_phi: model/nsa.py `Compression`
    modules (pos [l, D], up [D, l·D], down [D, D]); cos, sin [B, T, R/2] (None: no rotary);
    k_cmp, v_cmp [B, N + 1, Hkv, D] and cmp_end [B, N + 1] int64 (NSACache's; slot N is the trash).
    pdl: programmatic dependent launch (kernels/pdl.py)."""
    B, Hkv, L, D = k_raw.shape
    l = k_phi.pos.shape[0]
    T = positions.shape[1]
    shapes_ok = (v.shape == k_raw.shape and tuple(positions.shape[:1]) == (B,) and positions.dim() == 2
                 and k_cmp.shape == v_cmp.shape and k_cmp.shape[0] == B and tuple(k_cmp.shape[2:]) == (Hkv, D)
                 and tuple(cmp_end.shape) == (B, k_cmp.shape[1]) and cmp_end.dtype == torch.int64
                 and all(tuple(m.pos.shape) == (l, D) and tuple(m.up.weight.shape) == (D, l * D)
                         and tuple(m.down.weight.shape) == (D, D) for m in (k_phi, v_phi))
                 and (cos is None or (cos.shape == sin.shape and tuple(cos.shape[:2]) == (B, T)
                                      and 2 * cos.shape[-1] <= D)))
    if not shapes_ok:
        raise ValueError(f"compress_cache_blocks: k_raw / v [B, Hkv, L, D] {tuple(k_raw.shape)} / {tuple(v.shape)}, "
                         f"positions [B, T] {tuple(positions.shape)}, k_cmp / v_cmp [B, N + 1, Hkv, D] "
                         f"{tuple(k_cmp.shape)} / {tuple(v_cmp.shape)}, cmp_end [B, N + 1] int64 "
                         f"{tuple(cmp_end.shape)} {cmp_end.dtype}, φ's pos [l, D] / up [D, l·D] / down [D, D], "
                         f"cos / sin [B, T, <= D/2]: shapes disagree")
    dtypes = {k_raw.dtype, v.dtype, k_cmp.dtype, v_cmp.dtype, k_phi.up.weight.dtype, v_phi.up.weight.dtype}
    if len(dtypes) != 1:
        raise ValueError(f"compress_cache_blocks: the caches and φ's weights must share one dtype, got {dtypes}")
    if any(t.stride(-1) != 1 for t in (k_raw, v, k_cmp, v_cmp)) or k_cmp.stride() != v_cmp.stride():
        raise ValueError("compress_cache_blocks: the caches' last dimension must be contiguous and k_cmp, v_cmp "
                         "laid out alike (NSACache's buffers are)")
    if cos is not None:
        cos, sin = cos.float(), sin.float()
    weights = [t.contiguous() for m in (k_phi, v_phi) for t in (m.pos, m.up.weight, m.down.weight)]
    _compress_op(k_raw, v, positions, *weights, cos, sin, k_cmp, v_cmp, cmp_end, int(stride),
                 setting(pdl, "nsa_compress_blocks"))
