"""What the kernels' launch grids share: the SM count a grid aims to fill, and the counters of a
last-block reduction.

Last-block reduction: the programs of one launch that each own a part of a result (a split of the
keys, a slice of K) store their part, then raise one int32 count of their group (acq_rel, GPU scope,
after a CTA barrier); the program that raises it last reads every part (past L1), combines them and
sets the count back to zero, so the buffer is all zeros between launches. One buffer per (device,
user), made once and never freed: captured CUDA graphs keep its address, so the first call on a
device must come before capture (a captured step's warm-up makes it). Calls on one stream follow
each other and share a user's buffer; two launches of one user at once on two streams could not
(nothing here does that). In a kernel:

    (store this program's part)
    if arrive_last(CNT, group, parts):
        (read every part with cache_modifier=".cg", combine, store)
        reset_count(CNT, group)"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def sm_count(device: torch.device) -> int:
    """The device's SMs; 4 under the interpreter or off CUDA (tests keep their grids small)."""
    if _INTERPRET or device.type != "cuda" or not torch.cuda.is_available():
        return 4
    return torch.cuda.get_device_properties(device.index or 0).multi_processor_count


@functools.cache
def counters(device: torch.device, user: str, size: int) -> torch.Tensor:
    """`size` zeroed int32 counts for `user`'s launches on `device` (module docstring)."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"{user}: the first call on a device must come before CUDA-graph capture (its "
                           "counters must outlive the graph's memory pool); warm up first")
    return torch.zeros(size, dtype=torch.int32, device=device)


@triton.jit
def arrive_last(CNT, group, parts):
    """Called by each of a group's `parts` programs once its part is stored: True in the one that
    arrives last, whose threads may then read every part (module docstring)."""
    tl.debug_barrier()  # every thread's part stored before the count is raised
    done = tl.atomic_add(CNT + group, 1, sem="acq_rel", scope="gpu")
    tl.debug_barrier()  # every thread's reads ordered after the count's acquire
    return done == parts - 1


@triton.jit
def reset_count(CNT, group):
    """The last program's count back to zero for the next call (a captured graph reuses the buffer)."""
    tl.atomic_xchg(CNT + group, 0)
