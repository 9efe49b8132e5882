"""The sparse MLA kernel (kernels/sparse_mla) on one GPU against the dense path: the kernel part of
`deepwish bench dsa` (its --parts kernel), or alone:

    python -m deepwish.bench.sparse_mla --out DIR [--parts check,kernel,decode] [--sweep] [--tiles JSON] [--quick]

Parts (in the order given):
- check:  the Triton kernel at real sizes (H 64, Dqk 576 = 512 + 64, K 2048, bf16) on the last
          64 queries over an 8k cache, against the fp32 gather reference: relative RMS of o, lse,
          dq, dkv, for both backward forms.
- kernel: sparse MLA forward and backward time and TFLOP/s at B1, T = 4k, 8k, 32k, 64k with
          KV = T (causal) and the goal shape (4096 queries at the end of an 8192 cache), top-k
          2048, random distinct causal slots (uniform over the visible keys: the worst case for
          gather locality); against SDPA's memory-efficient kernel over the same latent in MQA
          form (one shared 576-wide key, 512-wide value, every head) with a lower-right causal mask.
- decode: latency per step at context 8k-128k, batch 1, one token and two (k + 1 = 2), top-k 2048,
          replayed from a CUDA graph (the capture itself is the graph-capturability check);
          against the dense weight-absorbed step (scores over the whole latent cache).
--sweep first times launch-config candidates (TILES, and the backward's form) at the goal shape,
each checked against the reference on a slice first, writes DIR/tiles.json and runs the other
parts with the fastest; --tiles applies a tiles.json from an earlier sweep.

FLOPs are counted on the selected slots that exist (min(K, visible keys) per query; -1 padding
is free): forward 2·H·(Dqk + dv) per (query, slot), the q·k and p·v products; backward 2.5× the
forward, the flash-attention convention, which here is the kernels' own count to 1% (recomputed
q·k, dO·vᵀ, ds·kv, dsᵀ·q, pᵀ·dO: 2·H·(3·Dqk + 2·dv) = 2.53× at 576 / 512). The dense path's FLOPs
are counted the same way on its causal pairs. Prints tables, writes DIR/sparse_mla.json and
DIR/sparse_mla.png.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from deepwish.bench.env import bench_environment, doc_summary
from deepwish.bench.timing import graph_ms, rel_rms

H, DQK, DV, TOPK = 64, 576, 512, 2048
BWD_FACTOR = 2.5
KERNEL_SHAPES = [  # (name, T queries, S cache rows): the queries are the last T positions
    ("T4k", 4096, 4096), ("T8k", 8192, 8192), ("T32k", 32768, 32768), ("T64k", 65536, 65536),
    ("goal S4k/KV8k", 4096, 8192),
]
DECODE_CONTEXTS = [4096, 8192, 16384, 32768, 65536, 131072]
GOAL = dict(fwd_tflops=300.0, bwd_tflops=120.0)

SWEEP = {  # kind -> candidates (BH, BK, warps, stages); the ptxas notes in kernels/sparse_mla/triton.py
    "fwd": [(64, 64, 8, 2), (64, 32, 8, 2), (64, 32, 8, 3), (64, 64, 8, 1), (64, 16, 8, 2),
            (32, 64, 4, 2), (32, 32, 4, 2), (32, 32, 4, 3), (32, 64, 8, 2)],  # BH 32: two programs per token
    "dq": [(64, 32, 8, 1), (64, 32, 8, 2), (64, 16, 8, 2), (64, 64, 8, 1)],
    "dkv": [(64, 32, 8, 2), (64, 64, 8, 2), (64, 32, 8, 3), (64, 16, 8, 3)],
    "bwd": [(64, 16, 8, 2), (32, 16, 8, 1), (32, 16, 8, 2)],  # BH 64 with one stage faults (triton.py)
}


def causal_indices(B: int, T: int, S: int, K: int, device, seed: int = 0) -> torch.Tensor:
    """[B, T, K] int32: for the query at position S - T + t, K distinct slots drawn uniformly from
    its visible keys [0, S - T + t], in random order; -1 where fewer than K keys are visible. Built
    in row chunks (a [rows, S] random matrix and its top-k), never [T, S] at once."""
    g = torch.Generator(device=device).manual_seed(seed)
    out = torch.empty(B, T, K, dtype=torch.int32, device=device)
    rows = max(1, (1 << 27) // S)
    key = torch.arange(S, device=device)
    for b in range(B):
        for t0 in range(0, T, rows):
            t1 = min(T, t0 + rows)
            pos = torch.arange(S - T + t0, S - T + t1, device=device)
            r = torch.rand(t1 - t0, S, device=device, generator=g)
            r = r.masked_fill(key[None, :] > pos[:, None], -1.0)
            val, idx = r.topk(min(K, S), dim=1)
            idx = idx.masked_fill(val < 0, -1).int()
            if K > S:
                idx = torch.cat([idx, idx.new_full((t1 - t0, K - S), -1)], 1)
            out[b, t0:t1] = idx
    return out


def time_ms(fn, min_ms: float = 200.0, max_reps: int = 50) -> float:
    """Median milliseconds of fn() by CUDA events: one warm-up call, then as many as fit in
    about min_ms (at least 2; a call of seconds runs twice)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est = (time.perf_counter() - t0) * 1e3
    reps = int(max(2, min(max_reps, min_ms / max(est, 1e-3))))
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def make_inputs(T: int, S: int, device, dtype=torch.bfloat16, seed: int = 0, K: int = TOPK, heads: int = H):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(1, T, heads, DQK, device=device, dtype=dtype, generator=g)
    kv = torch.randn(1, S, DQK, device=device, dtype=dtype, generator=g)
    do = torch.randn(1, T, heads, DV, device=device, dtype=dtype, generator=g)
    return q, kv, causal_indices(1, T, S, K, device, seed), do


