"""Figure of the fifth run (one H100, 2026-12-06): the decoding step (compressed + selected branch,
one query, B 1, 64 / 4 heads, D 128) against SDPA over the whole cache, as the session's changes
landed (the decode bench's JSONs: call A at tree 695d36c, call B at 7682359, call C at b2d9682 with
the new defaults), and call C's kernels at 64k by GPU time.

    python reports/nsa/plot_run5.py   # writes reports/nsa/run5.png
"""
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent
a = json.loads((HERE / "run5_decode_a.json").read_text())["decode"]
b = json.loads((HERE / "run5_decode_b.json").read_text())["decode"]
c = json.loads((HERE / "run5_decode_c.json").read_text())["decode"]
BEST = "all with merge 8 warps instead of the tree"   # call B's variant, the defaults since 4af8fb8


def pts(rows, get):
    return [r["C"] for r in rows], [get(r) * 1e3 for r in rows]


fig, (ax, bx) = plt.subplots(1, 2, figsize=(14, 5))
third = ([8192, 65536], [74.8, 67.5])   # the third run's decode figures (before this session; reports/nsa.md)
ax.plot(*third, "o:", color="grey", label="before (third run)")
ax.plot(*pts(a, lambda r: r["variants"]["slc unsplit"]), "s--", label="A: no bookkeeping launches, slc unsplit")
ax.plot(*pts(a, lambda r: r["cmp+slc"]), "s-", label="A: + selected slots split")
ax.plot(*pts(b, lambda r: r["cmp+slc"]), "^-", label="B: + prefix arrays chunk-parallel")
ax.plot(*pts(b, lambda r: r["variants"][BEST]), "D:", label="B: + scans, 128-token splits, 8 warps (a variant)")
ax.plot(*pts(c, lambda r: r["cmp+slc"]), "D-", lw=2, label="C: the same as the defaults")
ax.plot(*pts(c, lambda r: r["sdpa"]), "k*-", label="SDPA over the cache (C)")
ax.plot(*pts(c, lambda r: r["sdpa"] / 8), "k--", lw=0.8, label="goal: SDPA / 8")
ax.set(xscale="log", yscale="log", xlabel="context", ylabel="µs per layer step (CUDA graph)",
       title="NSA decode step (cmp + slc), B 1, H 64 / KV 4, D 128, H100")
ax.legend(fontsize=7)
k64 = next(r for r in c if r["C"] == 65536)["kernels"]["kernels"]
names = [e["name"].split("(")[0].replace("void at::native::", "")[:32] for e in k64]
bx.barh(names[::-1], [e["us_per_step"] for e in k64][::-1])
bx.set(xlabel="µs a step (eager, torch.profiler)", title="call C's kernels at 64k (the new defaults)")
fig.tight_layout()
fig.savefig(HERE / "run5.png", dpi=110)
