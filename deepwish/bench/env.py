"""What a kernel benchmark records about where it ran: device, versions, date, command, commit."""
from __future__ import annotations

import datetime
import subprocess
import sys

import torch


def kernel_bench_environment(device, command: str) -> dict:
    """`command` is the user-facing command; this process's arguments are appended to it."""
    import triton
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    return dict(device=torch.cuda.get_device_name(device), torch=torch.__version__, triton=triton.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command=" ".join([command, *sys.argv[1:]]), commit=commit)
