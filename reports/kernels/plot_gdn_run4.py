"""Gated delta's fourth run: the forward's kernels at T = 64k beside fla's, and the forward against fla
with the state pass's old and new tile sets. python reports/kernels/plot_gdn_run4.py"""
import json
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent
new = json.loads((HERE / "gdn_run4_new_tiles.json").read_text())
old = json.loads((HERE / "gdn_run4_old_tiles.json").read_text())
prof = new["forward_kernels"]
stages = {  # ours -> fla's kernels doing the same stage
    "UT transform (A, inverse, w, u)": (["_wy_fwd_kernel"], ["chunk_gated_delta_rule_fwd_kkt_solve_kernel",
                                                              "recompute_w_u_fwd_kernel", "chunk_local_cumsum_scalar_kernel"]),
    "state pass": (["_state_fwd_kernel"], ["chunk_gated_delta_rule_fwd_kernel_h_blockdim64"]),
    "output": (["_output_fwd_kernel"], ["chunk_fwd_kernel_o"]),
}


def us(side, names):
    return sum(k["us_per_step"] for k in prof[side]["kernels"] if k["name"] in names)


fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.4))
xs = range(len(stages))
ours = [us("triton", a) for a, _ in stages.values()]
fla = [us("fla", b) for _, b in stages.values()]
ax.bar([x - 0.2 for x in xs], ours, 0.4, label="deepwish")
ax.bar([x + 0.2 for x in xs], fla, 0.4, label="fla 0.6")
for x, a, b in zip(xs, ours, fla):
    ax.text(x - 0.2, a + 15, f"{a:.0f}", ha="center", fontsize=8)
    ax.text(x + 0.2, b + 15, f"{b:.0f}", ha="center", fontsize=8)
ax.set_xticks(list(xs), list(stages), fontsize=8)
ax.set_ylabel("µs at T = 65,536 (B1 H16 D128, bf16)")
ax.set_title("forward by stage (torch.profiler), H100")
ax.legend()
Ts = [16384, 32768, 65536]
for label, res, key in (("deepwish, new tiles", new, "triton fwd"), ("deepwish, old tiles", old, "triton fwd"),
                        ("fla (new-tiles run)", new, "fla fwd"), ("fla (old-tiles run)", old, "fla fwd")):
    bx.plot(Ts, [res["chunk_ms"][key][str(T)] / new["chunk_ms"]["fla fwd"][str(T)] for T in Ts], "o-", label=label)
bx.set_xscale("log", base=2)
bx.set_xlabel("T")
bx.set_ylabel("ms / fla's ms (new-tiles run)")
bx.set_title("chunked forward against fla, H100")
bx.axhline(1.0, color="gray", lw=0.5)
bx.legend(fontsize=8)
fig.tight_layout()
fig.savefig(HERE / "gdn_run4.png", dpi=110)
print("wrote", HERE / "gdn_run4.png")
