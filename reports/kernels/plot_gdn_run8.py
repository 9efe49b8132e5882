"""Gated delta's eighth run: the UT transform's backward walking K in slices (shipped, 21175b2) against
the whole-K kernel before it, forward + backward in three alternating rounds at T = 16k and 64k; and
the full `deepwish bench gdn` of the shipped tree: our forward and forward + backward beside fla 0.6's
forward and SDPA, one run. python reports/kernels/plot_gdn_run8.py"""
import json
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from gdn_bench_panel import bench_panel  # noqa: E402  (beside this script)

HERE = Path(__file__).parent
ab = json.loads((HERE / "gdn_run8_against.json").read_text())
bench = json.loads((HERE / "gdn_run8.json").read_text())
fig, axes = plt.subplots(1, 3, figsize=(18, 4.6))
for ax, row in zip(axes[:2], ab["rows"]):
    for i, (name, label) in enumerate((("other", "whole K, 8 warps (before)"), ("ours", "K in slices of 64, 4 warps"))):
        s = row["fwd_bwd_ms"][name]
        ax.scatter([i] * len(s), s, color="C3" if name == "other" else "C0")
        ax.hlines(sorted(s)[1], i - 0.3, i + 0.3, color="k")
    ax.set_xticks([0, 1], ["whole K, 8 warps\n(before)", "K slices of 64,\n4 warps (21175b2)"])
    ax.set_xlim(-0.7, 1.7)
    ax.set_ylim(0, None)
    ax.set_ylabel("fwd + bwd ms (3 alternating rounds)")
    ax.set_title(f"T {row['T'] // 1024}k, B1 H16 D128 bf16 (H100)")
    ax.grid(axis="y", alpha=0.3)
bench_panel(axes[2], bench, "deepwish bench gdn, one run (H100)", ratio_top=6)
fig.tight_layout()
fig.savefig(HERE / "gdn_run8.png", dpi=110)
