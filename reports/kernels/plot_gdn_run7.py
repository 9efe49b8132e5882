"""Gated delta's seventh run: forward + backward of the kernels before the gradient-dtype change
(b203a31~1), at it (HEAD then, 069ce63) and with the K-sliced UT-transform backward at four
(K slice, warps) pairs plus one storing the partial dk in bf16 (not shipped: run-to-run differences,
see kernels.md), T = 16k and 64k; and `_wy_bwd_kernel`'s own time. python reports/kernels/plot_gdn_run7.py"""
import json
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent
runs = json.loads((HERE / "gdn_run7_bwd_ab.json").read_text())
fig, axes = plt.subplots(1, 3, figsize=(18, 4.6))
for ax, T in zip(axes[:2], ("16384", "65536")):
    names = list(runs[T]["ms"])
    for i, n in enumerate(names):
        s = runs[T]["ms"][n]
        ax.scatter([i] * len(s), s, color="C3" if n in ("before_dtype", "head") else "C0")
        ax.hlines(sorted(s)[1], i - 0.3, i + 0.3, color="k")
    ax.set_xticks(range(len(names)), [n.replace("ours_", "") for n in names], rotation=30, ha="right")
    ax.set_ylabel("fwd + bwd ms (3 alternating rounds)")
    ax.set_title(f"T {int(T) // 1024}k, B1 H16 D128 bf16 (H100)")
    ax.set_ylim(0, None)
    ax.grid(axis="y", alpha=0.3)
ax = axes[2]
names = list(runs["65536"]["kernels_us"])
us = [runs["65536"]["kernels_us"][n]["_wy_bwd_kernel"] for n in names]
ax.bar(range(len(names)), us, color=["C3" if n in ("before_dtype", "head") else "C0" for n in names])
ax.set_xticks(range(len(names)), [n.replace("ours_", "") for n in names], rotation=30, ha="right")
ax.set_ylabel("_wy_bwd_kernel µs (one profiled step)")
ax.set_title("the UT transform's backward, T 64k")
ax.grid(axis="y", alpha=0.3)
fig.tight_layout()
fig.savefig(HERE / "gdn_run7.png", dpi=110)
