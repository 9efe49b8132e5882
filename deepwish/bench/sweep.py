"""Kernel sweep: the short conv, the chunked gated delta rule and the recurrent decode step over
ten scales, each backend against the torch reference (and flash-linear-attention where it imports).

    deepwish bench sweep --out reports/out/sweep            # GPU: the ten scales below
    TRITON_INTERPRET=1 deepwish bench sweep --out /tmp/sweep --quick   # two toy scales on CPU
    deepwish bench sweep --out DIR --scales 2x256x128,8x1024x1024

Scales (B, T, D) run from (2, 256, 128) to (64, 2048, 4096). D is the model width:
- short conv: x [B, T, D], a depthwise filter of width 4 per channel, SiLU;
- chunked gated delta rule: D is split into H = D / 128 heads of K = V = 128 (the kernels' head
  dim; D < 128 is one head of dim D): q, k, v [B, T, H, 128], g, beta [B, T, H], forward;
- recurrent step: one decode token per sequence, q, k, v [B, H, 128], fp32 state
  [B, H, 128, 128] updated in place; T plays no part (scales differing only in T repeat).
Inputs are bf16 on CUDA (fp32 on CPU); times are forward only, the median of
`triton.testing.do_bench` on CUDA (the helper of bench/gdn.py), of a few wall-clock calls on CPU.
Throughput is tokens per second: B·T / time (conv, chunk), B / time (one step of B sequences).
Before timing, each fast backend's output at the first scale is compared with the reference
(relative RMS error, stored). Writes results.json, sweep_time.png (time and throughput per
kernel) and sweep_speedup.png (speedup over the reference and over fla per scale, with the
geometric mean), and prints the table.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Callable

from deepwish.bench.env import doc_summary
from deepwish.bench.timing import median_ms, rel_rms

SCALES = ((2, 256, 128), (2, 512, 256), (4, 512, 512), (4, 1024, 512), (8, 1024, 1024), (8, 2048, 1024),
          (16, 2048, 2048), (32, 2048, 2048), (32, 2048, 4096), (64, 2048, 4096))
QUICK_SCALES = ((1, 16, 16), (2, 32, 16))
HEAD_DIM = 128
CONV_W = 4
KERNELS = ("short_conv", "chunk_gated_delta", "recurrent_step")


def heads(D: int) -> tuple[int, int]:
    """(H, head dim) for model width D (module doc)."""
    hd = min(D, HEAD_DIM)
    if D % hd:
        raise ValueError(f"width D={D} is not a multiple of the head dim {HEAD_DIM}")
    return D // hd, hd


def parse_scales(text: str) -> tuple[tuple[int, int, int], ...]:
    out = []
    for item in text.split(","):
        try:
            B, T, D = (int(x) for x in item.lower().split("x"))
        except ValueError:
            raise ValueError(f"scale {item!r} is not BxTxD (e.g. 2x256x128)") from None
        heads(D)
        out.append((B, T, D))
    return tuple(out)


def _fla():
    """fla's ops, or the reason they cannot be used here."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
    except Exception as e:  # noqa: BLE001 - any import failure means "fla not available here"
        return None, f"{type(e).__name__}: {e}"
    ops = {"chunk": chunk_gated_delta_rule, "recurrent": fused_recurrent_gated_delta_rule}
    for where in ("fla.modules.causal_conv1d", "fla.modules.convolution"):  # 0.6, older releases
        try:
            ops["conv"] = importlib.import_module(where).causal_conv1d
            break
        except Exception:  # noqa: BLE001 - no conv anchor in this fla
            continue
    return ops, None


