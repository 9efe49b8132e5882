"""Gated delta's eighth run: the UT transform's backward walking K in slices (shipped, 21175b2) against
the whole-K kernel before it, forward + backward in three alternating rounds at T = 16k and 64k; and
the full `deepwish bench gdn` of the shipped tree: our forward and forward + backward beside fla 0.6's
forward and SDPA, one run. python reports/kernels/plot_gdn_run8.py"""
import json
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

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
ax = axes[2]
ms = bench["chunk_ms"]
Ts = sorted(int(t) for t in ms["triton fwd"])
for name, style in (("triton fwd", "C0-o"), ("triton fwd+bwd", "C0--s"), ("fla fwd", "C1-o")):
    ax.plot(Ts, [ms[name][str(t)] for t in Ts], style, label=name.replace("triton", "deepwish"))
ax2 = ax.twinx()
ax2.plot(Ts, [ms["triton fwd+bwd"][str(t)] / ms["triton fwd"][str(t)] for t in Ts], "k:", label="fwd+bwd / fwd")
ax2.axhline(4, color="k", lw=0.5)
ax2.set_ylim(0, 6)
ax2.set_ylabel("our fwd+bwd / our fwd (goal ≤ 4)")
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xlabel("T")
ax.set_ylabel("ms")
ax.set_title("deepwish bench gdn, one run (H100)")
ax.legend(loc="upper left")
ax2.legend(loc="lower right")
ax.grid(alpha=0.3)
fig.tight_layout()
fig.savefig(HERE / "gdn_run8.png", dpi=110)
