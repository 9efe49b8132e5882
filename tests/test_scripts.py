"""scripts/train_tiny.sh -> scripts/infer_tiny.sh (MODEL_PATH, TOKENIZER_PATH), and
scripts/profile_kernels.py, on CPU at toy sizes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra):
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    env.pop("TOKENIZER_PATH", None)
    env.update(extra)
    return env


def _sh(script, *args, **env):
    return subprocess.run(["bash", str(ROOT / "scripts" / script), *args], capture_output=True, text=True,
                          timeout=120, env=_env(**env))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("scripts") / "run"
    r = _sh("train_tiny.sh", "--set", "model.n_layers=1", "--set", "train.batch_size=2", "--set", "train.seq_len=32",
            "--set", "train.eval_every=2", "--set", "train.sample_tokens=0", STEPS="2", OUT_DIR=str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 steps on cpu" in r.stderr
    assert (out / "checkpoints" / "latest").is_file() and (out / "tokenizer" / "tokenizer.json").is_file()
    return out


def test_infer_tiny_honours_model_and_tokenizer_path(tiny_run, tmp_path, capsys):
    from deepwish.cli import main
    args = ("--prompt", "KING:", "--temperature", "0")
    assert main(["generate", "--ckpt", str(tiny_run), "--max-new-tokens", "5", *args]) == 0
    expected = capsys.readouterr().out
    b = _sh("infer_tiny.sh", *args, MODEL_PATH=str(tiny_run), MAX_NEW_TOKENS="5",
            TOKENIZER_PATH=str(tiny_run / "tokenizer" / "tokenizer.json"))
    assert b.returncode == 0, b.stderr[-2000:]
    assert b.stdout == expected and expected.startswith("KING:") and "--ckpt" in b.stderr
    bad = _sh("infer_tiny.sh", *args, MODEL_PATH=str(tiny_run), TOKENIZER_PATH=str(tmp_path / "nope.json"))
    assert bad.returncode == 2 and "nope.json" in bad.stderr  # the variable reached --tokenizer
    missing = _sh("infer_tiny.sh", MODEL_PATH=str(tmp_path / "absent"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_generate_reads_tokenizer_path_when_tokenizer_unset(tiny_run, tmp_path, monkeypatch, capsys):
    from deepwish.cli import main
    monkeypatch.setenv("TOKENIZER_PATH", str(tmp_path / "missing.json"))
    assert main(["generate", "--ckpt", str(tiny_run), "--max-new-tokens", "2"]) == 2
    assert "missing.json" in capsys.readouterr().err
    # an explicit --tokenizer wins over the variable
    assert main(["generate", "--ckpt", str(tiny_run), "--max-new-tokens", "2", "--temperature", "0",
                 "--tokenizer", str(tiny_run / "tokenizer" / "tokenizer.json")]) == 0


def test_profile_kernels_tables(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import profile_kernels
    finally:
        sys.path.pop(0)
    assert profile_kernels.main(["--preset", "qwen3_tiny", "--set", "model.n_layers=1", "--batch", "2", "--seq",
                                 "16", "--context", "8", "--steps", "1", "--top", "5", "--device", "cpu",
                                 "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "== train step qwen3_tiny" in text and "== decode step qwen3_tiny" in text
    prof = json.loads((tmp_path / "profile.json").read_text())
    for phase in ("train", "decode"):
        rows = prof[phase]
        assert rows and abs(sum(r["share"] for r in rows) - 1) < 1e-6
        assert [r["us_per_step"] for r in rows] == sorted((r["us_per_step"] for r in rows), reverse=True)
        assert any(r["name"] in ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear") for r in rows)
    assert any("backward" in r["name"].lower() for r in prof["train"])  # the step includes the backward
    assert not any("backward" in r["name"].lower() for r in prof["decode"])
    assert (tmp_path / "trace_train.json").is_file()


def test_compile_sm90_finds_what_the_interpreter_runs_but_the_compiler_rejects(tmp_path):
    """scripts/compile_sm90.py: a kernel whose variable holds two dtypes across a runtime branch runs
    under the interpreter (its test passes) and fails Triton's compiler for sm_90, which the script
    reports by name with the compiler's message (exit 1); the mended kernel compiles (exit 0)."""
    kernel = '''
import triton
import triton.language as tl


@triton.jit
def copy_or_scale(X, Y, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    if tl.program_id(0) == 0:
        y = tl.load(X + i, mask=i < n)
    else:
        y = tl.load(X + i, mask=i < n).to(tl.float32) * 2.0
    tl.store(Y + i, y, mask=i < n)
'''
    test = '''
import torch
import sm90_probe


def test_probe():
    x = torch.randn(8, dtype=torch.float16)
    y = torch.empty_like(x)
    sm90_probe.copy_or_scale[(1,)](x, y, 8, BLOCK=8)
    assert torch.equal(x, y)
'''
    (tmp_path / "sm90_probe.py").write_text(kernel)
    (tmp_path / "test_probe.py").write_text(test)
    env = _env(PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    env.pop("TRITON_INTERPRET", None)
    run = lambda: subprocess.run([sys.executable, str(ROOT / "scripts" / "compile_sm90.py"),  # noqa: E731
                                  str(tmp_path / "test_probe.py"), "--jobs", "1", "-p", "no:cacheprovider"],
                                 capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    r = run()
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert "FAIL sm90_probe.copy_or_scale" in r.stdout and "Mismatched type for y" in r.stdout
    (tmp_path / "sm90_probe.py").write_text(kernel.replace("mask=i < n)\n    else", "mask=i < n).to(tl.float32)\n    else"))
    r = run()
    assert r.returncode == 0 and "1 compiled, 0 failed" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]


def test_compile_sm90_takes_tensor_descriptor_arguments(tmp_path):
    """A launch with a host-built tensor descriptor (the attention and NSA kernels' TMA loads) is
    recorded with its element type and box, and compiled for sm_90 with that descriptor type."""
    kernel = '''
import triton
import triton.language as tl


@triton.jit
def copy_tile(XD, Y, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(Y + i, XD.load([0]))
'''
    test = '''
import torch
from triton.tools.tensor_descriptor import TensorDescriptor
import sm90_desc_probe


def test_probe():
    x = torch.randn(16, dtype=torch.float16)
    y = torch.empty_like(x)
    sm90_desc_probe.copy_tile[(1,)](TensorDescriptor(x, [16], [1], [16]), y, BLOCK=16)
    assert torch.equal(x, y)
'''
    (tmp_path / "sm90_desc_probe.py").write_text(kernel)
    (tmp_path / "test_desc_probe.py").write_text(test)
    env = _env(PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "compile_sm90.py"), str(tmp_path / "test_desc_probe.py"),
                        "--jobs", "1", "-p", "no:cacheprovider"], capture_output=True, text=True, timeout=300, env=env,
                       cwd=ROOT)
    assert r.returncode == 0 and "1 compiled, 0 failed" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