def cases(kernel: str, B: int, T: int, D: int, device, dtype, fla) -> tuple[dict[str, Callable], int]:
    """({backend: forward callable}, tokens per call) for one kernel at one scale."""
    import torch
    import torch.nn.functional as F

    from deepwish.kernels.gated_delta import (chunk_gated_delta_rule, chunk_gated_delta_rule_ref,
                                              fused_recurrent_gated_delta_step, recurrent_gated_delta_step_ref)
    from deepwish.kernels.gated_delta.reference import l2norm
    from deepwish.kernels.short_conv import reference as conv_ref
    from deepwish.kernels.short_conv import triton as conv_tri
    H, K = heads(D)
    fns: dict[str, Callable] = {}
    if kernel == "short_conv":
        x = torch.randn(B, T, D, device=device, dtype=dtype)
        w = (torch.randn(D, CONV_W, device=device) * 0.5).to(dtype)
        fns["torch"] = lambda: conv_ref.causal_conv1d(x, w)[0]
        fns["triton"] = lambda: conv_tri.causal_conv1d(x, w)[0]
        if fla and "conv" in fla:
            fns["fla"] = lambda: fla["conv"](x=x, weight=w, activation="silu")[0]
        return fns, B * T
    if kernel == "chunk_gated_delta":
        q = l2norm(torch.randn(B, T, H, K, device=device)).to(dtype)
        k = l2norm(torch.randn(B, T, H, K, device=device)).to(dtype)
        v = torch.randn(B, T, H, K, device=device, dtype=dtype)
        g = F.logsigmoid(torch.randn(B, T, H, device=device) + 2.0)
        beta = torch.sigmoid(torch.randn(B, T, H, device=device))
        fns["torch"] = lambda: chunk_gated_delta_rule_ref(q, k, v, g, beta)[0]
        fns["triton"] = lambda: chunk_gated_delta_rule(q, k, v, g, beta)[0]
        if fla:
            fns["fla"] = lambda: fla["chunk"](q=q, k=k, v=v, g=g, beta=beta)[0]
        return fns, B * T
    if kernel == "recurrent_step":
        q = l2norm(torch.randn(B, H, K, device=device)).to(dtype)
        k = l2norm(torch.randn(B, H, K, device=device)).to(dtype)
        v = torch.randn(B, H, K, device=device, dtype=dtype)
        g = F.logsigmoid(torch.randn(B, H, device=device))
        beta = torch.sigmoid(torch.randn(B, H, device=device))
        s0 = torch.randn(B, H, K, K, device=device) * 0.01
        states = {name: s0.clone() for name in ("torch", "triton", "fla")}

        def ref():
            o, s = recurrent_gated_delta_step_ref(q, k, v, g, beta, states["torch"])
            states["torch"].copy_(s)
            return o
        fns["torch"] = ref
        fns["triton"] = lambda: fused_recurrent_gated_delta_step(q, k, v, g, beta, states["triton"])
        if fla:
            def fla_step():
                o, _ = fla["recurrent"](q=q[:, None], k=k[:, None], v=v[:, None], g=g[:, None], beta=beta[:, None],
                                        initial_state=states["fla"], output_final_state=True)
                return o[:, 0]
            fns["fla"] = fla_step
        return fns, B
    raise ValueError(f"unknown kernel {kernel!r}; one of {KERNELS}")


