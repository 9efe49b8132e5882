"""Figure of the eighth session's GPU calls (one H100, 2026-12-06, 21:25-21:37 UTC, tree d6e3357):
the decoding step's block compression by W_1 slices (run8_compress.json), the captured
`qwen3_0.6b_nsa` step at 4k context before (tree 08d47d9) and after (the slices and the NSA kernels
under decode_pdl), two runs each (run8_step_profile_*.json), and one layer's attention at 8k / 64k
with and without PDL (run8_decode.json).

    python reports/nsa/plot_run8.py   # writes reports/nsa/run8.png
"""
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent


def main():
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    c = json.loads((HERE / "run8_compress.json").read_text())
    splits = [k for k in c["ends a block"] if k != "torch"]
    ax[0].plot([int(s) for s in splits], [c["ends a block"][s] for s in splits], "o-", label="step ending a block")
    ax[0].plot([int(s) for s in splits], [c["ends none"][s] for s in splits], "o-", label="other steps")
    ax[0].axhline(c["ends a block"]["torch"], color="gray", ls="--", label="torch form (every step)")
    ax[0].set_xscale("log", base=2)
    ax[0].set(xlabel="W_1 slices (SPLITS; shipped 8)", ylabel="µs a launch (28 in a graph)",
              title="block compression, qwen3_0.6b_nsa's φ")
    ax[0].legend(fontsize=8)

    steps = {}
    for when in ("before", "after"):
        steps[when] = [json.loads((HERE / f"run8_step_profile_{when}_{i}.json").read_text())["paths"]["captured"]["step_us"]
                       for i in (1, 2)]
    x = range(2)
    for i, when in enumerate(("before", "after")):
        ax[1].bar([i - 0.18, i + 0.18], steps[when], width=0.34, color=["C0", "C1"][i])
        for j, v in enumerate(steps[when]):
            ax[1].text(i + (j - 0.5) * 0.36, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    ax[1].set_xticks(list(x), ["08d47d9 (before)", "d6e3357 (slices + PDL)"])
    ax[1].set(ylabel="µs a step (two runs)", title="captured decoding step, 4k context, batch 1")

    d = json.loads((HERE / "run8_decode.json").read_text())["decode"]
    ctx = [r["C"] for r in d]
    for key, lab in (("nsa", "all three branches"), ("cmp+slc", "compressed + selected"), ("win", "window")):
        ax[2].plot(ctx, [r[key] * 1e3 for r in d], "o-", label=f"{lab}, PDL")
        ax[2].plot(ctx, [r["no_pdl"][key] * 1e3 for r in d], "o--", color=ax[2].lines[-1].get_color(),
                   label=f"{lab}, no PDL")
    ax[2].plot(ctx, [r["sdpa"] * 1e3 for r in d], "k:", label="SDPA over the cache")
    ax[2].set_xscale("log", base=2)
    ax[2].set(xlabel="context", ylabel="µs a layer step (graph)", title="one layer, 64 / 4 heads, D 128")
    ax[2].legend(fontsize=7)
    fig.suptitle("NSA decoding, eighth run (one H100, 2026-12-06)")
    fig.tight_layout()
    fig.savefig(HERE / "run8.png", dpi=110)


if __name__ == "__main__":
    main()
