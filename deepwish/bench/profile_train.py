"""Where a training step's GPU time goes: torch.profiler over the benchmark's step.

    python -m deepwish.bench.profile_train --preset qwen3_0.6b [--variant deepwish] [--batch 8 --seq 2048]

Prints the kernels (and CPU-side ops) that take the most device time over a few profiled steps,
after warm-up, the GPU's idle time by host phase (as `train.profile_steps` counts it in the real
loop, train/profile.py), and writes a Chrome trace to --out when given. `--variant torchtitan | hf |
hf-liger` profiles an anchor's step as `bench train` builds and times it, to set beside ours.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from deepwish.bench.env import doc_summary
from deepwish.train.profile import PHASE_PREFIX, summary_lines, trace_figures


def build_step(preset: str, batch: int, seq: int, variant: str):
    """The training step `bench train` times for this variant (anchors included). An anchor's step
    marks no phases of ours, so it runs as one phase, "step", for the idle-time summary."""
    from deepwish.bench.train import build_variant
    step = build_variant(preset, batch, seq, variant)[0]
    if variant.startswith("deepwish"):
        return step

    def anchor_step():
        with torch.profiler.record_function(PHASE_PREFIX + "step"):
            return step()
    return anchor_step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="deepwish bench profile_train", description=doc_summary(__doc__))
    p.add_argument("--preset", default="qwen3_0.6b")
    p.add_argument("--variant", default="deepwish",
                   help="deepwish | deepwish-eager | deepwish-muon | hf | hf-liger | torchtitan (the anchors "
                        "as `bench train` builds them, so their kernels can be set beside ours)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--rows", type=int, default=30)
    p.add_argument("--out", default=None, help="folder for trace.json")
    p.add_argument("--by-shape", action="store_true",
                   help="also the host-side ops by input shape (which tensors the eager kernels work on)")
    args = p.parse_args(argv)
    from deepwish.bench.train import variant_parts
    try:
        variant_parts(args.variant)
    except ValueError as e:
        p.error(str(e))
    step = build_step(args.preset, args.batch, args.seq, args.variant)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    # the step's wall time without the profiler, to set beside the kernels' time below: the
    # difference is time the GPU waits on the host
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(args.steps):
        step()
    t1.record()
    torch.cuda.synchronize()
    wall_ms = t0.elapsed_time(t1) / args.steps
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts, record_shapes=args.by_shape) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    print(f"== {args.preset} {args.variant} b{args.batch} s{args.seq}: top kernels by device time over {args.steps} steps")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=70))
    if args.by_shape:
        print(f"== host-side ops by input shape, by device time over {args.steps} steps")
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cuda_time_total", row_limit=args.rows,
                                                                 max_name_column_width=40, max_shapes_column_width=80))
    # each kernel's time counted once, under the host-side op that launched it (the table's total)
    kernel_ms = sum(e.self_device_time_total for e in prof.key_averages()
                    if e.device_type == torch.autograd.DeviceType.CPU) / 1e3 / args.steps  # us -> ms
    print(f"== per step: wall {wall_ms:.2f} ms (unprofiled), kernels {kernel_ms:.2f} ms "
          f"({100 * kernel_ms / wall_ms:.0f}% of the wall time)")
    # the GPU's idle time by host phase, counted as `train.profile_steps` counts it in the real loop
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="profile_train_"))
    out.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(out / "trace.json"))
    for line in summary_lines(trace_figures(json.loads((out / "trace.json").read_text())), 1, args.steps):
        print(f"== {line}")
    if not args.out:
        shutil.rmtree(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
