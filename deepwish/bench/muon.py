"""Benchmark: one optimizer step on a preset's parameters (AdamW, batched Muon, Muon per matrix).

    python -m deepwish.bench.muon --out reports/bench_muon [--preset qwen3_0.6b]
    deepwish bench muon --out reports/bench_muon

The model is built on the GPU in fp32 (the trainer's master weights) with random fp32 gradients;
optimizers as `build_optimizer` makes them (Muon on the hidden matrices, fused AdamW on the rest):
  adamw            fused AdamW on every parameter (train.optimizer=adamw);
  muon             Muon, same-shape matrices batched (train/muon.py), jordan coefficients,
                   train.muon_backend=auto (on CUDA the Triton step: kernels/muon/triton.py, its
                   Newton–Schulz matmuls picked per shape by timing, NS_KERNELS="auto");
  muon-overlap     muon with train.optimizer_overlap (the AdamW part on a second stream beside it);
  muon-triton-all  the triton backend with every Newton–Schulz matmul a kernel (NS_KERNELS="all");
  muon-torch       the same with train.muon_backend=torch (cuBLAS Newton–Schulz, foreach momentum
                   and update): the step before its kernels;
  muon-fused-cublas  the triton backend's fused momentum/stack and update passes around the torch
                   (cuBLAS) Newton–Schulz (kernels/muon/triton.py NS_KERNELS="none"): what the
                   Newton–Schulz kernels add on their own;
  muon-triton-gram the triton backend with cuBLAS for the update matmul a X + B X (NS_KERNELS="gram"):
                   the symmetric Gram kernels without the update kernel;
  muon-gram-ns     the triton backend with the Gram Newton–Schulz iteration for every stack
                   (kernels/muon/triton.py gram_newton_schulz, NS_KERNELS="gram_ns");
  muon-pe          the same with the Polar Express coefficients;
  muon-normuon     the same with NorMuon;
  muon-per-matrix  Muon one matrix at a time (the update rule without batching: one Newton–Schulz
                   launch chain per matrix), the reference for what batching buys.
Reported: median ms per step (CUDA events, after warm-up; with --profile also the device kernel
time per step and the longest kernels, from torch.profiler), the Newton–Schulz FLOPs of one step
(per matrix of min/max dims m <= n and k iterations: k·(4·m²·n + 2·m³)) and their rate against the
device's measured bf16 peak (train/mfu.py), and the FLOPs the triton backend executes (its two
symmetric products computed on 128-tiles on and above the diagonal only). Results: DIR/results.json,
DIR/muon_step.png.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from deepwish.bench.env import doc_summary

VARIANTS = ("adamw", "muon", "muon-overlap", "muon-torch", "muon-fused-cublas", "muon-triton-gram", "muon-triton-all",
            "muon-gram-ns", "muon-pe", "muon-normuon", "muon-per-matrix")


def _stack_dims(shape: tuple[int, ...], tile: int = 128) -> tuple[int, int, int, float]:
    """(matrices in the stack, d = min dim, D = max dim, the fraction of a d x d product's
    tile-x-tile tiles on and above the diagonal: T(T+1)/2 of T², T = ceil(d / tile))."""
    d, D = sorted(shape[-2:])
    batch = 1
    for x in shape[:-2]:
        batch *= x
    t = -(-d // tile)
    return batch, d, D, t * (t + 1) / (2 * t * t)


def ns_flops(shapes: list[tuple[int, ...]], steps: int) -> float:
    """FLOPs of `steps` Newton–Schulz iterations over matrices (stacks) of these shapes."""
    total = 0.0
    for s in shapes:
        batch, m, n, _ = _stack_dims(s)
        total += batch * steps * (4 * m * m * n + 2 * m ** 3)
    return total


def ns_flops_symmetric(shapes: list[tuple[int, ...]], steps: int, tile: int = 128) -> float:
    """FLOPs the triton backend runs for the same iterations: A = X Xᵀ and A Aᵀ on the T(T+1)/2
    tiles on and above the diagonal of T² (T = ceil(m / tile)), B X in full."""
    total = 0.0
    for s in shapes:
        batch, m, n, frac = _stack_dims(s, tile)
        total += batch * steps * (frac * (2 * m * m * n + 2 * m ** 3) + 2 * m * m * n)
    return total


def ns_flops_gram_ns(shapes: list[tuple[int, ...]], steps: int, tile: int = 128) -> float:
    """FLOPs of kernels/muon/triton.py gram_newton_schulz for the same iterations (d <= D), on the
    symmetric tiles only: X Xᵀ (at the start and at the restart), per iteration b R + c R², Q P (not
    the first, nor the one after the restart) and R P, P (R P) (not the last); in full: Q X (at the
    restart and for the result)."""
    from deepwish.kernels.muon.reference import GRAM_NS_RESTART

    total = 0.0
    restart = steps > GRAM_NS_RESTART + 1
    for s in shapes:
        batch, d, D, frac = _stack_dims(s, tile)
        square = steps + (steps - 1 - restart) + 2 * (steps - 1)  # d x d products, all symmetric
        grams = (1 + restart) * frac * 2 * d * d * D + square * frac * 2 * d ** 3
        products = (1 + restart) * 2 * d * d * D
        total += batch * (grams + products)
    return total


def ns_flops_of(kind: str):
    """The FLOP count of one NS_KERNELS choice."""
    return {"none": ns_flops, "gram_ns": ns_flops_gram_ns}.get(kind, ns_flops_symmetric)


def per_matrix_step(opt) -> None:
    """Muon's update, one matrix at a time (the shape of the loop before batching)."""
    from deepwish.train.muon import newton_schulz, shape_scale
    for group in opt.param_groups:
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        for p in group["params"]:
            st = opt.state[p]
            if "momentum_buffer" not in st:
                st["momentum_buffer"] = torch.zeros_like(p.grad)
            buf = st["momentum_buffer"]
            buf.mul_(mu).add_(p.grad)
            o = newton_schulz(p.grad.add(buf, alpha=mu), steps=group["ns_steps"])
            if wd:
                p.mul_(1 - lr * wd)
            p.add_(o, alpha=-lr * shape_scale(p.shape))


