"""Gated delta's ninth run: the chunk backward split in two kernels against the one kernel before it,
forward + backward in three alternating rounds at T = 16k and 64k (both split forms), and the full
`deepwish bench gdn` of the shipped tree, one run. python reports/kernels/plot_gdn_run9.py"""
import json
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from gdn_bench_panel import bench_panel  # noqa: E402  (beside this script)

HERE = Path(__file__).parent
ab = json.loads((HERE / "gdn_run9_against.json").read_text())
bench = json.loads((HERE / "gdn_run9.json").read_text())
fig, axes = plt.subplots(1, 3, figsize=(18, 4.6))
labels = {"split": "two kernels,\nh·dh tile", "split_rows": "two kernels,\nh·dh rows (shipped)"}
for ax, T in zip(axes[:2], (16384, 65536)):
    rows = [r for r in ab["rows"] if r["T"] == T]
    for j, row in enumerate(rows):
        for i, name in enumerate(("tree", "other")):
            s = row["fwd_bwd_ms"][name]
            x = 2 * j + i
            ax.scatter([x] * len(s), s, color="C3" if name == "tree" else "C0")
            ax.hlines(sorted(s)[1], x - 0.3, x + 0.3, color="k")
    ax.set_xticks([0, 1, 2, 3], ["one kernel\n(before)", labels[rows[0]["form"]], "one kernel\n(before)",
                                 labels[rows[1]["form"]]])
    lo = min(min(r["fwd_bwd_ms"][n]) for r in rows for n in ("tree", "other"))
    ax.set_ylim(0.9 * lo, None)  # not from zero: the forms differ by 2-5%
    ax.set_ylabel("fwd + bwd ms (3 alternating rounds; axis not from 0)")
    ax.set_title(f"T {T // 1024}k, B1 H16 D128 bf16 (H100)")
    ax.grid(axis="y", alpha=0.3)
bench_panel(axes[2], bench, "deepwish bench gdn, one run (H100)", ratio_top=7)
fig.tight_layout()
fig.savefig(HERE / "gdn_run9.png", dpi=110)