def check_slice(device, rows: int = 64, S: int = 8192) -> dict:
    """The kernel (forward and the current backward form) on the last `rows` queries over an S
    cache against the fp32 gather reference: relative RMS of o, lse, dq, dkv."""
    from deepwish.kernels.sparse_mla import reference as ref
    from deepwish.kernels.sparse_mla import triton as tk
    q, kv, idx, do = make_inputs(rows, S, device, seed=1)
    scale = DQK ** -0.5
    qf, kvf = q.float().requires_grad_(), kv.float().requires_grad_()
    wo, wl = ref.sparse_mla(qf, kvf, idx, dv=DV, scale=scale)
    wdq, wdkv = torch.autograd.grad(wo, (qf, kvf), do.float())
    o, lse = tk.forward(q, kv, idx, DV, scale)
    dq, dkv = tk.backward(q, kv, idx, o, lse, do, None, DV, scale)
    return dict(o=rel_rms(wo, o), lse=rel_rms(wl, lse), dq=rel_rms(wdq, dq), dkv=rel_rms(wdkv, dkv))


def check(device) -> list[dict]:
    from deepwish.kernels.sparse_mla import triton as tk
    rows = []
    keep = tk.BACKWARD
    for form in ("split", "fused"):
        tk.BACKWARD = form
        try:
            rows.append(dict(backward=form, **check_slice(device)))
        except Exception as e:  # noqa: BLE001 (a form that fails to compile is reported, not fatal)
            rows.append(dict(backward=form, error=f"{type(e).__name__}: {str(e)[:300]}"))
        print(rows[-1], flush=True)
    tk.BACKWARD = keep
    return rows


def sparse_times(q, kv, idx, do) -> dict:
    """Forward and backward milliseconds of the Triton kernels (the backward alone: delta, dq,
    dkv, the zeroed fp32 dkv buffer and its cast)."""
    from deepwish.kernels.sparse_mla import triton as tk
    scale = DQK ** -0.5
    with torch.no_grad():
        fwd = time_ms(lambda: tk.forward(q, kv, idx, DV, scale))
        o, lse = tk.forward(q, kv, idx, DV, scale)
        bwd = time_ms(lambda: tk.backward(q, kv, idx, o, lse, do, None, DV, scale))
    return dict(fwd_ms=fwd, bwd_ms=bwd)


