"""Figure of the seventh run's profiles (one H100, 2026-12-07, tree 7ff18d4): the training step's
GPU time by kernel, AdamW against Muon, from `python -m deepwish.bench.profile_train --preset
qwen3_0.6b --variant {deepwish,deepwish-muon} --batch 8 --seq 2048 --steps 3 --rows 45`
(run7_profile_adamw.txt, run7_profile_muon.txt): the rows that differ by more than 0.3 ms a step.

    python reports/muon/plot_run7.py   # writes reports/muon/run7_profile.png
"""
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent
STEPS = 3
# a table row: name, then self CPU %, self CPU, CPU total %, CPU total, CPU avg, then self CUDA time
ROW = re.compile(r"\s*(.+?)\s{2,}[\d.]+%\s+\S+\s+[\d.]+%\s+\S+\s+\S+\s+(\S+)\s+[\d.]+%")
UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def self_cuda_ms(path: Path) -> dict[str, float]:
    """Self CUDA ms a step by row name (rows of one name summed)."""
    out = {}
    for line in path.read_text().splitlines():
        m = ROW.match(line)
        if m:
            value = re.fullmatch(r"([\d.]+)(us|ms|s)", m.group(2))
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(value.group(1)) * UNIT_MS[value.group(2)] / STEPS
    return out


def main():
    adamw, muon = self_cuda_ms(HERE / "run7_profile_adamw.txt"), self_cuda_ms(HERE / "run7_profile_muon.txt")
    names = [n for n in set(adamw) | set(muon) if abs(muon.get(n, 0) - adamw.get(n, 0)) > 0.3
             and n != "Command Buffer Full"]  # a host-side wait, not GPU work
    names.sort(key=lambda n: -(muon.get(n, 0) - adamw.get(n, 0)))
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(names) + 1.5))
    y = range(len(names))
    ax.barh([i - 0.2 for i in y], [adamw.get(n, 0) for n in names], height=0.4, label="AdamW (deepwish)")
    ax.barh([i + 0.2 for i in y], [muon.get(n, 0) for n in names], height=0.4, label="Muon (deepwish-muon)")
    ax.set_yticks(list(y), [n[:60] for n in names], fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="self CUDA ms a step (profiled)",
           title="qwen3_0.6b b8 × 2048, one H100: where Muon's step differs from AdamW's")
    ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / "run7_profile.png", dpi=110)


if __name__ == "__main__":
    main()
