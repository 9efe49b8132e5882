"""Benchmark: ablations of the GPT family — Δ validation loss per token of each technique.

    deepwish bench ablate --out reports/ablate --preset gpt_124m --off value_embeds,skips,windows
        [--seeds 2] [--data DIR] [--steps N] [--set section.key=value ...]

For every seed, the full preset and one variant per technique turned off train with the real
trainer on identical data in identical order (the seed fixes both the data order and the
initialisation stream; the training shape is the preset's for every variant; the data is the
embedded corpus or `--data DIR`, a `deepwish data build` output, as for `bench speedrun`). At every
evaluation, Δ = val loss(variant) − val loss(full) at the same token count: a positive Δ is what
the technique buys. Reported per technique: the final Δ as the mean over seeds with its
seed-to-seed spread (min..max; one Δ per seed), the full model's own seed-to-seed spread of its
final loss beside it (a Δ inside that spread is not measured), Δ against tokens as a plot
(mean line, min..max band), DIR/ablate.json and DIR/ablate.md. An ablation too long for one
sitting is split by technique: the first call trains the full model too, later ones take its runs
with `--full-from FIRST_OUT` (checked to be the same settings, data and corpus fingerprint);
`--off none` trains the full model alone. `--runs-from EARLIER_OUT` reads back every run that
finished there, the full model's and any technique's (same checks), and trains only the rest, so
one command gives the whole table after several calls. A call cut short (a time limit's SIGTERM) is taken up
by the same command: runs that finished in --out are read back (checked to be the same settings),
a run stopped with a checkpoint is resumed, the rest are trained.

Techniques (--off; each is one `--set` away from the full preset, the neutral value of the switch;
a technique the preset does not use, whose switch is already neutral, is refused: gpt_124m has no
attention soft-cap and runs Muon without NorMuon):
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from deepwish.bench.env import doc_summary
from deepwish.bench.speedrun import data_note, data_sets, run_curves

TECHNIQUES: dict[str, tuple[str, ...]] = {
    "value_embeds": ("model.value_embeds=0",),
    "skips": ("model.unet_skips=false",),
    "residual_scales": ("model.residual_scales=false",),
    "windows": ("model.window_pattern=''", "train.window_warmup_frac=0"),  # full causal attention everywhere
    "window_schedule": ("train.window_warmup_frac=0",),  # final windows from the first step
    "logit_softcap": ("model.logit_softcap=0",),
    "attn_softcap": ("model.attn_softcap=0",),
    "qk_norm": ("model.qk_norm=false",),
    "embed_norm": ("model.embed_norm=false",),
    "relu2": ("model.hidden_act=gelu_new",),  # the ungated MLP with GPT-2's activation instead
    "untied_head": ("model.tie_embeddings=true",),
    # hidden matrices on AdamW at the GPT-2 baseline's lr (0.0018, llm.c's 3x GPT-2), not train.lr 0.008,
    # which is the head's (val 5.49 vs 3.34 after 100 steps on the H200: an untuned lr, not Muon's worth)
    "muon": ("train.optimizer=adamw", "train.lr=0.0018"),
    "polar_express": ("train.muon_ns_schedule=jordan",),
    "normuon": ("train.muon_normuon=false",),
}
__doc__ += "\n".join(f"    {name:16s} {' '.join(sets)}" for name, sets in TECHNIQUES.items()) + "\n"


def variant_config(preset: str, out_dir: Path, sets: list[str]):
    from deepwish.config import load_config

    cfg = load_config(preset, list(sets) + [f"train.out_dir={out_dir}", "train.log_every=1", "train.sample_tokens=0"])
    return load_config(None, [f"train.save_every={cfg.train.steps}"], base=cfg)


def train_variant(preset: str, out_dir: Path, sets: list[str]) -> dict:
    """One run's curves: read back when an earlier call finished it in `out_dir`, resumed from its
    checkpoint when one was stopped there, trained otherwise."""
    from deepwish.config import ConfigError
    from deepwish.train import loop
    from deepwish.train.checkpoint import list_checkpoints

    if (out_dir / "config.json").is_file():
        if diff := settings_diff(out_dir, preset, sets):
            raise ConfigError(f"{out_dir}: holds a run with other settings ({', '.join(diff)}); give another --out")
        if finished(out_dir):
            print(f"[deepwish] ablate: {out_dir} finished in an earlier call; its curves are read back", flush=True)
            return run_curves(out_dir)
        if list_checkpoints(out_dir):
            loop.train(variant_config(preset, out_dir, sets), resume=True, progress_bar=False)
            return run_curves(out_dir)
        raise ConfigError(f"{out_dir}: an unfinished run without a checkpoint; remove it to train it again")
    loop.train(variant_config(preset, out_dir, sets), progress_bar=False)
    return run_curves(out_dir)


def finished(run: Path) -> bool:
    """The trainer's last record (`final`) is in the run's metrics.jsonl."""
    path = run / "metrics.jsonl"
    return path.is_file() and any(json.loads(line).get("kind") == "final" for line in path.read_text().splitlines()
                                  if line.strip())


def settings_diff(run: Path, preset: str, sets: list[str]) -> list[str]:
    """What the run saved in run/config.json trained differently from what `sets` would (the model
    and train settings, out_dir aside; the data files by name)."""
    from deepwish.config import ModelConfig, TrainConfig, to_dict

    saved = json.loads((run / "config.json").read_text())
    want = json.loads(json.dumps(to_dict(variant_config(preset, run, sets))))
    # a setting newer than the saved run is absent from its config.json: at its default it matches
    defaults = {sec: json.loads(json.dumps(to_dict(cls()))) for sec, cls in (("train", TrainConfig), ("model", ModelConfig))}

    def differs(sec: str, k: str) -> bool:
        if k not in saved[sec] and want[sec].get(k) == defaults[sec].get(k):
            return False
        return saved[sec].get(k) != want[sec].get(k)
    diff = [f"train.{k}" for k in sorted(set(saved["train"]) | set(want["train"])) if k != "out_dir" and differs("train", k)]
    diff += [f"model.{k}" for k in sorted(set(saved["model"]) | set(want["model"]))
             if differs("model", k) and not (k == "vocab_size" and not want["data"]["train_bin"])]
    diff += [f"data.{k}" for k in ("train_bin", "val_bin")
             if (Path(saved["data"][k]).name if saved["data"][k] else "") != (Path(want["data"][k]).name if want["data"][k] else "")]
    return diff


def reuse_full(full_from: Path, preset: str, sets: list[str], seed: int, note: dict) -> dict:
    """The full model's curves for `seed` from an earlier `bench ablate` output (--full-from DIR:
    DIR/seed<s>/full/{config.json,metrics.jsonl} and DIR/ablate.json), after checking that it trained
    what this call would (`reuse_run`). A missing run is an error."""
    from deepwish.config import ConfigError

    run = Path(full_from) / f"seed{seed}" / "full"
    if not (run / "config.json").is_file() or not (run / "metrics.jsonl").is_file():
        raise ConfigError(f"--full-from {full_from}: no {run}/config.json and metrics.jsonl (the output of an "
                          f"earlier `bench ablate` with --seeds > {seed})")
    return reuse_run("--full-from", Path(full_from), "full", preset, sets, seed, note)


def reuse_run(flag: str, root: Path, name: str, preset: str, sets: list[str], seed: int, note: dict) -> dict:
    """Run `name`'s curves for `seed` from an earlier `bench ablate` output ROOT
    (ROOT/seed<s>/<name>/{config.json,metrics.jsonl}, finished), after checking that it trained what
    this call would (`settings_diff`; and the corpus fingerprint of ROOT/ablate.json when both calls
    name one). A mismatch is one error naming the settings: a run is never silently retrained."""
    from deepwish.config import ConfigError

    run = root / f"seed{seed}" / name
    diff = settings_diff(run, preset, sets)
    earlier = root / "ablate.json"
    fp = json.loads(earlier.read_text()).get("data", {}).get("fingerprint") if earlier.is_file() else None
    if fp and note.get("fingerprint") and fp != note["fingerprint"]:
        diff.append(f"corpus fingerprint ({fp} there, {note['fingerprint']} here)")
    if diff:
        raise ConfigError(f"{flag} {root}: seed {seed}'s {name} run differs from this call's in "
                          f"{', '.join(diff)}; train it here (drop {flag})")
    print(f"[deepwish] ablate: seed {seed}'s {name} read back from {run}", flush=True)
    return run_curves(run)


def deltas(full: dict, variant: dict) -> tuple[list[int], list[float]]:
    """Δ val loss at the evaluations both runs share (the same steps: the same tokens)."""
    at = dict(zip(full["steps"], zip(full["tokens"], full["val_loss"])))
    pairs = [(at[s][0], v - at[s][1]) for s, v in zip(variant["steps"], variant["val_loss"]) if s in at]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def summarise(curves: dict[str, dict[int, dict]], off: list[str]) -> dict:
    """curves[variant][seed] -> per technique: final Δ per seed, mean, min, max, and Δ(tokens)."""
    seeds = sorted(curves["full"])
    finals = [curves["full"][s]["val_loss"][-1] for s in seeds]
    out = {"seeds": seeds, "full": {"final_val_loss": finals, "spread": max(finals) - min(finals)}, "off": {}}
    for name in off:
        per_seed = [deltas(curves["full"][s], curves[name][s]) for s in seeds]
        final = [d[-1] for _, d in per_seed]
        out["off"][name] = {"final_delta": final, "mean": sum(final) / len(final), "min": min(final),
                            "max": max(final), "tokens": per_seed[0][0], "delta_by_seed": [d for _, d in per_seed]}
    return out


def table(summary: dict, preset: str) -> str:
    full = summary["full"]
    lines = [f"{preset}, seeds {summary['seeds']}: full model final val loss "
             f"{', '.join(f'{x:.4f}' for x in full['final_val_loss'])} (seed spread {full['spread']:.4f})", "",
             "| off | Δ final val loss (mean) | min..max over seeds | outside the seed spread |", "|---|---|---|---|"]
    for name, r in summary["off"].items():
        measured = "yes" if abs(r["mean"]) > full["spread"] else "no"
        lines.append(f"| {name} | {r['mean']:+.4f} | {r['min']:+.4f}..{r['max']:+.4f} | {measured} |")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in summary["off"].items():
        rows = list(zip(*r["delta_by_seed"]))  # per evaluation: Δ of each seed
        mean = [sum(x) / len(x) for x in rows]
        line, = ax.plot(r["tokens"], mean, marker=".", label=f"{name} off")
        ax.fill_between(r["tokens"], [min(x) for x in rows], [max(x) for x in rows], color=line.get_color(), alpha=0.2)
    ax.axhline(0.0, color="gray", lw=0.8)
    ax.set_xlabel("tokens")
    ax.set_ylabel("Δ val loss vs full model (nats/token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="deepwish bench ablate", description=doc_summary(__doc__))
    ap.add_argument("--out", default="reports/ablate")
    ap.add_argument("--preset", default="gpt_124m")
    ap.add_argument("--off", default="value_embeds,skips,residual_scales,windows",
                    help=f"comma-separated techniques: {', '.join(TECHNIQUES)}; 'none': the full model "
                         f"alone (its seed spread, and runs for later calls' --full-from)")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--data", default=None, metavar="DIR",
                    help="a `deepwish data build` output (train.bin, val.bin, tokenizer/); default: the embedded corpus")
    ap.add_argument("--full-from", default=None, metavar="DIR",
                    help="take the full model's runs from an earlier `bench ablate --out DIR` with the same settings "
                         "(its seed*/full/{config.json,metrics.jsonl} and ablate.json) instead of training them: an "
                         "ablation split over several calls trains the full model once")
    ap.add_argument("--runs-from", default=None, metavar="DIR",
                    help="read back every run that finished in an earlier `bench ablate --out DIR` (the full "
                         "model's and any technique's, seed*/NAME), after the same settings check, instead of "
                         "training it; what DIR lacks is trained: a table completed over several calls")
    ap.add_argument("--steps", type=int, default=0, help="train.steps (0: the preset's)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="section.key=value, for every run")
    args = ap.parse_args(argv)
    off = [] if args.off.strip() == "none" else [x.strip() for x in args.off.split(",") if x.strip()]
    unknown = [x for x in off if x not in TECHNIQUES]
    if not off and args.full_from:
        from deepwish.config import ConfigError
        raise ConfigError("--off none --full-from: nothing to train; name the techniques to turn off")
    if unknown or (not off and args.off.strip() != "none"):
        from deepwish.config import ConfigError
        raise ConfigError(f"--off {args.off!r}: unknown technique(s) {', '.join(unknown) or '(none given)'}; "
                          f"known: {', '.join(TECHNIQUES)}")
    if args.seeds < 2:
        print("[deepwish] note: one seed gives no seed-to-seed spread; the goal asks for at least 2", flush=True)
    out = Path(args.out)
    base = (data_sets(args.data) if args.data else []) + args.sets + ([f"train.steps={args.steps}"] if args.steps else [])
    note = data_note(args.data, args.preset, base)
    from deepwish.config import ConfigError, to_dict
    full_cfg = to_dict(variant_config(args.preset, out, base))
    idle = [name for name in off if to_dict(variant_config(args.preset, out, base + list(TECHNIQUES[name]))) == full_cfg]
    if idle:  # its switch is already at the neutral value: the "ablation" would train the full model again
        raise ConfigError(f"--off {','.join(idle)}: already off in {args.preset} with these settings "
                          f"({'; '.join(' '.join(TECHNIQUES[n]) for n in idle)}): nothing to ablate")
    out.mkdir(parents=True, exist_ok=True)
    curves: dict[str, dict[int, dict]] = {}
    for seed in range(args.seeds):
        for name in ["full", *off]:
            sets = base + [f"train.seed={seed}"] + list(TECHNIQUES.get(name, ()))
            if name == "full" and args.full_from:
                curves.setdefault(name, {})[seed] = reuse_full(Path(args.full_from), args.preset, sets, seed, note)
                continue
            if args.runs_from and finished(Path(args.runs_from) / f"seed{seed}" / name):
                curves.setdefault(name, {})[seed] = reuse_run("--runs-from", Path(args.runs_from), name, args.preset,
                                                              sets, seed, note)
                continue
            curves.setdefault(name, {})[seed] = train_variant(args.preset, out / f"seed{seed}" / name, sets)
    summary = summarise(curves, off)
    text = table(summary, args.preset)
    plot(summary, out / "ablate.png")
    (out / "ablate.md").write_text(text + "\n")
    (out / "ablate.json").write_text(json.dumps({"preset": args.preset, "sets": base, "data": note, "full_from": args.full_from,
                                                 "runs_from": args.runs_from,
                                                 **summary}, indent=1))
    print(text)
    print(f"[deepwish] wrote {out / 'ablate.json'}, {out / 'ablate.md'}, {out / 'ablate.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
