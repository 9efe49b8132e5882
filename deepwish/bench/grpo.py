"""Benchmark: one GRPO step at a fixed shape, split into rollout and update, with the sampler /
trainer mismatch.

    deepwish bench grpo --out reports/bench_grpo          # Qwen3-0.6B shape, 16 x 16 x 256
    python -m deepwish.bench.grpo --out DIR --preset qwen3_tiny --device cpu --steps 1   # smoke

What runs is the trainer's own step (rl/trainer.py `grpo_step`): the model is random-init at the
preset's shape, warmed by `--sft-steps` supervised steps on the arithmetic task (character
vocabulary, answer tokens only), then `--warmup` untimed and `--steps` timed GRPO steps of
`--prompts` prompts x `--samples` samples x `--new-tokens` tokens. Stop tokens are ignored so
that every completion has exactly `--new-tokens` tokens (the shape asked for), and since those
completions run past the answer, truncation masking and group dropping are off (every token
carries loss, so the update is timed at full size). Parameters fp32, rollout and update under
bf16 autocast on CUDA; the decode step is a captured CUDA graph over a cache of P·G rows.

Printed per timed step and in DIR/results.json: rollout seconds (prefill + decode, measured
inside the rollout), update seconds (recompute of the sampled tokens' log-probabilities, the
mismatch check, forward/backward over micro-batches, optimizer step), rollout tokens/s, and the
mismatch share: tokens whose trainer/sampler probability ratio lies outside [0.9, 1.1], measured
before the update. DIR/grpo_bench.png draws them by step.

Goals (the issue): mismatch <= 1% of tokens in bf16; rollout >= 10k tokens/s.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import time
from pathlib import Path

import torch

from deepwish.bench.env import doc_summary


def _write(out: Path, result: dict) -> None:
    (out / "results.json").write_text(json.dumps(result, indent=1))


def _plot(out: Path, steps: list[dict]) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    xs = [s["step"] for s in steps]
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(13, 3.8))
    a1.bar(xs, [s["rollout_s"] for s in steps], label="rollout")
    a1.bar(xs, [s["update_s"] for s in steps], bottom=[s["rollout_s"] for s in steps], label="update")
    a1.set_xlabel("step")
    a1.set_ylabel("seconds")
    a1.set_title("step time")
    a1.legend()
    a2.plot(xs, [s["rollout_tok_s"] for s in steps], "o-")
    a2.axhline(10_000, color="gray", ls="--", lw=1, label="goal 10k")
    a2.set_title("rollout tokens/s")
    a2.set_xlabel("step")
    a2.legend()
    a3.plot(xs, [100 * s["mismatch"] for s in steps], "o-")
    a3.axhline(1.0, color="gray", ls="--", lw=1, label="goal 1%")
    a3.set_title("% tokens with |ratio - 1| > 0.1")
    a3.set_xlabel("step")
    a3.legend()
    for a in (a1, a2, a3):
        a.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "grpo_bench.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    from deepwish.config import load_config
    from deepwish.rl.loss import GRPOLoss
    from deepwish.rl.trainer import GRPOConfig, grpo_step, start_grpo, supervised_warmup
    from deepwish.train.checkpoint import versions

    p = argparse.ArgumentParser(prog="deepwish bench grpo", description=doc_summary(__doc__))
    p.add_argument("--out", default="reports/bench_grpo")
    p.add_argument("--preset", default="qwen3_0.6b")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="model/train field (SECTION.KEY=V)")
    p.add_argument("--device", default="auto")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--sft-steps", type=int, default=30)
    p.add_argument("--sft-lr", type=float, default=3e-4)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--warmup", type=int, default=1, help="untimed GRPO steps first (graph capture, kernel JIT)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--graph", default="auto", choices=("auto", "on", "off"))
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--head-fp32", action="store_true", help="LM head in fp32 in sampler and trainer (bf16 otherwise)")
    args = p.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.preset, [f"train.out_dir={out / 'run'}", f"train.device={args.device}", "train.optimizer=adamw",
                                    f"train.lr={args.lr}", "train.schedule=constant", "train.warmup_steps=0",
                                    "train.weight_decay=0.0", "train.seed=0", *args.overrides])
    grpo = GRPOConfig(task="arithmetic", tokenizer="char", prompts_per_step=args.prompts, group_size=args.samples,
                      max_new_tokens=args.new_tokens, temperature=args.temperature, micro_batch=args.micro_batch,
                      track_kl=False, sft_steps=args.sft_steps, sft_lr=args.sft_lr, graph=args.graph,
                      head_fp32=args.head_fp32,
                      loss=GRPOLoss(mask_truncated=False, drop_equal_groups=False))
    t0 = time.perf_counter()
    run = start_grpo(cfg, grpo)
    run.stop_on_eos = False
    dev = run.device
    result = {"bench": "grpo", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "versions": versions(), "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
              "preset": args.preset, "params": run.model.num_params(), "args": vars(args),
              "shape": {"prompts": args.prompts, "samples": args.samples, "new_tokens": args.new_tokens},
              "graph": run.use_graph(), "setup_s": time.perf_counter() - t0, "steps": []}
    print(f"[bench grpo] {args.preset} {run.model.num_params() / 1e6:.0f}M params on {result['device']} | "
          f"{args.prompts} prompts x {args.samples} samples x {args.new_tokens} tokens | graph {run.use_graph()} | "
          f"head {'fp32' if args.head_fp32 else 'autocast dtype'} | "
          f"set-up {result['setup_s']:.1f}s", flush=True)
    t = time.perf_counter()
    losses = supervised_warmup(run.model, run.task, run.tok, run.cfg.train, grpo, dev) if args.sft_steps else []
    result["sft"] = {"steps": args.sft_steps, "seconds": time.perf_counter() - t, "losses": losses}
    if losses:
        print(f"[bench grpo] warm-up {args.sft_steps} steps {result['sft']['seconds']:.1f}s, loss {losses[0]:.3f} -> "
              f"{losses[-1]:.3f}", flush=True)
    _write(out, result)
    keys = ("rollout_s", "update_s", "rollout_tok_s", "mismatch", "reward", "entropy", "clip_frac", "completion_len")
    for s in range(args.warmup + args.steps):
        t = time.perf_counter()
        try:
            m = grpo_step(run, s)
        except Exception as e:  # one retry without the captured step, recorded, so a run still measures
            if not run.use_graph() or s > 0:
                raise
            import traceback
            traceback.print_exc()
            result["graph_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            print(f"[bench grpo] the captured decode step failed ({result['graph_error']}); continuing eagerly",
                  flush=True)
            run.grpo = dataclasses.replace(run.grpo, graph="off")
            run.decoders.clear()
            run.optimizer.zero_grad(set_to_none=True)
            result["graph"] = False
            m = grpo_step(run, s)
        wall = time.perf_counter() - t
        timed = s >= args.warmup
        rec = {"step": s + 1, "timed": timed, "wall_s": wall, **{k: m[k] for k in keys}}
        result["steps"].append(rec)
        print(f"[bench grpo] step {s + 1}{'' if timed else ' (warm-up)'}: wall {wall:.2f}s = rollout "
              f"{m['rollout_s']:.2f}s + update {m['update_s']:.2f}s (+ capture/rewards) | rollout "
              f"{m['rollout_tok_s']:,.0f} tok/s | mismatch {100 * m['mismatch']:.3f}% | reward {m['reward']:.3f}",
              flush=True)
        _write(out, result)
    timed = [r for r in result["steps"] if r["timed"]] or result["steps"]
    mean = {k: sum(r[k] for r in timed) / len(timed) for k in ("wall_s", "rollout_s", "update_s", "rollout_tok_s",
                                                                "mismatch")}
    mean["peak_mem_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    result["mean"] = mean
    result["goals"] = {"mismatch<=1%": mean["mismatch"] <= 0.01, "rollout>=10k tok/s": mean["rollout_tok_s"] >= 10_000}
    _write(out, result)
    plot = _plot(out, timed)
    print(f"\n| step s | rollout s | update s | rollout tok/s | mismatch (|r-1|>0.1) |\n|---|---|---|---|---|\n"
          f"| {mean['wall_s']:.2f} | {mean['rollout_s']:.2f} | {mean['update_s']:.2f} | {mean['rollout_tok_s']:,.0f} | "
          f"{100 * mean['mismatch']:.3f}% |")
    print(f"goals: mismatch <= 1%: {'met' if result['goals']['mismatch<=1%'] else 'NOT met'}; rollout >= 10k tok/s: "
          f"{'met' if result['goals']['rollout>=10k tok/s'] else 'NOT met'} | {out / 'results.json'} {plot}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
