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

`pdl` is model.decode_pdl (config.py): "on" (or True) requires it, "off" (or False) never uses it,
"auto" uses it where the device has it (compute capability 9.0 or later). The interpreter has no
grid dependency control, so under TRITON_INTERPRET=1 the kernels run without it.
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


SETTINGS = ("auto", "on", "off")


@triton.jit
def prefetch_to_l2(ptr, nbytes):
    """Start moving `nbytes` from `ptr` into L2 (cp.async.bulk.prefetch, sm_90): one thread of the
    program issues it and nothing waits for it, so later loads of those bytes are L2 hits. `ptr`
    16-byte aligned, `nbytes` a multiple of 16. Before `wait_for_inputs`, only for bytes the
    previous kernels do not write (weights): a GEMV's weights stream in while the kernel before
    it still runs."""
    tl.inline_asm_elementwise(
        "{ .reg .pred p; .reg .b32 t; mov.u32 t, %tid.x; setp.eq.u32 p, t, 0; "
        "@p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [ptr, nbytes], dtype=tl.int32, is_pure=False, pack=1)


def setting(pdl: bool | str, name: str) -> str:
    """A `pdl` request as one of SETTINGS (True: "on", False: "off"), or an error naming the kernel.
    Pure Python, so a compiled step traces it; the device is asked only at launch (use_pdl)."""
    if pdl is True or pdl is False:
        return "on" if pdl else "off"
    if pdl not in SETTINGS:
        raise ValueError(f"{name}: pdl={pdl!r} is not one of {SETTINGS} (or a bool)")
    return pdl


def use_pdl(pdl: bool | str, device: torch.device, name: str) -> bool:
    """Whether kernel `name` launches with PDL on `device`: "on" on a device without PDL is an
    error naming the kernel, never a silent launch without it; "auto" takes it where the device
    has it."""
    pdl = setting(pdl, name)
    if pdl == "off" or _INTERPRET:
        return False
    available = device.type == "cuda" and _has_pdl(
        device.index if device.index is not None else torch.cuda.current_device())
    if pdl == "auto" or available:
        return available
    raise ValueError(f"{name}: pdl (model.decode_pdl) needs a CUDA device of compute capability 9.0 "
                     f"or later (Hopper); got {device}")


def launch_options(pdl: bool | str, device: torch.device, name: str) -> tuple[bool, dict]:
    """(the kernel's PDL constexpr, the launch's keyword arguments) for a `pdl` setting (use_pdl)."""
    return (True, {"launch_pdl": True}) if use_pdl(pdl, device, name) else (False, {})


@functools.cache
def _has_pdl(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9
