"""What every benchmark records about where it ran (device, versions, date, command, commit and the
git tree of the files that ran), and the ceilings its figures are divided by."""
from __future__ import annotations

import datetime
import platform
import sys

import torch

# measured on one H100 (shared/GPU.md): the ceilings of a GPU that train/mfu.py's PEAKS does not list
H100_MATMUL_FLOPS = 777e12
H100_COPY_BW = 2973e9


def doc_summary(doc: str | None) -> str:
    """A module docstring's first paragraph on one line: what a benchmark's `--help` prints as its
    description (the first line alone would cut a sentence wrapped over two)."""
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def ceilings() -> tuple[float, float]:
    """(bf16 matmul FLOP/s, device copy bytes/s) of this GPU as the benchmarks divide by them: the
    measured figures of train/mfu.py's PEAKS (H200 774 TFLOP/s, 4,172 GB/s), the H100's for what the
    table lacks (and without a GPU)."""
    from deepwish.train.mfu import peaks_for_name
    flops, copy = peaks_for_name(torch.cuda.get_device_name())[:2] if torch.cuda.is_available() else (None, None)
    return flops or H100_MATMUL_FLOPS, copy or H100_COPY_BW


def copy_bw() -> float:
    """This GPU's measured copy bandwidth in bytes/s (`ceilings`)."""
    return ceilings()[1]


def bench_environment(device, command: str, **extra) -> dict:
    """The record a benchmark writes beside its numbers. `command` is the user-facing command (this
    process's arguments are appended); `extra` adds the benchmark's own fields (ceilings, anchors)."""
    from deepwish.train.checkpoint import git_hash, git_tree
    device = torch.device(device)
    env = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
               python=platform.python_version(), torch=torch.__version__)
    for name in ("triton", "transformers"):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            env[name] = None
    args = sys.argv[1:]
    words = command.split()[1:]   # `deepwish bench x` through the CLI: its argv already names `bench x`
    if words and args[:len(words)] == words:
        args = args[len(words):]
    env.update(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               command=" ".join([command, *args]), commit=git_hash(), tree=git_tree())
    env.update(extra)
    return env
