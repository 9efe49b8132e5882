"""Crash-safe checkpoints: a directory per step, written aside and renamed into place.

Layout of a run directory:
    RUN/checkpoints/step_00000100/model.pt        model state_dict (unwrapped module)
    RUN/checkpoints/step_00000100/train_state.pt  optimizer, step, RNG states, loader, EMA
    RUN/checkpoints/step_00000100/meta.json       step, resolved config, versions, git hash
    RUN/checkpoints/latest                        the name of the newest complete checkpoint

A save writes into `checkpoints/.tmp-step_...` (same parent, so the rename is atomic on one
file system), fsyncs every file and the directory, renames it to `step_...`, then replaces
`latest` atomically (write `latest.tmp`, fsync, `os.replace`). A crash at any point leaves the
previous checkpoint and `latest` untouched; a stale `.tmp-*` directory is removed by the next
save. Only then are checkpoints beyond the newest `keep_last` deleted.

Single-process: under FSDP2, train/parallel.py writes sharded state (torch.distributed.checkpoint)
and reuses the same `latest` protocol.
"""
from __future__ import annotations

import json
import os
import platform
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

CKPT_DIR = "checkpoints"
LATEST = "latest"
FORMAT_VERSION = 1


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes_synced(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def git_hash(repo_dir: Path | None = None) -> str:
    """The commit of the source tree (`+dirty` when modified), or 'unknown' outside git."""
    repo_dir = repo_dir or Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(repo_dir), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        if out.returncode != 0:
            return "unknown"
        h = out.stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo_dir), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        return h + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    try:
        from importlib.metadata import version
        dw = version("deepwish")
    except Exception:  # not installed as a distribution (run from the source tree)
        dw = "source"
    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
           "deepwish": dw}
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = "absent"
    if torch.cuda.is_available():
        out["cuda"] = str(torch.version.cuda)
        out["device"] = torch.cuda.get_device_name()
    return out


def rng_state() -> dict[str, Any]:
    """Every RNG the trainer may touch, as tensors and plain Python (loadable with weights_only)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "key": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_to_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(run_dir: str | os.PathLike, step: int, *, model_state: dict, optimizer_state: dict,
                    loader_state: Any, ema_state: dict | None, config: dict, keep_last: int = 2,
                    extra: dict | None = None) -> Path:
    """Write checkpoint `step` atomically; return its directory. `step` = optimizer steps done."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    name = step_dir_name(step)
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    tmp.mkdir()
    try:
        _write_bytes_synced(tmp / "model.pt", lambda f: torch.save(model_state, f))
        train_state = {"format": FORMAT_VERSION, "step": step, "optimizer": optimizer_state,
                       "rng": rng_state(), "loader": loader_state, "ema": ema_state, "extra": extra or {}}
        _write_bytes_synced(tmp / "train_state.pt", lambda f: torch.save(train_state, f))
        meta = {"format": FORMAT_VERSION, "step": step, "config": config, "versions": versions(),
                "git": git_hash(), "argv": sys.argv}
        _write_bytes_synced(tmp / "meta.json", lambda f: f.write(json.dumps(meta, indent=1).encode()))
        _fsync_path(tmp)
        publish(root, tmp, name, keep_last)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def publish(root: Path, tmp: Path, name: str, keep_last: int) -> None:
    """Move the fully written and fsynced `tmp` into place as `root/name`, then point `latest`
    at it, then prune. Each step is atomic; a crash between them leaves a loadable state."""
    final = root / name
    replaced = root / f".tmp-replaced-{name}-{os.getpid()}"
    if final.exists():  # the same step saved again (e.g. after a resume): swap it out
        os.rename(final, replaced)
    os.rename(tmp, final)
    _fsync_path(root)
    shutil.rmtree(replaced, ignore_errors=True)
    latest_tmp = root / f"{LATEST}.tmp"
    _write_bytes_synced(latest_tmp, lambda f: f.write(name.encode()))
    os.replace(latest_tmp, root / LATEST)
    _fsync_path(root)
    _prune(root, keep_last, keep=name)


def _prune(root: Path, keep_last: int, keep: str) -> None:
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in steps[:-keep_last]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    root = Path(run_dir) / CKPT_DIR
    return sorted(p for p in root.glob("step_*") if p.is_dir()) if root.exists() else []


def resolve_checkpoint(path_or_run_dir: str | os.PathLike) -> Path:
    """A checkpoint directory, or a run directory (-> its `latest`)."""
    p = Path(path_or_run_dir)
    if (p / "model.pt").exists() and (p / "train_state.pt").exists():
        return p
    pointer = p / CKPT_DIR / LATEST
    if pointer.exists():
        target = p / CKPT_DIR / pointer.read_text().strip()
        if not (target / "meta.json").exists():
            raise FileNotFoundError(f"{pointer} names {target.name}, which is missing or incomplete")
        return target
    if not p.exists():
        raise FileNotFoundError(f"no such checkpoint or run directory: {p}")
    raise FileNotFoundError(f"{p} holds no checkpoint (no model.pt/train_state.pt and no {CKPT_DIR}/{LATEST})")


def load_checkpoint(path_or_run_dir: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint: {'path', 'step', 'model', 'optimizer', 'rng', 'loader', 'ema', 'extra',
    'config', 'versions', 'git'}. Tensors are loaded with weights_only=True."""
    d = resolve_checkpoint(path_or_run_dir)
    meta = json.loads((d / "meta.json").read_text())
    state = torch.load(d / "train_state.pt", map_location=map_location, weights_only=True)
    model = torch.load(d / "model.pt", map_location=map_location, weights_only=True)
    if state.get("format") != FORMAT_VERSION:
        raise ValueError(f"{d}: checkpoint format {state.get('format')} is not {FORMAT_VERSION}")
    return {"path": d, "step": state["step"], "model": model, "optimizer": state["optimizer"],
            "rng": state["rng"], "loader": state["loader"], "ema": state["ema"], "extra": state["extra"],
            "config": meta["config"], "versions": meta["versions"], "git": meta["git"]}
