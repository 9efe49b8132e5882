"""A pytest plugin (`-p launch_recorder`, scripts/ on sys.path) that writes the signature of every
Triton kernel launch the interpreter runs to $DEEPWISH_RECORD_LAUNCHES (JSON lines): the kernel's
module and name, each argument (a tensor as its dtype, a tensor descriptor as its dtype and box,
a scalar as its value) and the launch options. scripts/compile_sm90.py compiles them for the GPU."""
from __future__ import annotations

import atexit
import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from triton.runtime import interpreter  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

_launches: dict[str, dict] = {}
_run = interpreter.InterpretedFunction.run


def _encode(v):
    if isinstance(v, torch.Tensor):
        return {"tensor": str(v.dtype).removeprefix("torch.")}
    if isinstance(v, TensorDescriptor):  # a host-built TMA descriptor: its element type and box
        return {"descriptor": str(v.base.dtype).removeprefix("torch."), "block": list(v.block_shape)}
    if hasattr(v, "value") and not isinstance(v, (bool, int, float, str)):  # tl.constexpr
        return _encode(v.value)
    return v if isinstance(v, (bool, int, float, str)) or v is None else {"other": type(v).__name__}


def _recording_run(self, *args, grid, warmup, **kwargs):
    values = dict(zip(self.arg_names, args)) | {k: v for k, v in kwargs.items() if k in self.arg_names}
    record = {"module": self.fn.__module__, "name": self.fn.__qualname__,
              "args": {k: _encode(v) for k, v in values.items()},
              "options": {k: _encode(v) for k, v in kwargs.items() if k not in self.arg_names}}
    _launches[json.dumps(record, sort_keys=True)] = record
    return _run(self, *args, grid=grid, warmup=warmup, **kwargs)


interpreter.InterpretedFunction.run = _recording_run


@atexit.register
def _write() -> None:
    path = os.environ.get("DEEPWISH_RECORD_LAUNCHES")
    if path:
        with open(path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in _launches.values())