def kernel_profile(step, steps: int = 2) -> dict:
    """Device kernels of `steps` calls of step() under torch.profiler: {'busy_ms': kernel time per
    step, 'kernels': [{'name', 'ms', 'calls'} per step, longest first]}. busy_ms well under the
    step's time means the device waited (for the CPU issuing launches)."""
    from collections import defaultdict

    from deepwish.bench.decode_profile import device_events

    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    per: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for name, us in device_events(prof, "cuda"):
        per[name][0] += us / 1e3 / steps
        per[name][1] += 1 / steps
    rows = sorted(({"name": k, "ms": v[0], "calls": v[1]} for k, v in per.items()), key=lambda r: -r["ms"])
    return {"busy_ms": sum(r["ms"] for r in rows), "kernels": rows}


# Variants that fix kernels/muon/triton.py's NS_KERNELS (the others keep its default, "auto").
NS_KERNELS_OF = {"muon-triton-all": "all", "muon-triton-gram": "gram", "muon-fused-cublas": "none",
                 "muon-gram-ns": "gram_ns"}


def ns_flops_run(variant: str, backend: str, shapes: list, steps: int) -> tuple[str, float]:
    """(which Newton–Schulz ran, its FLOPs per step): the symmetric count where the Gram kernels ran."""
    from deepwish.kernels.muon import triton as muon_kernels

    if not shapes:
        return "", 0.0
    if backend != "triton" or variant == "muon-per-matrix":
        return "torch", ns_flops(shapes, steps)
    kind = NS_KERNELS_OF.get(variant, muon_kernels.NS_KERNELS)
    if kind != "auto":
        return f"triton {kind}", ns_flops_of(kind)(shapes, steps)
    picks = [(key[0], kind) for key, kind in muon_kernels._PICKED.items() if key[3] == steps]
    total = sum(ns_flops_of(kind)([stack], steps) for stack, kind in picks)
    counts = {k: sum(1 for _, c in picks if c == k) for k in muon_kernels.NS_KERNEL_CHOICES}
    return "triton auto (" + ", ".join(f"{k} {n}" for k, n in counts.items() if n) + ")", total


def time_variant(model, cfg_train, variant: str, steps: int, warmup: int, profile: bool = False) -> dict:
    from deepwish.kernels.muon import triton as muon_kernels

    before = muon_kernels.NS_KERNELS
    muon_kernels.NS_KERNELS = NS_KERNELS_OF.get(variant, before)
    try:
        return _time_variant(model, cfg_train, variant, steps, warmup, profile)
    finally:
        muon_kernels.NS_KERNELS = before


