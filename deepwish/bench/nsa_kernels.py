"""NSA's kernels (kernels/nsa) on one GPU: the compressed branch (attention over compressed tokens
with the block scoring and top-n fused in) and the selected branch, against SDPA flash (plain
causal) and, when importable, `fla.ops.nsa.parallel_nsa` (fla-core 0.6). The kernel part of
`deepwish bench nsa` (what it runs without --quality):

    deepwish bench nsa --out DIR [--parts check,train,decode] [--lengths 8192,...] [--quick] [--no-fla]
                       [--query-runs 64]
    python -m deepwish.bench.nsa_kernels --out DIR ...      (the same)
    python -m deepwish.bench.nsa_kernels --out DIR --parts sweep [--sweep-T 16384] [--sweep-kinds cmp_fwd,...]

Shape: the paper's, B 1, 64 query / 4 KV heads (G 16), D 128, bf16; compression blocks l 32,
stride d 16 (N = (T - 32) / 16 + 1 compressed tokens, random: the compression MLP is the model's),
selection blocks l' 64, n 16 (1 initial, 2 local).

Parts:
- check:  T 2048 at that shape against the fp32 reference (reference.py): relative RMS of o_cmp,
          o_slc and every gradient, and the share of (query, group) rows whose selection equals
          the reference's (bf16 scores may reorder near-ties).
- train:  forward, backward (fwd+bwd minus fwd) and fwd+bwd milliseconds at T = 8k..128k of
          `cmp` (nsa_compressed: attention, scoring, top-n) and `slc` (nsa_selected on cmp's
          selection), and their sum; SDPA flash causal (enable_gqa, no copies of K/V); fla, when
          importable: `fla cmp+slc` = parallel_nsa(q, k, v, g_cmp, g_slc, None, block_counts=16,
          block_size=64, window_size=0) (its compression, top-n and selection; gates all ones)
          and `fla slc` = parallel_nsa(q, k, v, None, None, None, block_indices=our sel_idx, ...,
          window_size=0) (selection alone, on the same blocks as ours).
- decode: one query at position C - 1 over a static cache of C = 8k..128k (B 1), cmp + slc replayed
          from a CUDA graph (the capture is the graph-capturability check), against SDPA over the
          whole cache (one query, enable_gqa) replayed the same way.
- compress (not in the default parts): the decoding step's block compression (kernels/nsa/compress.py)
          at `qwen3_0.6b_nsa`'s φ (8 KV heads, D 128, l 32, d 16; B 1, a 4,096-slot cache), replayed
          from a CUDA graph: µs a launch on a step that ends a block and on one that does not, for
          each slicing of W_1 (COMPRESS_SPLITS), beside the torch form (`NSA.compress_chunk_`).

What fla covers, read from its source (fla/ops/nsa/parallel.py, compression.py; fla-org/
flash-linear-attention): its compressed tokens are MEAN-POOLED non-overlapping blocks of
block_size (64) tokens, so N = T / 64, a quarter of the paper's (and ours) at l 32 / d 16; its
top-n forces block 0 and the last two blocks (score 1.0), scores only complete blocks, and needs
G a power of two >= 16. So `fla cmp+slc` does a quarter of our compressed attention and scoring
work, and `fla slc` the same selected work as our `slc`.

Why `parallel_nsa(q, k, v, g_cmp, g_slc, g_swa, block_counts=16, block_size=64, window_size=512)`
fails with "'NoneType' object is not callable": not the missing block_indices. Without them it
computes them (parallel_nsa_compression, then parallel_nsa_topk) and runs the selection; the
error comes after, from the sliding-window branch. `fla/ops/nsa/parallel.py` imports
`flash_attn_func, flash_attn_varlen_func` from the `flash-attn` package at module import and, on
ImportError, sets both to None with only an ImportWarning (which Python hides by default); any
window_size > 0 then calls `flash_attn_func(q, k, v, causal=True, window_size=(w - 1, 0))` = None(...).
The GPU image has no flash-attn, so the window branch of parallel_nsa cannot run there whatever the
indices; window_size=0 skips it (as this bench does), and the window branch is timed on its own
(our flash kernel with window 512, kernels/attention) in the whole-layer bench.

- sweep (not in the default parts; run once per GPU kind, then paste the winners into
          kernels/nsa/triton.py's TILES): for each kernel kind in turn, a few launch
          configurations (SWEEP_CANDIDATES, each a change of the current one), each checked
          against the fp32 reference at T CHECK_T (relative RMS of outputs and gradients below
          SWEEP_TOL, >= 95% of selections equal) and then timed at --sweep-T; the fastest correct
          one is kept before the next kind (one coordinate-descent pass). Writes DIR/nsa_sweep.json.

Time: every cell records its wall seconds ("seconds"), compilation included. The first call of
each of our kernels compiles it (the first length pays); fla autotunes each of its kernels at
its first call over 3-16 configurations (keys exclude T, so at the first length only), most of a
minute or more. The reference check runs at T CHECK_T only.

Prints tables; writes DIR/nsa_kernels.json and DIR/nsa_kernels.png. Every function here is
importable (the whole-layer bench reuses make_inputs, branch_times, decode_times).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

from deepwish.bench.env import bench_environment, doc_summary
from deepwish.bench.sparse_mla import time_ms
from deepwish.bench.timing import graph_ms, rel_rms

B, H, HKV, D = 1, 64, 4, 128
CMP_LEN, CMP_STRIDE, SELECT_LEN, N_SELECT, N_INIT, N_LOCAL = 32, 16, 64, 16, 1, 2
LENGTHS = [8192, 16384, 32768, 65536, 131072]
QUICK_LENGTHS = [8192, 16384]
CHECK_T = 2048
# 0: independent random queries (adjacent tokens share only the forced blocks of their selections).
# r > 0: each run of r positions shares one random query direction (plus 25% noise per token), a
# stand-in for trained models' neighbouring queries that select mostly the same blocks (what the
# selected branch's BT > 1 union tiles gain from). --query-runs sets it for a whole run.
QUERY_RUN = 0
WINDOW = 512   # the sliding-window branch in the decode part (model/nsa.py's default nsa_window)


def set_shape(spec: str) -> None:
    """The module's B, H, HKV from "B,H,HKV" (--shape), checked."""
    global B, H, HKV
    try:
        b, h, hkv = (int(x) for x in spec.split(","))
    except ValueError:
        raise ValueError(f"nsa_kernels bench: --shape wants B,H,HKV (three integers), got {spec!r}") from None
    if min(b, h, hkv) < 1 or h % hkv:
        raise ValueError(f"nsa_kernels bench: --shape {spec}: sizes must be positive and H a multiple of HKV")
    B, H, HKV = b, h, hkv


