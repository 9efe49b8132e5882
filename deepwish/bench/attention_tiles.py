"""Launch-config sweep of the flash-attention kernels (kernels/attention/triton.py: TILES) and of
the split-KV decode's split count (kernels/attention/decode.py), one GPU run:

    python -m deepwish.bench.attention_tiles --out DIR [--quick]
    python -m deepwish.bench.attention_tiles --out DIR --parts regs --kinds dkdv,dkdvq --classes d128-long
        (no GPU: compiles the candidates for sm_90 and prints ptxas's registers and spills)
    python -m deepwish.bench.attention_tiles --out DIR --parts tiles --focus --kinds fwd,dkdv
        (only FOCUS's candidates, the latest kernel changes, beside today's TILES picks)
    python -m deepwish.bench.attention_tiles --out DIR --parts tiles --focus --kinds fwd,dq --loads pointer,tma
        (each candidate with its streamed tiles through pointers and through descriptors: LOADS)

Each kernel (fwd, dkdv, dq; with --kinds also dkdvq, the dK/dV kernel with dq atomics) is timed
alone (triton.testing.do_bench, median) per candidate (BM, BN, warps, stages) on the shape classes
of its head-dim class, every candidate checked against the fp32 reference first (relative RMS of
its outputs; a wrong config is dropped). The candidates are compiled in parallel worker processes
into Triton's on-disk cache first (compile time dominates a sweep). Prints a table per kernel and
writes DIR/tiles.json ({"kind|head-dim class|16bit|length class": [BM, BN, warps, stages]}: the
fastest by mean time relative to the best per shape), which `deepwish bench attention --tiles
DIR/tiles.json` applies.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
import traceback
from pathlib import Path

import torch

from deepwish.bench.env import doc_summary
from deepwish.bench.timing import graph_ms, median_ms, rel_rms

# shape classes: (head-dim class, length class) -> [(name, (B, T, H, Hkv, D, docs per row), timed)];
# untimed shapes are checked against the fp32 reference only (the reference's [B, H, T, T]
# scores are too large past T8k), timed ones up to T2k are checked too.
SHAPES = {
    ("d128", "short"): [("B8 T2k 16/8 4docs", (8, 2048, 16, 8, 128, 4), True),
                        ("B2 T4k 16/8 causal", (2, 4096, 16, 8, 128, 1), True),
                        ("B1 T16k 16/8 causal", (1, 16384, 16, 8, 128, 1), True)],
    ("d256", "short"): [("B2 T2k 16/2 4docs", (2, 2048, 16, 2, 256, 4), True),
                        ("B1 T4k 16/2 4docs", (1, 4096, 16, 2, 256, 4), True)],
    ("d128", "long"): [("B1 T32k 2/1 4docs", (1, 32768, 2, 1, 128, 4), False),
                       ("B1 T64k 16/8 causal", (1, 65536, 16, 8, 128, 1), True),
                       ("B1 T64k 16/8 16docs", (1, 65536, 16, 8, 128, 16), True)],
    ("d256", "long"): [("B1 T32k 2/1 4docs", (1, 32768, 2, 1, 256, 4), False),
                       ("B1 T32k 16/2 4docs", (1, 32768, 16, 2, 256, 4), True)],
}
CANDIDATES = {
    ("fwd", "d128", "short"): [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3),
                               (128, 64, 8, 4)],
    ("dkdv", "d128", "short"): [(64, 128, 8, 2), (32, 128, 4, 3), (64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 3),
                                (128, 128, 8, 2), (64, 128, 4, 2)],
    ("dq", "d128", "short"): [(128, 64, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2)],
    ("fwd", "d256", "short"): [(64, 64, 8, 2), (128, 64, 8, 2), (64, 32, 4, 2), (128, 32, 8, 2), (64, 64, 4, 2)],
    ("dkdv", "d256", "short"): [(32, 64, 8, 2), (64, 64, 8, 2), (32, 32, 4, 2), (64, 32, 4, 2), (32, 64, 4, 2)],
    ("dq", "d256", "short"): [(64, 32, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2), (32, 64, 4, 2), (64, 32, 4, 2)],
    ("fwd", "d128", "long"): [(128, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 4), (128, 64, 8, 4)],
    ("dkdv", "d128", "long"): [(64, 128, 8, 3), (64, 128, 8, 2), (64, 128, 8, 4), (32, 128, 8, 3), (64, 64, 8, 3)],
    ("dq", "d128", "long"): [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (64, 128, 8, 3)],
    ("fwd", "d256", "long"): [(128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 3)],
    ("dkdv", "d256", "long"): [(64, 64, 8, 2), (64, 64, 8, 3), (64, 32, 8, 2), (32, 64, 8, 3)],
    ("dq", "d256", "long"): [(128, 32, 8, 2), (128, 32, 8, 3), (128, 64, 8, 2)],
    # the dK/dV kernel with dq atomics (BACKWARD_DQ = "atomic"; --kinds ...,dkdvq)
    ("dkdvq", "d128", "short"): [(32, 128, 8, 3), (32, 128, 8, 2), (64, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 3),
                                 (64, 64, 4, 3)],
    ("dkdvq", "d128", "long"): [(32, 128, 8, 3), (32, 128, 8, 2), (64, 128, 8, 3), (64, 128, 8, 2)],
    ("dkdvq", "d256", "short"): [(32, 64, 8, 2), (64, 64, 8, 2), (32, 32, 4, 2), (16, 64, 4, 2), (32, 128, 8, 2)],
    ("dkdvq", "d256", "long"): [(32, 64, 8, 2), (64, 64, 8, 2), (32, 128, 8, 2)],
}
# --focus: the candidates of one round of kernel changes, each class beside today's TILES pick
# (added to the list when absent). Candidates are (BM, BN, warps, stages) plus options: fwd
# (..., SLACK): lazy rescale in log2 units (0: every tile); dkdv / dkdvq (..., SPLIT): dK and dV
# summed by separate programs (one accumulator each).
# This round (reports/attention.md run 7): the K/V load forms (--loads pointer,tma) of the forward
# and dQ kernels; descriptors take fewer registers (ptxas, sm_90, triton 3.7: fwd 128 x 128 w8 s3
# 248 -> 216, 128 x 64 180 -> 174; dq 128 x 64 w8 s3 198 -> 192, 128 x 128 w8 s2 104 -> 24 bytes
# of spills), so the 128-key tiles were timed again. The dK/dV rows are today's picks and their
# neighbours (the round's descriptor form for them lost and was removed).
FOCUS = {
    ("fwd", "d128", "short"): [(128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 4)],
    ("fwd", "d128", "long"): [(128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3)],
    ("fwd", "d256", "short"): [(128, 64, 8, 2), (128, 64, 8, 3)],
    ("fwd", "d256", "long"): [(128, 64, 8, 2)],
    ("dq", "d128", "short"): [(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2)],
    ("dq", "d128", "long"): [(128, 64, 8, 3), (128, 64, 8, 4)],
    ("dq", "d256", "short"): [(128, 32, 8, 2)],
    ("dq", "d256", "long"): [(128, 32, 8, 2)],
    ("dkdv", "d128", "short"): [(32, 64, 4, 3), (32, 128, 8, 3), (64, 128, 8, 3)],
    ("dkdv", "d128", "long"): [(64, 128, 8, 3), (32, 128, 8, 3)],
    ("dkdv", "d256", "short"): [(32, 128, 8, 3, 1)],
    ("dkdv", "d256", "long"): [(32, 128, 8, 3, 1)],
    ("dkdvq", "d128", "short"): [(64, 128, 8, 3, 1), (32, 128, 8, 3, 1)],
    ("dkdvq", "d128", "long"): [(64, 128, 8, 3, 1), (32, 128, 8, 3, 1)],
    ("dkdvq", "d256", "short"): [(32, 128, 8, 2, 1), (16, 128, 8, 2, 1)],
    ("dkdvq", "d256", "long"): [(32, 128, 8, 2, 1), (16, 128, 8, 2, 1)],
}
for _key, _cands in FOCUS.items():  # the full lists hold the focus candidates too
    CANDIDATES[_key] += [c for c in _cands if c not in CANDIDATES[_key]]
DECODE_PER_SM = (1, 2, 4, 8, 16)


def candidate_lists(focus: bool) -> dict:
    """CANDIDATES, or with focus FOCUS with today's TILES pick first in each list."""
    if not focus:
        return CANDIDATES
    from deepwish.kernels.attention import triton as tk
    out = {}
    for (kind, d, t), cands in FOCUS.items():
        pick = tuple(tk.TILES[(kind, d, "16bit", t)])
        out[(kind, d, t)] = [pick] + [c for c in cands if tuple(c) != pick]
    return out


