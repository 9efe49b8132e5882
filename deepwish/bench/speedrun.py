"""Benchmark: the GPT-family speedrun — a model against its baseline twin on the same tokens.

    deepwish bench speedrun --out reports/speedrun [--preset gpt_124m --baseline gpt2_baseline_124m]
        [--data DIR] [--steps N] [--set section.key=value ...]

Both presets train with the real trainer (`deepwish train`) on the same data in the same order:
the baseline takes the model preset's training shape (steps, batch_size, grad_accum, seq_len,
seed, eval_every, eval_batches), so step s of either run has seen the same tokens. The data is
the embedded corpus unless `--data DIR` names a `deepwish data build` output (DIR/train.bin,
DIR/val.bin, DIR/tokenizer; e.g. `data build --tree python --bpe-vocab 50304`, the installed
Python's code and docs, tens of millions of tokens) or `--set data.train_bin=... --set
data.val_bin=... --set data.tokenizer=...` gives shards (applied to both; the presets' vocab must
cover the tokenizer). The planned tokens are printed as epochs of the training shard.
`--set` overrides go to both runs (e.g. a smaller shape for a CPU check). The embedded corpus
is small (about 0.4M training tokens): a preset's full token budget is hundreds of epochs of it,
so on it give --steps and a batch that keep to a few epochs (the curves then show learning, not
memorisation), or give shards of a larger corpus.

Reported (DIR/speedrun.json, DIR/speedrun.md, DIR/speedrun.png):
- the baseline's final validation loss L*, and for the model the first evaluation at or below L*:
  tokens and training wall-clock to get there, both as fractions of the baseline's (goals: at
  most 1/2 of its tokens, 1/3 of its wall-clock);
- tokens/s and MFU of each run (the median of the logged steps after the first 10%, so
  compilation and warm-up do not count), parameters, final validation loss;
- loss against tokens and against wall-clock, both runs on one figure each.

Wall-clock is training time: the trainer logs every step (`train.log_every=1`), and the time spent
in evaluations is subtracted (saves happen only at the end). Both runs take the compile warm-up
(`train.compile_warmup=true`, train/warmup.py: one forward+backward at every shape the schedules
use, before the clock starts, no update), so the clock holds no compilation; its seconds are
reported apart ("compile s"). `--set train.compile_warmup=false` puts compilation back into the
clock. Steps are the run's own: a run that reaches L* earlier is not stopped, so both curves are
complete.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from deepwish.bench.env import doc_summary

SHARED_TRAIN = ("steps", "batch_size", "grad_accum", "seq_len", "seed", "eval_every", "eval_batches")


def data_sets(data_dir: str | Path) -> list[str]:
    """--set overrides naming the shards and tokenizer of a `deepwish data build` output directory."""
    from deepwish.config import ConfigError
    d = Path(data_dir)
    missing = [n for n in ("train.bin", "val.bin", "tokenizer") if not (d / n).exists()]
    if missing:
        raise ConfigError(f"--data {d}: no {', '.join(missing)} there; build it with `deepwish data build ... "
                          f"--out {d}` (e.g. --tree python --bpe-vocab 50304)")
    return [f"data.train_bin={d / 'train.bin'}", f"data.val_bin={d / 'val.bin'}", f"data.tokenizer={d / 'tokenizer'}"]


def data_note(data_dir: str | Path | None, preset: str, sets: list[str]) -> dict:
    """The data a bench trains on (corpus fingerprint from DIR/meta.json when there is one) and the
    planned tokens as epochs of the training shard; printed, and kept in the bench's JSON."""
    from deepwish.config import load_config
    from deepwish.data.shards import read_header
    from deepwish.train.schedule import accum_at

    tc = load_config(preset, sets).train
    planned = sum(tc.batch_size * tc.seq_len * accum_at(s, tc) for s in range(tc.steps + tc.extend_steps))
    note = {"data_dir": None if data_dir is None else str(data_dir), "planned_tokens": planned}
    if data_dir is not None:
        meta_file = Path(data_dir) / "meta.json"
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        note.update(fingerprint=meta.get("fingerprint"), tokenizer=meta.get("tokenizer", {}).get("fingerprint"),
                    train_tokens=read_header(Path(data_dir) / "train.bin").n_tokens,
                    val_tokens=read_header(Path(data_dir) / "val.bin").n_tokens)
        note["epochs"] = planned / note["train_tokens"]
        print(f"[deepwish] data {data_dir}: {note['train_tokens']:,} training tokens (corpus fingerprint "
              f"{note['fingerprint']}); each run plans {planned:,} tokens = {note['epochs']:.2f} epochs", flush=True)
    return note