def make_inputs(T: int, device, dtype=torch.bfloat16, seed: int = 0, S: int | None = None) -> dict:
    """q [B, T, H, D] at the last T positions of a row of S (default T), k/v [B, S, HKV, D], random
    compressed tokens k_cmp/v_cmp [B, N, HKV, D] with cmp_end [B, N] (every complete block of
    l tokens every d), q_pos [B, T]."""
    S = T if S is None else S
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=g)
    ends = torch.arange(CMP_LEN - 1, S, CMP_STRIDE, device=device)[None].expand(B, -1).contiguous()
    N = ends.shape[1]
    q = rnd(B, T, H, D)
    if QUERY_RUN > 0:   # module constant QUERY_RUN: runs of positions share a query direction
        shared = rnd(B, -(-T // QUERY_RUN), H, D).repeat_interleave(QUERY_RUN, 1)[:, :T]
        q = (shared.float() + 0.25 * q.float()).to(dtype)
    return dict(q=q, k=rnd(B, S, HKV, D), v=rnd(B, S, HKV, D), k_cmp=rnd(B, N, HKV, D),
                v_cmp=rnd(B, N, HKV, D), cmp_end=ends, q_pos=torch.arange(S - T, S, device=device)[None].expand(B, T))


def cmp_kwargs() -> dict:
    return dict(cmp_len=CMP_LEN, select_len=SELECT_LEN, n_select=N_SELECT, n_init=N_INIT, n_local=N_LOCAL)


def _fwd_bwd_ms(fwd, params) -> dict:
    """fwd() -> output; times fwd, fwd+bwd (a fixed random cotangent), bwd = their difference."""
    out = fwd()
    do = torch.randn_like(out)
    del out

    def fwdbwd():  # gradients returned, not accumulated into .grad (no extra read-modify-write of dq)
        torch.autograd.grad(fwd(), params, do)

    with torch.no_grad():
        f = time_ms(fwd)
    fb = time_ms(fwdbwd)
    return dict(fwd=f, bwd=fb - f, fwdbwd=fb)


def branch_times(T: int, device, with_fla: bool = True, dtype=torch.bfloat16) -> dict:
    """{'cmp', 'slc', 'nsa (cmp+slc)', 'sdpa', 'fla cmp+slc', 'fla slc'}: {fwd, bwd, fwdbwd} ms (or an
    'error' string) at T (module docstring)."""
    from deepwish.kernels.nsa import triton as nk
    x = make_inputs(T, device, dtype=dtype)
    q, k, v, kc, vc = (x[n].requires_grad_() for n in ("q", "k", "v", "k_cmp", "v_cmp"))
    row = {}

    def guarded(name, f):
        t0 = time.perf_counter()
        try:
            row[name] = f()
        except Exception as e:  # noqa: BLE001 - one failing path must not stop the table
            row[name] = {"error": f"{type(e).__name__}: {e}"[:400]}
        row[name]["seconds"] = round(time.perf_counter() - t0, 1)   # wall time of the cell, compiles included
        if device.type == "cuda":
            torch.cuda.empty_cache()

    guarded("cmp", lambda: _fwd_bwd_ms(lambda: nk.nsa_compressed(q, kc, vc, x["cmp_end"], q_pos=x["q_pos"],
                                                                   **cmp_kwargs())[0], (q, kc, vc)))
    with torch.no_grad():
        sel = nk.nsa_compressed(q, kc, vc, x["cmp_end"], q_pos=x["q_pos"], **cmp_kwargs())[1]
    guarded("slc", lambda: _fwd_bwd_ms(lambda: nk.nsa_selected(q, k, v, sel, q_pos=x["q_pos"], select_len=SELECT_LEN),
                                       (q, k, v)))
    if "error" not in row["cmp"] and "error" not in row["slc"]:   # the sum of the two branches
        row["nsa (cmp+slc)"] = {m: row["cmp"][m] + row["slc"][m] for m in ("fwd", "bwd", "fwdbwd")}
    guarded("sdpa", lambda: sdpa_times(q, k, v))
    if with_fla:
        fla = fla_nsa()
        if isinstance(fla, str):
            row["fla cmp+slc"] = row["fla slc"] = {"error": fla}
        else:
            ones = torch.ones(B, T, H, device=device, dtype=q.dtype)
            guarded("fla cmp+slc", lambda: _fwd_bwd_ms(
                lambda: fla(q, k, v, ones, ones, None, block_counts=N_SELECT, block_size=SELECT_LEN, window_size=0),
                (q, k, v)))
            idx = sel.long()
            guarded("fla slc", lambda: _fwd_bwd_ms(
                lambda: fla(q, k, v, None, None, None, block_indices=idx, block_counts=N_SELECT, block_size=SELECT_LEN,
                            window_size=0), (q, k, v)))
    return row


def sdpa_times(q, k, v) -> dict:
    """SDPA flash, plain causal, GQA folded by the kernel (enable_gqa); where this torch's flash
    path refuses enable_gqa, K/V repeated to every head (the copy inside the timed call, and
    the row says so under 'note')."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    G = q.shape[2] // k.shape[2]

    def fwd_gqa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True, enable_gqa=True)

    def fwd_repeated():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.repeat_interleave(G, 2).transpose(1, 2),
                                                  v.repeat_interleave(G, 2).transpose(1, 2), is_causal=True)
    try:
        return _fwd_bwd_ms(fwd_gqa, (q, k, v))
    except RuntimeError as e:
        return dict(_fwd_bwd_ms(fwd_repeated, (q, k, v)), note=f"enable_gqa refused ({str(e)[:120]}); K/V repeated")


def fla_nsa():
    """fla's parallel_nsa, or a one-line reason it is not importable."""
    try:
        from fla.ops.nsa.parallel import parallel_nsa
    except Exception as e:  # noqa: BLE001 - fla is optional: never installed into the project's env
        return f"fla not importable ({type(e).__name__}: {e}); carry fla-core 0.6 as a wheel (.whl/) to compare"
    return parallel_nsa


# decoding's launch options timed beside the defaults (kernels/nsa/triton.py TILES): kind -> change
DECODE_VARIANTS = {
    "slc unsplit": {"slc_split": dict(BLOCKS=0)},
    "slc 2-block splits": {"slc_split": dict(BLOCKS=2)},
    "slc 4 warps": {"slc_split": dict(num_warps=4)},
    "cmp 256-token splits": {"cmp_split": dict(SPLIT_TOKENS=256)},
    "ranges by searches": {"cmp_split": dict(SCAN=0)},
    "ranges by 4096-wide scans": {"cmp_split": dict(SCAN=4096)},
    "top-n merge 8 warps": {"cmp_split": dict(MERGE_WARPS=8)},
    "top-n merge unpruned, 8 warps": {"cmp_split": dict(MERGE_PRUNE=False, MERGE_WARPS=8)},
    "scoring 2 tiles a split": {"cmp_split": dict(SEL_TILES=2)},
    # the set before 2026-12-06's fifth run (reports/nsa.md)
    "previous defaults": {"cmp_split": dict(SPLIT_TOKENS=256, SCAN=0, MERGE_WARPS=4, MERGE_PRUNE=False, num_warps=4),
                          "slc_split": dict(num_warps=4)},
}


def decode_times(C: int, device, variants: dict | None = None) -> dict:
    """Per-layer decode step at context C (one query at C - 1, static cache), CUDA-graph replayed:
    {'cmp+slc': ms, 'cmp': ms, 'slc': ms (on cmp's selection), 'win': ms (the WINDOW-token sliding
    window through kernels/attention's split-KV decode kernel, as the model runs it), 'nsa': ms
    (all three branches, summed), 'sdpa': ms, 'variants': {name: ms of cmp+slc under that launch
    option (DECODE_VARIANTS)}, 'win_variants': {name: ms of the window branch in another launch form},
    'no_pdl': {'cmp+slc', 'win', 'nsa': ms with every launch without PDL (the columns launch as the
    model does: model.decode_pdl auto)},
    'kernels': the cmp+slc step's kernels by GPU time (eager,
    torch.profiler)}."""
    import contextlib

    import torch.nn.functional as F
    from deepwish.bench.timing import kernel_times
    from deepwish.kernels.attention.decode import decode_attention, plan_splits
    from deepwish.kernels.nsa import triton as nk
    x = make_inputs(1, device, S=C)
    q, k, v = x["q"], x["k"], x["v"]
    k_cache, v_cache = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()   # the cache's layout
    row = {}

    pdl = "auto"   # as the model launches them (model.decode_pdl's default); `no_pdl` times them without

    def cmp():
        return nk.nsa_compressed(q, x["k_cmp"], x["v_cmp"], x["cmp_end"], q_pos=x["q_pos"], pdl=pdl, **cmp_kwargs())

    with torch.no_grad():
        sel = cmp()[1]

    def slc():
        return nk.nsa_selected(q, k, v, sel, q_pos=x["q_pos"], select_len=SELECT_LEN, pdl=pdl)

    def step():
        o_cmp, sel = cmp()
        return o_cmp + nk.nsa_selected(q, k, v, sel, q_pos=x["q_pos"], select_len=SELECT_LEN, pdl=pdl)

    def win():   # as the model runs it: split kernel, then the merge kernel
        return decode_attention(q, k_cache, v_cache, x["q_pos"], None, window=WINDOW, pdl=pdl)

    def win_cache_splits():   # the split count planned over the whole cache (before the window's own splits)
        splits = plan_splits(1, k_cache.shape[1], C, q.device)[0]
        return decode_attention(q, k_cache, v_cache, x["q_pos"], None, window=WINDOW, splits=splits)

    def layer():   # the gates are elementwise: the sum stands in for them
        return step() + win()

    def dense():
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True)

    def timed(f):
        try:
            return graph_ms(f)
        except Exception as e:  # noqa: BLE001
            return f"error: {type(e).__name__}: {e}"[:400]
    with torch.no_grad():
        for name, f in (("cmp+slc", step), ("cmp", cmp), ("slc", slc), ("win", win), ("nsa", layer), ("sdpa", dense)):
            row[name] = timed(f)
        row["variants"] = {}
        for name, change in (DECODE_VARIANTS if variants is None else variants).items():
            with contextlib.ExitStack() as stack:
                for kind, cfg in change.items():
                    stack.enter_context(nk.override_tiles(kind, **cfg))
                row["variants"][name] = timed(step)
        row["win_variants"] = {"splits over the whole cache": timed(win_cache_splits)}
        pdl = "off"
        row["no_pdl"] = {"cmp+slc": timed(step), "win": timed(win), "nsa": timed(layer)}
        pdl = "auto"
        try:
            row["kernels"] = kernel_times(step, rows=16)
        except Exception as e:  # noqa: BLE001
            row["kernels"] = f"error: {type(e).__name__}: {e}"[:400]
    return row


COMPRESS_SPLITS = (1, 2, 4, 8, 16, 32)


def compress_times(device, C: int = 4096) -> dict:
    """µs a launch of the cached chunk's block compression (module docstring, part compress):
    {'ends a block': {splits: µs, 'torch': µs}, 'ends none': {...}, 'max_err': largest relative RMS
    of a slicing's compressed slots against one slice's}."""
    import copy

    from deepwish.config import model_config
    from deepwish.kernels.nsa import compress
    from deepwish.model.transformer import Transformer
    torch.manual_seed(0)
    model = Transformer(model_config("qwen3_0.6b_nsa", n_layers=1)).eval().to(device, torch.bfloat16)
    nsa = model.blocks[0].mixer
    for m in (nsa.k_compress, nsa.v_compress):   # a trained φ's scale, not its initialisation
        for p in m.parameters():
            p.data = torch.randn_like(p) * 0.02
    cache = nsa.make_cache(1, C, torch.bfloat16, device)
    cache.k_raw.normal_()
    cache.v.normal_()
    row, ref, err, shipped = {}, None, 0.0, compress.SPLITS
    for name, p0 in (("ends a block", C - 1), ("ends none", C - 2)):
        pos = torch.tensor([[p0]], device=device)
        ctx = model.context(torch.zeros_like(pos), pos)
        cell = {}
        with torch.no_grad():
            for splits in COMPRESS_SPLITS:
                compress.SPLITS = splits
                c = copy.deepcopy(cache)

                def launch(c=c):
                    compress.compress_cache_blocks(c.k_raw, c.v, ctx.positions, nsa.k_compress, nsa.v_compress,
                                                   ctx.cos, ctx.sin, c.k_cmp, c.v_cmp, c.cmp_end, nsa.cmp_stride)
                launch()
                if name == "ends a block":
                    got = torch.cat([c.k_cmp, c.v_cmp]).float()
                    ref = got if ref is None else ref
                    err = max(err, float((got - ref).norm() / ref.norm()))
                cell[splits] = graph_ms(launch, calls=28) * 1e3
            c = copy.deepcopy(cache)
            cell["torch"] = graph_ms(lambda: nsa.compress_chunk_(c, ctx), calls=28) * 1e3
        row[name] = cell
    compress.SPLITS = shipped
    row["max_err"] = err
    return row


def check(device, dtype=torch.bfloat16, T: int = CHECK_T) -> dict:
    """Real-size bf16 kernels against the fp32 reference at T = CHECK_T (module docstring)."""
    from deepwish.kernels.nsa import reference as ref
    from deepwish.kernels.nsa import triton as nk
    x = make_inputs(T, device, dtype=dtype)
    ins = {n: x[n].requires_grad_() for n in ("q", "k", "v", "k_cmp", "v_cmp")}
    q, k, v, kc, vc = ins.values()
    res = {}
    o_r, sel_r = ref.nsa_compressed(q, kc, vc, x["cmp_end"], q_pos=x["q_pos"], S=T, **cmp_kwargs())
    o_t, sel_t = nk.nsa_compressed(q, kc, vc, x["cmp_end"], q_pos=x["q_pos"], **cmp_kwargs())
    do = torch.randn_like(o_r, dtype=torch.float32)
    g_r = torch.autograd.grad((o_r.float() * do).sum(), (q, kc, vc))
    g_t = torch.autograd.grad((o_t.float() * do).sum(), (q, kc, vc))
    for name, a, b in zip(("o_cmp", "dq_cmp", "dk_cmp", "dv_cmp"), (o_r, *g_r), (o_t, *g_t)):
        res[name] = rel_rms(a, b)
    res["selection_equal"] = float((sel_r == sel_t).all(-1).float().mean())
    s_r = ref.nsa_selected(q, k, v, sel_r, q_pos=x["q_pos"], select_len=SELECT_LEN)
    s_t = nk.nsa_selected(q, k, v, sel_r, q_pos=x["q_pos"], select_len=SELECT_LEN)
    g_r = torch.autograd.grad((s_r.float() * do).sum(), (q, k, v))
    g_t = torch.autograd.grad((s_t.float() * do).sum(), (q, k, v))
    for name, a, b in zip(("o_slc", "dq_slc", "dk_slc", "dv_slc"), (s_r, *g_r), (s_t, *g_t)):
        res[name] = rel_rms(a, b)
    return res


# kernel kind -> candidate changes of its current launch configuration (the first, {}, is the
# current one). Kept short: each candidate compiles its kernel once (seconds).
SWEEP_CANDIDATES = {
    # BNS / BJ: a tile of BJ blocks overlaps BJ·l'/d + 1 compressed tokens (65 for 16), computed in
    # steps of BNS: 16 -> 80 (1.23x), 32 -> 96 (1.5x), 64 -> 128 (2x); BJ 32, BNS 16 -> 144 for 129
    # SKIP_MERGE / RANK_MERGE: the early-out and the rank form of the running top-n merge;
    # FUSED_SELECT False: the scoring as its own launch (cmp_sel's tiles: 3 programs per SM by
    # registers at BM 64 / 4 warps, where the fused kernel's 255 registers x 256 threads hold 1);
    # cmp_sel BJ 64: 4x fewer scoring tiles (each a serial chain), 240 registers, 2 per SM
    # FUSED_SELECT True: the scoring inside the attention's programs (the default until the third
    # run, 95.2 ms at 64k against 52.6 for the separate pass); its closest forms kept as candidates
    # TMA (the default): the compressed K/V tiles through descriptors (as the selected branch's)
    "cmp_fwd": [{}, dict(TMA=False), dict(num_stages=3), dict(BN=128), dict(BN=32), dict(BM=64, num_warps=4),
                dict(FUSED_SELECT=True), dict(FUSED_SELECT=True, JV=16), dict(FUSED_SELECT=True, BNS=64),
                dict(FUSED_SELECT=True, JV=16, SKIP_MERGE=True)],
    # the separate scoring pass (cmp_fwd's FUSED_SELECT False, the default)
    # TMA (the default since the fourth run): its key tiles through a descriptor (BN-wide boxes)
    "cmp_sel": [{}, dict(TMA=False), dict(num_stages=3), dict(SORT_MERGE=False), dict(BN=16), dict(BN=64),
                dict(BJ=32), dict(JV=16), dict(BM=128, num_warps=8), dict(BM=32, num_warps=2), dict(SKIP_MERGE=True),
                dict(RANK_MERGE=True), dict(JV=16, SKIP_MERGE=True), dict(BJ=64), dict(BJ=64, SKIP_MERGE=True)],
    "cmp_dq": [{}, dict(TMA=False), dict(num_stages=2), dict(BN=32), dict(BM=64, num_warps=4)],
    "cmp_dkdv": [{}, dict(Q_CHUNK=1024), dict(MAX_CHUNKS=32), dict(BN=32), dict(num_stages=3),
                 dict(BM=64, num_warps=4), dict(FUSE_DQ=True), dict(FUSE_DQ=True, BN=128)],
    # TMA (the default): each selected block through a tensor descriptor; compiled for sm_90 (triton
    # 3.7) the pointer form's masked gather is not multi-buffered (22.5 KB of shared memory at any
    # stage count, 150 registers), the descriptor form is (72 KB at 3 stages, 107 registers).
    # BT > 1 (the union kernel, descriptor loads too): at small groups (--shape 8,16,8: G 2) BT 8 fills
    # the 16 dot rows a one-token program fills 2 of (BT 32 took 126 s to compile and ran 16 ms)
    "slc_fwd": [{}, dict(num_stages=2), dict(num_stages=4), dict(num_warps=2), dict(TMA=False),
                dict(TMA=False, BT=4), dict(TMA=False, BT=8, num_warps=8), dict(BT=4), dict(BT=8),
                dict(BT=8, num_stages=2), dict(BT=16, num_warps=8)],
    "slc_dq": [{}, dict(num_stages=2), dict(num_stages=4), dict(num_warps=2), dict(TMA=False),
               dict(TMA=False, BT=4), dict(TMA=False, BT=8, num_warps=8), dict(BT=4), dict(BT=8),
               dict(BT=8, num_stages=2), dict(BT=16, num_warps=8)],
    "slc_dkdv": [{}, dict(ROWS=64), dict(ROWS=256), dict(CH=256), dict(num_stages=3), dict(num_warps=4)],
}
SWEEP_TOL = 2e-2


def _internal_inputs(x: dict) -> dict:
    """The launchers' arguments (kernels/nsa/triton.py, below the autograd layer) for inputs x."""
    from deepwish.kernels.nsa import triton as nk
    q = x["q"].detach()
    qpos, qds = nk.query_positions(q, x["q_pos"], None, x["k"].shape[1])
    end = x["cmp_end"].contiguous()
    return dict(q=q, k=x["k"].detach(), v=x["v"].detach(), kc=x["k_cmp"].detach(), vc=x["v_cmp"].detach(), end=end,
                qpos=qpos, qds=qds, scale=q.shape[-1] ** -0.5, do=torch.randn_like(q))


def kind_runner(kind: str, a: dict):
    """A no-argument call that runs the kernel(s) of `kind` once on inputs a (_internal_inputs):
    the compressed forward (cmp_fwd, cmp_sel), the compressed backward (cmp_dq, cmp_dkdv), the
    selected forward (slc_fwd) or backward (slc_dq, slc_dkdv)."""
    from deepwish.kernels.nsa import triton as nk
    opts = (CMP_LEN, SELECT_LEN, N_SELECT, N_INIT, N_LOCAL)

    def fwd():
        return nk.compressed_forward(a["q"], a["kc"], a["vc"], a["end"], a["qpos"], a["qds"], a["scale"], *opts)
    if kind in ("cmp_fwd", "cmp_sel"):
        return fwd
    o, lse, sel = fwd()
    if kind in ("cmp_dq", "cmp_dkdv"):
        return lambda: nk.compressed_backward(a["q"], a["kc"], a["vc"], o, lse, a["do"], a["end"], a["qpos"], a["qds"],
                                              a["scale"])

    def sfwd():
        return nk.selected_forward(a["q"], a["k"], a["v"], sel, a["qpos"], a["qds"], a["scale"], SELECT_LEN)
    if kind == "slc_fwd":
        return sfwd
    so, slse = sfwd()
    return lambda: nk.selected_backward(a["q"], a["k"], a["v"], so, slse, a["do"], sel, a["qpos"], a["qds"], a["scale"],
                                        SELECT_LEN)


def sweep(device, T: int, kinds: list[str] | None = None, candidates: dict | None = None, log=print,
          save: Path | None = None) -> dict:
    """The tile sweep (module docstring): {kind: {"best": changes, "config": the full launch
    configuration to keep, "trials": [{changes, ms | error, check}]}}, also written to `save`
    after each kind (a run stopped by a time limit keeps the kinds it finished). The winners
    stay applied (kernels/nsa/triton.py's tables) for the rest of this process."""
    from deepwish.kernels.nsa import triton as nk
    candidates = SWEEP_CANDIDATES if candidates is None else candidates
    kinds = list(candidates) if kinds is None else kinds
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = _internal_inputs(make_inputs(T, device, dtype=dtype))
    result = {}
    for kind in kinds:
        trials = []
        for change in candidates[kind]:
            t0 = time.perf_counter()
            trial = dict(changes=change)
            try:
                with nk.override_tiles(kind, group=H // HKV, **change):
                    trial["check"] = check(device, dtype=dtype, T=min(CHECK_T, T))
                    worst = max(v for k, v in trial["check"].items() if k != "selection_equal")
                    if worst > SWEEP_TOL or trial["check"]["selection_equal"] < 0.95:
                        trial["error"] = f"wrong: worst relative RMS {worst:.2e}, selection equal " \
                                         f"{trial['check']['selection_equal']:.2f}"
                    else:
                        trial["ms"] = time_ms(kind_runner(kind, a))
            except Exception as e:  # noqa: BLE001 - a candidate that does not compile or fit is skipped
                trial["error"] = f"{type(e).__name__}: {e}"[:300]
            trial["seconds"] = round(time.perf_counter() - t0, 1)
            trials.append(trial)
            log(f"sweep {kind} {change}: " + (f"{trial['ms']:.3f} ms" if "ms" in trial else trial["error"]) +
                f" ({trial['seconds']} s)")
        ok = [t for t in trials if "ms" in t]
        best = min(ok, key=lambda t: t["ms"])["changes"] if ok else {}
        table = nk.INTERPRET_TILES if nk._INTERPRET else nk.TILES
        key = kind if nk._INTERPRET else nk._tile_key(kind, torch.bfloat16, H // HKV)
        table[key] = dict(table[key], **best)     # keep the winner for the next kinds
        result[kind] = dict(best=best, config=dict(table[key]), trials=trials)
        log(f"sweep {kind}: keep {result[kind]['config']}")
        if save is not None:
            save.write_text(json.dumps(result, indent=1, default=str))
    return result


def _ms(cell, key) -> str:
    if not isinstance(cell, dict):
        return "-"
    if "error" in cell:
        return "error"
    return f"{cell[key]:.2f}"


TRAIN_COLS = ["cmp", "slc", "nsa (cmp+slc)", "sdpa", "fla cmp+slc", "fla slc"]


def train_table(rows: list[dict]) -> str:
    lines = ["| T | metric | " + " | ".join(TRAIN_COLS) + " | sdpa / nsa |", "|---" * (len(TRAIN_COLS) + 3) + "|"]
    for r in rows:
        for m in ("fwd", "bwd", "fwdbwd"):
            nsa, sd = r.get("nsa (cmp+slc)"), r.get("sdpa")
            ratio = f"{sd[m] / nsa[m]:.1f}x" if isinstance(nsa, dict) and isinstance(sd, dict) and "error" not in sd else "-"
            lines.append(f"| {r['T']} | {m} ms | " + " | ".join(_ms(r.get(c), m) for c in TRAIN_COLS) + f" | {ratio} |")
    errors = {f"T{r['T']} {c}": r[c]["error"] for r in rows for c in TRAIN_COLS
              if isinstance(r.get(c), dict) and "error" in r[c]}
    if errors:
        lines += ["", "errors:"] + [f"- {k}: {v}" for k, v in errors.items()]
    return "\n".join(lines)


DECODE_COLS = ("cmp+slc", "cmp", "slc", "win", "nsa", "sdpa")


def decode_table(rows: list[dict]) -> str:
    """µs per step by column and SDPA / NSA; then each context's variants (DECODE_VARIANTS) and
    its kernels by GPU time."""
    us = lambda x: f"{x * 1e3:.1f}" if isinstance(x, float) else str(x)  # noqa: E731
    lines = ["| context | " + " | ".join(f"{c} us" for c in DECODE_COLS) + " | sdpa / (cmp+slc) | sdpa / nsa |",
             "|---" * (len(DECODE_COLS) + 3) + "|"]
    for r in rows:
        ratios = [f"{r['sdpa'] / r[c]:.2f}x" if isinstance(r.get(c), float) and isinstance(r.get("sdpa"), float)
                  else "-" for c in ("cmp+slc", "nsa")]
        lines.append(f"| {r['C']} | " + " | ".join(us(r.get(c)) for c in DECODE_COLS) + f" | {' | '.join(ratios)} |")
    for r in rows:
        if r.get("variants"):
            lines.append(f"\ncontext {r['C']}: cmp+slc us under " +
                         ", ".join(f"{n} {us(t)}" for n, t in r["variants"].items()))
        if r.get("win_variants"):
            lines.append(f"context {r['C']}: win us under " +
                         ", ".join(f"{n} {us(t)}" for n, t in r["win_variants"].items()))
        if r.get("no_pdl"):
            lines.append(f"context {r['C']}: without PDL, us: " +
                         ", ".join(f"{n} {us(t)}" for n, t in r["no_pdl"].items()))
        kt = r.get("kernels")
        if isinstance(kt, dict):
            lines.append(f"context {r['C']}: kernels {kt['sum_ms'] * 1e3:.1f} us a step (eager)")
            lines += [f"  {e['us_per_step']:7.1f} us  x{e['calls_per_step']:g}  {e['name'][:90]}" for e in kt["kernels"]]
        elif kt is not None:
            lines.append(f"context {r['C']}: kernels {kt}")
    return "\n".join(lines)


def plot(train: list[dict], decode: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    for col in TRAIN_COLS:
        pts = [(r["T"], r[col]["fwdbwd"]) for r in train if isinstance(r.get(col), dict) and "fwdbwd" in r[col]]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=col)
    ax.set(xscale="log", yscale="log", xlabel="T", ylabel="fwd+bwd ms", title="NSA branches vs SDPA flash (H64/KV4, D128)")
    ax.legend(fontsize=7)
    ax = axes[1]
    for col in ("cmp+slc", "nsa", "sdpa"):
        pts = [(r["C"], r[col] * 1e3) for r in decode if isinstance(r.get(col), float)]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=col)
    ax.set(xscale="log", yscale="log", xlabel="context", ylabel="us per step", title="decode, one query, B1")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def environment(device) -> dict:
    fla = fla_nsa()
    return dict(bench_environment(device, "python -m deepwish.bench.nsa_kernels"),
                fla=fla if isinstance(fla, str) else "importable",
                shape=dict(B=B, H=H, Hkv=HKV, D=D, cmp_len=CMP_LEN, cmp_stride=CMP_STRIDE, select_len=SELECT_LEN,
                           n_select=N_SELECT, n_init=N_INIT, n_local=N_LOCAL, dtype="bfloat16", query_run=QUERY_RUN))


def run(device, out: Path, parts: list[str], lengths: list[int], with_fla: bool = True, sweep_T: int = 16384,
        sweep_kinds: list[str] | None = None) -> dict:
    """The parts in order; writes out/nsa_kernels.json after each and out/nsa_kernels.png
    (the sweep: out/nsa_sweep.json)."""
    out.mkdir(parents=True, exist_ok=True)
    res = dict(env=environment(device))
    print(json.dumps(res["env"]), flush=True)
    for part in parts:
        if part not in ("check", "train", "decode", "sweep", "compress"):
            raise ValueError(f"nsa_kernels bench: unknown part {part!r}; choose from check, train, decode, sweep, "
                             "compress")
    for kind in sweep_kinds or []:
        if kind not in SWEEP_CANDIDATES:
            raise ValueError(f"nsa_kernels bench: unknown sweep kind {kind!r}; choose from {list(SWEEP_CANDIDATES)}")
    t_start = time.perf_counter()
    for part in parts:
        t0 = time.perf_counter()
        try:
            if part == "sweep":
                res["sweep"] = sweep(device, sweep_T, sweep_kinds, log=lambda m: print(m, flush=True),
                                     save=out / "nsa_sweep.json")
                print("\n## sweep winners at T", sweep_T, "(paste into kernels/nsa/triton.py TILES, 16bit)\n" +
                      "\n".join(f'("{k}", "16bit"): dict({", ".join(f"{a}={b!r}" for a, b in r["config"].items())}),'
                                for k, r in res["sweep"].items()), flush=True)
            elif part == "compress":
                res["compress"] = compress_times(device)
                print("\n## block compression at qwen3_0.6b_nsa's phi (us a launch, graph; W_1 slices)\n" +
                      "\n".join(f"{k}: " + ", ".join(f"{s} {t:.2f}" for s, t in v.items()) if isinstance(v, dict)
                                else f"{k}: {v:.2e}" for k, v in res["compress"].items()), flush=True)
            elif part == "check":
                res["check"] = check(device)
                print("\n## check at T", CHECK_T, "(relative RMS vs the fp32 reference)\n" +
                      "\n".join(f"{k}: {v:.2e}" for k, v in res["check"].items()), flush=True)
            elif part == "train":
                res["train"] = []
                for T in lengths:
                    res["train"].append(dict(T=T, **branch_times(T, device, with_fla=with_fla)))
                    print(f"T {T}: " + json.dumps(res["train"][-1], default=str), flush=True)
                print("\n## training branches (ms)\n" + train_table(res["train"]) +
                      "\n(goal at T 64k: NSA fwd+bwd >= 6x SDPA flash's with all branches and gates; this table's "
                      "nsa is cmp + slc only)", flush=True)
            else:
                res["decode"] = []
                for C in lengths:
                    res["decode"].append(dict(C=C, **decode_times(C, device)))
                print("\n## decode step (per layer, cmp + slc)\n" + decode_table(res["decode"]) +
                      "\n(goal at context 64k: sdpa / nsa >= 8x)", flush=True)
        except Exception:  # noqa: BLE001
            res[part] = "error: " + traceback.format_exc()[-2000:]
            print(res[part], flush=True)
        res.setdefault("seconds", {})[part] = round(time.perf_counter() - t0, 1)
        print(f"[deepwish] part {part}: {res['seconds'][part]} s (total {time.perf_counter() - t_start:.0f} s)",
              flush=True)
        (out / "nsa_kernels.json").write_text(json.dumps(res, indent=1, default=str))
    if isinstance(res.get("train"), list) and isinstance(res.get("decode"), list):
        plot(res["train"], res["decode"], out / "nsa_kernels.png")
    print(f"[deepwish] wrote {out / 'nsa_kernels.json'}", flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deepwish.bench.nsa_kernels", description=doc_summary(__doc__))
    ap.add_argument("--out", default="reports/nsa_kernels")
    ap.add_argument("--parts", default="check,train,decode")
    ap.add_argument("--lengths", default="", help="comma-separated T (default 8k..128k; --quick: 8k, 16k)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-fla", action="store_true", help="skip fla's parallel_nsa (it autotunes at its first call)")
    ap.add_argument("--query-runs", type=int, default=0,
                    help="runs of this many positions share a query direction (0: independent queries)")
    ap.add_argument("--sweep-T", type=int, default=16384, help="the length the sweep part times at")
    ap.add_argument("--sweep-kinds", default="", help=f"comma-separated subset of {','.join(SWEEP_CANDIDATES)}")
    ap.add_argument("--shape", default=f"{B},{H},{HKV}",
                    help="B,H,HKV: batch, query heads, KV heads (default: the paper's 1,64,4; qwen3_0.6b_nsa: 8,16,8)")
    args = ap.parse_args(argv)
    set_shape(args.shape)
    if not torch.cuda.is_available():
        print("nsa_kernels bench: needs a CUDA device", file=sys.stderr)
        return 2
    lengths = [int(x) for x in args.lengths.split(",") if x] or (QUICK_LENGTHS if args.quick else LENGTHS)
    global QUERY_RUN
    QUERY_RUN = args.query_runs
    run(torch.device("cuda"), Path(args.out), [p for p in args.parts.split(",") if p], lengths,
        with_fla=not args.no_fla, sweep_T=args.sweep_T, sweep_kinds=[k for k in args.sweep_kinds.split(",") if k] or None)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