def make_inputs(shape, device, seed=0):
    from deepwish.bench.attention import make_doc_ids
    from deepwish.kernels.attention.triton import document_bounds
    B, T, H, Hkv, D, docs = shape
    gen = torch.Generator().manual_seed(seed)
    ids = make_doc_ids(B, T, docs, gen)
    ids = None if ids is None else ids.to(device)
    q = torch.randn(B, T, H, D, generator=gen).to(device, torch.bfloat16)
    k = torch.randn(B, T, Hkv, D, generator=gen).to(device, torch.bfloat16)
    v = torch.randn(B, T, Hkv, D, generator=gen).to(device, torch.bfloat16)
    do = torch.randn(B, T, H, D, generator=gen).to(device, torch.bfloat16)
    return q, k, v, do, ids, document_bounds(ids, B, T, device)


def run_kind(kind, q, k, v, do, bounds, o=None, lse=None, delta=None):
    from deepwish.kernels.attention import triton as tk
    scale = q.shape[-1] ** -0.5
    if kind == "fwd":
        return tk.forward(q, k, v, bounds[0], scale, 0, 0.0)
    if kind == "dkdv":
        return tk.backward_dkdv(q, k, v, do, lse, delta, bounds[0], bounds[1], scale, 0, 0.0)
    if kind == "dkdvq":
        return tk.backward_dkdvq(q, k, v, do, lse, delta, bounds[0], bounds[1], scale, 0, 0.0)
    return (tk.backward_dq(q, k, v, do, lse, delta, bounds[0], scale, 0, 0.0),)


