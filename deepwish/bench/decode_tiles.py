"""Launch configurations of the decode step's own kernels at a model's shapes, timed as the step
runs them: one launch per layer, back to back in one CUDA graph (each layer with its own weights
and cache, so nothing is served from L2), with programmatic dependent launch where the GPU has it
(model.decode_pdl=auto), one GPU run:

    python -m deepwish.bench.decode_tiles --out DIR [--preset qwen3_0.6b] [--context 512[,4096,...]]

Parts: `gemv`: the one-row GEMV (kernels/gemv/triton.py, batch 1) at the step's four projections
with what model.decode_fusion puts in them (q/k/v and gate/up with the pre-norm, gate/up with
SwiGLU's activation, o and down with the residual add) and the LM head, per (BN, BK, warps, stages), and
the shipped tiles without the bulk L2 prefetch of W (PREFETCH_UNDER_PDL) and autotuned alone (the
shapes of IN_STEP_TILES too); `split`: the split-KV decode kernel with its merge kernel
(kernels/attention/decode.py) per programs per SM, chunk unit and (BN, warps,
stages), and with its L2 prefetch of keys and values switched (PREFETCH_UNDER_PDL); `step` (opt-in): the whole step of the model
as it comes, captured (--step-mode compiled: compiled and captured), as shipped, with the split
kernel's prefetch switched and with every GEMV
tile autotuned alone. Every candidate's output is checked against
the shipped configuration's first (a wrong one is dropped). `rows` (opt-in): the rows kernel
(2..64 rows) at the same projections for batches 8, 16, 32 and 64 against cuBLAS, in both operand
forms (ROWS_DOT), with K split (ROWS_SPLIT_K) and with the norm's row sums (ROWS_NORM_ROW_SUMS), fused
and plain; `--batch` runs the step part at other batches (with the
projections moved between cuBLAS and the rows kernel too). Prints µs a launch and the share of
the copy bandwidth the launch's bytes would take, and writes DIR/decode_tiles.json (every row, the
fastest per kernel, the shipped configuration's time).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch

from deepwish.bench.env import bench_environment, copy_bw, doc_summary
from deepwish.bench.timing import graph_ms, rel_rms

# one-row GEMV candidates (BN, BK, warps, stages): the autotuned list (kernels/gemv/triton.py) and
# fewer rows a program with longer K tiles (more bytes in flight a program, more programs at N=1024)
GEMV_CANDIDATES = [(4, 512, 4, 4), (8, 256, 4, 4), (8, 512, 4, 3), (16, 256, 4, 3), (16, 512, 8, 3),
                   (32, 256, 8, 3), (32, 128, 4, 4), (64, 128, 8, 3),
                   (2, 512, 4, 3), (2, 1024, 4, 2), (2, 1024, 8, 2), (4, 1024, 4, 2), (4, 1024, 8, 2),
                   (4, 1024, 8, 3), (8, 1024, 8, 2), (8, 1024, 8, 3), (2, 2048, 8, 1), (4, 2048, 8, 1),
                   (1, 1024, 4, 2), (1, 2048, 4, 1), (4, 256, 2, 4), (8, 256, 2, 4)]
# split-KV candidates: programs per SM x chunk unit x (BN, warps, stages)
SPLIT_PER_SM = (1, 2, 4, 8)
# (at context 512 on an H200, 9 splits of 64 slots beat 5 of 128: a program's chain of dependent
# loads, not the bytes, sets the time; 32 tries shorter chunks still)
SPLIT_UNITS = (32, 64, 128)
SPLIT_TILES = [(64, 4, 3), (64, 4, 2), (32, 4, 2), (32, 2, 2), (64, 8, 2), (128, 8, 2), (32, 4, 3)]


@contextlib.contextmanager
def switched(obj, **values):
    """obj's attributes (a module's switches, a kernel's autotuning cache) set to `values` for the
    block, then back to what they were."""
    saved = {k: getattr(obj, k) for k in values}
    for k, v in values.items():
        setattr(obj, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(obj, k, v)


def _gemv_cases(cfg, layers: int, dev, rows: int = 1, dtype=torch.bfloat16) -> list[tuple[str, int, list]]:
    """(name, bytes of W a launch, per-launch argument dicts) for the step's GEMVs at batch `rows`."""
    bf = dict(device=dev, dtype=dtype)
    d, ff, H, Hkv, D = cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, **bf) * scale

    x = rnd(rows, d)
    nw = 1 + 0.1 * rnd(d)
    # (name, rows of W, K, fusions): W's rows are the outputs but for gate/up's (SwiGLU: half)
    shapes = [("qkv+norm", (H + 2 * Hkv) * D, d, dict(norm=(nw, 1e-6, False))),
              ("o+residual", d, H * D, dict(residual=x)),
              ("gate_up+norm+swiglu", 2 * ff, d, dict(norm=(nw, 1e-6, False), glu=True)),
              ("down+residual", d, ff, dict(residual=x))]
    cases = []
    for name, N, K, kw in shapes:
        inp = x if K == d else rnd(rows, K)
        calls = [dict(x=inp, weight=rnd(N, K, scale=0.02), **kw) for _ in range(layers)]
        cases.append((name, N * K * 2, calls))
    cases.append(("lm_head", cfg.vocab_size * d * 2, [dict(x=x, weight=rnd(cfg.vocab_size, d, scale=0.02))]))
    return cases


