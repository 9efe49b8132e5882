"""Programmatic dependent launch (PDL, Hopper and later) for the decode step's own kernels.

A decode step at batch 1 is hundreds of kernels of one to a few microseconds each, and a kernel's
launch and ramp-up cost about as much as its work. With PDL a kernel is launched while the one
before it still runs: its programs start, do what needs nothing from the previous kernel (a GEMV
loads its first tile of weights), and wait at `gdc_wait` until the previous kernel's writes are
visible. Every program of a PDL kernel passes that wait before it reads a dependent input or
writes anything, so the order of the step's writes is the order without PDL; and since a kernel
completes only after its own wait, which followed its predecessor's completion, the chain holds
back to the first kernel. A kernel that follows without PDL waits for full completion as always.
Inside a captured CUDA graph the launches become programmatic edges (CUDA 12.3 or later).

`pdl` is model.decode_pdl (config.py); the interpreter has no grid dependency control, so under
TRITON_INTERPRET=1 the kernels run without it.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def wait_for_inputs(PDL: tl.constexpr):
    """Under PDL: wait until the previous kernel's writes are visible, then let the next kernel
    launch (it waits the same way before it reads what this one writes)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def launch_options(pdl: bool, device: torch.device, name: str) -> tuple[bool, dict]:
    """(the kernel's PDL constexpr, the launch's keyword arguments) for a `pdl` request; a device
    without PDL is an error naming the kernel, never a silent launch without it."""
    if not pdl or _INTERPRET:
        return False, {}
    if device.type != "cuda" or not _has_pdl(device.index if device.index is not None else torch.cuda.current_device()):
        raise ValueError(f"{name}: pdl (model.decode_pdl) needs a CUDA device of compute capability 9.0 "
                         f"or later (Hopper); got {device}")
    return True, {"launch_pdl": True}


@functools.cache
def _has_pdl(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9
