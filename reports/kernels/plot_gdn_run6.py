"""Gated delta's sixth run: the UT transform's three forms alternating with fla's forward (T = 64k, 16k),
the shipped form's forward over T beside fla's, and qwen3_next_bench's training step with each of the
two forms that were shipped. python reports/kernels/plot_gdn_run6.py"""
import json
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent
forms = json.loads((HERE / "gdn_run6_wy_forms.json").read_text())["runs"]
sweep = json.loads((HERE / "gdn_run6.json").read_text())["chunk_ms"]
train = json.loads((HERE / "gdn_run6_train_ab.json").read_text())["runs"]
fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
for ax, run in zip(axes[:2], forms):
    names = list(run["fwd_ms"]) + ["fla"]
    samples = [run["fwd_ms"][f] for f in run["fwd_ms"]] + [run["anchor_fwd_ms"]]
    for i, s in enumerate(samples):
        ax.scatter([i] * len(s), s, color="C3" if names[i] == "fla" else "C0")
        ax.hlines(sorted(s)[len(s) // 2], i - 0.25, i + 0.25, color="k")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("forward ms (3 alternating rounds)")
    ax.set_title(f"UT transform forms, T {run['T']} (B1 H16 D128 bf16)")
    ax.set_ylim(0, None)
    ax.grid(axis="y", alpha=0.3)
Ts = sorted(int(t) for t in sweep["triton fwd"])
ax = axes[2]
ax.plot(Ts, [sweep["fla fwd"][str(t)] / sweep["triton fwd"][str(t)] for t in Ts], "o-", label="fla fwd / ours (blocks)")
ax.axhline(1.0, color="k", lw=0.8)
ax.set_xscale("log", base=2)
ax.set_xlabel("T")
ax.set_ylabel("fla time / our time (> 1: ours faster)")
ax.set_title("chunked forward vs fla 0.6.0, same process")
ax.legend()
ax.grid(alpha=0.3)
ax = axes[3]
for i, r in enumerate(train):
    ax.bar(i, r["tok_s_k"], color="C0" if r["form"] == "blocks" else "C7")
ax.set_xticks(range(len(train)), [r["form"] for r in train])
ax.set_ylim(160, 172)
ax.set_ylabel("k tok/s")
ax.set_title("qwen3_next_bench train step, b8 x 2048")
fig.suptitle("one H100 80GB HBM3, 2026-12-07, torch 2.11, triton 3.6, fla 0.6.0")
fig.tight_layout()
fig.savefig(HERE / "gdn_run6.png", dpi=100)
