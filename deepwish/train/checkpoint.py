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

Integrity: meta.json (written last) lists every other file of the checkpoint with its size and
SHA-256 (`files`; for a sharded checkpoint every DCP shard and its .metadata). A checkpoint is
verified before it is published (so nothing older is pruned until a newer one verifies) and
before it is loaded. Resolving a run directory takes `latest`, or the newest step directory when
`latest` is missing; if that checkpoint does not verify (a changed, truncated or missing file,
unreadable meta.json) the newest older one that does is used, with one printed line naming the
bad file. An explicitly named checkpoint directory that does not verify is an error.

Branches: resuming from a checkpoint older than the newest step directory (`--resume
RUN/checkpoints/step_...`, or after a fallback) starts a branch: `start_branch` moves the newer
step directories, never deleted, to RUN/abandoned/<time>-after-step_.../ with one printed line,
and points `latest` at the checkpoint resumed from.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

CKPT_DIR = "checkpoints"
LATEST = "latest"
ABANDONED_DIR = "abandoned"
DCP_DIR = "dcp"  # the sharded payload of a data-parallel checkpoint (train/dist_checkpoint.py)
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, does not verify, or cannot be written; names the file."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


def _is_write_failure(e: BaseException) -> bool:
    """torch.save reports a failed write (full disk, I/O error) as a RuntimeError from its zip
    writer (`[enforce fail at inline_container.cc...]`, `PytorchStreamWriter failed ...`)."""
    return isinstance(e, OSError) or (isinstance(e, RuntimeError) and any(
        k in str(e) for k in ("inline_container", "PytorchStreamWriter", "file write failed")))


def write_failure(final: Path, e: BaseException) -> CheckpointError:
    why = f"{e.strerror} ({e.filename})" if isinstance(e, OSError) and e.strerror else _first_line(e)
    return CheckpointError(f"cannot write checkpoint {final}: {why}; the previous checkpoints are untouched")


@contextlib.contextmanager
def staged(tmp: Path, final: Path):
    """Around the writing of checkpoint `final` under its staging directory `tmp`: any failure
    removes `tmp` (the previous checkpoints stay as they were), and a failed write (full disk, I/O
    error) becomes one CheckpointError naming `final`."""
    try:
        yield
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_write_failure(e):
            raise write_failure(final, e) from None
        raise


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


def file_digest(path: Path) -> dict:
    """{'bytes', 'sha256'} of one file (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
            n += len(block)
    return {"bytes": n, "sha256": h.hexdigest()}


def manifest(ckpt_dir: Path) -> dict[str, dict]:
    """{relative path: file_digest} of every file under `ckpt_dir` except meta.json."""
    return {p.relative_to(ckpt_dir).as_posix(): file_digest(p)
            for p in sorted(ckpt_dir.rglob("*")) if p.is_file() and p.name != "meta.json"}


_VERIFIED: dict[str, tuple] = {}  # checkpoint dir -> file signatures verified in this process


def _signature(d: Path, files) -> tuple:
    out = []
    for rel in sorted(files):
        st = (d / rel).stat()
        out.append((rel, st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(out)


def read_meta_json(d: Path) -> dict:
    path = d / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing (an incomplete checkpoint)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} cannot be read: {_first_line(e)}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int) or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{path} is not a checkpoint's metadata (no step/config)")
    return meta


def verify(ckpt_dir: str | os.PathLike, *, fresh: bool = False) -> dict:
    """Check every file of a checkpoint against its meta.json; return the metadata, or raise
    CheckpointError naming the first bad file. Checkpoints written before checksums existed are
    checked for their files' presence only. `fresh`: re-hash even if verified before."""
    d = Path(ckpt_dir)
    meta = read_meta_json(d)
    files = meta.get("files")
    if files is None:
        need = ("train_state.pt", "dcp/.metadata") if meta.get("kind") == "dcp" else ("train_state.pt", "model.pt")
        for rel in need:
            if not (d / rel).is_file():
                raise CheckpointError(f"{d / rel} is missing")
        return meta
    for rel in files:
        if not (d / rel).is_file():
            raise CheckpointError(f"{d / rel} is missing")
    sig = _signature(d, files)
    if not fresh and _VERIFIED.get(str(d.resolve())) == sig:
        return meta
    for rel, want in files.items():
        path = d / rel
        got = file_digest(path)
        if got["bytes"] != want["bytes"]:
            raise CheckpointError(f"{path} has {got['bytes']} bytes, {want['bytes']} were written (truncated or "
                                  f"overwritten)")
        if got["sha256"] != want["sha256"]:
            raise CheckpointError(f"{path}: checksum mismatch (its bytes changed after it was written)")
    _VERIFIED[str(d.resolve())] = sig
    return meta


