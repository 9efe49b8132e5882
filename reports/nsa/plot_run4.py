"""Figure of the fourth run (one H100, 2026-12-06): the selected branch's launch forms at
qwen3_0.6b_nsa's group (G 2, from the sweep's JSON and log), and the model's training rate before
and after (bench train JSON).

    python reports/nsa/plot_run4.py   # writes reports/nsa/run4.png
"""
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent
sweep = json.loads((HERE / "run4_slc_sweep_g2_2k.json").read_text())["slc_fwd"]["trials"]
# slc_dq's trials: the call's time limit ended the sweep before it wrote them; from its log
dq_log = [({}, 11.240), ({"num_stages": 2}, 12.888), ({"num_stages": 4}, 12.416), ({"num_warps": 2}, 10.935),
          ({"TMA": False}, 12.980), ({"TMA": False, "BT": 4}, 5.330), ({"TMA": False, "BT": 8, "num_warps": 8}, 6.416),
          ({"BT": 4}, 4.990), ({"BT": 8}, 5.001), ({"BT": 8, "num_stages": 2}, 5.157), ({"BT": 16, "num_warps": 8}, 27.149)]
before = json.loads((HERE / "run4_train_before.json").read_text())["results"]
after = json.loads((HERE / "run4_train_after.json").read_text())["results"]


def label(change: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in change.items()) or "BT=1 (the old default)"


fig, (a, b, c) = plt.subplots(1, 3, figsize=(17, 5.5), gridspec_kw=dict(width_ratios=[1.2, 1.2, 1]))
for ax, trials, title in ((a, [(t["changes"], t["ms"]) for t in sweep if "ms" in t], "selected forward"),
                          (b, dq_log, "selected backward (dQ + dK/dV)")):
    names = [label(ch) for ch, _ in trials]
    ms = [m for _, m in trials]
    ax.barh(range(len(ms)), ms, color=["tab:green" if ch.get("BT", 1) > 1 else "tab:gray" for ch, _ in trials])
    ax.set_yticks(range(len(ms)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ms (B 8, T 2048, 16 query / 8 KV heads, D 128, bf16)")
    ax.set_title(f"{title}: launch forms at G 2 (green: union tiles)", fontsize=9)
rows = [("before (BT 1, bincount sync)", [r for r in before if r["variant"] == "deepwish"][0]["tok_s"]),
        ("after (union tiles, no sync)", [r for r in after if r["preset"] == "qwen3_0.6b_nsa" and r["variant"] == "deepwish"][0]["tok_s"]),
        ("dense qwen3_0.6b (same call)", [r for r in after if r["preset"] == "qwen3_0.6b" and r["variant"] == "deepwish"][0]["tok_s"])]
c.bar(range(3), [v / 1e3 for _, v in rows], color=["tab:gray", "tab:green", "tab:blue"])
c.set_xticks(range(3), [n for n, _ in rows], fontsize=7, rotation=12)
for i, (_, v) in enumerate(rows):
    c.text(i, v / 1e3, f"{v / 1e3:.1f}k", ha="center", va="bottom", fontsize=8)
c.set_ylabel("k tok/s (bench train, batch 8 x 2048, AdamW)")
c.set_title("qwen3_0.6b_nsa training rate", fontsize=9)
fig.suptitle("NSA fourth run: one H100 80GB HBM3, torch 2.11.0+cu130, triton 3.6.0, 2026-12-06", fontsize=10)
fig.tight_layout()
fig.savefig(HERE / "run4.png", dpi=110)
print(HERE / "run4.png")