def dense_times(q, kv, do, T: int, S: int) -> dict:
    """SDPA over the latent in MQA form (one shared 576-wide key and 512-wide value for every head)
    with a lower-right causal mask: forward, and backward as (forward + backward) - forward. The
    memory-efficient kernel with the latent broadcast over heads (stride 0), else with a copy per
    head, else the math kernel where its [H, T, S] scores fit; the row says which ran."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right
    qh = q.transpose(1, 2).detach().requires_grad_()                   # [1, H, T, 576]
    mask = causal_lower_right(T, S)
    dot = do.transpose(1, 2)
    tries = [("efficient", "expand"), ("efficient", "copy")]
    if 4 * q.shape[2] * T * S * 4 < 60e9:  # scores, probabilities and their gradients in fp32
        tries.append(("math", "expand"))
    errors, partial = [], None
    for kernel, layout in tries:
        k = kv.detach()[:, None].expand(-1, q.shape[2], -1, -1)        # [1, H, S, 576]
        k = (k.contiguous() if layout == "copy" else k).requires_grad_()
        v = k[..., :DV]
        backend = SDPBackend.EFFICIENT_ATTENTION if kernel == "efficient" else SDPBackend.MATH

        def fwd():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, scale=DQK ** -0.5)

        def fwdbwd():
            torch.autograd.grad(fwd(), (qh, k), dot)
        try:
            with torch.no_grad():
                f = time_ms(fwd)
        except RuntimeError as e:
            errors.append(f"{kernel}/{layout} fwd: {str(e).splitlines()[0][:120]}")
            torch.cuda.empty_cache()
            continue
        row = dict(fwd_ms=f, kernel=kernel, kv_layout=layout)
        try:
            row["bwd_ms"] = time_ms(fwdbwd) - f
            return row
        except RuntimeError as e:
            errors.append(f"{kernel}/{layout} bwd: {str(e).splitlines()[0][:120]}")
            row["bwd_error"] = errors[-1]
            partial = partial or row
            torch.cuda.empty_cache()
    if partial is not None:  # a forward ran, no backward did
        return partial
    raise RuntimeError("; ".join(errors))


def kernel_rows(device, quick: bool, dense_max_t: int) -> list[dict]:
    rows = []
    for name, T, S in (KERNEL_SHAPES[:1] + KERNEL_SHAPES[-1:] if quick else KERNEL_SHAPES):
        q, kv, idx, do = make_inputs(T, S, device)
        sel = int((idx >= 0).sum())
        pairs = T * (S - T) + T * (T + 1) // 2
        per = 2 * H * (DQK + DV)
        r = dict(name=name, T=T, S=S, H=H, K=TOPK, selected=sel, fwd_tflop=per * sel / 1e12)
        try:
            r["sparse"] = sparse_times(q, kv, idx, do)
            r["sparse"]["fwd_tflops"] = per * sel / r["sparse"]["fwd_ms"] / 1e9
            r["sparse"]["bwd_tflops"] = BWD_FACTOR * per * sel / r["sparse"]["bwd_ms"] / 1e9
        except Exception as e:  # noqa: BLE001
            r["sparse"] = f"error: {type(e).__name__}: {str(e)[:300]}"
        if T > dense_max_t:
            r["dense"] = f"skipped (T > --dense-max-t {dense_max_t})"
        else:
            try:
                r["dense"] = dense_times(q, kv, do, T, S)
                r["dense"]["fwd_tflops"] = per * pairs / r["dense"]["fwd_ms"] / 1e9
                if "bwd_ms" in r["dense"]:
                    r["dense"]["bwd_tflops"] = BWD_FACTOR * per * pairs / r["dense"]["bwd_ms"] / 1e9
            except Exception as e:  # noqa: BLE001 (OOM or a refused kernel is a result here)
                r["dense"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        del q, kv, idx, do
        torch.cuda.empty_cache()
        print(fmt_kernel_row(r), flush=True)
        rows.append(r)
    return rows


def decode_rows(device, quick: bool) -> list[dict]:
    from deepwish.kernels.sparse_mla import triton as tk
    rows = []
    scale = DQK ** -0.5
    for L in (DECODE_CONTEXTS[:2] + DECODE_CONTEXTS[-1:] if quick else DECODE_CONTEXTS):
        for T in (1, 2):
            q, kv, idx, _ = make_inputs(T, L, device, seed=2)
            cfg = tk.tile_config("fwd", q.dtype, DQK, H)
            programs = T * -(-H // cfg["BH"])
            r = dict(L=L, T=T, K=TOPK, H=H, splits=tk.plan_splits(programs, TOPK, cfg["BK"], device)[0])
            with torch.no_grad():
                try:
                    r["sparse_us"] = 1e3 * graph_ms(lambda: tk.forward(q, kv, idx, DV, scale))
                except Exception as e:  # noqa: BLE001
                    r["sparse_us"] = f"error: {type(e).__name__}: {str(e)[:200]}"

                def dense():  # the weight-absorbed dense step: every head against the whole latent
                    s = torch.einsum("bthd,bsd->bths", q, kv).float() * scale
                    s = s + torch.full((T, L), float("-inf"), device=device).triu(L - T + 1)[None, :, None]
                    p = torch.softmax(s, -1).to(kv.dtype)
                    return torch.einsum("bths,bsd->bthd", p, kv[..., :DV])
                try:
                    r["dense_us"] = 1e3 * graph_ms(dense)
                except Exception as e:  # noqa: BLE001
                    r["dense_us"] = f"error: {type(e).__name__}: {str(e)[:200]}"
            print(fmt_decode_row(r), flush=True)
            rows.append(r)
    return rows


def sweep(device, out: Path, kinds: tuple[str, ...] = ("fwd", "dq", "dkv", "bwd")) -> dict:
    """Each candidate of SWEEP at the goal shape: checked on a slice (o, dq, dkv rel RMS < 3e-2),
    then timed; the fastest per kind is kept in TILES, and the faster backward form in BACKWARD."""
    from deepwish.kernels.sparse_mla import triton as tk
    name, T, S = KERNEL_SHAPES[-1]
    q, kv, idx, do = make_inputs(T, S, device)
    res = {}

    def run(kind, form):
        best = None
        for cand in SWEEP[kind]:
            tk.TILES[(kind, "16bit", "wide")] = cand
            tk.BACKWARD = form
            try:
                err = check_slice(device)
                if max(err.values()) > 3e-2:
                    raise RuntimeError(f"wrong: {err}")
                t = sparse_times(q, kv, idx, do)
                ms = t["fwd_ms"] if kind == "fwd" else t["bwd_ms"]
                row = dict(kind=kind, tile=cand, ms=ms)
            except Exception as e:  # noqa: BLE001 (out of resources etc.: recorded, skipped)
                row = dict(kind=kind, tile=cand, error=f"{type(e).__name__}: {str(e)[:200]}")
            print(row, flush=True)
            res.setdefault(kind, []).append(row)
            if "ms" in row and (best is None or row["ms"] < best[1]):
                best = (cand, row["ms"])
        if best is not None:
            tk.TILES[(kind, "16bit", "wide")] = best[0]
        return best

    if "fwd" in kinds:
        run("fwd", "split")
    # the forward's loop options at its fastest tile: lazy rescaling, automatic warp specialization
    best_fwd = None
    loops = ((False, False, False), (8.0, False, False), (False, False, True), (8.0, False, True),
             (False, True, False), (8.0, True, True))
    for lazy, ws, ahead in loops if "fwd" in kinds else ():
        tk.FWD_LAZY_RESCALE, tk.FWD_WARP_SPECIALIZE, tk.FWD_INDEX_AHEAD = lazy, ws, ahead
        row = dict(kind="fwd_loop", lazy_rescale=lazy, warp_specialize=ws, index_ahead=ahead,
                   tile=tk.TILES[("fwd", "16bit", "wide")])
        try:
            err = check_slice(device)
            if max(err.values()) > 3e-2:
                raise RuntimeError(f"wrong: {err}")
            row["ms"] = sparse_times(q, kv, idx, do)["fwd_ms"]
        except Exception as e:  # noqa: BLE001 (a compile failure of one option is recorded, skipped)
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        print(row, flush=True)
        res.setdefault("fwd_loop", []).append(row)
        if "ms" in row and (best_fwd is None or row["ms"] < best_fwd[3]):
            best_fwd = (lazy, ws, ahead, row["ms"])
    if best_fwd is not None:
        tk.FWD_LAZY_RESCALE, tk.FWD_WARP_SPECIALIZE, tk.FWD_INDEX_AHEAD = best_fwd[:3]
    if "dq" in kinds:
        run("dq", "split")
    split = run("dkv", "split") if "dkv" in kinds else None
    fused = run("bwd", "fused") if "bwd" in kinds else None
    if split is not None and fused is not None:  # the backward form only when both were timed
        tk.BACKWARD = "fused" if fused[1] < split[1] else "split"
    picks = {"|".join(k): list(v) for k, v in tk.TILES.items() if k[1:] == ("16bit", "wide")}
    picks["backward"] = tk.BACKWARD
    picks["fwd_lazy_rescale"] = tk.FWD_LAZY_RESCALE
    picks["fwd_warp_specialize"] = tk.FWD_WARP_SPECIALIZE
    picks["fwd_index_ahead"] = tk.FWD_INDEX_AHEAD
    (out / "tiles.json").write_text(json.dumps(picks, indent=1))
    res["picked"] = picks
    print("picked:", picks, flush=True)
    return res


def ptxas_report(cases: list[tuple[str, tuple[int, int, int, int]]] | None = None) -> list[dict]:
    """Compile the bf16 kernels at Dqk 576 = 512 + 64 for sm_90a without a GPU (Triton's own ptxas
    -v): shared memory, registers and spilled bytes per launch config; by default TILES' 16-bit
    wide rows and the sweep's candidates. How the TILES defaults were chosen."""
    import os
    import re
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from deepwish.kernels.sparse_mla import triton as tk
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    pointers = {"IDX": "*i32", "LSE": "*fp32", "OP": "*fp32", "LP": "*fp32", "DELTA": "*fp32", "DKV": "*fp32"}
    floats = {"scale", "scale_log2"}
    kernels = {"fwd": (tk._fwd_kernel, dict(SPLIT=False, LAZY=float(tk.FWD_LAZY_RESCALE or 0.0), WS=bool(tk.FWD_WARP_SPECIALIZE),
                                                  AHEAD=bool(tk.FWD_INDEX_AHEAD))), "bwd": (tk._bwd_kernel, dict(FUSED=True)),
               "dq": (tk._bwd_kernel, dict(FUSED=False)), "dkv": (tk._dkv_kernel, {})}
    if cases is None:
        cases = [(k, v) for k in kernels for v in dict.fromkeys([tk.TILES[(k, "16bit", "wide")], *SWEEP[k]])]
    rows = []
    for kind, (bh, bk, warps, stages) in cases:
        fn, extra = kernels[kind]
        consts = dict(BLOCK_V=512, BLOCK_R=64, HAS_TAIL=True, PREC="tf32", BH=bh, BK=bk, **extra)
        sig, attrs = {}, {}
        for i, name in enumerate(fn.arg_names):
            if name in consts:
                sig[name] = "constexpr"
            elif name in pointers or name in ("Q", "KV", "O", "DO", "DQ", "PB", "DSB"):
                sig[name] = pointers.get(name, "*bf16")
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif name in floats:
                sig[name] = "fp32"
            else:
                sig[name] = "i64" if name.endswith("_b") else "i32"
                if name.startswith("s") or name in ("DV", "DR", "K", "TC"):  # strides and sizes: multiples of 16
                    attrs[(i,)] = [["tt.divisibility", 16]]
        src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                        attrs=attrs)
        row = dict(kind=kind, tile=(bh, bk, warps, stages))
        try:
            k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
            with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
                f.write(k.asm["ptx"])
            info = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                                  capture_output=True, text=True).stderr
            os.unlink(f.name)
            regs = re.search(r"Used (\d+) registers", info)
            spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
            row.update(shared_kib=k.metadata.shared / 1024, registers=int(regs.group(1)) if regs else None,
                       spill_bytes=int(spill.group(1)) if spill else None,
                       v4_atomics=len(re.findall(r"add\.v4\.f32", k.asm["ptx"])))
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        print(row, flush=True)
        rows.append(row)
    return rows


