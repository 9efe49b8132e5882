"""Figure of run 9 (one H100, 2026-12-06): the flash backward's dQ forms (the dQ kernel, dQ by
atomics inside the dK/dV kernel, its transposed form) against FlexAttention, fwd+bwd, at the
training grid's shapes.

    python reports/attention/plot_run9.py   # writes reports/attention/run9.png
"""
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent
rows = json.loads((HERE / "run9_dq_forms_rows.json").read_text())
forms = [("own", "dQ kernel (default)", "tab:blue"), ("own_atomic", "atomic dQ", "tab:orange"),
         ("own_atomic_t", "atomic dQ, transposed", "tab:red")]
fig, ax = plt.subplots(figsize=(13, 6))
width = 0.27
labels = []
for i, r in enumerate(rows):
    labels.append(f"D{r['D']} {r['H']}/{r['Hkv']} B{r['B']} T{r['T']} docs{r['docs']} W{r['window']}")
    for j, (key, _, color) in enumerate(forms):
        ax.bar(i + (j - 1) * width, r["flex"]["fwdbwd_ms"] / r[key]["fwdbwd_ms"], width, color=color)
ax.axhline(1.0, color="k", lw=0.8)
ax.axhline(1.2, color="tab:green", lw=0.8, ls="--")
ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
ax.set_ylabel("FlexAttention fwd+bwd ms / ours (higher is faster; dashed: the 1.2x goal)")
ax.legend([plt.Rectangle((0, 0), 1, 1, color=c) for _, _, c in forms], [n for _, n, _ in forms], fontsize=8)
ax.set_title("Run 9: dQ forms of the flash backward vs FlexAttention, packed documents (one H100, "
             "torch 2.11.0+cu130, triton 3.6.0, 2026-12-06)", fontsize=9)
fig.tight_layout()
fig.savefig(HERE / "run9.png", dpi=110)
print(HERE / "run9.png")