def _prepare(shape, device):
    from deepwish.kernels.attention import triton as tk
    q, k, v, do, ids, bounds = make_inputs(shape, device)
    o, lse = tk.forward(q, k, v, bounds[0], q.shape[-1] ** -0.5, 0, 0.0)
    delta = tk.backward_delta(o, do)
    return q, k, v, do, ids, bounds, o, lse, delta


def _apply(kind, dcls, tcls, cand, load):
    """Make (cand, load) the launch of `kind` for its class: TILES, and LOADS for the kernels that
    load K/V tiles (load None: the module's own)."""
    from deepwish.kernels.attention import triton as tk
    tk.TILES[(kind, dcls, "16bit", tcls)] = cand
    if load is not None:
        tk.LOADS[kind] = load


_WORKER_DEFAULTS = None  # a worker's TILES and LOADS as imported, restored before each task


def _compile_worker(task):
    """Compile (and run once) one candidate in a worker: fills Triton's on-disk cache. A pool
    worker runs many tasks: each starts from the module's own launches, so the other kernels a
    task runs (the forward before a backward candidate) never take an earlier task's candidate."""
    global _WORKER_DEFAULTS
    from deepwish.kernels.attention import triton as tk
    if _WORKER_DEFAULTS is None:
        _WORKER_DEFAULTS = dict(tk.TILES), dict(tk.LOADS)
    tk.TILES.clear()
    tk.TILES.update(_WORKER_DEFAULTS[0])
    tk.LOADS.clear()
    tk.LOADS.update(_WORKER_DEFAULTS[1])
    kind, dcls, tcls, cand, load = task
    _apply(kind, dcls, tcls, cand, load)
    try:
        for _, shape, _ in SHAPES[(dcls, tcls)]:
            q, k, v, do, ids, bounds, o, lse, delta = _prepare(shape, "cuda")
            run_kind(kind, q, k, v, do, bounds, o, lse, delta)
        torch.cuda.synchronize()
        return task, "ok"
    except Exception as e:  # noqa: BLE001
        return task, f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"


