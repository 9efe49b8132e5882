"""The clip fold timed: bench train's step time with clipping folded into the optimizer's update (5a169aa)
against clipping as a separate pass (687db2e), two alternating rounds on one H100.
python reports/training/plot_clip_fold.py"""
import json
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent
d = json.loads((HERE / "clip_fold_2026-12-07.json").read_text())
fig, axes = plt.subplots(1, 2, figsize=(10, 4))
for ax, variant in zip(axes, ("deepwish", "deepwish-muon")):
    for i, form in enumerate(("before", "after")):
        s = [r["step_ms"] for r in d["runs"] if r["variant"] == variant and r["run"].startswith(form)]
        ax.scatter([i] * len(s), s, color="C3" if form == "before" else "C0")
    ax.set_xticks([0, 1], ["separate clip pass\n(687db2e)", "clip in the update\n(5a169aa)"])
    ax.set_xlim(-0.6, 1.6)
    ax.set_ylabel("ms a step (axis not from 0)")
    ax.set_title(f"qwen3_0.6b b8×2048, {'AdamW' if variant == 'deepwish' else 'Muon'} (H100)")
    ax.grid(axis="y", alpha=0.3)
fig.tight_layout()
fig.savefig(HERE / "clip_fold_2026-12-07.png", dpi=110)
