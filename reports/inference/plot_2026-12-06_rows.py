"""The figure of reports/inference.md "Measured 2026-12-06 (later)" (numbers typed from the logs and JSON beside it):
python reports/inference/plot_2026-12-06_rows.py  ->  reports/inference/decode_rows_2026-12-06.png"""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# before_after_h100_2026-12-06.log: tree 6df3df5 against 970d20b, one call, ms a step
cases = ["b1 captured", "b8 captured", "b64 captured", "b64 compiled"]
before = [0.957, 2.665, 3.792, 2.638]
after = [0.924, 1.612, 3.142, 2.643]
roof = [0.421, 0.561, 1.685, 1.685]
# decode_rows_steps_h100_2026-12-06_2.json: 64 rows, µs a launch (28 launches back to back in a graph)
proj = ["q/k/v", "o", "gate/up", "down"]
cublas = [6.00, 5.91, 7.51, 8.37]
plain = [6.21, 5.10, 7.05, 7.13]  # rows kernel, native operands, the product alone
fused = [11.43, 5.26, 14.00, 7.30]  # with the norm prologue (q/k/v, gate/up), SwiGLU (gate/up), residual (o, down)
fig, ax = plt.subplots(1, 2, figsize=(13, 4.6))
x = range(len(cases))
ax[0].bar([i - 0.27 for i in x], before, 0.27, label="before (6df3df5)")
ax[0].bar(list(x), after, 0.27, label="after (970d20b)")
ax[0].bar([i + 0.27 for i in x], roof, 0.27, label="roofline (copy bandwidth)", color="0.7")
ax[0].set_xticks(list(x))
ax[0].set_xticklabels(cases)
ax[0].set_ylabel("ms / step")
ax[0].set_title("Qwen3-0.6B decode step, context 512")
ax[0].legend(fontsize=8)
x = range(len(proj))
ax[1].bar([i - 0.27 for i in x], cublas, 0.27, label="cuBLAS (product only)")
ax[1].bar(list(x), plain, 0.27, label="rows kernel, product only")
ax[1].bar([i + 0.27 for i in x], fused, 0.27, label="rows kernel, with its fusions")
ax[1].set_xticks(list(x))
ax[1].set_xticklabels(proj)
ax[1].set_ylabel("µs / launch")
ax[1].set_title("projections at 64 rows")
ax[1].legend(fontsize=8)
fig.suptitle("one H100 80GB HBM3, torch 2.11.0+cu130, triton 3.6.0, bf16, 2026-12-06", fontsize=9)
fig.tight_layout()
fig.savefig("reports/inference/decode_rows_2026-12-06.png", dpi=110)