def load_pt(path: Path, map_location="cpu"):
    """torch.load(weights_only=True) with unreadable files reported as one CheckpointError line."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read: {_first_line(e)}") from None


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


def git_tree(repo_dir: Path | None = None, untracked_limit: int = 64 << 20) -> str:
    """The git tree id of the files as they are (tracked and untracked, ignored ones left out), or
    'unknown' outside git. Unlike the commit, it names the code that ran when the checkout's history
    is older than its files (a copy of a working tree): the commit whose `%T` equals it holds exactly
    these files. Staged through a copy of the index (only changed files are hashed again) and a
    temporary object store (the repository's objects read as alternates): nothing in the repository
    is written. Untracked files larger in all than `untracked_limit` (data someone left in the
    checkout) are not hashed: the tree then covers the tracked files and ends in '+untracked'."""
    repo_dir = repo_dir or Path(__file__).resolve().parents[2]
    git = ["git", "-C", str(repo_dir)]
    try:
        paths = subprocess.run([*git, "rev-parse", "--path-format=absolute", "--git-path", "objects",
                                "--git-path", "index"], capture_output=True, text=True, timeout=5)
        if paths.returncode != 0:
            return "unknown"
        objects, index = paths.stdout.split("\n")[:2]
        others = subprocess.run([*git, "ls-files", "-z", "--others", "--exclude-standard"], capture_output=True,
                                timeout=30)
        if others.returncode != 0:
            return "unknown"
        top = subprocess.run([*git, "rev-parse", "--show-toplevel"], capture_output=True, text=True, timeout=5)
        root = Path(top.stdout.strip())
        size = sum((root / f.decode()).stat().st_size for f in others.stdout.split(b"\0") if f
                   and (root / f.decode()).is_file())
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "objects").mkdir()
            if Path(index).is_file():
                shutil.copyfile(index, Path(tmp) / "index")
            env = {**os.environ, "GIT_INDEX_FILE": str(Path(tmp) / "index"),
                   "GIT_OBJECT_DIRECTORY": str(Path(tmp) / "objects"), "GIT_ALTERNATE_OBJECT_DIRECTORIES": objects}
            staged = subprocess.run([*git, "add", "-A" if size <= untracked_limit else "-u", "--", str(root)],
                                    env=env, capture_output=True, timeout=120)
            if staged.returncode != 0:
                return "unknown"
            out = subprocess.run([*git, "write-tree"], env=env, capture_output=True, text=True, timeout=30)
            if out.returncode != 0:
                return "unknown"
            return out.stdout.strip() + ("" if size <= untracked_limit else "+untracked")
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
                    extra: dict | None = None, meta_extra: dict | None = None) -> Path:
    """Write checkpoint `step` atomically; return its directory. `step` = optimizer steps done."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    root = Path(run_dir) / CKPT_DIR
    name = step_dir_name(step)
    final = root / name
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_failure(final, e) from None
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-{name}-{os.getpid()}"
    with staged(tmp, final):
        tmp.mkdir()
        _write_bytes_synced(tmp / "model.pt", lambda f: torch.save(model_state, f))
        train_state = {"format": FORMAT_VERSION, "step": step, "optimizer": optimizer_state,
                       "rng": rng_state(), "loader": loader_state, "ema": ema_state, "extra": extra or {}}
        _write_bytes_synced(tmp / "train_state.pt", lambda f: torch.save(train_state, f))
        write_meta(tmp, step, config, **(meta_extra or {}))
        _fsync_path(tmp)
        publish(root, tmp, name, keep_last)
    return final


def write_meta(ckpt_dir: Path, step: int, config: dict, **extra) -> None:
    """meta.json of a checkpoint, either format, written last: step, resolved config, versions,
    git hash, argv, the checksum manifest of every other file (and `extra`, e.g. the DCP format's
    kind and world size). The one metadata writer."""
    meta = {"format": FORMAT_VERSION, **extra, "step": step, "config": config, "versions": versions(),
            "git": git_hash(), "argv": sys.argv, "files": manifest(ckpt_dir)}
    _write_bytes_synced(ckpt_dir / "meta.json", lambda f: f.write(json.dumps(meta, indent=1).encode()))


def publish(root: Path, tmp: Path, name: str, keep_last: int) -> None:
    """Verify the fully written and fsynced `tmp` against its manifest, move it into place as
    `root/name`, then point `latest` at it, then prune older ones. Each step is atomic; a crash
    between them leaves a loadable state."""
    verify(tmp, fresh=True)
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
    """Delete all but the newest keep_last-1 checkpoints older than `keep` (just published and
    verified). Newer step directories are never touched (start_branch moves them aside)."""
    older = sorted(p for p in root.glob("step_*") if p.is_dir() and p.name < keep)
    for old in older[:len(older) - (keep_last - 1)]:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    root = Path(run_dir) / CKPT_DIR
    return sorted(p for p in root.glob("step_*") if p.is_dir()) if root.exists() else []


def is_checkpoint_dir(p: Path) -> bool:
    return (p / "meta.json").is_file() or (p / "model.pt").exists() or (p / "dcp").is_dir()


_NOTED: set[str] = set()


def _note(line: str) -> None:
    """Print a resolution note once per process (a run directory is resolved several times)."""
    if line not in _NOTED and int(os.environ.get("RANK", "0") or 0) == 0:
        _NOTED.add(line)
        print(line, file=sys.stderr, flush=True)


def resolve_checkpoint(path_or_run_dir: str | os.PathLike) -> Path:
    """A verified checkpoint directory: the one given, or a run directory's `latest` (the newest
    step directory when `latest` is missing), falling back to the newest older checkpoint that
    verifies with one printed line (module docstring)."""
    p = Path(path_or_run_dir)
    if is_checkpoint_dir(p):
        verify(p)
        return p
    root = p / CKPT_DIR
    steps = list_checkpoints(p)
    if not steps:
        if not p.exists():
            raise FileNotFoundError(f"no such checkpoint or run directory: {p}")
        raise FileNotFoundError(f"{p} holds no checkpoint (no model.pt/train_state.pt and no {CKPT_DIR}/{LATEST})")
    pointer = root / LATEST
    head, why = None, None
    try:
        head = root / pointer.read_text().strip()
        if not head.name.startswith("step_") or not head.is_dir():
            why = f"{pointer} names {head.name!r}, which is missing"
            head = None
    except FileNotFoundError:
        why = f"{pointer} is missing"
    except (OSError, UnicodeDecodeError) as e:
        why = f"{pointer} cannot be read ({_first_line(e)})"
    candidates = [d for d in reversed(steps) if head is None or d.name <= head.name]
    problems = [why] if why else []
    for d in candidates:
        try:
            verify(d)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        if problems:
            _note(f"[deepwish] warning: {'; '.join(problems)}; using {d}, the newest checkpoint that verifies")
        return d
    raise CheckpointError(f"no checkpoint in {root} verifies: {'; '.join(problems)}")


def start_branch(run_dir: str | os.PathLike, resumed: str | os.PathLike) -> Path | None:
    """Resuming from `resumed`: move the run's newer step directories to
    RUN/abandoned/<UTC time>-after-<name>/ (one printed line) and point `latest` at `resumed`.
    Returns the abandoned directory, or None when nothing was newer. Writer (rank 0) only."""
    root = Path(run_dir) / CKPT_DIR
    resumed = Path(resumed)
    if resumed.parent.resolve() != root.resolve():
        return None  # a checkpoint of another run directory: this run's history is not touched
    newer = [d for d in list_checkpoints(run_dir) if d.name > resumed.name]
    if newer:
        dest = Path(run_dir) / ABANDONED_DIR / f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-after-{resumed.name}"
        dest.mkdir(parents=True, exist_ok=False)
        for d in newer:
            os.rename(d, dest / d.name)
        _fsync_path(root)
        print(f"[deepwish] resuming from {resumed.name} starts a branch: moved the newer "
              f"{', '.join(d.name for d in newer)} to {dest}", flush=True)
    latest = root / LATEST
    if not latest.exists() or latest.read_text().strip() != resumed.name:
        _write_bytes_synced(root / f"{LATEST}.tmp", lambda f: f.write(resumed.name.encode()))
        os.replace(root / f"{LATEST}.tmp", latest)
        _fsync_path(root)
    return dest if newer else None


def is_dcp_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / DCP_DIR / ".metadata").exists()


