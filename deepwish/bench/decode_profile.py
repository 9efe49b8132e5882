"""Where one decode step's time goes: a per-kernel table of the one-token step, per path.

    python -m deepwish.bench.decode_profile --out reports/decode_profile [--preset qwen3_0.6b]
        [--batch 1] [--context 512] [--paths eager,compiled,captured,compiled-captured]
        [--steps 20] [--rows 30] [--unfused] [--matmul torch|triton]

Paths (all run `generate.decode_one_token`, the step `generate` takes):
  eager              the step as Python launches it;
  compiled           torch.compile of the step (inductor's fused kernels), not captured;
  captured           `decode_graph.CapturedDecoder`: the eager step's kernels replayed from a CUDA graph;
  compiled-captured  the compiled step captured (the fastest path `bench decode` times).
For each path the step is timed without the profiler (CUDA events, mean over --steps), then
profiled over the same number of steps; every device kernel is listed with its calls per step,
device time per step and share of the step: `busy` is the kernels' summed time over the step
time, the rest is the GPU waiting (launch gaps, host work). A short class column (gemm,
attention, triton-fused, elementwise, copy, other) sums up what to fuse next.

Writes DIR/decode_profile.json (every row of every path) and DIR/decode_profile.md (the tables).
On a machine without CUDA the eager path is profiled on the CPU (ops by self CPU time): the
same table, for checking the tool, not for conclusions about the GPU.

--unfused builds the model with model.fuse_projections=false (q, k, v as three matmuls), the
layout before the fused projection, so before/after tables come from one build of the tool;
--matmul triton takes model.decode_matmul=triton (kernels/gemv for the step's matmuls);
--prologue model.decode_prologue=true (QK-norm, rotary and the cache write in one kernel);
--fusion model.decode_fusion=true (the block's norms, SwiGLU and residual adds inside the GEMVs);
--pdl model.decode_pdl=on (the step's own kernels with programmatic dependent launch).
Each decode option is off unless its flag is given, so one step is built up option by option; the
model's defaults (the step `deepwish generate` runs) have all three on.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import re
import time
from pathlib import Path

import torch

from deepwish.bench.env import doc_summary

PATHS = ("eager", "compiled", "captured", "compiled-captured")

# Kernel classes by name, first match wins (cuBLAS/cuBLASLt GEMMs and GEMVs have many names).
KERNEL_CLASSES = (
    ("attention", re.compile(r"_split_kernel|_merge_kernel|flash|fmha|attention|sdpa", re.I)),
    ("gemm", re.compile(r"gemm|gemv|_one_row_kernel|_rows_kernel|nvjet|cutlass|xmma|sm\d\d_|splitK|cublas|matmul|"
                        r"addmm|\bmm\b|linear", re.I)),
    ("triton-fused", re.compile(r"^triton_", re.I)),
    ("copy", re.compile(r"memcpy|memset|copy|fill|scatter|index", re.I)),
    ("elementwise", re.compile(r"elementwise|vectorized|reduce|unrolled|softmax|norm|mul|add|rsqrt|pow|mean|cat|"
                               r"cos|sin|silu|sigmoid|argmax|topk|sort", re.I)),
)


def kernel_class(name: str) -> str:
    for cls, pat in KERNEL_CLASSES:
        if pat.search(name):
            return cls
    return "other"


@dataclasses.dataclass
class KernelRow:
    name: str
    cls: str
    calls_per_step: float
    us_per_step: float
    pct_of_step: float


def kernel_table(events: list[tuple[str, float]], steps: int, step_us: float) -> list[KernelRow]:
    """(kernel name, duration µs) of `steps` profiled steps -> one row per name, by time per step,
    largest first; pct_of_step = time per step / step_us."""
    if steps < 1 or step_us <= 0:
        raise ValueError(f"kernel_table needs steps >= 1 and step_us > 0, got {steps}, {step_us}")
    calls: dict[str, int] = {}
    total: dict[str, float] = {}
    for name, us in events:
        calls[name] = calls.get(name, 0) + 1
        total[name] = total.get(name, 0.0) + us
    rows = [KernelRow(n, kernel_class(n), calls[n] / steps, total[n] / steps, 100.0 * total[n] / steps / step_us)
            for n in total]
    return sorted(rows, key=lambda r: -r.us_per_step)


def class_summary(rows: list[KernelRow]) -> dict[str, dict[str, float]]:
    """{class: {calls_per_step, us_per_step, pct_of_step}} summed over the kernels of each class."""
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        s = out.setdefault(r.cls, {"calls_per_step": 0.0, "us_per_step": 0.0, "pct_of_step": 0.0})
        s["calls_per_step"] += r.calls_per_step
        s["us_per_step"] += r.us_per_step
        s["pct_of_step"] += r.pct_of_step
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["us_per_step"]))


def device_events(prof, device: str) -> list[tuple[str, float]]:
    """(name, µs) of every kernel the profiler saw on `device` ('cuda': device kernels; 'cpu':
    top-level-free ops by self CPU time, the CPU stand-in)."""
    from torch.autograd import DeviceType
    out = []
    for e in prof.events():
        if device == "cuda":
            if e.device_type == DeviceType.CUDA:
                out.append((e.name, float(e.time_range.elapsed_us())))
        elif e.device_type == DeviceType.CPU and e.self_cpu_time_total > 0 and e.name.startswith("aten::"):
            out.append((e.name, float(e.self_cpu_time_total)))
    return out


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_step(step, steps: int, device: str) -> float:
    """Mean µs per call of step(i) over `steps` calls (CUDA events on the GPU)."""
    _sync(device)
    if device == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for i in range(steps):
            step(i)
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b) * 1e3 / steps
    t = time.perf_counter()
    for i in range(steps):
        step(i)
    return (time.perf_counter() - t) * 1e6 / steps


def profile_step(step, steps: int, device: str, warmup: int = 3) -> dict:
    """Time `step` (callable of the step index), then profile it: {'step_us', 'busy_pct', 'kernels',
    'classes', 'kernels_per_step'}."""
    for i in range(warmup):
        step(i)
    step_us = time_step(step, steps, device)
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    _sync(device)
    with torch.profiler.profile(activities=acts) as prof:
        for i in range(steps):
            step(i)
        _sync(device)
    rows = kernel_table(device_events(prof, device), steps, step_us)
    busy = sum(r.us_per_step for r in rows)
    return {"step_us": step_us, "busy_us": busy, "busy_pct": 100.0 * busy / step_us,
            "kernels_per_step": sum(r.calls_per_step for r in rows),
            "kernels": [dataclasses.asdict(r) for r in rows], "classes": class_summary(rows)}


def format_table(path: str, result: dict, rows: int = 30, width: int = 90) -> str:
    lines = [f"### {path}: {result['step_us']:.1f} µs/step ({1e6 / result['step_us']:.0f} steps/s), "
             f"{result['kernels_per_step']:.0f} kernels/step, busy {result['busy_us']:.1f} µs "
             f"({result['busy_pct']:.0f}% of the step)", "",
             f"| {'kernel':{width}s} | class | calls | µs/step | % of step |",
             f"|{'-' * (width + 2)}|-------|------:|--------:|----------:|"]
    for r in result["kernels"][:rows]:
        name = r["name"] if len(r["name"]) <= width else r["name"][:width - 3] + "..."
        lines.append(f"| {name:{width}s} | {r['cls']} | {r['calls_per_step']:.0f} | {r['us_per_step']:.1f} | "
                     f"{r['pct_of_step']:.1f} |")
    rest = result["kernels"][rows:]
    if rest:
        lines.append(f"| ({len(rest)} more kernels) | | {sum(r['calls_per_step'] for r in rest):.0f} | "
                     f"{sum(r['us_per_step'] for r in rest):.1f} | {sum(r['pct_of_step'] for r in rest):.1f} |")
    lines += ["", "| class | calls | µs/step | % of step |", "|---|---:|---:|---:|"]
    for cls, s in result["classes"].items():
        lines.append(f"| {cls} | {s['calls_per_step']:.0f} | {s['us_per_step']:.1f} | {s['pct_of_step']:.1f} |")
    return "\n".join(lines)


def build_model(preset: str, context: int, device: str, fuse: bool = True, dtype=torch.bfloat16,
                matmul: str = "torch", prologue: bool = False, fusion: bool = False, pdl: bool = False):
    from deepwish.config import model_config
    from deepwish.model.transformer import Transformer
    cfg = model_config(preset)
    cfg = dataclasses.replace(cfg, max_seq_len=max(cfg.max_seq_len, context + 64),
                              fuse_projections=fuse, decode_matmul=matmul, decode_prologue=prologue,
                              decode_fusion=fusion, decode_pdl="on" if pdl else "off")
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(cfg)
    return model.to(dtype).eval()


def path_step(path: str, model, cache, tokens: torch.Tensor, positions: torch.Tensor):
    """The step of `path` as a callable of the step index (tokens/positions [N, B])."""
    from deepwish.decode_graph import CapturedDecoder
    from deepwish.generate import decode_one_token
    if path == "eager":
        return lambda i: decode_one_token(model, tokens[i], positions[i], cache)
    if path == "compiled":
        torch._dynamo.reset()
        fn = torch.compile(decode_one_token, dynamic=False)
        return lambda i: fn(model, tokens[i], positions[i], cache)
    if path in ("captured", "compiled-captured"):
        if path == "compiled-captured":
            torch._dynamo.reset()
        dec = CapturedDecoder(model, cache, compile=path == "compiled-captured")
        return lambda i: dec(model, tokens[i], positions[i], cache)
    raise ValueError(f"path {path!r} is not one of {', '.join(PATHS)}")


def run(out_dir, preset: str = "qwen3_0.6b", batch: int = 1, context: int = 512, paths=PATHS, steps: int = 20,
        rows: int = 30, fuse: bool = True, device: str | None = None, matmul: str = "torch",
        prologue: bool = False, fusion: bool = False, pdl: bool = False) -> dict:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        paths = tuple(p for p in paths if p == "eager")  # nothing to capture on the CPU; compile is slow there
    bad = [p for p in paths if p not in PATHS]
    if bad:
        raise ValueError(f"paths {bad} are not among {', '.join(PATHS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(preset, context, device, fuse, torch.bfloat16 if device == "cuda" else torch.float32, matmul,
                        prologue, fusion, pdl)
    V = model.cfg.vocab_size
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, V, (steps + 8, batch), generator=g).to(device)
    # decoding starts at `context` over a cache of context + steps + warm-up slots (not prefilled:
    # a static cache costs the same to decode whatever it holds, as in bench decode)
    positions = (context + torch.arange(steps + 8))[:, None].expand(-1, batch).contiguous().to(device)
    results = {}
    for path in paths:
        cache = model.make_cache(batch, context + steps + 8)
        try:
            step = path_step(path, model, cache, tokens, positions)
            results[path] = profile_step(step, steps, device)
        except Exception as e:  # one failing path is reported, the others still run
            results[path] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        del cache
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    from deepwish.bench.env import bench_environment
    doc = {"env": bench_environment(device, "deepwish bench decode_profile"), "preset": preset, "batch": batch,
           "context": context, "steps": steps, "fuse_projections": fuse, "decode_matmul": matmul,
           "decode_prologue": prologue, "decode_fusion": fusion, "decode_pdl": pdl, "device": device,
           "paths": results}
    (out / "decode_profile.json").write_text(json.dumps(doc, indent=2))
    head = (f"## decode step profile: {preset}, batch {batch}, context {context}, {device}, "
            f"fuse_projections={fuse}, decode_matmul={matmul}, decode_prologue={prologue}, decode_fusion={fusion}, "
            f"decode_pdl={pdl}, torch {torch.__version__}\n")
    parts = [head]
    for path, res in results.items():
        parts.append(f"### {path}: failed: {res['error']}" if "error" in res else format_table(path, res, rows))
    text = "\n\n".join(parts) + "\n"
    (out / "decode_profile.md").write_text(text)
    print(text, flush=True)
    return doc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deepwish.bench.decode_profile", description=doc_summary(__doc__))
    ap.add_argument("--out", required=True, help="output folder (decode_profile.json, decode_profile.md)")
    ap.add_argument("--preset", default="qwen3_0.6b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {', '.join(PATHS)}")
    ap.add_argument("--steps", type=int, default=20, help="steps timed and profiled per path")
    ap.add_argument("--rows", type=int, default=30, help="kernels listed per path (the rest summed)")
    ap.add_argument("--unfused", action="store_true", help="model.fuse_projections=false: q, k, v as three matmuls")
    ap.add_argument("--matmul", default="torch", choices=["torch", "triton"],
                    help="model.decode_matmul: triton runs the step's matmuls (<= 64 rows, 16 compiled) through kernels/gemv")
    ap.add_argument("--prologue", action="store_true",
                    help="model.decode_prologue=true: QK-norm, rotary and the cache write in one kernel")
    ap.add_argument("--fusion", action="store_true",
                    help="model.decode_fusion=true: the block's norms, SwiGLU and residual adds inside the GEMVs "
                         "(needs --matmul triton)")
    ap.add_argument("--pdl", action="store_true",
                    help="model.decode_pdl=on: the step's own kernels with programmatic dependent launch (Hopper)")
    args = ap.parse_args(argv)
    run(args.out, args.preset, args.batch, args.context, tuple(p for p in args.paths.split(",") if p), args.steps,
        args.rows, fuse=not args.unfused, matmul=args.matmul, prologue=args.prologue, fusion=args.fusion,
        pdl=args.pdl)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