def _time_variant(model, cfg_train, variant: str, steps: int, warmup: int, profile: bool) -> dict:
    import dataclasses

    from deepwish.train.optim import build_optimizer

    sets = {"adamw": dict(optimizer="adamw"), "muon": dict(muon_backend="auto"),
            "muon-overlap": dict(muon_backend="auto", optimizer_overlap=True), "muon-per-matrix": {}, "muon-torch": dict(muon_backend="torch"),
            "muon-fused-cublas": dict(muon_backend="triton"), "muon-triton-gram": dict(muon_backend="triton"),
            "muon-triton-all": dict(muon_backend="triton"), "muon-gram-ns": dict(muon_backend="triton"),
            "muon-pe": dict(muon_ns_schedule="polar_express"), "muon-normuon": dict(muon_normuon=True)}[variant]
    tc = dataclasses.replace(cfg_train, **sets)
    opt = build_optimizer(model, tc)
    if variant == "muon-per-matrix":
        muon = opt.optimizers["muon"]
        rest = opt.optimizers["adamw"]

        def step():
            with torch.no_grad():
                per_matrix_step(muon)
            rest.step()
    else:
        step = opt.step
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    prof = kernel_profile(step) if profile else None
    shapes = [tuple(p.shape) for g in opt.optimizers.get("muon", opt).param_groups for p in g["params"]] \
        if "muon" in opt.optimizers else []
    backend = opt.optimizers["muon"].backend_for(torch.device("cuda", torch.cuda.current_device())) \
        if "muon" in opt.optimizers else ""
    ran, flops_run = ns_flops_run(variant, backend, shapes, tc.muon_ns_steps)
    del opt
    torch.cuda.empty_cache()
    return {"variant": variant, "ms": times[len(times) // 2], "ms_min": times[0],
            "ns_flops": ns_flops(shapes, tc.muon_ns_steps) if shapes else 0.0, "n_matrices": len(shapes),
            "ns_backend": ran or None, "ns_flops_run": flops_run, "profile": prof}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="deepwish bench muon", description=doc_summary(__doc__))
    p.add_argument("--out", default="reports/bench_muon")
    p.add_argument("--preset", default="qwen3_0.6b")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    p.add_argument("--profile", action="store_true",
                   help="also profile two steps of each variant: device kernel time per step, the longest kernels")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("deepwish bench muon needs a CUDA GPU")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}")
    from deepwish.config import load_config
    from deepwish.model import Transformer
    from deepwish.train.mfu import device_peak_flops

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.preset)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Transformer(cfg.model)
    for q in model.parameters():
        q.grad = torch.randn_like(q) * 1e-3
    peak, note = device_peak_flops(torch.device("cuda"))
    results, failed = [], []
    for v in variants:
        try:
            r = time_variant(model, cfg.train, v, args.steps, args.warmup, profile=args.profile)
        except Exception as e:  # noqa: BLE001 - one variant's failure is reported; the others still run
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            print(f"[bench muon] {args.preset} {v:16s} FAILED: {type(e).__name__}: {first}", flush=True)
            failed.append({"variant": v, "error": f"{type(e).__name__}: {first}"})
            torch.cuda.synchronize()
            continue
        r["ns_tflops_s"] = r["ns_flops"] / (r["ms"] * 1e-3) / 1e12 if r["ns_flops"] else None
        results.append(r)
        print(f"[bench muon] {args.preset} {v:16s} {r['ms']:8.2f} ms/step  ({r['n_matrices']} matrices, "
              f"NS {r['ns_flops'] / 1e12:.2f} TFLOP/step"
              + (f", {r['ns_flops_run'] / 1e12:.2f} run by the {r['ns_backend']} Newton–Schulz" if r["ns_backend"] else "")
              + (f", {r['ns_tflops_s']:.0f} TFLOP/s counting the whole step)" if r["ns_tflops_s"] else ")"), flush=True)
        if r["profile"]:
            pr = r["profile"]
            print(f"[bench muon]   profile: {pr['busy_ms']:.2f} ms of device kernels per step "
                  f"({100 * pr['busy_ms'] / r['ms']:.0f}% of the step), longest:", flush=True)
            for k in pr["kernels"][:12]:
                print(f"[bench muon]     {k['ms']:7.3f} ms  {k['calls']:5.1f}x  {k['name'][:90]}", flush=True)
    from deepwish.bench.env import bench_environment
    env = bench_environment("cuda", "deepwish bench muon", peak=note)
    (out / "results.json").write_text(json.dumps({"env": env, "preset": args.preset, "results": results,
                                                  "failed": failed}, indent=1))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = ax.bar(range(len(results)), [r["ms"] for r in results], color=["C1" if r["variant"] == "adamw" else "C0" for r in results])
    for bar, r in zip(bars, results):
        ax.annotate(f"{r['ms']:.1f} ms", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(results)), [r["variant"] for r in results], fontsize=8)
    ax.set_ylabel("ms per optimizer step")
    ax.set_title(f"{args.preset} optimizer step, {env['device']}")
    fig.tight_layout()
    fig.savefig(out / "muon_step.png", dpi=120)
    print(f"{env['device']} | torch {torch.__version__} | peak {note}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
