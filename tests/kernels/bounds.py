"""Out-of-bounds accesses of Triton kernels, found on the CPU: under the interpreter, every load and
store's masked-in addresses must fall inside one of the launch's tensor arguments. The interpreter
itself reads and writes wherever a pointer points (a wrong offset corrupts a neighbouring buffer or
nothing at all); on a GPU the same access is an illegal-address fault or silent corruption."""
from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import torch


def _tensors(arg):
    if isinstance(arg, torch.Tensor):
        yield arg
    elif isinstance(arg, (tuple, list)):
        for a in arg:
            yield from _tensors(a)
    elif hasattr(arg, "base") and isinstance(arg.base, torch.Tensor):  # a tensor descriptor
        yield arg.base


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """[first byte, one past the last byte] the view can address."""
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if n > 0)
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


@dataclasses.dataclass
class Report:
    faults: list = dataclasses.field(default_factory=list)   # (kernel, "load" | "store", lanes, first address)
    kernels: set = dataclasses.field(default_factory=set)    # the kernels launched (so a check is not vacuous)


_active: list[Report] = []   # the open blocks, innermost last: a fault goes to the innermost one


@contextlib.contextmanager
def bounds_checked():
    """Within the block, record each interpreted load or store (not atomics) that reaches outside
    the kernel's tensor arguments; yields a Report. Blocks nest: a fault made inside an inner block
    is the inner block's (so a test can make one on purpose under a check that covers every test)."""
    report = Report()
    if not _active:
        _patch()
    _active.append(report)
    try:
        yield report
    finally:
        _active.remove(report)
        if not _active:
            _unpatch()


_saved: dict = {}


def _patch() -> None:
    import triton.runtime.interpreter as interp

    from deepwish.kernels.muon.triton import AddressTables

    addressed: list[tuple[int, int]] = []
    launch = {"kernel": "?", "ranges": []}
    init_args, load, store = (interp.GridExecutor._init_args_hst, interp.InterpreterBuilder.create_masked_load,
                              interp.InterpreterBuilder.create_masked_store)
    tables = AddressTables.__call__
    _saved.update(init_args=init_args, load=load, store=store, tables=tables)

    def checked_init_args(self, args_dev, kwargs):
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        launch["kernel"] = getattr(self.fn, "__name__", str(self.fn))
        for r in _active:
            r.kernels.add(launch["kernel"])
        launch["ranges"] = [_extent(t) for a in (*args_hst, *kwargs_hst.values()) for t in _tensors(a) if t.numel()]
        launch["ranges"] += addressed
        return args_hst, kwargs_hst

    def check(ptrs, mask, what):
        addr = ptrs.data
        if mask is not None:  # masks may arrive as int8 0/1 or as a scalar: as booleans of the pointers' shape
            addr = addr[np.broadcast_to(np.asarray(mask.data).astype(bool), addr.shape)]
        addr = np.asarray(addr, dtype=np.int64).ravel()
        inside = np.zeros(addr.shape, dtype=bool)
        for lo, hi in launch["ranges"]:
            inside |= (addr >= lo) & (addr < hi)
        if not inside.all():
            _active[-1].faults.append((launch["kernel"], what, int((~inside).sum()), int(addr[~inside][0])))

    def checked_load(self, ptrs, mask, other, *rest, **kw):
        check(ptrs, mask, "load")
        return load(self, ptrs, mask, other, *rest, **kw)

    def checked_store(self, ptrs, value, mask, *rest, **kw):
        check(ptrs, mask, "store")
        return store(self, ptrs, value, mask, *rest, **kw)

    def checked_tables(self, tensors):
        # Muon's kernels reach their matrices through an int64 table of addresses: the table's
        # tensors count as the launch's arguments (while the check is on)
        addressed.extend(_extent(t) for t in tensors if t.numel())
        return tables(self, tensors)

    interp.GridExecutor._init_args_hst = checked_init_args
    interp.InterpreterBuilder.create_masked_load = checked_load
    interp.InterpreterBuilder.create_masked_store = checked_store
    AddressTables.__call__ = checked_tables


def _unpatch() -> None:
    import triton.runtime.interpreter as interp

    from deepwish.kernels.muon.triton import AddressTables

    interp.GridExecutor._init_args_hst = _saved["init_args"]
    interp.InterpreterBuilder.create_masked_load = _saved["load"]
    interp.InterpreterBuilder.create_masked_store = _saved["store"]
    AddressTables.__call__ = _saved["tables"]
