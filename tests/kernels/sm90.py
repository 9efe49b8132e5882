"""Triton kernels compiled for Hopper (sm_90) with no GPU: Triton's own ptxas, in a process without
the interpreter. The interpreter accepts programs sm_90's lowering refuses (an early return out of
an inlined helper's branch), and says nothing of instruction order; the PTX does (where PDL's
`griddepcontrol.wait` sits against the kernel's loads and stores)."""
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def compile_ptx(kernel, constants: dict, arg_type, num_warps: int = 4, num_stages: int = 2, **options) -> list[str]:
    """The PTX lines of JIT function `kernel` for sm_90: its constexpr parameters from `constants`
    (by name), every other parameter typed by `arg_type(name)` ("*bf16", "i32", "fp32", ...)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs = {}, {}
    for i, p in enumerate(kernel.params):
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[(i,)] = constants[p.name]
        else:
            signature[p.name] = arg_type(p.name)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages, **options))
    return compiled.asm["ptx"].splitlines()


def run_compiled(script: str) -> dict:
    """Run `script` in a fresh process without TRITON_INTERPRET (read when kernels are defined, so
    it cannot be unset in this one) and return the JSON object its last printed line holds."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