def time_ms(fn: Callable, device, reps: int = 2) -> float:
    """Median ms per call: do_bench on CUDA (after one compile/autotune call), wall clock on CPU."""
    if device.type == "cuda":
        return median_ms(fn)
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def run(out_dir, scales=SCALES, kernels=KERNELS, device: str = "auto", max_ref_tokens: int | None = None,
        time_limit_s: float | None = None) -> dict:
    """Time every kernel and backend at each scale; see the module doc. `time_limit_s`: start no new
    scale after this many seconds (compilation and autotuning per shape dominate on a GPU), and
    draw what was measured."""
    import torch

    from deepwish.device import resolve_device
    dev = resolve_device(device, what="--device")
    # Without CUDA the Triton kernels run only under the interpreter, which must be on before they
    # are defined (the CLI imports them before any command runs): TRITON_INTERPRET=1 in the environment.
    interpret = dev.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    if not interpret:
        print("[sweep] no CUDA and TRITON_INTERPRET is not 1: the triton rows are skipped", flush=True)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    fla, why = _fla()
    if why:
        print(f"[sweep] fla not available: {why}", flush=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"scales": [list(s) for s in scales], "head_dim": HEAD_DIM, "dtype": str(dtype).split(".")[-1],
                     "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                     "torch": torch.__version__, "fla": None if fla is None else _fla_version(),
                     "ms": {}, "tok_s": {}, "check_rel_rms": {}, "notes": []}
    start = time.perf_counter()
    for i, (B, T, D) in enumerate(scales):  # scales outermost: a stopped run still covers every kernel
        if time_limit_s is not None and i > 0 and time.perf_counter() - start > time_limit_s:
            results["notes"].append(f"stopped after {i} of {len(scales)} scales: --time-limit {time_limit_s:g} s")
            print(f"[sweep] {results['notes'][-1]}", flush=True)
            break
        for kernel in kernels:
            fns, tokens = cases(kernel, B, T, D, dev, dtype, fla)
            if i == 0:  # correctness at the first scale, before anything is timed
                ref = fns["torch"]().float()
                for name, fn in fns.items():
                    if name != "torch" and interpret:
                        results["check_rel_rms"][f"{kernel} {name}"] = _try(lambda: rel_rms(ref, fn().float()))
                # the step mutates its state: rebuild the inputs for timing
                fns, tokens = cases(kernel, B, T, D, dev, dtype, fla)
            for name, fn in fns.items():
                key = f"{kernel} {name}"
                if name != "torch" and not interpret:
                    val = "skipped: no CUDA (TRITON_INTERPRET=1 runs the kernels in the interpreter)"
                elif name == "torch" and max_ref_tokens and B * T > max_ref_tokens and kernel != "recurrent_step":
                    val = "skipped: reference above --max-ref-tokens"
                else:
                    val = _try(lambda: time_ms(fn, dev))
                results["ms"].setdefault(key, []).append(val)
                results["tok_s"].setdefault(key, []).append(tokens / (val * 1e-3) if isinstance(val, float) else None)
            del fns
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            (out / "results.json").write_text(json.dumps(results, indent=1))  # partial results survive a stop
            print(f"[sweep] {kernel} B={B} T={T} D={D}: " + ", ".join(
                f"{k.split()[1]} {_fmt(v[-1])}" for k, v in results["ms"].items() if k.startswith(kernel + " ")),
                flush=True)
    results["speedup"] = speedups(results)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, out)
    print_table(results)
    print(f"[sweep] wrote {out / 'results.json'}, sweep_time.png, sweep_speedup.png")
    return results


def _fla_version():
    try:
        import fla
        return getattr(fla, "__version__", "unknown")
    except Exception:  # noqa: BLE001
        return None


def _try(fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - one failing backend/shape is reported, the sweep goes on
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return f"error: {type(e).__name__}: {str(e).splitlines()[0][:140] if str(e) else ''}"


def _fmt(v) -> str:
    return f"{v:.3f} ms" if isinstance(v, float) else str(v).split(":")[0]


def speedups(results: dict) -> dict:
    """{'<kernel> triton/torch': {'per_scale': [...], 'geomean': x}, ...}: time of the baseline over
    the triton time (> 1: triton faster); scales where either side has no time are None."""
    out = {}
    for kernel in KERNELS:
        fast = results["ms"].get(f"{kernel} triton")
        if not fast:
            continue
        for base in ("torch", "fla"):
            slow = results["ms"].get(f"{kernel} {base}")
            if not slow:
                continue
            per = [s / f if isinstance(s, float) and isinstance(f, float) and f > 0 else None
                   for s, f in zip(slow, fast)]
            vals = [x for x in per if x]
            geomean = math.exp(sum(map(math.log, vals)) / len(vals)) if vals else None
            out[f"{kernel} triton/{base}"] = {"per_scale": per, "geomean": geomean}
    return out


def _labels(scales) -> list[str]:
    return [f"{B}x{T}x{D}" for B, T, D in scales]


def plot(results: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    done = max(len(v) for v in results["ms"].values())  # a partial run (--replot) covers the first scales
    scales = [tuple(s) for s in results["scales"]][:done]
    labels = _labels(scales)
    xs = list(range(len(scales)))
    kernels = [k for k in KERNELS if any(key.startswith(k + " ") for key in results["ms"])]
    fig, axes = plt.subplots(2, len(kernels), figsize=(5.5 * len(kernels), 8), squeeze=False)
    for j, kernel in enumerate(kernels):
        for key in (k for k in results["ms"] if k.startswith(kernel + " ")):
            name = key.split()[1]
            for row, metric, scale in ((0, "ms", 1.0), (1, "tok_s", 1e-6)):
                pts = [(x, v * scale) for x, v in zip(xs, results[metric][key]) if isinstance(v, float)]
                if pts:
                    axes[row][j].plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
        axes[0][j].set_title(f"{kernel} ({results['device']}, {results['dtype']})")
        axes[0][j].set_ylabel("ms per call (median)")
        axes[1][j].set_ylabel("Mtokens / s")
        for row in (0, 1):
            ax = axes[row][j]
            ax.set_yscale("log")
            ax.set_xticks(xs, labels, rotation=45, ha="right", fontsize=7)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        axes[1][j].set_xlabel("B x T x D" + (" (T unused: one step)" if kernel == "recurrent_step" else ""))
    fig.tight_layout()
    fig.savefig(out / "sweep_time.png", dpi=110)
    plt.close(fig)

    sp = results["speedup"]
    fig, axes = plt.subplots(1, len(kernels), figsize=(5.5 * len(kernels), 4.2), squeeze=False)
    for j, kernel in enumerate(kernels):
        ax = axes[0][j]
        pairs = [k for k in sp if k.startswith(kernel + " ")]
        width = 0.8 / max(1, len(pairs))
        for n, key in enumerate(pairs):
            per = (sp[key]["per_scale"] + [None] * len(scales))[:len(scales)]
            vals = [v if v else 0.0 for v in per] + [sp[key]["geomean"] or 0.0]
            pos = [x + (n - (len(pairs) - 1) / 2) * width for x in range(len(vals))]
            ax.bar(pos, vals, width, label=f"{key.split()[1]} (mean {sp[key]['geomean'] or 0:.2f}x)")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(scales) + 1), labels + ["geomean"], rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("speedup of triton (x)")
        ax.set_title(kernel)
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "sweep_speedup.png", dpi=110)
    plt.close(fig)


