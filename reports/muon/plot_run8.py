"""The eighth run's figure: Newton–Schulz's error by path (reports/muon/run8_gram_ns_accuracy.txt) and
the training step's tok/s (run8_bench_train_*.json). python reports/muon/plot_run8.py"""
import json
import re
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent
rows = {}
for line in (HERE / "run8_gram_ns_accuracy.txt").read_text().splitlines():
    if line.startswith("#") or not line.strip():
        continue
    name = line[:22].strip()
    rows[name] = {k.strip(): float(v) for k, v in re.findall(r"([a-z_ ()0-9,]+?) (\d\.\d{4})", line[22:])}
fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.6))
paths = ["torch plain", "all", "gram_ns", "ref gram_ns (fp32 products)"]
labels = ["torch (bf16)", "triton all", "triton gram_ns (unsymmetrised diagonal tiles)", "reference gram_ns (fp16)"]
width = 0.2
for i, (p, lab) in enumerate(zip(paths, labels)):
    ax.bar([j + i * width for j in range(len(rows))], [r[p] for r in rows.values()], width, label=lab)
ax.set_xticks([j + 1.5 * width for j in range(len(rows))], list(rows), rotation=30, ha="right", fontsize=8)
ax.set_ylabel("relative error vs the fp64 iteration")
ax.set_title("Newton–Schulz (5 jordan steps), H100, before d74a8b0")
ax.legend(fontsize=7)
runs = []
for f in ("run8_bench_train_anchors.json", "run8_bench_train_again.json"):
    for r in json.loads((HERE / f).read_text())["results"]:
        runs.append((f"{r['variant']}\n({f.split('_')[-1][:-5]})", r["tok_s"] / 1e3))
bx.bar(range(len(runs)), [t for _, t in runs], color=["C0", "C1", "C2", "C3", "C0", "C1"][:len(runs)])
bx.set_xticks(range(len(runs)), [n for n, _ in runs], fontsize=8)
for i, (_, t) in enumerate(runs):
    bx.text(i, t + 1, f"{t:.1f}k", ha="center", fontsize=8)
bx.set_ylabel("tok/s (thousands)")
bx.set_title("bench train qwen3_0.6b b8 x 2048, H100, two processes")
fig.tight_layout()
fig.savefig(HERE / "run8.png", dpi=110)
print("wrote", HERE / "run8.png")
