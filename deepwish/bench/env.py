"""What every benchmark records about where it ran: device, versions, date, command, commit."""
from __future__ import annotations

import datetime
import platform
import sys

import torch


def bench_environment(device, command: str, **extra) -> dict:
    """The record a benchmark writes beside its numbers. `command` is the user-facing command (this
    process's arguments are appended); `extra` adds the benchmark's own fields (ceilings, anchors)."""
    from deepwish.train.checkpoint import git_hash
    device = torch.device(device)
    env = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
               python=platform.python_version(), torch=torch.__version__)
    for name in ("triton", "transformers"):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            env[name] = None
    env.update(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               command=" ".join([command, *sys.argv[1:]]), commit=git_hash())
    env.update(extra)
    return env
