"""Gated delta's fifth run: the chunked forward with each way of forming the UT transform's inverse,
alternating with fla's forward in one process, at T = 64k and 16k. python reports/kernels/plot_gdn_run5.py"""
import json
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent
runs = json.loads((HERE / "gdn_run5_wy_forms.json").read_text())["runs"]
fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4.2))
for ax, run in zip(axes, runs):
    names = list(run["fwd_ms"]) + ["fla"]
    samples = [run["fwd_ms"][f] for f in run["fwd_ms"]] + [run["anchor_fwd_ms"]]
    for i, s in enumerate(samples):
        ax.scatter([i] * len(s), s, color="C0" if names[i] != "fla" else "C3")
        ax.hlines(sorted(s)[len(s) // 2], i - 0.25, i + 0.25, color="k")
    ax.set_xticks(range(len(names)), [n if n == "fla" else f"WY_INVERSE\n{n}" for n in names])
    ax.set_ylabel("forward ms (3 alternating rounds, median line)")
    ax.set_title(f"gated delta chunked fwd, B1 T{run['T']} H16 D128 bf16")
    ax.grid(axis="y", alpha=0.3)
fig.suptitle("one H100 80GB HBM3, 2026-12-07, torch 2.11, triton 3.6, fla 0.6.0")
fig.tight_layout()
fig.savefig(HERE / "gdn_run5.png", dpi=110)