def reference_grads(q, k, v, do, ids):
    from deepwish.kernels.attention import reference as ref
    qq, kk, vv = (x.detach().float().requires_grad_() for x in (q, k, v))
    o = ref.attention(qq, kk, vv, doc_ids=ids)
    dq, dk, dv = torch.autograd.grad(o, (qq, kk, vv), do.float())
    return dict(fwd=(o.detach(),), dkdv=(dk, dv), dq=(dq,), dkdvq=(dq, dk, dv))


def sweep_tiles(out: Path, workers: int, classes: list[tuple[str, str]], kinds=("fwd", "dkdv", "dq"),
                focus: bool = False, loads: tuple[str, ...] | None = None) -> dict:
    """loads: the K/V load forms (kernels/attention/triton.py LOADS) each candidate of the kernels
    that have them (fwd, dq) runs in; None: the module's own."""
    from deepwish.kernels.attention import triton as tk
    cand_lists = candidate_lists(focus)

    def forms(kind):  # the load forms a candidate of `kind` runs in (None: the module's own)
        return loads if loads and kind in tk.LOADS else (None,)

    tasks = [(kind, d, t, c, ld) for (kind, d, t), cands in cand_lists.items()
             if (d, t) in classes and kind in kinds for c in cands for ld in forms(kind)]
    t0 = time.time()
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers) as pool:
        compiled = dict(pool.imap_unordered(_compile_worker, tasks))
    print(f"compiled {len(tasks)} candidates in {time.time() - t0:.0f} s", flush=True)
    rows, best = [], {}
    for dcls, tcls in classes:
        prepared = []
        for name, shape, timed in SHAPES[(dcls, tcls)]:
            q, k, v, do, ids, bounds, o, lse, delta = _prepare(shape, "cuda")
            check = not timed or shape[1] <= 2048
            want = reference_grads(q, k, v, do, ids) if check else None
            prepared.append((name, timed, (q, k, v, do, bounds, o, lse, delta), want))
        for kind in kinds:
            times = {}
            if (kind, dcls, tcls) not in cand_lists:
                continue
            variants = [(c, ld) for c in cand_lists[(kind, dcls, tcls)] for ld in forms(kind)]
            for cand, load in variants:
                status = compiled.get((kind, dcls, tcls, cand, load))
                if status != "ok":
                    rows.append(dict(kind=kind, cls=[dcls, tcls], cand=cand, load=load, error=status))
                    print(f"{kind} {dcls} {tcls} {cand} {load or ''}: {status}", flush=True)
                    continue
                _apply(kind, dcls, tcls, cand, load)
                row = dict(kind=kind, cls=[dcls, tcls], cand=cand, load=load, ms={}, err=None)
                for name, timed, (q, k, v, do, bounds, o, lse, delta), want in prepared:
                    fn = lambda: run_kind(kind, q, k, v, do, bounds, o, lse, delta)  # noqa: E731
                    if want is not None:
                        got = fn()
                        err = max(rel_rms(a, b) for a, b in zip(want[kind], got))
                        row["err"] = max(err, row["err"] or 0.0)
                    if timed:
                        row["ms"][name] = median_ms(fn, warmup=10, rep=40)
                rows.append(row)
                if row["err"] is None or row["err"] < 1e-2:
                    times[(cand, load)] = row["ms"]
                print(f"{kind:5s} {dcls} {tcls:5s} BM{cand[0]:4d} BN{cand[1]:4d} w{cand[2]} s{cand[3]} "
                      f"{'opt ' + ','.join(map(str, cand[4:])) if len(cand) > 4 else '':8s} {load or '':7s} "
                      + "  ".join(f"{n}: {t:.3f} ms" for n, t in row["ms"].items())
                      + (f"  err {row['err']:.1e}" if row["err"] is not None else ""), flush=True)
            if times:
                names = list(next(iter(times.values())))
                fastest = {n: min(t[n] for t in times.values()) for n in names}
                score = {c: sum(t[n] / fastest[n] for n in names) / len(names) for c, t in times.items()}
                pick, load = min(score, key=score.get)
                best[f"{kind}|{dcls}|16bit|{tcls}"] = list(pick)
                if load is not None:
                    best[f"loads|{kind}|{dcls}|{tcls}"] = load
                _apply(kind, dcls, tcls, pick, load)
                print(f"  -> {kind} {dcls} {tcls}: {pick} {load or ''} (mean time / best {score[pick, load]:.3f})",
                      flush=True)
            del times
        del prepared
        torch.cuda.empty_cache()
    (out / "tiles.json").write_text(json.dumps(best, indent=1))
    (out / "tile_rows.json").write_text(json.dumps(rows, indent=1, default=str))
    return best


