#!/usr/bin/env python3
"""Execute a notebook's code cells in this interpreter, top to bottom, and save a copy with the
outputs, for machines without Jupyter (no nbclient / ipykernel needed).

    python scripts/run_notebook.py notebooks/walkthrough.ipynb --out executed.ipynb

Cells run in one namespace with the notebook's folder as the working directory, like a kernel.
What a cell prints becomes a stream output (also echoed here); `IPython.display.display` of an
`Image` becomes an image/png output (a stand-in module is installed when IPython is missing).
The first failing cell stops the run: its traceback is saved as an error output and the exit
status is 1. Not a kernel: no magics, no rich reprs of a cell's last expression.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import sys
import time
import traceback
import types
from pathlib import Path


class _Tee(io.TextIOBase):
    def __init__(self, echo):
        self.buf, self.echo = io.StringIO(), echo

    def write(self, s):
        self.buf.write(s)
        self.echo.write(s)
        return len(s)

    def flush(self):
        self.echo.flush()


def _display_hooks(outputs: list) -> None:
    """Route display(Image(...)) into `outputs`, with or without IPython installed."""
    def display(*objs, **_):
        for obj in objs:
            data = getattr(obj, "data", None)
            if isinstance(data, bytes):
                outputs.append({"output_type": "display_data", "metadata": {},
                                "data": {"image/png": base64.b64encode(data).decode("ascii"), "text/plain": "<image>"}})
            else:
                outputs.append({"output_type": "display_data", "metadata": {}, "data": {"text/plain": repr(obj)}})

    try:
        import IPython.display as mod  # the real Image; only display() is replaced
    except ImportError:  # a stand-in that libraries probing for a notebook see as "not one"
        class Image:
            def __init__(self, data=None, filename=None, **_):
                self.data = Path(filename).read_bytes() if filename else data

        root = types.ModuleType("IPython")
        root.get_ipython = lambda: None
        root.version_info = (0, 0, 0)  # matplotlib reads it whenever an "IPython" module is loaded
        mod = types.ModuleType("IPython.display")
        mod.Image = Image
        root.display = mod
        sys.modules["IPython"], sys.modules["IPython.display"] = root, mod
    mod.display = display


def run(path: Path, out: Path) -> int:
    nb = json.loads(path.read_text())
    os.chdir(path.resolve().parent)
    os.environ.setdefault("MPLBACKEND", "Agg")
    namespace = {"__name__": "__main__"}
    status, count = 0, 0
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        count += 1
        outputs: list = []
        _display_hooks(outputs)
        out_tee, err_tee = _Tee(sys.__stdout__), _Tee(sys.__stderr__)
        source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        t = time.time()
        error = None
        with contextlib.redirect_stdout(out_tee), contextlib.redirect_stderr(err_tee):
            try:
                exec(compile(source, f"<cell {i}>", "exec"), namespace)
            except Exception as e:  # noqa: BLE001 - saved as the cell's error output
                error = {"output_type": "error", "ename": type(e).__name__, "evalue": str(e),
                         "traceback": traceback.format_exc().splitlines()}
                traceback.print_exc()
        streams = [{"output_type": "stream", "name": n, "text": tee.buf.getvalue()}
                   for n, tee in (("stdout", out_tee), ("stderr", err_tee)) if tee.buf.getvalue()]
        cell["outputs"] = streams + outputs + ([error] if error else [])
        cell["execution_count"] = count
        print(f"[run_notebook] cell {i}: {time.time() - t:.1f} s{' FAILED' if error else ''}", file=sys.__stderr__,
              flush=True)
        # saved after every cell: a run stopped from outside keeps what it had
        out.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
        if error:
            status = 1
            break
    out.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return status


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("notebook")
    p.add_argument("--out", required=True, help="where the executed copy is written")
    args = p.parse_args(argv)
    return run(Path(args.notebook), Path(args.out).resolve())


if __name__ == "__main__":
    raise SystemExit(main())
