"""Benchmark: Native Sparse Attention (model/nsa.py, kernels/nsa).

    deepwish bench nsa --quality --out reports/nsa_quality [--seeds 1] [--steps N] [--set section.key=value ...]
    deepwish bench nsa --out DIR ...     (without --quality: the kernel timings, bench/nsa_kernels.py)

Training quality: `qwen3_nsa_tiny` (every attention layer NSA, blocks scaled to its 128-token
rows) and the dense `qwen3_tiny` train with the real trainer on the embedded corpus, the same
steps, data order and initialisation stream (train.seed), and the validation losses at every
evaluation are printed side by side with the relative gap (NSA − dense) / dense. Writes
DIR/quality.json and DIR/quality.md. The run directories are DIR/seed<S>/{dense,nsa}.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

QUALITY_PAIR = (("dense", "qwen3_tiny"), ("nsa", "qwen3_nsa_tiny"))


def quality(out: Path, seeds: int = 1, steps: int = 0, sets: list[str] | tuple[str, ...] = ()) -> dict:
    """Train the pair per seed (module docstring) -> {"seeds", "steps", "runs": {name: {seed: curves}},
    "final": {name: [final val loss per seed]}, "gap": [relative final gap per seed]}."""
    from deepwish.bench.ablate import train_variant

    base = list(sets) + ([f"train.steps={steps}"] if steps else [])
    runs: dict[str, dict[int, dict]] = {}
    for seed in range(seeds):
        for name, preset in QUALITY_PAIR:
            runs.setdefault(name, {})[seed] = train_variant(preset, out / f"seed{seed}" / name,
                                                            base + [f"train.seed={seed}"])
    final = {name: [runs[name][s]["val_loss"][-1] for s in range(seeds)] for name, _ in QUALITY_PAIR}
    gap = [(n - d) / d for n, d in zip(final["nsa"], final["dense"])]
    return {"seeds": seeds, "sets": base, "runs": runs, "final": final, "gap": gap}


def quality_table(result: dict) -> str:
    lines = []
    for seed in range(result["seeds"]):
        dense, nsa = result["runs"]["dense"][seed], result["runs"]["nsa"][seed]
        at = dict(zip(nsa["steps"], nsa["val_loss"]))
        lines += [f"seed {seed}: validation loss (nats/token), {QUALITY_PAIR[0][1]} vs {QUALITY_PAIR[1][1]}", "",
                  "| step | tokens | dense | nsa | (nsa - dense) / dense |", "|---|---|---|---|---|"]
        for s, tok, d in zip(dense["steps"], dense["tokens"], dense["val_loss"]):
            if s in at:
                lines.append(f"| {s} | {tok} | {d:.4f} | {at[s]:.4f} | {(at[s] - d) / d:+.2%} |")
        lines.append("")
    gaps = ", ".join(f"{g:+.2%}" for g in result["gap"])
    lines.append(f"final gap per seed: {gaps} (goal: within 3%)")
    return "\n".join(lines)


def quality_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="deepwish bench nsa --quality", description="NSA vs dense validation loss")
    ap.add_argument("--quality", action="store_true")
    ap.add_argument("--out", default="reports/nsa_quality")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--steps", type=int, default=0, help="train.steps (0: the presets')")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="section.key=value, for both runs")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = quality(out, args.seeds, args.steps, args.sets)
    text = quality_table(result)
    (out / "quality.md").write_text(text + "\n")
    (out / "quality.json").write_text(json.dumps(result, indent=1))
    print(text)
    print(f"[deepwish] wrote {out / 'quality.json'}, {out / 'quality.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """--quality: the training-quality check here; otherwise the kernel timings (bench/nsa_kernels.py)."""
    argv = list(argv or [])
    if "--quality" in argv:
        return quality_main(argv)
    from deepwish.bench.nsa_kernels import main as kernels_main
    return kernels_main(argv)
