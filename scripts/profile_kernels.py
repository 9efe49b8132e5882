#!/usr/bin/env python3
"""Where the time of one training step and one decode step goes, kernel by kernel (torch.profiler).

    python scripts/profile_kernels.py [--preset qwen3_next_tiny] [--batch 4 --seq 256] [--top 15]
                                      [--decode-batch 1 --context 128] [--out DIR] [--device auto]

A model is built from the preset (random weights, bf16 on CUDA, fp32 on CPU) and profiled over
`--steps` steps after warm-up:
  train    forward with the step's loss (fused linear cross-entropy on CUDA, the model's kernel
           backends as its config resolves them), backward, AdamW update;
  decode   one token for `--decode-batch` sequences at position `--context` of a static cache.
On CUDA each row is a device kernel and its time is device time; on CPU the rows are the
operators and their self CPU time (there is no separate device). The table gives, per kernel:
calls per step, time per step, and its share of the step's total. With --out: profile.json
(both tables) and a Chrome trace per phase.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def build(preset: str, device: torch.device, overrides: list[str]):
    from deepwish.config import load_config
    from deepwish.model.transformer import Transformer
    cfg = load_config(preset, overrides)
    with torch.device(device):
        model = Transformer(cfg.model)
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    return cfg, model


def train_step_fn(cfg, model, batch: int, seq: int, device: torch.device):
    from deepwish.train.loss import lm_loss, resolve_loss_backend
    backend = resolve_loss_backend(cfg.train.loss_backend, device)
    ids = torch.randint(0, cfg.model.vocab_size, (batch, seq + 1), device=device)
    data = (ids[:, :-1], ids[:, 1:], None, None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    n = batch * seq

    def step():
        loss, _ = lm_loss(model, data, cfg.train, n, backend=backend)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def decode_step_fn(model, batch: int, context: int, device: torch.device):
    from deepwish.generate import decode_one_token
    cache = model.make_cache(batch, context + 64)
    token = torch.randint(0, model.cfg.vocab_size, (batch,), device=device)
    pos = torch.full((batch,), context, device=device, dtype=torch.long)

    def step():
        decode_one_token(model, token, pos, cache)
    return step


def _time_attr(evt, device: torch.device) -> float:
    """Self time in µs on the device (CUDA) or the CPU."""
    if device.type == "cuda":
        return float(getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0.0))
    return float(evt.self_cpu_time_total)


def profile(step, steps: int, device: torch.device, trace: Path | None = None) -> list[dict]:
    """Rows {name, calls_per_step, us_per_step, share}, largest first, over `steps` profiled steps."""
    for _ in range(2):  # warm-up: compilation, autotuning, allocator
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    if trace is not None:
        prof.export_chrome_trace(str(trace))
    events = [e for e in prof.key_averages() if _time_attr(e, device) > 0 and not e.key.startswith("ProfilerStep")]
    if device.type == "cuda":  # the kernels themselves; an operator's device time is its kernels' again
        kernels = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
        events = kernels or [e for e in events if not e.key.startswith(("aten::", "autograd::"))]
    rows = [{"name": e.key, "calls_per_step": e.count / steps, "us_per_step": _time_attr(e, device) / steps}
            for e in events]
    total = sum(r["us_per_step"] for r in rows) or 1.0
    for r in rows:
        r["share"] = r["us_per_step"] / total
    return sorted(rows, key=lambda r: -r["us_per_step"])


def table(title: str, rows: list[dict], top: int) -> str:
    total = sum(r["us_per_step"] for r in rows)
    lines = [f"== {title}: {total / 1e3:.3f} ms per step in {len(rows)} rows; top {min(top, len(rows))}",
             f"{'kernel':60s} {'calls':>6s} {'ms/step':>9s} {'share':>7s}"]
    for r in rows[:top]:
        name = r["name"] if len(r["name"]) <= 60 else r["name"][:57] + "..."
        lines.append(f"{name:60s} {r['calls_per_step']:6.1f} {r['us_per_step'] / 1e3:9.3f} {r['share']:7.1%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="qwen3_next_tiny")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--decode-batch", type=int, default=1)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="profiled steps per phase (after 2 warm-up steps)")
    p.add_argument("--top", type=int, default=15, help="rows per table")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--out", default=None, help="folder for profile.json and the Chrome traces")
    args = p.parse_args(argv)
    from deepwish.device import resolve_device
    device = resolve_device(args.device, what="--device")
    cfg, model = build(args.preset, device, args.overrides)
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (self CPU time per operator)"
    result = {"preset": args.preset, "device": where, "torch": torch.__version__}
    model.train()
    result["train"] = profile(train_step_fn(cfg, model, args.batch, args.seq, device), args.steps, device,
                              out / "trace_train.json" if out else None)
    print(table(f"train step {args.preset} b{args.batch} s{args.seq} on {where}", result["train"], args.top))
    model.eval()
    result["decode"] = profile(decode_step_fn(model, args.decode_batch, args.context, device), args.steps, device,
                               out / "trace_decode.json" if out else None)
    print(table(f"decode step {args.preset} b{args.decode_batch} at position {args.context} on {where}",
                result["decode"], args.top))
    if out:
        (out / "profile.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
