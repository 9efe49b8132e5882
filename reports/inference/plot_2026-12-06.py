"""The figure of reports/inference.md "Measured 2026-12-06" (numbers typed from the logs beside it):
python reports/inference/plot_2026-12-06.py  ->  reports/inference/decode_2026-12-06.png"""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

labels = ["as shipped\n(tree aa7c6be)", "split L2\nprefetch on", "prologue\ninside split", "next weights\nto L2 (L2_AHEAD)",
          "all three", "GEMV tiles\nautotuned alone"]
r1 = [0.848, 0.834, 0.885, 0.884, 0.936, 0.978]  # decode_tiles_h200_2026-12-06_1.log
r2 = [0.843, 0.828, 0.891, 0.912, 0.912, 0.918]  # decode_tiles_h200_2026-12-06_2.log
cases = ["b64 ctx 512", "b64 ctx 4096", "b8 ctx 512", "b8 ctx 4096"]
t64 = [3.490, 10.295, 2.577, 3.434]  # step_tiles_2026-12-06.py
t32 = [3.313, 9.163, 2.511, 3.529]
fig, ax = plt.subplots(1, 2, figsize=(13, 4.6))
x = range(len(labels))
ax[0].bar([i - 0.2 for i in x], r1, 0.4, label="run 1")
ax[0].bar([i + 0.2 for i in x], r2, 0.4, label="run 2")
ax[0].axhline(0.300, color="k", ls="--", lw=1, label="roofline 0.300 ms")
ax[0].axhline(1 / 1.8, color="r", ls=":", lw=1, label="goal 1,800 tok/s")
ax[0].set_xticks(list(x))
ax[0].set_xticklabels(labels, fontsize=8)
ax[0].set_ylabel("ms / step")
ax[0].set_title("Qwen3-0.6B captured decode step, batch 1, context 512")
ax[0].legend(fontsize=8)
x = range(len(cases))
ax[1].bar([i - 0.2 for i in x], t64, 0.4, label="64-key tile (64, 4 warps, 3 stages)")
ax[1].bar([i + 0.2 for i in x], t32, 0.4, label="32-key tile (32, 4 warps, 3 stages)")
ax[1].set_xticks(list(x))
ax[1].set_xticklabels(cases)
ax[1].set_ylabel("ms / step")
ax[1].set_title("split kernel tile in the captured step (batch 64: one split)")
ax[1].legend(fontsize=8)
fig.suptitle("one H200, torch 2.11.0+cu130, triton 3.6.0, bf16, 2026-12-06", fontsize=9)
fig.tight_layout()
fig.savefig("reports/inference/decode_2026-12-06.png", dpi=110)