def resolve_any(path_or_run_dir: str | os.PathLike) -> Path:
    """A checkpoint directory of either format, or a run directory (-> its `latest`), verified."""
    return resolve_checkpoint(path_or_run_dir)


def read_meta(path_or_run_dir: str | os.PathLike) -> dict:
    """{'path', 'step', 'config', 'format' ('dcp' | 'torch'), 'world_size', 'mlflow'} without loading
    tensors ('mlflow': the MLflow run the training run logged to, or None)."""
    d = resolve_any(path_or_run_dir)
    meta = read_meta_json(d)
    return {"path": d, "step": meta["step"], "config": meta["config"], "format": meta.get("kind", "torch"),
            "world_size": meta.get("world_size", 1), "mlflow": meta.get("mlflow")}


def load_checkpoint(path_or_run_dir: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint: {'path', 'step', 'model', 'optimizer', 'rng', 'loader', 'ema', 'extra',
    'config', 'versions', 'git'}. Tensors are loaded with weights_only=True."""
    d = resolve_checkpoint(path_or_run_dir)
    meta = read_meta_json(d)
    state = load_pt(d / "train_state.pt", map_location)
    model = load_pt(d / "model.pt", map_location)
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{d}: checkpoint format {state.get('format') if isinstance(state, dict) else '?'} "
                              f"is not {FORMAT_VERSION}")
    return {"path": d, "step": state["step"], "model": model, "optimizer": state["optimizer"],
            "rng": state["rng"], "loader": state["loader"], "ema": state["ema"], "extra": state["extra"],
            "config": meta["config"], "versions": meta["versions"], "git": meta["git"]}