def apply_tiles(path: str) -> None:
    from deepwish.kernels.sparse_mla import triton as tk
    for key, cfg in json.loads(Path(path).read_text()).items():
        if key == "backward":
            tk.BACKWARD = cfg
        elif key == "fwd_lazy_rescale":
            tk.FWD_LAZY_RESCALE = cfg
        elif key == "fwd_warp_specialize":
            tk.FWD_WARP_SPECIALIZE = cfg
        elif key == "fwd_index_ahead":
            tk.FWD_INDEX_AHEAD = cfg
        else:
            tk.TILES[tuple(key.split("|"))] = tuple(cfg)


def fmt_kernel_row(r: dict) -> str:
    def cell(x, k):
        return f"{x[k]:.2f}" if isinstance(x, dict) and k in x else "-"

    def tf(x, k):
        return f"{x[k]:.0f}" if isinstance(x, dict) and k in x else "-"
    s, d = r.get("sparse"), r.get("dense")
    both = isinstance(s, dict) and isinstance(d, dict) and "bwd_ms" in d
    speed = f"{(d['fwd_ms'] + d['bwd_ms']) / (s['fwd_ms'] + s['bwd_ms']):.1f}x" if both else "-"
    note = "" if isinstance(s, dict) else f" sparse: {s}"
    note += f" dense: {d}" if not isinstance(d, dict) else (f" dense ({d['kernel']}): {d['bwd_error']}"
                                                           if "bwd_error" in d else "")
    return (f"| {r['name']} | {r['T']} | {r['S']} | {cell(s, 'fwd_ms')} | {tf(s, 'fwd_tflops')} | {cell(s, 'bwd_ms')} | "
            f"{tf(s, 'bwd_tflops')} | {cell(d, 'fwd_ms')} | {cell(d, 'bwd_ms')} | {tf(d, 'fwd_tflops')} | {speed} |{note}")