def sweep_decode(out: Path) -> list[dict]:
    """Split-KV decode at batch 1 (and 8): time per programs-per-SM, eager (do_bench) and as CUDA
    graph replays (launch overhead out), against the copy bandwidth."""
    from deepwish.kernels.attention import decode as dk
    dev = torch.device("cuda")
    x = torch.empty(1 << 30, dtype=torch.uint8, device=dev).random_()
    y = torch.empty_like(x)
    copy_gbs = 2 * x.numel() / median_ms(lambda: y.copy_(x)) / 1e6
    del x, y
    rows = []
    for L, B in ((32768, 1), (131072, 1), (32768, 8), (4096, 1)):
        kc = torch.randn(B, 8, L, 128, device=dev, dtype=torch.bfloat16)
        vc = torch.randn(B, 8, L, 128, device=dev, dtype=torch.bfloat16)
        q = torch.randn(B, 1, 16, 128, device=dev, dtype=torch.bfloat16)
        qp = torch.full((B, 1), L - 1, device=dev, dtype=torch.int64)
        nbytes = 2 * kc.numel() * 2
        for per_sm in DECODE_PER_SM:
            splits, chunk = dk.plan_splits(B, 8, L, dev, per_sm=per_sm)
            fn = lambda: dk.decode_attention(q, kc, vc, qp, splits=splits)  # noqa: E731
            eager = median_ms(fn, warmup=10, rep=50)
            graph = graph_ms(fn)
            row = dict(L=L, B=B, per_sm=per_sm, splits=splits, chunk=chunk, eager_us=eager * 1e3,
                       graph_us=graph * 1e3, graph_of_copy=nbytes / graph / 1e6 / copy_gbs,
                       eager_of_copy=nbytes / eager / 1e6 / copy_gbs)
            rows.append(row)
            print(f"decode L{L} B{B} per_sm {per_sm:2d} splits {splits:4d} chunk {chunk:6d}: eager {eager * 1e3:7.1f} us "
                  f"({row['eager_of_copy']:.0%} of copy)  graph {graph * 1e3:7.1f} us ({row['graph_of_copy']:.0%})",
                  flush=True)
        del kc, vc
        torch.cuda.empty_cache()
    (out / "decode_splits.json").write_text(json.dumps(dict(copy_gbs=copy_gbs, rows=rows), indent=1))
    return rows