def replot(out_dir) -> dict:
    """Speedups, charts and table again from out_dir/results.json (e.g. of a run stopped early)."""
    out = Path(out_dir)
    results = json.loads((out / "results.json").read_text())
    results["speedup"] = speedups(results)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, out)
    print_table(results)
    return results


def print_table(results: dict) -> None:
    done = max(len(v) for v in results["ms"].values())
    labels = _labels([tuple(s) for s in results["scales"]][:done])
    print(f"\n== kernel sweep, forward ms (median) on {results['device']}, {results['dtype']}, head dim {HEAD_DIM}")
    print(f"{'':28s}" + "".join(f"{s:>15s}" for s in labels))
    for key, row in results["ms"].items():
        print(f"{key:28s}" + "".join(f"{(f'{v:.4f}' if isinstance(v, float) else str(v).split(':')[0]):>15s}"
                                     for v in row))
    for key, s in results["speedup"].items():
        print(f"speedup {key:20s}" + "".join(f"{(f'{v:.2f}x' if v else '-'):>15s}" for v in s["per_scale"])
              + (f"   geomean {s['geomean']:.2f}x" if s["geomean"] else ""))
    for key, v in results["check_rel_rms"].items():
        print(f"check {key} vs torch (rel rms, first scale): {v if isinstance(v, str) else f'{v:.2e}'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="deepwish bench sweep", description=doc_summary(__doc__))
    p.add_argument("--out", required=True, help="folder for results.json, sweep_time.png, sweep_speedup.png")
    p.add_argument("--quick", action="store_true", help=f"two toy scales {QUICK_SCALES} (CPU smoke test)")
    p.add_argument("--scales", default=None, help="comma-separated BxTxD list (default: the ten scales)")
    p.add_argument("--kernels", default=",".join(KERNELS), help="subset of " + ",".join(KERNELS))
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--time-limit", type=float, default=None, metavar="S",
                   help="start no new scale after S seconds; the charts show the scales measured")
    p.add_argument("--replot", action="store_true", help="only redraw from --out's results.json (a partial run too)")
    p.add_argument("--max-ref-tokens", type=int, default=None,
                   help="skip the torch reference of conv/chunk above B*T tokens (it is slow)")
    args = p.parse_args(argv)
    if args.replot:
        replot(args.out)
        return 0
    if args.quick and args.scales:
        p.error("give --quick or --scales, not both")
    scales = QUICK_SCALES if args.quick else parse_scales(args.scales) if args.scales else SCALES
    kernels = tuple(k for k in args.kernels.split(",") if k)
    bad = [k for k in kernels if k not in KERNELS]
    if bad:
        p.error(f"unknown kernel(s) {bad}; choose from {KERNELS}")
    run(args.out, scales, kernels, args.device, args.max_ref_tokens, args.time_limit)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
