"""Atomic, crash-safe checkpoints with keep-last-k and full training state."""
import random

import numpy as np
import pytest
import torch

from deepwish.config import RunConfig, to_dict
from deepwish.train import checkpoint as ck


def _save(run_dir, step, model, keep_last=2):
    return ck.save_checkpoint(run_dir, step, model_state=model.state_dict(), optimizer_state={"x": torch.ones(2)},
                              loader_state={"pos": step, "epoch": 0}, ema_state=None,
                              config=to_dict(RunConfig()), keep_last=keep_last)


def test_roundtrip_contents_and_rng(tmp_path):
    model = torch.nn.Linear(4, 3)
    torch.manual_seed(0), random.seed(1), np.random.seed(2)
    _save(tmp_path, 5, model)
    expect = (torch.rand(3), random.random(), np.random.rand())
    torch.rand(7), random.random(), np.random.rand(5)  # move every generator on
    c = ck.load_checkpoint(tmp_path)
    assert c["step"] == 5 and c["loader"] == {"pos": 5, "epoch": 0}
    for k, v in model.state_dict().items():
        assert torch.equal(c["model"][k], v)
    assert c["config"]["model"]["d_model"] == RunConfig().model.d_model
    assert set(c["versions"]) >= {"python", "torch", "deepwish"} and c["git"]
    ck.set_rng_state(c["rng"])
    assert (torch.rand(3).tolist(), random.random(), np.random.rand()) == (expect[0].tolist(), expect[1], expect[2])
    # A checkpoint directory itself is accepted too.
    assert ck.load_checkpoint(c["path"])["step"] == 5


def test_keep_last_k_and_latest(tmp_path):
    model = torch.nn.Linear(2, 2)
    for s in (1, 2, 3, 4):
        _save(tmp_path, s, model, keep_last=2)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    assert ck.load_checkpoint(tmp_path)["step"] == 4


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 3)
    _save(tmp_path, 10, model)
    good = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    real_save = torch.save
    calls = []

    def dying_save(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 2:  # model.pt written, train_state.pt half way: power cut
            f.write(b"partial")
            raise OSError("simulated crash during save")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(ck.CheckpointError, match="cannot write checkpoint .*step_00000020: simulated crash"):
        _save(tmp_path, 20, model)
    monkeypatch.setattr(torch, "save", real_save)
    c = ck.load_checkpoint(tmp_path)
    assert c["step"] == 10
    for k, v in good.items():
        assert torch.equal(c["model"][k], v)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_00000010"]
    assert not list((tmp_path / ck.CKPT_DIR).glob(".tmp-*"))
    # The next save succeeds and moves `latest` on.
    _save(tmp_path, 20, model)
    assert ck.load_checkpoint(tmp_path)["step"] == 20


def test_crash_before_latest_update_keeps_previous_latest(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 3)
    _save(tmp_path, 1, model)
    real_replace = ck.os.replace

    def dying_replace(src, dst):
        raise OSError("simulated crash before latest")

    monkeypatch.setattr(ck.os, "replace", dying_replace)
    with pytest.raises(ck.CheckpointError, match="simulated crash before latest"):
        _save(tmp_path, 2, model)
    monkeypatch.setattr(ck.os, "replace", real_replace)
    assert ck.load_checkpoint(tmp_path)["step"] == 1


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ck.load_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such"):
        ck.load_checkpoint(tmp_path / "nope")


def test_git_tree_names_the_files_as_they_are_and_writes_nothing(tmp_path):
    """git_tree: the tree id of the tracked and untracked files (ignored ones left out), equal to the
    tree of the commit that holds exactly those files, without touching the repository's index or
    object store; 'unknown' outside git."""
    import subprocess
    from deepwish.train.checkpoint import git_tree

    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              capture_output=True, text=True, check=True).stdout.strip()

    assert git_tree(tmp_path) == "unknown"
    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / ".gitignore").write_text("out/\n")
    git("add", "-A")
    git("commit", "-qm", "one")
    assert git_tree(tmp_path) == git("rev-parse", "HEAD^{tree}")
    (tmp_path / "a.py").write_text("x = 2\n")           # modified, not staged
    (tmp_path / "b.py").write_text("y = 1\n")           # untracked
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "scratch.txt").write_text("z")  # ignored
    status, objects = git("status", "--porcelain"), git("count-objects", "-v")
    tree = git_tree(tmp_path)
    tracked_only = git_tree(tmp_path, untracked_limit=0)   # b.py over the limit: not hashed
    assert tree != git("rev-parse", "HEAD^{tree}") and tracked_only.endswith("+untracked")
    assert (git("status", "--porcelain"), git("count-objects", "-v")) == (status, objects)
    git("add", "a.py")
    git("commit", "-qm", "two")
    assert tracked_only == git("rev-parse", "HEAD^{tree}") + "+untracked"
    git("add", "-A")
    git("commit", "-qm", "three")
    assert tree == git("rev-parse", "HEAD^{tree}")