def run_curves(run_dir: Path) -> dict:
    """From a run's metrics.jsonl: validation loss by step with the tokens and training seconds
    at that step, the median tok/s and MFU after the first 10% of the logged steps, and the
    compile warm-up's seconds (None without one). The medians are of each logged step's own rate
    (step_tok_s) where the records have it: the logger's windowed rate averages the last 20 steps,
    so in a short run every record would still carry the first, slow steps."""
    recs = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    warmup = [r["seconds"] for r in recs if r["kind"] == "warmup"]
    train = {r["step"]: r for r in recs if r["kind"] == "train"}
    vals = {r["step"]: r for r in recs if r["kind"] == "val"}
    steps = sorted(train)
    if not steps or not vals:
        raise ValueError(f"{run_dir}: metrics.jsonl has no training or validation records")
    first = train[steps[0]]
    # the run's first step started when the first record's steps (at its tok/s) began
    t0 = first["time"] - first["step"] * first["n_targets"] / max(first["tok_s"], 1e-9)
    seconds, eval_time = {}, 0.0
    for s in steps:
        seconds[s] = train[s]["time"] - t0 - eval_time
        if s in vals:  # evaluation runs after the step's log record: not training time
            eval_time += vals[s]["time"] - train[s]["time"]
    tokens, total, prev = {}, 0, 0
    for s in steps:  # a record every log_every steps: its step's target count stands for the steps since the last
        total += train[s]["n_targets"] * (s - prev)
        tokens[s], prev = total, s
    late = steps[len(steps) // 10:]

    def median(key):
        xs = sorted(train[s][key] for s in late if train[s].get(key) is not None)
        return xs[len(xs) // 2] if xs else None

    per_step = any(train[s].get("step_tok_s") is not None for s in late)
    return {"steps": sorted(vals), "val_loss": [vals[s]["val_loss"] for s in sorted(vals)],
            "tokens": [tokens[s] for s in sorted(vals)], "seconds": [seconds[s] for s in sorted(vals)],
            "tok_s": median("step_tok_s" if per_step else "tok_s"), "mfu": median("step_mfu" if per_step else "mfu"),
            "compile_seconds": sum(warmup) if warmup else None}


def reach(curve: dict, target: float) -> dict | None:
    """The first evaluation of `curve` at or below `target`: its step, tokens and seconds."""
    for s, loss, n, t in zip(curve["steps"], curve["val_loss"], curve["tokens"], curve["seconds"]):
        if loss <= target:
            return {"step": s, "tokens": n, "seconds": t, "val_loss": loss}
    return None


def train_preset(preset: str, out_dir: Path, sets: list[str], shape_from=None) -> dict:
    """One `deepwish train` run of `preset` into out_dir (logging every step, one save at the end)."""
    from deepwish.config import load_config
    from deepwish.train import loop

    overrides = list(sets)
    if shape_from is not None:  # the baseline takes the model's training shape: the same tokens
        overrides = [f"train.{k}={getattr(shape_from, k)}" for k in SHARED_TRAIN] + overrides
    cfg = load_config(preset, overrides + [f"train.out_dir={out_dir}", "train.log_every=1", "train.sample_tokens=0"])
    cfg = load_config(None, [f"train.save_every={cfg.train.steps}"], base=cfg)
    summary = loop.train(cfg, progress_bar=False)
    return {"preset": preset, "cfg": cfg, "num_params": summary["num_params"],
            "final_val_loss": summary["final_val_loss"], "curves": run_curves(out_dir)}


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in ("baseline", "model"):
        r = results[name]
        c = r["curves"]
        axes[0].plot(c["tokens"], c["val_loss"], marker=".", label=r["preset"])
        axes[1].plot(c["seconds"], c["val_loss"], marker=".", label=r["preset"])
    for ax, xl in zip(axes, ("tokens", "training wall-clock (s)")):
        ax.axhline(results["target"], color="gray", ls="--", lw=0.8, label="baseline final val loss")
        ax.set_xlabel(xl)
        ax.set_ylabel("validation loss (nats/token)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(x, spec):
    return "n/a" if x is None else format(x, spec)


def table(results: dict) -> str:
    m, b, hit = results["model"], results["baseline"], results["reached"]
    lines = ["| run | params | final val loss | tok/s | MFU | training s | compile s |", "|---|---|---|---|---|---|---|"]
    for r in (b, m):
        c = r["curves"]
        lines.append(f"| {r['preset']} | {r['num_params'] / 1e6:.1f}M | {r['final_val_loss']:.4f} | "
                     f"{_fmt(c['tok_s'], ',.0f')} | {_fmt(None if c['mfu'] is None else 100 * c['mfu'], '.1f')}% | "
                     f"{c['seconds'][-1]:.1f} | {_fmt(c.get('compile_seconds'), '.1f')} |")
    lines.append("")
    data = results.get("data") or {}
    if data.get("data_dir"):
        lines += [f"data {data['data_dir']}: corpus fingerprint {data.get('fingerprint')}, "
                  f"{data['train_tokens']:,} training tokens; each run {data['planned_tokens']:,} tokens "
                  f"({data['epochs']:.2f} epochs)", ""]
    bc = b["curves"]
    if hit is None:
        lines.append(f"{m['preset']} did not reach the baseline's final val loss {results['target']:.4f}.")
    else:
        lines.append(f"{m['preset']} reached the baseline's final val loss {results['target']:.4f} at step "
                     f"{hit['step']}: {hit['tokens']:,} tokens ({hit['tokens'] / bc['tokens'][-1]:.2f} of the "
                     f"baseline's {bc['tokens'][-1]:,}; goal <= 0.50) and {hit['seconds']:.1f} s of training "
                     f"({hit['seconds'] / max(bc['seconds'][-1], 1e-9):.2f} of the baseline's "
                     f"{bc['seconds'][-1]:.1f} s; goal <= 0.33).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="deepwish bench speedrun", description=doc_summary(__doc__))
    ap.add_argument("--out", default="reports/speedrun")
    ap.add_argument("--preset", default="gpt_124m")
    ap.add_argument("--baseline", default="gpt2_baseline_124m")
    ap.add_argument("--data", default=None, metavar="DIR",
                    help="a `deepwish data build` output (train.bin, val.bin, tokenizer/) for both runs "
                         "(default: the embedded corpus)")
    ap.add_argument("--steps", type=int, default=0, help="train.steps of both runs (0: the model preset's)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="section.key=value, for both runs")
    args = ap.parse_args(argv)
    out = Path(args.out)
    sets = (["train.compile_warmup=true"] + (data_sets(args.data) if args.data else []) + args.sets
            + ([f"train.steps={args.steps}"] if args.steps else []))
    note = data_note(args.data, args.preset, sets)
    out.mkdir(parents=True, exist_ok=True)
    model = train_preset(args.preset, out / args.preset, sets)
    baseline = train_preset(args.baseline, out / args.baseline, sets, shape_from=model["cfg"].train)
    target = baseline["final_val_loss"]
    results = {"model": model, "baseline": baseline, "target": target, "reached": reach(model["curves"], target),
               "data": note}
    plot(results, out / "speedrun.png")
    text = table(results)
    (out / "speedrun.md").write_text(text + "\n")
    keep = {k: v for k, v in results.items() if k not in ("model", "baseline")}
    for name in ("model", "baseline"):
        keep[name] = {k: v for k, v in results[name].items() if k != "cfg"}
    (out / "speedrun.json").write_text(json.dumps(keep, indent=1))
    print(text)
    print(f"[deepwish] wrote {out / 'speedrun.json'}, {out / 'speedrun.md'}, {out / 'speedrun.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
