"""Figure of run 7 (one H100, 2026-12-06): the K/V load forms per kernel, tile and shape, and the
goals grid (own vs FlexAttention vs SDPA flash on plain causal input).

    python reports/attention/plot_run7.py   # writes reports/attention/run7.png
"""
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent
rows = json.loads((HERE / "run7_loads_tile_rows.json").read_text())
rows += json.loads((HERE / "run7_dkdv_loads_tile_rows.json").read_text())
goals = json.loads((HERE / "run7_goals_rows.json").read_text())

fig, (a, b) = plt.subplots(1, 2, figsize=(15, 6))
pairs = {}
for r in rows:
    if "ms" not in r:
        continue
    for shape, ms in r["ms"].items():
        key = f"{r['kind']} {'x'.join(map(str, r['cand'][:2]))} w{r['cand'][2]}s{r['cand'][3]} | {shape}"
        pairs.setdefault(key, {})[r["load"]] = ms
labels = [k for k, v in pairs.items() if "pointer" in v and "tma" in v]
speedup = [pairs[k]["pointer"] / pairs[k]["tma"] for k in labels]
colors = {"fwd": "tab:blue", "dq": "tab:orange", "dkdv": "tab:gray"}
a.barh(range(len(labels)), speedup, color=[colors[k.split()[0]] for k in labels])
a.axvline(1.0, color="k", lw=0.8)
a.set_yticks(range(len(labels)), labels, fontsize=6)
a.set_xlabel("pointer ms / descriptor (tma) ms  (> 1: descriptors faster)")
a.set_title("K/V (fwd, dq) and q/dO (dkdv) tiles through descriptors, kernel alone")
names = [f"D{g['D']} {g['H']}/{g['Hkv']} B{g['B']} T{g['T'] // 1024}k {g['docs']}doc W{g['window']}" for g in goals]
x = range(len(goals))
w = 0.27
for i, (path, color) in enumerate((("own", "tab:green"), ("flex", "tab:purple"), ("sdpa_flash_causal", "tab:gray"))):
    b.bar([j + (i - 1) * w for j in x], [g[path]["fwdbwd_ms"] / goals[j]["own"]["fwdbwd_ms"] for j, g in enumerate(goals)],
          w, label=path, color=color)
b.set_xticks(list(x), names, rotation=30, ha="right", fontsize=7)
b.set_ylabel("fwd+bwd time / own kernel's (eager)")
b.axhline(1.2, color="tab:purple", ls="--", lw=0.8, label="goal: Flex 1.2x own")
b.legend(fontsize=8)
b.set_title("goals grid: FlexAttention and SDPA flash (plain causal) against the own kernel")
fig.suptitle("attention, one NVIDIA H100 80GB HBM3, torch 2.11.0+cu130, triton 3.6.0, bf16 (2026-12-06)")
fig.tight_layout()
fig.savefig(HERE / "run7.png", dpi=110)