def fmt_decode_row(r: dict) -> str:
    def us(x):
        return f"{x:.1f}" if isinstance(x, float) else str(x)
    return f"| {r['L']} | {r['T']} | {r['splits']} | {us(r['sparse_us'])} | {us(r['dense_us'])} |"


KERNEL_HEADER = ("| shape | T | KV | sparse fwd ms | fwd TFLOP/s | sparse bwd ms | bwd TFLOP/s | dense fwd ms | "
                 "dense bwd ms | dense fwd TFLOP/s | dense/sparse fwd+bwd |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
                 "---:|---:|")
DECODE_HEADER = "| context | tokens | K splits | sparse us | dense us |\n|---:|---:|---:|---:|---:|"


def plot(kernel: list[dict], decode: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(14, 5))
    names = [r["name"] for r in kernel]
    x = range(len(kernel))
    for i, (path_, k) in enumerate((("sparse", "fwd_tflops"), ("sparse", "bwd_tflops"),
                                    ("dense", "fwd_tflops"), ("dense", "bwd_tflops"))):
        ys = [r[path_][k] if isinstance(r.get(path_), dict) else 0 for r in kernel]
        a1.bar([xi + 0.2 * i for xi in x], ys, width=0.2, label=f"{path_} {k.split('_')[0]}")
    a1.axhline(GOAL["fwd_tflops"], ls="--", c="k", lw=0.8)
    a1.axhline(GOAL["bwd_tflops"], ls=":", c="k", lw=0.8)
    a1.set_xticks([xi + 0.3 for xi in x], names, fontsize=8)
    a1.set_ylabel("TFLOP/s (selected slots / causal pairs)")
    a1.set_title(f"sparse MLA vs dense, H{H} D{DQK}/{DV} top-k {TOPK}, bf16 (goals dashed)")
    a1.legend(fontsize=8)
    for name, key in (("sparse", "sparse_us"), ("dense", "dense_us")):
        for T in (1, 2):
            pts = [(r["L"], r[key]) for r in decode if r["T"] == T and isinstance(r.get(key), float)]
            if pts:
                a2.plot(*zip(*pts), marker="o", label=f"{name} T{T}")
    a2.set_xscale("log", base=2)
    a2.set_yscale("log")
    a2.set_xlabel("context (cache rows)")
    a2.set_ylabel("us per step (CUDA graph)")
    a2.set_title("decode attention, batch 1")
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def environment(device) -> dict:
    return bench_environment(device, "deepwish bench dsa")


