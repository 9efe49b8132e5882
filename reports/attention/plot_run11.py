"""reports/attention/run11.png from run11_plain_backends_h200.json: plain-causal attention fwd+bwd at
qwen3_0.6b's heads (16 / 8, D 128, bf16) under each SDPA backend and the own kernel, one H200."""
import json
import os

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

HERE = os.path.dirname(os.path.abspath(__file__))
rows = [r for r in json.load(open(os.path.join(HERE, "run11_plain_backends_h200.json"))) if "error" not in r]
shapes = sorted({(r["B"], r["T"]) for r in rows}, key=lambda s: s[1])
fig, axes = plt.subplots(1, len(shapes), figsize=(5.2 * len(shapes), 3.8))
for ax, (B, T) in zip(axes, shapes):
    rs = [r for r in rows if (r["B"], r["T"]) == (B, T)]
    names = [r["variant"] for r in rs]
    fwd = [r["fwd_ms"] for r in rs]
    bwd = [r["fwdbwd_ms"] - r["fwd_ms"] for r in rs]
    ax.barh(names, fwd, label="forward")
    ax.barh(names, bwd, left=fwd, label="backward (fwd+bwd - fwd)")
    for i, r in enumerate(rs):
        ax.text(r["fwdbwd_ms"], i, f" {r['fwdbwd_ms']:.2f} ms", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_title(f"B {B}, T {T}, plain causal")
    ax.set_xlabel("ms (median of 30)")
    ax.set_xlim(0, max(r["fwdbwd_ms"] for r in rs) * 1.3)
axes[-1].legend(loc="upper right", fontsize=8)
fig.suptitle("Plain-causal attention, 16 / 8 heads, D 128, bf16, one H200 (torch 2.11, 2026-12-07)", fontsize=10)
fig.tight_layout()
fig.savefig(os.path.join(HERE, "run11.png"), dpi=110)
