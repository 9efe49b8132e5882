"""Benchmark: one preset's training rate under named variants of its settings, on the real trainer.

    deepwish bench variants --out DIR [--preset gpt_124m] [--data DIR] [--steps 60]
        --variant "bf16: train.residual_dtype=bf16" --variant "b32: train.batch_size=32 train.grad_accum=1"
        [--set section.key=value ...]

Each variant is `NAME: section.key=value ...` (whitespace-separated overrides on top of the preset
and of every `--set`); the preset as given, named `base`, always runs first and is the reference
of the ratios. Every run is `deepwish train` itself (bench/speedrun.py train_preset: the loader on
the given shards, the loop with its look-ahead, the compile warm-up before the clock), in this
process one after the other, so what is timed is what a user's command does. A variant that fails
(out of memory, a refused setting) is reported with its error and the others still run.

Reported (DIR/variants.json, DIR/variants.md, DIR/variants.png): per variant the median tok/s and
MFU of the logged steps after the first 10%, each step's own rate (bench/speedrun.py run_curves),
the step's wall time,
its ratio to `base`, the final validation loss (a variant that changes numerics shows it here; a
loss verdict needs `bench ablate`'s seeds), peak memory and the warm-up's compile seconds.
"""
from __future__ import annotations

import argparse
import json
import shlex
import traceback
from pathlib import Path

from deepwish.bench.env import doc_summary
from deepwish.bench.speedrun import data_note, data_sets, train_preset


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'NAME: section.key=value ...' -> (NAME, overrides)."""
    name, sep, rest = text.partition(":")
    name = name.strip()
    sets = shlex.split(rest)
    if not sep or not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"--variant {text!r}: expected 'NAME: section.key=value ...' with a plain NAME")
    if name == "base":
        raise ValueError("--variant: 'base' is the preset as given and always runs; name the variant otherwise")
    bad = [s for s in sets if "=" not in s or "." not in s.split("=", 1)[0]]
    if not sets or bad:
        raise ValueError(f"--variant {name}: every override must be section.key=value, got {bad or 'none'}")
    return name, sets


def run_row(name: str, sets: list[str], result: dict | None, error: str | None) -> dict:
    row = {"variant": name, "sets": sets, "error": error}
    if result is not None:
        c, tc = result["curves"], result["cfg"].train
        tokens_per_step = tc.batch_size * tc.seq_len * tc.grad_accum
        row.update(tok_s=c["tok_s"], mfu=c["mfu"], final_val_loss=result["final_val_loss"],
                   compile_seconds=c["compile_seconds"], peak_mem_gib=None,
                   step_ms=None if not c["tok_s"] else 1e3 * tokens_per_step / c["tok_s"])
    return row


def peak_mem(run_dir: Path) -> float | None:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    mems = [r["peak_mem_gib"] for r in recs if r.get("kind") == "train" and r.get("peak_mem_gib") is not None]
    return max(mems) if mems else None


def table(rows: list[dict]) -> str:
    base = rows[0].get("tok_s")
    lines = ["| variant | overrides | tok/s | vs base | MFU | step ms | final val loss | peak GiB | compile s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sets = " ".join(r["sets"]) or "(preset)"
        if r["error"]:
            lines.append(f"| {r['variant']} | {sets} | failed: {r['error'].splitlines()[-1][:120]} | | | | | | |")
            continue
        ratio = f"{r['tok_s'] / base:.3f}x" if base and r["tok_s"] else "n/a"
        fmt = lambda x, spec: "n/a" if x is None else format(x, spec)  # noqa: E731
        lines.append(f"| {r['variant']} | {sets} | {fmt(r['tok_s'], ',.0f')} | {ratio} | "
                     f"{fmt(None if r['mfu'] is None else 100 * r['mfu'], '.1f')}% | {fmt(r['step_ms'], '.1f')} | "
                     f"{r['final_val_loss']:.4f} | {fmt(r['peak_mem_gib'], '.1f')} | {fmt(r['compile_seconds'], '.0f')} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, preset: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if not r["error"] and r["tok_s"]]
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(ok) + 2), 3.6))
    ax.bar([r["variant"] for r in ok], [r["tok_s"] / 1e3 for r in ok], color="tab:blue")
    for i, r in enumerate(ok):
        if r["mfu"] is not None:
            ax.text(i, r["tok_s"] / 1e3, f"{100 * r['mfu']:.1f}%", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("k tok/s (median, after warm-up)")
    ax.set_title(f"{preset}: training rate by variant (labels: MFU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="deepwish bench variants", description=doc_summary(__doc__))
    ap.add_argument("--out", default="reports/variants")
    ap.add_argument("--preset", default="gpt_124m")
    ap.add_argument("--data", default=None, metavar="DIR",
                    help="a `deepwish data build` output (train.bin, val.bin, tokenizer/) (default: the embedded corpus)")
    ap.add_argument("--steps", type=int, default=60, help="train.steps of every run (0: the preset's)")
    ap.add_argument("--variant", dest="variants", action="append", default=[], metavar="'NAME: k=v ...'")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="section.key=value, for every run")
    args = ap.parse_args(argv)
    try:
        variants = [("base", [])] + [parse_variant(v) for v in args.variants]
    except ValueError as e:
        ap.error(str(e))
    if len({n for n, _ in variants}) != len(variants):
        ap.error("--variant names must be distinct")
    out = Path(args.out)
    common = (["train.compile_warmup=true"] + (data_sets(args.data) if args.data else []) + args.sets
              + ([f"train.steps={args.steps}"] if args.steps else []))
    note = data_note(args.data, args.preset, common)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, sets in variants:
        import torch
        torch._dynamo.reset()  # each run compiles its own graphs; none count against the next one's limit
        print(f"[deepwish] variant {name}: {' '.join(sets) or '(preset)'}", flush=True)
        result, error = None, None
        try:
            result = train_preset(args.preset, out / name, common + sets)
        except Exception:  # noqa: BLE001 - a failed variant is reported, the others still run
            error = traceback.format_exc()
            print(error, flush=True)
        row = run_row(name, sets, result, error)
        if result is not None:
            row["peak_mem_gib"] = peak_mem(out / name)
        rows.append(row)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    text = table(rows)
    (out / "variants.md").write_text(text + "\n")
    (out / "variants.json").write_text(json.dumps({"preset": args.preset, "data": note, "common_sets": common,
                                                   "rows": rows}, indent=1))
    plot(rows, out / "variants.png", args.preset)
    print(text)
    print(f"[deepwish] wrote {out / 'variants.json'}, {out / 'variants.md'}, {out / 'variants.png'}")
    return 1 if any(r["error"] for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
