"""The panel the gated-delta run plots share: one `deepwish bench gdn` run's forward and forward +
backward against fla's forward over T, with our fwd+bwd / fwd ratio against the ≤ 4 goal."""


def bench_panel(ax, bench: dict, title: str, ratio_top: float) -> None:
    ms = bench["chunk_ms"]
    Ts = sorted(int(t) for t in ms["triton fwd"])
    for name, style in (("triton fwd", "C0-o"), ("triton fwd+bwd", "C0--s"), ("fla fwd", "C1-o")):
        ax.plot(Ts, [ms[name][str(t)] for t in Ts], style, label=name.replace("triton", "deepwish"))
    ax2 = ax.twinx()
    ax2.plot(Ts, [ms["triton fwd+bwd"][str(t)] / ms["triton fwd"][str(t)] for t in Ts], "k:", label="fwd+bwd / fwd")
    ax2.axhline(4, color="k", lw=0.5)
    ax2.set_ylim(0, ratio_top)
    ax2.set_ylabel("our fwd+bwd / our fwd (goal ≤ 4)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("T")
    ax.set_ylabel("ms")
    ax.set_title(title)
    ax.legend(loc="upper left")
    ax2.legend(loc="lower right")
    ax.grid(alpha=0.3)