def sweep_gemv(cfg, layers: int, dev, pdl: str, rows: list) -> None:
    from deepwish.kernels.gemv import triton as gk
    import triton
    kernel = gk._one_row_kernel
    shipped = list(kernel.configs)
    try:
        for name, nbytes, calls in _gemv_cases(cfg, layers, dev):
            run = lambda: [gk.gemv(**c, pdl=pdl) for c in calls]  # noqa: E731
            kernel.configs, kernel.cache = shipped, {}
            want = run()
            base_us = graph_ms(run) * 1e3 / len(calls)
            pick = kernel.best_config
            print(f"gemv {name}: {nbytes / 1e6:.1f} MB a launch x {len(calls)}; shipped ({pick.kwargs}, "
                  f"w{pick.num_warps} s{pick.num_stages}): {base_us:.2f} us ({nbytes / base_us / 1e-6 / copy_bw():.0%} "
                  f"of copy)", flush=True)
            rows.append(dict(kernel="gemv", case=name, config="shipped", us=base_us, bytes=nbytes,
                             picked=[pick.kwargs["BN"], pick.kwargs["BK"], pick.num_warps, pick.num_stages]))
            # every tile autotuned alone, as other shapes are (then the shipped picks back, not re-tuned)
            with switched(gk, USE_IN_STEP_TILES=False), switched(kernel, cache={}):
                run()
                alone, alone_us = kernel.best_config, graph_ms(run) * 1e3 / len(calls)
            rows.append(dict(kernel="gemv", case=name, config="autotuned alone", us=alone_us, bytes=nbytes,
                             picked=[alone.kwargs["BN"], alone.kwargs["BK"], alone.num_warps, alone.num_stages]))
            print(f"  autotuned alone ({alone.kwargs}, w{alone.num_warps} s{alone.num_stages}): {alone_us:.2f} us",
                  flush=True)
            with switched(gk, PREFETCH_UNDER_PDL=False):  # the same tiles without the bulk L2 prefetch
                no_prefetch_us = graph_ms(run) * 1e3 / len(calls)
            rows.append(dict(kernel="gemv", case=name, config="shipped without prefetch", us=no_prefetch_us,
                             bytes=nbytes))
            print(f"  shipped tiles without the L2 prefetch: {no_prefetch_us:.2f} us", flush=True)
            for bn, bk, w, s in GEMV_CANDIDATES:
                kernel.configs = [triton.Config({"BN": bn, "BK": bk}, num_warps=w, num_stages=s)]
                kernel.cache = {}
                try:
                    got = run()
                    err = max(rel_rms(a, b) for a, b in zip(want, got))
                    us = graph_ms(run) * 1e3 / len(calls) if err < 1e-2 else float("nan")
                except Exception as e:  # noqa: BLE001 (a config that does not compile is a row, not a stop)
                    err, us = float("nan"), float("nan")
                    print(f"  {bn}x{bk} w{w} s{s}: {type(e).__name__}", flush=True)
                rows.append(dict(kernel="gemv", case=name, config=[bn, bk, w, s], us=us, bytes=nbytes, rel_rms=err))
                print(f"  BN {bn:3d} BK {bk:5d} w{w} s{s}: {us:7.2f} us ({nbytes / us / 1e-6 / copy_bw():4.0%})", flush=True)
    finally:
        kernel.configs, kernel.cache = shipped, {}


