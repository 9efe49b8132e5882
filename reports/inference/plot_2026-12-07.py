"""Decode measurements of 2026-12-07 (one H100): the split-KV merge inside the split kernel against its
own kernel (captured steps, alternating), and the rows kernel's switches in the captured and the
compiled step. python reports/inference/plot_2026-12-07.py"""
import json
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent
ab = {"qwen3_0.6b\nctx 512": HERE / "merge_ab_qwen3_0.6b_ctx512_h100_2026-12-07.json",
      "qwen3_0.6b\nctx 4096": HERE / "merge_ab_qwen3_0.6b_ctx4096_h100_2026-12-07.json",
      "qwen3_0.6b_nsa\nctx 4096": HERE.parent / "nsa" / "run10_window_merge_ab.json"}
fig, (ax, bx) = plt.subplots(1, 2, figsize=(14, 4.8))
for i, (name, path) in enumerate(ab.items()):
    runs = json.loads(path.read_text())
    for j, form in enumerate(("in_split", "merge_kernel")):
        us = [r["step_us"] for r in runs if r["form"] == form]
        ax.scatter([i + (j - 0.5) * 0.3] * len(us), us, color=f"C{j}", label=form.replace("_", " ") if i == 0 else None)
ax.set_xticks(range(len(ab)), list(ab))
ax.set_ylabel("captured step µs (batch 1; two samples each)")
ax.set_title("split-KV merge: inside the split kernel vs its own kernel")
ax.legend()
ax.grid(axis="y", alpha=0.3)
rows = []
for f in ("decode_rows_h100_2026-12-07.json", "decode_rows_compiled_h100_2026-12-07.json"):
    rows += [r for r in json.loads((HERE / f).read_text())["rows"] if r["kernel"] == "step" and "batch 1," not in r["case"]]
cases = sorted({r["case"] for r in rows})
for i, case in enumerate(cases):
    sel = [r for r in rows if r["case"] == case]
    bx.barh([f"{case}: {r['config'].removeprefix('step, ')}" for r in sel], [r["us"] / 1000 for r in sel], color=f"C{i}")
bx.set_xlabel("ms a step (Qwen3-0.6B)")
bx.set_title("rows kernel switches, batches 8 and 64")
bx.tick_params(axis="y", labelsize=6)
fig.suptitle("one H100 80GB HBM3, 2026-12-07, torch 2.11, triton 3.6, bf16")
fig.tight_layout()
fig.savefig(HERE / "decode_2026-12-07.png", dpi=110)
