"""Figure of the ninth run's GPU calls (one H100, 2026-12-07, 00:29-00:41 UTC, tree 7ff18d4):
the training branches at 64k beside fla's `parallel_nsa` in one process, twice
(run9_train_64k_{1,2}.json); the captured `qwen3_0.6b_nsa` step at 4k with the merges in their own
kernels and with MERGE_IN_SPLIT (run9_step_profile_*.json); one layer's decoding at 64k by variant
(run9_decode.json).

    python reports/nsa/plot_run9.py   # writes reports/nsa/run9.png
"""
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent
# the second "separate merges" run's step, as the call printed it (its JSON was not fetched back)
SEPARATE_2_US = 1690.3


def main():
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.4))
    runs = [json.loads((HERE / f"run9_train_64k_{i}.json").read_text())["train"][0] for i in (1, 2)]
    metrics = ("fwd", "bwd", "fwdbwd")
    for k, (key, label, color) in enumerate((("nsa (cmp+slc)", "deepwish cmp + slc", "C0"),
                                             ("fla cmp+slc", "fla parallel_nsa cmp + slc", "C3"))):
        for i, r in enumerate(runs):
            xs = [m + (k * 2 + i - 1.5) * 0.2 for m in range(3)]
            ax[0].bar(xs, [r[key][m] for m in metrics], width=0.19, color=color, alpha=1.0 - 0.35 * i,
                      label=f"{label}, run {i + 1}")
    for m in range(3):
        ratio = [r["fla cmp+slc"][metrics[m]] / r["nsa (cmp+slc)"][metrics[m]] for r in runs]
        top = max(r[key][metrics[m]] for r in runs for key in ("fla cmp+slc", "nsa (cmp+slc)"))
        ax[0].text(m, top * 1.02, "fla / deepwish\n" + " / ".join(f"{q:.2f}×" for q in ratio), ha="center", fontsize=8)
    ax[0].set_xticks(range(3), ["forward", "backward", "forward + backward"])
    ax[0].set(ylabel="ms", title="training branches at T 64k (64 / 4 heads, D 128, B 1)")
    ax[0].set_ylim(0, 1.45 * max(r["fla cmp+slc"]["fwdbwd"] for r in runs))
    ax[0].legend(fontsize=7, loc="upper left")

    sep = [json.loads((HERE / "run9_step_profile_separate_1.json").read_text())["paths"]["captured"]["step_us"],
           SEPARATE_2_US]
    ins = [json.loads((HERE / f"run9_step_profile_in_split_{i}.json").read_text())["paths"]["captured"]["step_us"]
           for i in (1, 2)]
    for i, (vals, color) in enumerate(((sep, "C0"), (ins, "C1"))):
        ax[1].bar([i - 0.18, i + 0.18], vals, width=0.34, color=color)
        for j, v in enumerate(vals):
            ax[1].text(i + (j - 0.5) * 0.36, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    ax[1].set_xticks([0, 1], ["merge kernels (shipped)", "MERGE_IN_SPLIT"])
    ax[1].set(ylabel="µs a step (two runs, alternating)", title="captured qwen3_0.6b_nsa step, 4k context, batch 1")

    d = json.loads((HERE / "run9_decode.json").read_text())["decode"][0]
    names = ["shipped"] + list(d["variants"])
    vals = [d["cmp+slc"] * 1e3] + [v * 1e3 for v in d["variants"].values()]
    ax[2].barh(range(len(names)), vals, color=["C0"] + ["C7"] * (len(names) - 1))
    ax[2].set_yticks(range(len(names)), names, fontsize=7)
    ax[2].invert_yaxis()
    ax[2].set(xlabel="µs (compressed + selected, one layer, CUDA graph)",
              title=f"decoding at 64k; window {d['win'] * 1e3:.1f} µs, SDPA {d['sdpa'] * 1e3:.1f} µs")
    fig.suptitle("NSA, ninth run (one H100, 2026-12-07)")
    fig.tight_layout()
    fig.savefig(HERE / "run9.png", dpi=110)


if __name__ == "__main__":
    main()