ROW_COUNTS = (8, 16, 32, 64)  # the rows part's batches: the GEMV's 2..16 and the GEMM range above it
_OFF = dict(ROWS_SPLIT_K=False, ROWS_NORM_ROW_SUMS=False)
# the rows part's kernel forms: (label, kernels/gemv/triton.py switches); the norm row sums only
# where the projection has the norm, and only fused (without it they change nothing)
ROWS_FORMS = [("kernel tf32", dict(_OFF, ROWS_DOT="tf32")), ("kernel native", dict(_OFF, ROWS_DOT="native")),
              ("kernel native, K split", dict(_OFF, ROWS_DOT="native", ROWS_SPLIT_K=True)),
              ("kernel native, norm row sums", dict(_OFF, ROWS_DOT="native", ROWS_NORM_ROW_SUMS=True)),
              ("kernel native, K split, norm row sums", dict(ROWS_DOT="native", ROWS_SPLIT_K=True,
                                                            ROWS_NORM_ROW_SUMS=True))]


def sweep_rows(cfg, layers: int, dev, pdl: str, rows: list, counts=ROW_COUNTS, dtype=torch.bfloat16) -> None:
    """The rows kernel (2..64 rows: a decode step of that batch) at the step's projections, against
    cuBLAS (F.linear: the product alone, without the norm, activation and add the kernel takes in;
    in the step those are separate kernels, or fused by the compiler into others), with both
    tensor-core operand forms (ROWS_DOT), with K cut into slices (ROWS_SPLIT_K) and with the norm's
    statistics summed a row per tile (ROWS_NORM_ROW_SUMS): ROWS_FORMS; and the kernel without its
    fusions beside cuBLAS."""
    import torch.nn.functional as F

    from deepwish.kernels.gemv import triton as gk
    for M in counts:
        for name, nbytes, calls in _gemv_cases(cfg, layers, dev, rows=M, dtype=dtype):
            plain = [dict(x=c["x"], weight=c["weight"]) for c in calls]
            cublas = lambda: [F.linear(c["x"], c["weight"]) for c in plain]  # noqa: E731
            cases = [("cublas", cublas)]
            for label, switches in ROWS_FORMS:
                if switches.get("ROWS_NORM_ROW_SUMS") and calls[0].get("norm") is None:
                    continue  # no norm: the same kernel as without
                cases.append((f"{label}, fused", lambda sw=switches: _rows_forms(gk, sw, calls, pdl)))
                if not switches.get("ROWS_NORM_ROW_SUMS"):
                    cases.append((f"{label}, plain", lambda sw=switches: _rows_forms(gk, sw, plain, pdl)))
            base = None
            for label, fn in cases:
                gk._rows_kernel.cache = {}
                try:
                    got = fn()
                    us = graph_ms(fn) * 1e3 / len(calls)
                    if label == "cublas":
                        base = got
                    err = max(rel_rms(a, b) for a, b in zip(base, got)) if "plain" in label else float("nan")
                    pick = gk._rows_kernel.best_config if label != "cublas" else None
                except Exception as e:  # noqa: BLE001 (a form that fails is a row, not a stop)
                    us, err, pick = float("nan"), float("nan"), None
                    print(f"rows {M} {name} {label}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                picked = None if pick is None else [pick.kwargs["BN"], pick.kwargs["BK"], pick.num_warps, pick.num_stages]
                rows.append(dict(kernel="rows", case=f"{name}, {M} rows", config=label, us=us, bytes=nbytes,
                                 rel_rms=err, picked=picked))
                print(f"rows {M:2d} {name:22s} {label:31s}: {us:7.2f} us ({nbytes / us / 1e-6 / copy_bw():4.0%} of copy)"
                      f"{'' if picked is None else f' tile {picked}'}{'' if err != err else f' rel. rms {err:.1e}'}",
                      flush=True)
    gk._rows_kernel.cache = {}


def _rows_forms(gk, switches: dict, calls: list, pdl: str) -> list:
    with switched(gk, **switches):
        return [gk.gemv(**c, pdl=pdl) for c in calls]


def sweep_split(cfg, layers: int, context: int, dev, pdl: str, rows: list) -> None:
    from deepwish.kernels.attention import decode as dk
    H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    L = context + 64  # a cache sized for the prompt and some new tokens, as generate sizes it
    g = torch.Generator(device=dev).manual_seed(1)
    bf = dict(device=dev, dtype=torch.bfloat16)
    caches = [(torch.randn(1, Hkv, L, D, generator=g, **bf), torch.randn(1, Hkv, L, D, generator=g, **bf))
              for _ in range(layers)]
    qs = [torch.randn(1, 1, H, D, generator=g, **bf) for _ in range(layers)]
    pos = torch.full((1, 1), context, device=dev, dtype=torch.int64)
    nbytes = 2 * Hkv * (context + 1) * D * 2  # the keys and values a step reads (positions 0..context)
    saved = {k: getattr(dk, k) for k in ("DECODE_PROGRAMS_PER_SM", "DECODE_CHUNK_UNIT", "DECODE_BN", "DECODE_WARPS",
                                         "DECODE_STAGES")}
    run = lambda: [dk.decode_attention(q, k, v, pos, pdl=pdl)  # noqa: E731
                   for q, (k, v) in zip(qs, caches)]
    try:
        want = run()
        base_us = graph_ms(run) * 1e3 / layers
        splits, chunk = dk.plan_splits(1, Hkv, L, dev)
        print(f"split context {context} (cache {L}): shipped {saved} splits {splits} chunk {chunk}: {base_us:.2f} us "
              f"({nbytes / base_us / 1e-6 / copy_bw():.0%} of copy)", flush=True)
        rows.append(dict(kernel="split", case=f"context {context}", config="shipped", us=base_us, bytes=nbytes,
                         picked=list(saved.values())))
        # the same kernel with its bulk L2 prefetch of keys and values switched (on by default since 2026-12-06)
        flipped = not dk.PREFETCH_UNDER_PDL
        with switched(dk, PREFETCH_UNDER_PDL=flipped):
            err = max(rel_rms(a, b) for a, b in zip(want, run()))
            flipped_us = graph_ms(run) * 1e3 / layers
        label = f"shipped {'with' if flipped else 'without'} prefetch"
        rows.append(dict(kernel="split", case=f"context {context}", config=label, us=flipped_us, bytes=nbytes,
                         rel_rms=err))
        print(f"  {label}: {flipped_us:.2f} us (rel. rms {err:.1e} from shipped)", flush=True)
        for per_sm in SPLIT_PER_SM:
            for unit in SPLIT_UNITS:
                for bn, w, s in SPLIT_TILES:
                    dk.DECODE_PROGRAMS_PER_SM, dk.DECODE_CHUNK_UNIT = per_sm, unit
                    dk.DECODE_BN, dk.DECODE_WARPS, dk.DECODE_STAGES = bn, w, s
                    splits, chunk = dk.plan_splits(1, Hkv, L, dev)
                    try:
                        got = run()
                        err = max(rel_rms(a, b) for a, b in zip(want, got))
                        us = graph_ms(run) * 1e3 / layers if err < 1e-2 else float("nan")
                    except Exception as e:  # noqa: BLE001
                        err, us = float("nan"), float("nan")
                        print(f"  {per_sm} {unit} {bn} w{w} s{s}: {type(e).__name__}", flush=True)
                    rows.append(dict(kernel="split", case=f"context {context}", config=[per_sm, unit, bn, w, s],
                                     splits=splits, chunk=chunk, us=us, bytes=nbytes, rel_rms=err))
                    print(f"  per_sm {per_sm} unit {unit:3d} BN {bn:3d} w{w} s{s} ({splits} x {chunk}): {us:6.2f} us",
                          flush=True)
    finally:
        for k, v in saved.items():
            setattr(dk, k, v)


_ROWS_SWITCHES = (("K split", "ROWS_SPLIT_K"), ("norm row sums", "ROWS_NORM_ROW_SUMS"))  # the step part's rows-kernel switches


def sweep_step(preset: str, context: int, dev, rows: list, new_tokens: int = 64, mode: str = "graph",
               batch: int = 1) -> None:
    """The whole decode step of the model with its defaults (`mode` graph: captured, the step
    `deepwish generate` runs on CUDA; compiled: compiled and captured, `generate --compile`'s) as
    shipped, then at batch 1 with the split kernel's L2 prefetch switched and with every GEMV tile
    autotuned alone; at a larger batch the other matmul: where the rows kernel serves the batch
    (MAX_ROWS_CAPTURED, or MAX_ROWS compiled), with its other operand form (ROWS_DOT), with K split
    (ROWS_SPLIT_K) and the norm row sums (ROWS_NORM_ROW_SUMS) each switched and both on, and with
    cuBLAS instead; else with the rows kernel instead of cuBLAS, as shipped and with both on."""
    import dataclasses

    from deepwish.bench.decode import _decode_rows, build
    from deepwish.config import model_config
    from deepwish.kernels import gemv as gemv_dispatch
    from deepwish.kernels.attention import decode as dk
    from deepwish.kernels.gemv import triton as gk
    cfg = model_config(preset)
    cfg = dataclasses.replace(cfg, max_seq_len=max(cfg.max_seq_len, context + new_tokens + 1))
    torch.manual_seed(0)
    model = build(cfg, dev)
    kernels = (gk._one_row_kernel, gk._rows_kernel)
    prefetch = dk.PREFETCH_UNDER_PDL
    other_dot = "native" if gk.ROWS_DOT == "tf32" else "tf32"
    variants = [("step, as shipped", {}, {}, {})]
    if batch == 1:
        variants += [
            (f"step, split {'without' if prefetch else 'with'} its L2 prefetch", {}, dict(PREFETCH_UNDER_PDL=not prefetch), {}),
            ("step, GEMV tiles autotuned alone", dict(USE_IN_STEP_TILES=False), {}, {})]
    elif batch <= (gemv_dispatch.MAX_ROWS if mode == "compiled" else gemv_dispatch.MAX_ROWS_CAPTURED):
        variants.append((f"step, rows kernel {other_dot}", dict(ROWS_DOT=other_dot), {}, {}))
        variants += [(f"step, rows kernel {'without' if getattr(gk, attr) else 'with'} {name}",
                      {attr: not getattr(gk, attr)}, {}, {}) for name, attr in _ROWS_SWITCHES]
        variants += [("step, rows kernel with both", {attr: True for _, attr in _ROWS_SWITCHES}, {}, {}),
                     ("step, projections on cuBLAS", {}, {}, dict(MAX_ROWS=0, MAX_ROWS_CAPTURED=0))]
    elif batch <= gk.KERNEL_MAX_ROWS:
        into = dict(MAX_ROWS=batch, MAX_ROWS_CAPTURED=batch)
        variants += [("step, projections on the rows kernel, not cuBLAS", {}, {}, into),
                     ("step, projections on the rows kernel with K split and norm row sums, not cuBLAS",
                      {attr: True for _, attr in _ROWS_SWITCHES}, {}, into)]
    for label, tiles, split, dispatch in variants:
        for k in kernels:
            k.cache = {}
        with switched(gk, **tiles), switched(dk, **split), switched(gemv_dispatch, **dispatch):
            (r,) = _decode_rows(preset, model, batch, context, new_tokens, [mode], dev, label=f"{label} ({mode})")
        rows.append(dict(kernel="step", case=f"batch {batch}, context {context}, {mode}", config=label,
                         us=(r.ms_per_step or float("nan")) * 1e3, bytes=r.weight_gb * 1e9 + r.cache_gb * 1e9,
                         note=r.note))
    for k in kernels:
        k.cache = {}


def run(out_dir, preset: str = "qwen3_0.6b", context: int | tuple[int, ...] = 512, parts=("gemv", "split"),
        step_mode: str = "graph", batch: int | tuple[int, ...] = 1, row_counts: tuple[int, ...] = ROW_COUNTS) -> dict:
    """`context`: one or several; the split part sweeps each, the step part takes the first.
    `batch`: one or several, the step part runs each."""
    batches = (batch,) if isinstance(batch, int) else tuple(batch)
    contexts = (context,) if isinstance(context, int) else tuple(context)
    from deepwish.config import model_config
    from deepwish.kernels.pdl import use_pdl
    if not torch.cuda.is_available():
        raise RuntimeError("the decode tile sweep needs a CUDA device")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    cfg = model_config(preset)
    pdl = cfg.decode_pdl
    print(f"== decode tiles: {preset}, {cfg.n_layers} launches a kernel, context {list(contexts)}, pdl={pdl} "
          f"({'on' if use_pdl(pdl, dev, 'gemv') else 'off'} here), {torch.cuda.get_device_name()}", flush=True)
    rows: list = []
    t0 = time.time()
    if "gemv" in parts:
        sweep_gemv(cfg, cfg.n_layers, dev, pdl, rows)
    if "split" in parts:
        for c in contexts:
            sweep_split(cfg, cfg.n_layers, c, dev, pdl, rows)
    if "rows" in parts:
        sweep_rows(cfg, cfg.n_layers, dev, pdl, rows, counts=row_counts)
    if "step" in parts:
        for b in batches:
            sweep_step(preset, contexts[0], dev, rows, mode=step_mode, batch=b)
    best = {}
    for r in rows:
        if isinstance(r["config"], list) and r["us"] == r["us"]:
            key = f"{r['kernel']}|{r['case']}"
            if key not in best or r["us"] < best[key]["us"]:
                best[key] = r
    print("\n| kernel | case | shipped µs | best µs | best config | best % of copy |\n|---|---|---:|---:|---|---:|")
    for r in rows:
        if r["config"] == "shipped":
            b = best.get(f"{r['kernel']}|{r['case']}")
            if b:
                print(f"| {r['kernel']} | {r['case']} | {r['us']:.2f} | {b['us']:.2f} | {b['config']} | "
                      f"{b['bytes'] / b['us'] / 1e-6 / copy_bw():.0%} |")
    result = dict(env=bench_environment(dev, "python -m deepwish.bench.decode_tiles", preset=preset,
                                                  context=list(contexts)),
                  rows=rows, best=best, seconds=time.time() - t0)
    (out / "decode_tiles.json").write_text(json.dumps(result, indent=1, default=str))
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deepwish.bench.decode_tiles", description=doc_summary(__doc__))
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="qwen3_0.6b")
    ap.add_argument("--context", default="512", help="comma-separated: the split part sweeps each, the step takes the first")
    ap.add_argument("--parts", default="gemv,split", help="comma-separated subset of gemv, split, rows, step")
    ap.add_argument("--batch", default="1", help="comma-separated: the step part's batches")
    ap.add_argument("--rows", default=",".join(map(str, ROW_COUNTS)), help="comma-separated: the rows part's row counts")
    ap.add_argument("--step-mode", default="graph", choices=("graph", "compiled"),
                    help="the step part's step: captured (generate's) or compiled and captured (generate --compile's)")
    args = ap.parse_args(argv)
    run(args.out, args.preset, tuple(int(c) for c in args.context.split(",")), tuple(args.parts.split(",")),
        args.step_mode, tuple(int(b) for b in args.batch.split(",")), tuple(int(m) for m in args.rows.split(",")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
