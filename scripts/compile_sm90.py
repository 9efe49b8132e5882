"""Compile every Triton kernel launch of the CPU tests for the GPU (sm_90), without a GPU.

    python scripts/compile_sm90.py [TEST PATHS...] [--jobs 2] [--keep-fp16] [pytest options, e.g. -k prologue]

The interpreter runs kernels as Python, so a kernel that Triton's compiler rejects (a variable
joined across branches with two dtypes, a constexpr used as a value, a shape the layout cannot
tile) passes every CPU test and fails on the device. This runs the given tests (default:
tests/kernels) under the interpreter with scripts/launch_recorder.py, then compiles each distinct
launch (kernel, argument dtypes, constexprs, warps, stages) for sm_90 with Triton's own compiler
and ptxas, fp16 pointers as bf16 (the interpreter tests use fp16 where the GPU runs bf16; tl.dot
on bf16 is wrong in the interpreter). Prints each failure with the compiler's message; exit
status 1 if any. About eight minutes for tests/kernels on two cores (326 launches of 48 kernels,
all compiled on 2026-12-05): run it before a GPU session.
Kernels defined inside tests are skipped. The tile sizes are the interpreter's (the tests' own
small configurations), not the GPU's tuned ones.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "int8": "i8",
           "int16": "i16", "int32": "i32", "int64": "i64", "uint8": "u8", "bool": "i1"}


def record(tests: list[str], path: str) -> int:
    env = dict(os.environ, TRITON_INTERPRET="1", DEEPWISH_RECORD_LAUNCHES=path,
               PYTHONPATH=os.pathsep.join([str(ROOT / "scripts"), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "pytest", "-p", "launch_recorder", "-o", "addopts=", "-m", "not gpu", "-q", *tests]
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


def jobs_from(path: str, bf16: bool) -> dict[str, dict]:
    """Distinct compile jobs: {key: {module, name, signature, constexprs, warps, stages}}."""
    jobs = {}
    for line in Path(path).read_text().splitlines():
        r = json.loads(line)
        if r["module"].startswith("tests"):
            continue
        fn = _jit(r["module"], r["name"])
        sig, const = {}, {}
        for p in fn.params:
            v = r["args"].get(p.name, p.default if p.has_default else None)
            if p.is_constexpr or v is None:
                sig[p.name], const[p.name] = "constexpr", v
            elif isinstance(v, dict) and "tensor" in v:
                t = _DTYPES[v["tensor"]]
                sig[p.name] = "*" + ("bf16" if bf16 and t == "fp16" else t)
            elif isinstance(v, dict) and "descriptor" in v:
                t = _DTYPES[v["descriptor"]]
                sig[p.name] = f"tensordesc<{'bf16' if bf16 and t == 'fp16' else t}[{', '.join(map(str, v['block']))}]>"
            elif isinstance(v, bool):
                sig[p.name] = "i1"
            elif isinstance(v, int):
                sig[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
            elif isinstance(v, float):
                sig[p.name] = "fp32"
            else:
                raise ValueError(f"{r['name']}: argument {p.name}={v!r} has no signature type")
        job = {"module": r["module"], "name": r["name"], "signature": sig, "constexprs": const,
               "warps": r["options"].get("num_warps", 4), "stages": r["options"].get("num_stages", 3)}
        jobs[json.dumps(job, sort_keys=True)] = job
    return jobs


def _jit(module: str, name: str):
    import triton
    obj = getattr(importlib.import_module(module), name)
    while not isinstance(obj, triton.runtime.jit.JITFunction):  # through autotune / heuristics wrappers
        obj = obj.fn
    return obj


def compile_one(job: dict) -> str | None:
    """None, or the compiler's message."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn = _jit(job["module"], job["name"])
    const = {(fn.arg_names.index(k),): v for k, v in job["constexprs"].items()}
    try:
        triton.compile(ASTSource(fn, job["signature"], constexprs=const), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=job["warps"], num_stages=job["stages"]))
    except Exception as e:  # noqa: BLE001 - every compiler error is a finding
        return " ".join(str(e).strip().splitlines()[-4:])[:600]
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("tests", nargs="*", default=["tests/kernels"])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--keep-fp16", action="store_true", help="compile fp16 pointers as fp16 (default: as bf16)")
    ap.add_argument("--launches", help="a recorded launch file to compile instead of running the tests")
    args, pytest_args = ap.parse_known_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU: the kernels' modules as the GPU loads them
    t0 = time.time()
    path = args.launches
    if path is None:
        path = tempfile.mktemp(suffix=".jsonl")
        if record([*args.tests, *pytest_args], path) != 0:
            print("compile_sm90: the tests failed; compiling what they launched anyway", flush=True)
    jobs = list(jobs_from(path, bf16=not args.keep_fp16).values())
    print(f"compile_sm90: {len(jobs)} distinct launches of "
          f"{len({(j['module'], j['name']) for j in jobs})} kernels", flush=True)
    with ProcessPoolExecutor(args.jobs) as pool:
        errors = list(pool.map(compile_one, jobs))
    failed = [(j, e) for j, e in zip(jobs, errors) if e]
    for j, e in failed:
        shown = {k: v for k, v in j["constexprs"].items() if v is not None}
        print(f"FAIL {j['module']}.{j['name']} warps={j['warps']} stages={j['stages']} {shown}\n     {e}")
    print(f"compile_sm90: {len(jobs) - len(failed)} compiled, {len(failed)} failed, {time.time() - t0:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
