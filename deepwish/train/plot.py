"""`deepwish plot RUN_DIR`: train/val loss and throughput curves from metrics.jsonl (Agg backend).

A resumed run appends to metrics.jsonl; for a step logged twice the later record wins.
Like is drawn with like: the train cross-entropy (`ce`) beside the validation cross-entropy, and
the minimised objective (`loss`: CE plus z-loss and auxiliary terms such as DeepSeek's MTP loss)
as its own dashed curve when it differs from the CE.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from deepwish.train.log import read_metrics


def _by_step(records: list[dict], kind: str, key: str) -> tuple[list[int], list[float]]:
    last: dict[int, float] = {}
    for r in records:
        if r.get("kind") == kind and isinstance(r.get(key), (int, float)):
            last[r["step"]] = r[key]
    steps = sorted(last)
    return steps, [last[s] for s in steps]


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Draw RUN_DIR/plot.png (or `out`): losses vs step (with the unigram-entropy line when the
    run recorded it) and tokens/s vs step. Returns the path written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    ts, tl = _by_step(records, "train", "loss")
    cs, cl = _by_step(records, "train", "ce")
    vs, vl = _by_step(records, "val", "val_loss")
    rs, rate = _by_step(records, "train", "tok_s")
    if not ts:
        raise ValueError(f"{run_dir}/metrics.jsonl has no train records to plot")
    final = [r for r in records if r.get("kind") == "final"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if cs:  # records written before `ce` was logged have the objective only
        ax1.plot(cs, cl, label="train CE", lw=1.2)
    if not cs or (ts, tl) != (cs, cl):
        ax1.plot(ts, tl, "--" if cs else "-", label="train objective (CE + aux terms)" if cs else "train loss", lw=1)
    if vs:
        ax1.plot(vs, vl, "o-", label="val CE", lw=1.5)
    if final and final[-1].get("unigram_entropy") is not None:
        ax1.axhline(final[-1]["unigram_entropy"], color="gray", ls="--", lw=1,
                    label="val unigram entropy")
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss (nats/token)")
    ax1.set_title(f"loss — {Path(run_dir).name}")
    ax1.grid(alpha=0.3)
    ax1.legend()
    ax2.plot(rs, rate, color="tab:green", lw=1.2)
    ax2.set_xlabel("step")
    ax2.set_ylabel("tokens / s")
    ax2.set_title("throughput (rolling)")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(out) if out else Path(run_dir) / "plot.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory holding metrics.jsonl")
    parser.add_argument("--out", default=None, help="PNG path (default RUN_DIR/plot.png)")


def run(args: argparse.Namespace) -> int:
    print(plot_run(args.run_dir, args.out))
    return 0
