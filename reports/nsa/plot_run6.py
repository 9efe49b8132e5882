"""Figure of the sixth run (one H100, 2026-12-06, 16:17-16:47 UTC): the decoding step of one NSA
layer (one query, B 1, 64 / 4 heads, D 128) per branch as this run's changes landed (the decode
bench's JSONs: call A at tree 8141a2b, B at 2dd8204, C at 9713970), the window branch's launch
forms at 64k, and the cache-write kernels of `qwen3_0.6b_nsa`'s compiled decode step at 4k context
(decode_profile tables, before and after the writes went through index_put_).

    python reports/nsa/plot_run6.py   # writes reports/nsa/run6.png
"""
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent
runs = {k: json.loads((HERE / f"run6_decode_{k}.json").read_text())["decode"] for k in "abc"}


def pts(rows, get):
    return [r["C"] for r in rows], [get(r) * 1e3 for r in rows]


fig, (ax, bx, cx) = plt.subplots(1, 3, figsize=(18, 5), gridspec_kw=dict(width_ratios=[3, 2, 2]))
a, c = runs["a"], runs["c"]
ax.plot(*pts(a, lambda r: r["nsa"]), "s--", color="C3", label="A: all three branches (before)")
ax.plot(*pts(a, lambda r: r["cmp+slc"]), "s--", color="C0", label="A: compressed + selected (before)")
ax.plot(*pts(a, lambda r: r["win"]), "s--", color="C2", label="A: window (before)")
ax.plot(*pts(c, lambda r: r["nsa"]), "D-", lw=2, color="C3", label="C: all three branches")
ax.plot(*pts(c, lambda r: r["cmp+slc"]), "D-", color="C0", label="C: compressed + selected (pruned top-n merge)")
ax.plot(*pts(c, lambda r: r["win"]), "D-", color="C2", label="C: window (splits over the window)")
ax.plot(*pts(c, lambda r: r["sdpa"]), "k*-", label="SDPA over the whole cache")
ax.plot(*pts(c, lambda r: r["sdpa"] / 8), "k--", lw=0.8, label="goal: SDPA / 8")
ax.set(xscale="log", yscale="log", xlabel="context", ylabel="µs per layer step (CUDA graph)",
       title="NSA decode step, B 1, H 64 / KV 4, D 128, H100")
ax.legend(fontsize=7)
b64 = next(r for r in runs["b"] if r["C"] == 65536)
c64 = next(r for r in c if r["C"] == 65536)
forms = {"splits over the cache,\nin-split merge (before)": c64["win_variants"]["splits over the whole cache"],
         "splits over the window,\nmerge kernel": c64["win_variants"]["merge kernel, not in-split"],
         "splits over the window,\nin-split merge row by row (B)": b64["win"],
         "splits over the window,\nin-split merge over rows (C)": c64["win"]}
bx.barh(list(forms)[::-1], [v * 1e3 for v in forms.values()][::-1], color="C2")
bx.set(xlabel="µs a step (CUDA graph)", title="window branch (512) at 64k context")
writes = {"scatter_ (inductor: whole-cache\ncopy + scatter, 2 kernels)": 660.9 + 660.6,
          "index_put_ (in place,\n1 kernel)": 85.5}
cx.barh(list(writes)[::-1], list(writes.values())[::-1], color="C1")
cx.set(xlabel="µs a step (28 layers x 3 buffers)", title="qwen3_0.6b_nsa compiled decode step, 4k:\nNSACache writes")
fig.tight_layout()
fig.savefig(HERE / "run6.png", dpi=110)