def run(device, out: Path, parts: list[str], quick: bool = False, sweep_first: bool = False,
        tiles: str | None = None, dense_max_t: int = 32768, sweep_kinds: str = "fwd,dq,dkv,bwd") -> dict:
    """The parts in order (check, kernel, decode), after an optional sweep; writes
    out/sparse_mla.json (after each part) and out/sparse_mla.png, prints the tables."""
    from deepwish.kernels.sparse_mla import triton as tk
    out.mkdir(parents=True, exist_ok=True)
    if tiles:
        apply_tiles(tiles)
    res = dict(env=environment(device), flops=f"fwd 2*H*(Dqk+dv) per selected (query, slot); bwd {BWD_FACTOR}x fwd")
    print(json.dumps(res["env"]), flush=True)
    if sweep_first:
        res["sweep"] = sweep(device, out, tuple(k for k in sweep_kinds.split(",") if k))
    res["tiles"] = {"|".join(k): v for k, v in tk.TILES.items()}
    res["backward"] = tk.BACKWARD
    res["fwd_loop"] = dict(lazy_rescale=tk.FWD_LAZY_RESCALE, warp_specialize=tk.FWD_WARP_SPECIALIZE,
                           index_ahead=tk.FWD_INDEX_AHEAD)
    steps = {"check": lambda: check(device),
             "kernel": lambda: kernel_rows(device, quick, dense_max_t),
             "decode": lambda: decode_rows(device, quick)}
    for part in parts:
        if part not in steps:
            raise ValueError(f"sparse_mla bench: unknown part {part!r}; choose from {', '.join(steps)}")
    for part in parts:
        if part == "kernel":
            print(KERNEL_HEADER, flush=True)
        if part == "decode":
            print(DECODE_HEADER, flush=True)
        try:
            res[part] = steps[part]()
        except Exception:  # noqa: BLE001
            res[part] = "error: " + traceback.format_exc()[-2000:]
            print(res[part], flush=True)
        (out / "sparse_mla.json").write_text(json.dumps(res, indent=1, default=str))
    if isinstance(res.get("kernel"), list) and isinstance(res.get("decode"), list):
        plot(res["kernel"], res["decode"], out / "sparse_mla.png")
    print(f"\n## sparse MLA kernel (H{H}, D{DQK}/{DV}, top-k {TOPK}, bf16; backward form {tk.BACKWARD})")
    print(f"FLOPs: {res['flops']}")
    if isinstance(res.get("kernel"), list):
        print(KERNEL_HEADER)
        for r in res["kernel"]:
            print(fmt_kernel_row(r))
    if isinstance(res.get("decode"), list):
        print(DECODE_HEADER)
        for r in res["decode"]:
            print(fmt_decode_row(r))
    print(f"wrote {out / 'sparse_mla.json'}", flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deepwish.bench.sparse_mla", description=doc_summary(__doc__))
    p.add_argument("--out", required=True)
    p.add_argument("--parts", default="check,kernel,decode", help="comma list, in order: check,kernel,decode")
    p.add_argument("--quick", action="store_true", help="T4k and the goal shape only; three decode contexts")
    p.add_argument("--sweep", action="store_true", help="time launch-config candidates first and use the fastest")
    p.add_argument("--sweep-kinds", default="fwd,dq,dkv,bwd", help="with --sweep: the kernels to sweep (fwd also times its loop options)")
    p.add_argument("--tiles", default=None, help="a tiles.json from an earlier --sweep")
    p.add_argument("--dense-max-t", type=int, default=32768, help="skip the dense path above this many queries")
    p.add_argument("--ptxas", action="store_true",
                   help="no GPU needed: compile the bf16 kernels for sm_90a and print shared memory, registers, "
                        "spills per launch config (TILES and the sweep's candidates), then exit")
    args = p.parse_args(argv)
    if args.ptxas:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "ptxas.json").write_text(json.dumps(ptxas_report(), indent=1))
        return 0
    if not torch.cuda.is_available():
        print("error: the sparse MLA bench needs a CUDA GPU", file=sys.stderr)
        return 2
    run(torch.device("cuda"), Path(args.out), [x for x in args.parts.split(",") if x], args.quick, args.sweep,
        args.tiles, args.dense_max_t, args.sweep_kinds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