def diagnose_unequal_dims(out: Path) -> list[dict]:
    """The bf16 error of the own kernel at Dqk 192 / Dv 128 beside equal dims, and beside SDPA's
    own bf16 error on the same inputs (what bf16 rounding alone costs)."""
    import torch.nn.functional as F
    from deepwish.kernels.attention import reference as ref
    from deepwish.kernels.attention.triton import flash_attention
    dev = torch.device("cuda")
    rows = []
    for H, Hkv, Dqk, Dv in ((8, 8, 192, 128), (8, 8, 128, 128), (8, 8, 192, 192), (8, 8, 256, 128), (16, 8, 192, 128)):
        torch.manual_seed(0)
        B, T = 2, 1500
        q = torch.randn(B, T, H, Dqk, device=dev, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(B, T, Hkv, Dqk, device=dev, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(B, T, Hkv, Dv, device=dev, dtype=torch.bfloat16, requires_grad=True)
        ids = torch.zeros(B, T, dtype=torch.long, device=dev)
        ids[0, 300:] += 1
        ids[0, 301:] += 1
        ids[1, 1000:] += 1
        g = torch.randn(B, T, H, Dv, device=dev)
        want = ref.attention(q, k, v, doc_ids=ids)
        wg = torch.autograd.grad((want.float() * g).sum(), (q, k, v))
        got = flash_attention(q, k, v, doc_ids=ids)
        gg = torch.autograd.grad((got.float() * g).sum(), (q, k, v))
        mask = ref.visible(T, ids, 0, dev, B)[:, None]
        rep = H // Hkv
        qt = q.transpose(1, 2)
        kt = k.repeat_interleave(rep, 2).transpose(1, 2)
        vt = v.repeat_interleave(rep, 2).transpose(1, 2)
        sd = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask).transpose(1, 2)
        sg = torch.autograd.grad((sd.float() * g).sum(), (q, k, v))
        row = dict(case=f"H{H}/{Hkv} Dqk{Dqk} Dv{Dv}",
                   own=[rel_rms(a, b) for a, b in zip((want, *wg), (got, *gg))],
                   sdpa_bf16=[rel_rms(a, b) for a, b in zip((want, *wg), (sd, *sg))])
        rows.append(row)
        print(f"{row['case']}: own o/dq/dk/dv " + " ".join(f"{e:.1e}" for e in row["own"])
              + " | sdpa bf16 " + " ".join(f"{e:.1e}" for e in row["sdpa_bf16"]), flush=True)
    (out / "unequal_dims.json").write_text(json.dumps(rows, indent=1))
    return rows


def compile_report(kind: str, head_dim: int, group: int, cand, form: str = "atomic") -> dict:
    """Compile one kernel for sm_90 without a GPU (Triton's own ptxas) and read what ptxas says:
    registers a thread, spill bytes (static: per thread, summed over the code), the tensor-core
    and atomic instructions in the PTX. A first filter for candidates, and the way to see what a
    code change costs in registers before a GPU run. `form`: the dkdvq orientation."""
    import os
    import re
    import subprocess
    import tempfile

    import triton
    import triton.backends.nvidia as nv
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from deepwish.kernels.attention import triton as tk
    fn = {"fwd": tk._fwd_kernel, "dkdv": tk._dkdv_kernel, "dkdvq": tk._dkdv_kernel, "dq": tk._dq_kernel}[kind]
    bm, bn, warps, stages, *rest = cand
    const = dict(BLOCK_DK=head_dim, BLOCK_DV=head_dim, GP=triton.next_power_of_2(group), SOFTCAP=False, PREC="tf32",
                 BM=bm, BN=bn, DQ_ATOMIC={"dkdv": 0, "dkdvq": 2 if form == "atomic_t" else 1}.get(kind, 0),
                 SPLIT=rest[0] if rest else 0, DQK=head_dim, DV=head_dim,
                 SLACK=rest[0] if rest else 0)
    fp32_ptrs, int_ptrs = {"LSE", "DELTA", "DQA"} if kind == "dkdvq" else {"LSE", "DELTA"}, {"DS", "DE"}
    sig, constexprs, attrs = {}, {}, {}
    for i, prm in enumerate(fn.params):
        name = prm.name
        if prm.is_constexpr:
            sig[name], constexprs[(i,)] = "constexpr", const[name]
        elif name in ("scale", "softcap"):
            sig[name] = "fp32"
        elif name.isupper() and name not in ("T", "H", "HKV", "G", "W", "DQK", "DV"):
            sig[name] = "*fp32" if name in fp32_ptrs else "*i32" if name in int_ptrs else "*bf16"
        else:
            sig[name] = "i32"
        # what the JIT's specialization tells the compiler at a real launch (contiguous [B, T, H, D]
        # tensors, T a multiple of 16, as in training): pointers 16-byte aligned, every stride, T, H,
        # W and the head dims divisible by 16 (HKV and G are not at the sweep's 16/8 and 16/2).
        # Without it every load is a scalar 16-bit load, no cp.async pipelining, and the register
        # count describes a kernel that never runs.
        if sig[name] != "constexpr" and sig[name] != "fp32" and name not in ("HKV", "G"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(fn, sig, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        ptxas = os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")
        log = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", path, "-o", path + ".cubin"],
                             capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return dict(kind=kind, head_dim=head_dim, group=group, cand=list(cand), form=form if kind == "dkdvq" else None,
                regs=int(regs.group(1)) if regs else None,
                spill_stores=int(spill.group(1)) if spill else None, spill_loads=int(spill.group(2)) if spill else None,
                shared=compiled.metadata.shared, wgmma=ptx.count("wgmma.mma_async"), mma_sync=ptx.count("mma.sync"),
                atomics=len(re.findall(r"(?:atom|red)\.global\S*add", ptx)))


def report_regs(out: Path, classes: list[tuple[str, str]], kinds, focus: bool = False) -> list[dict]:
    """compile_report for every candidate of the given kinds and classes (CPU only, ~5-20 s each)."""
    from deepwish.kernels.attention import triton as tk
    forms = ("atomic", "atomic_t")
    rows = []
    for (kind, dcls, tcls), cands in candidate_lists(focus).items():
        if kind not in kinds or (dcls, tcls) not in classes:
            continue
        D, G = (128, 2) if dcls == "d128" else (256, 8)  # the sweep's GQA: 16/8 at d128, 16/2 at d256
        for cand in cands:
            for form in forms if kind == "dkdvq" else (tk.BACKWARD_DQ,):
                try:
                    row = compile_report(kind, D, G, cand, form)
                except Exception as e:  # noqa: BLE001
                    row = dict(kind=kind, cand=list(cand), form=form, error=f"{type(e).__name__}: {str(e)[:200]}")
                rows.append(row)
                print(f"{kind:5s} {dcls} {tcls:5s} {cand} {form if kind == 'dkdvq' else '':8s} "
                      + " ".join(f"{k} {v}" for k, v in row.items() if k not in ("kind", "cand", "form", "head_dim",
                                                                                 "group")), flush=True)
    (out / "regs.json").write_text(json.dumps(rows, indent=1))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m deepwish.bench.attention_tiles", description=doc_summary(__doc__))
    p.add_argument("--out", required=True)
    p.add_argument("--parts", default="diag,decode,tiles")
    p.add_argument("--workers", type=int, default=12)
    p.add_argument("--classes", default="d128-short,d256-short,d128-long,d256-long",
                   help="shape classes to sweep: head-dim class - length class")
    p.add_argument("--kinds", default="fwd,dkdv,dq",
                   help="kernels to sweep: fwd, dkdv, dq, and dkdvq (the dK/dV kernel with dq atomics)")
    p.add_argument("--loads", default=None,
                   help="K/V load forms to cross with the fwd and dq candidates (pointer,tma; default: today's LOADS)")
    p.add_argument("--focus", action="store_true",
                   help="only FOCUS's candidates (the latest kernel changes) beside today's TILES picks")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    classes = [tuple(c.split("-")) for c in args.classes.split(",")]
    for part in args.parts.split(","):
        t0 = time.time()
        print(f"=== {part}", flush=True)
        try:
            {"diag": lambda: diagnose_unequal_dims(out), "decode": lambda: sweep_decode(out),
             "tiles": lambda: sweep_tiles(out, args.workers, classes, tuple(args.kinds.split(",")), args.focus,
                                          tuple(args.loads.split(",")) if args.loads else None),
             "regs": lambda: report_regs(out, classes, tuple(args.kinds.split(",")), args.focus)}[part]()
        except Exception:  # noqa: BLE001  (the other parts still run)
            traceback.print_exc()
        print(f"=== {part} took {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
