"""Figure of the seventh session's GPU call (one H100, 2026-12-06, 19:40-19:46 UTC, tree df9e31f):
`deepwish generate` on `qwen3_0.6b_nsa` before (the sixth run's calls B and D) and after the
decoding step's compression, gated sum, fused residual branch and fused gates, and the compiled,
captured step at 4k context by kernel (decode_profile; the sixth run's table is
run6_step_profile_index_put.md, read here from its class rows), beside the dense `qwen3_0.6b` step
of the same call.

    python reports/nsa/plot_run7.py   # writes reports/nsa/run7.png
"""
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent


def classes_md(path):
    """{class: µs per step} from a decode_profile table's class rows, and the step's µs."""
    text = path.read_text()
    step = float(re.search(r": ([\d.]+) µs/step", text).group(1))
    rows = re.findall(r"^\| ([a-z-]+) \| \d+ \| ([\d.]+) \|", text, re.M)
    return {c: float(us) for c, us in rows}, step


def classes_json(path):
    path_data = next(iter(json.loads(path.read_text())["paths"].values()))
    out = {}
    for k in path_data["kernels"]:
        out[k["cls"]] = out.get(k["cls"], 0.0) + k["us_per_step"]
    return out, path_data["step_us"]


fig, (ax, bx) = plt.subplots(1, 2, figsize=(14, 5))
names = ["captured", "--compile"]
before, after = [123.8, 253.9], [618.6, 677.0]
x = range(len(names))
ax.bar([i - 0.2 for i in x], before, 0.4, label="before (sixth run: calls B, D)", color="C7")
ax.bar([i + 0.2 for i in x], after, 0.4, label="after (this call)", color="C3")
for i, (b, a) in enumerate(zip(before, after)):
    ax.text(i - 0.2, b, f"{b:.0f}", ha="center", va="bottom")
    ax.text(i + 0.2, a, f"{a:.0f}", ha="center", va="bottom")
ax.set_xticks(list(x), names)
ax.set(ylabel="tok/s after the first token", title="deepwish generate, qwen3_0.6b_nsa, 256 greedy tokens, H100")
ax.legend(fontsize=8)

bars = {"sixth run, compiled\n(decode_prologue off)": classes_md(HERE / "run6_step_profile_index_put.md"),
        "this call, compiled": classes_json(HERE / "run7_step_profile_compiled.json"),
        "this call, captured": classes_json(HERE / "run7_step_profile_captured.json"),
        "dense qwen3_0.6b,\ncaptured (this call)": classes_json(HERE / "run7_dense_step_profile_captured.json")}
order = ["gemm", "attention", "other", "triton-fused", "copy", "elementwise"]
for i, (label, (cls, step)) in enumerate(bars.items()):
    bottom = 0.0
    for j, c in enumerate(order):
        v = cls.get(c, 0.0)
        bx.bar(i, v, 0.6, bottom=bottom, color=f"C{j}", label=c if i == 0 else None)
        bottom += v
    bx.plot([i - 0.3, i + 0.3], [step, step], "k-", lw=2, label="step (wall)" if i == 0 else None)
    bx.text(i, step, f"{step:,.0f} µs", ha="center", va="bottom")
bx.set_xticks(range(len(bars)), list(bars), fontsize=8)
bx.set(ylabel="µs per step (kernel time by class; PDL overlap lets it exceed the step)",
       title="one decoding step at 4k context, batch 1, H100")
bx.legend(fontsize=7)
fig.tight_layout()
fig.savefig(HERE / "run7.png", dpi=110)
print("wrote", HERE / "run7.png")
