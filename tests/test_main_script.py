"""scripts/main.sh runs twice in a row: the second run resumes the run directory it finds (a
finished run is evaluated, plotted and sampled again) instead of refusing it."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from deepwish.config import load_config
from deepwish.train import loop

ROOT = Path(__file__).resolve().parents[1]


def _fake_repo(tmp_path):
    """scripts/main.sh in a copy whose set-up is a no-op and whose `deepwish` prints its argv."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "main.sh", tmp_path / "scripts" / "main.sh")
    (tmp_path / "scripts" / "setup.sh").write_text("true\n")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "activate").write_text(f'PATH="{bin_dir}:$PATH"\n')
    (bin_dir / "deepwish").write_text('#!/usr/bin/env bash\necho "deepwish $*"\n')
    os.chmod(bin_dir / "deepwish", 0o755)


def _main_sh(tmp_path, *args):
    r = subprocess.run(["bash", str(tmp_path / "scripts" / "main.sh"), *args], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip(), r.stderr


def test_main_sh_resumes_the_run_it_finds(tmp_path):
    _fake_repo(tmp_path)
    assert _main_sh(tmp_path)[0] == "deepwish train --preset qwen3_tiny"
    (tmp_path / "runs" / "qwen3_tiny" / "checkpoints").mkdir(parents=True)
    (tmp_path / "runs" / "qwen3_tiny" / "checkpoints" / "latest").write_text("step_00000250")
    out, err = _main_sh(tmp_path)
    assert out == "deepwish train --resume runs/qwen3_tiny" and "resuming it" in err
    assert _main_sh(tmp_path, "--out", "runs/other")[0] == "deepwish train --preset qwen3_tiny --out runs/other"
    (tmp_path / "runs" / "other" / "checkpoints").mkdir(parents=True)
    (tmp_path / "runs" / "other" / "checkpoints" / "latest").write_text("step_00000001")
    assert _main_sh(tmp_path, "--out=runs/other")[0] == "deepwish train --resume runs/other --out=runs/other"


@pytest.mark.usefixtures("one_thread")
def test_resuming_a_finished_run_evaluates_and_keeps_its_checkpoint(tmp_path):
    cfg = load_config("qwen3_tiny", ["model.n_layers=1", "train.steps=2", "train.batch_size=2", "train.seq_len=16",
                                     "train.eval_batches=1", "train.sample_tokens=0", f"train.out_dir={tmp_path}"])
    first = loop.train(cfg, progress_bar=False)
    again = loop.train(cfg, resume=True, progress_bar=False)
    assert again["start_step"] == 2 and again["train_losses"] == {}
    assert again["final_val_loss"] == first["final_val_loss"] and again["checkpoint"].endswith("step_00000002")
