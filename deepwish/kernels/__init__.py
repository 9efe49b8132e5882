"""Kernels: each op lives in `kernels/<op>/` as `reference.py` (pure torch, fp32, readable,
the CPU path and the test oracle) beside `triton.py` (the fast path). Which one runs is
chosen once, explicitly, by `resolve_backend`."""
from deepwish.kernels.backend import BackendError, resolve_backend

__all__ = ["BackendError", "resolve_backend"]
