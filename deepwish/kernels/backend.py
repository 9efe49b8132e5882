"""Explicit backend choice: a named backend that cannot run is an error; `auto` picks the
first that can and says so in one line. Never a silent fallback."""
from __future__ import annotations

import importlib
import os
import sys
from typing import Callable


class BackendError(RuntimeError):
    pass


def resolve_backend(op: str, requested: str, candidates: dict[str, Callable[[], str | None]],
                    auto_order: list[str], announce: bool = True) -> str:
    """Return the backend to use for `op`.

    candidates maps a backend name to a probe returning None when usable, or a short reason
    why not. `auto` walks `auto_order` and prints which backend it chose (and why it skipped
    the faster ones); an explicitly requested backend that is not usable raises.
    """
    if requested != "auto":
        if requested not in candidates:
            raise BackendError(f"{op}: unknown backend {requested!r}; choose from auto, {', '.join(candidates)}")
        why = candidates[requested]()
        if why is not None:
            raise BackendError(f"{op}: backend {requested!r} was requested but cannot run here: {why}")
        return requested
    skipped = []
    for name in auto_order:
        why = candidates[name]()
        if why is None:
            if announce:
                note = f" (skipped: {'; '.join(skipped)})" if skipped else ""
                print(f"[deepwish] {op}: backend auto -> {name}{note}", file=sys.stderr)
            return name
        skipped.append(f"{name}: {why}")
    raise BackendError(f"{op}: no usable backend: {'; '.join(skipped)}")


def triton_probe(module: str, device) -> Callable[[], str | None]:
    """Probe for a Triton kernel module: usable on CUDA, or on CPU under TRITON_INTERPRET=1."""
    def probe() -> str | None:
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return "no CUDA device (TRITON_INTERPRET=1 runs it on CPU in the interpreter, slowly)"
        try:
            importlib.import_module(module)
        except ImportError as e:
            return f"the Triton kernel cannot be imported ({e})"
        return None
    return probe


def resolve_triton_or_torch(op: str, module: str, requested: str, device, announce: bool = True) -> str:
    """The common two-way choice: 'auto' -> 'triton' (kernel `module`) on CUDA, 'torch' elsewhere."""
    order = ["triton", "torch"] if device.type == "cuda" else ["torch"]
    return resolve_backend(op, requested, {"triton": triton_probe(module, device), "torch": lambda: None},
                           order, announce=announce)
