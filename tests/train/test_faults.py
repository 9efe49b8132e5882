"""Fault injection into a run directory, on a tiny Qwen3 on CPU: concurrent writers, corrupted,
truncated and incomplete checkpoints, resume from an older step, SIGINT/SIGTERM during a step and
during a save, a torn metrics line, a full disk. Each fault is either survived with nothing lost
or mixed, or reported as one line."""
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from deepwish.cli import main
from deepwish.config import to_dict
from deepwish.train import checkpoint as ck
from deepwish.train import log as L
from deepwish.train import rundir
from deepwish.train.plot import plot_run

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1", "model.head_dim=16",
        "model.d_ff=64", "train.seq_len=32", "train.batch_size=4", "train.eval_batches=2", "train.sample_tokens=0",
        "train.log_every=1", "train.warmup_steps=2", "train.lr=0.02", "train.muon_lr=0.05", "train.steps=4",
        "train.save_every=2", "train.eval_every=100"]


def train_argv(run: Path, *extra: str, resume: str | None = None) -> list[str]:
    sets = [a for kv in [*TINY, *extra] for a in ("--set", kv)]
    head = ["train", "--preset", "qwen3_tiny", "--out", str(run)]
    return head + (["--resume", resume] if resume else []) + sets


SETUP_NOTE = re.compile(r"^\[deepwish\] (parallel |\w+: backend auto)")  # printed by every run


def err_lines(text: str) -> list[str]:
    """The lines of stderr other than a run's set-up notes."""
    return [line for line in text.splitlines() if line.strip() and not SETUP_NOTE.match(line)]


def train_losses(run: Path) -> dict[int, list[float]]:
    """{step: [loss of each time the step was logged]} from metrics.jsonl."""
    out: dict[int, list[float]] = {}
    for rec in L.read_metrics(run):
        if rec["kind"] == "train":
            out.setdefault(rec["step"], []).append(rec["loss"])
    return out


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, one_thread):
    """4 steps, checkpoints at steps 2 and 4, every step's loss in metrics.jsonl."""
    run = tmp_path_factory.mktemp("faults") / "run"
    assert main(train_argv(run)) == 0
    assert [p.name for p in ck.list_checkpoints(run)] == ["step_00000002", "step_00000004"]
    return run


@pytest.fixture
def run(base_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(base_run, copy)
    return copy


# ---- 1: one writer per run directory ----------------------------------------------------------
def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_second_writer_is_refused_and_sigint_stops_the_first_after_a_save(tmp_path, capsys, one_thread):
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "deepwish", *train_argv(run, "train.steps=100000",
                                                                              "train.save_every=1000")],
                             cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not ((run / "metrics.jsonl").exists() and len(train_losses(run)) >= 2):
            assert first.poll() is None, first.communicate()
            assert time.time() < deadline, "the first writer made no progress"
            time.sleep(0.2)
        assert main(train_argv(run, "train.steps=3")) == 2
        err = err_lines(capsys.readouterr().err)
        assert len(err) == 1 and err[0].startswith("error: run directory"), err
        assert f"pid {first.pid} on host {socket.gethostname()}" in err[0]
        first.send_signal(signal.SIGINT)
        out, stderr = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 128 + signal.SIGINT, stderr
    lines = err_lines(stderr)
    assert len(lines) == 1 and lines[0].startswith("[deepwish] stopped by SIGINT after step "), stderr
    step = int(lines[0].split("after step ")[1].split(":")[0])
    assert ck.load_checkpoint(run)["step"] == step
    logged = train_losses(run)  # every step once, from one run: nothing lost, nothing mixed
    assert sorted(logged) == list(range(1, step + 1)) and all(len(v) == 1 for v in logged.values())
    assert not (run / rundir.LOCK_FILE).exists()


def test_stale_lock_is_reported_and_taken_over(tmp_path, capsys):
    (tmp_path / rundir.LOCK_FILE).write_text(json.dumps({"pid": 999999, "host": "gone", "started": 0}))
    with rundir.RunLock(tmp_path) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
        with pytest.raises(rundir.RunDirError, match=f"in use by another training run \\(pid {os.getpid()}"):
            rundir.RunLock(tmp_path).acquire()
    err = err_lines(capsys.readouterr().err)
    assert len(err) == 1 and "stale lock" in err[0] and "pid 999999 on host gone" in err[0]
    assert not (tmp_path / rundir.LOCK_FILE).exists()


def test_only_rank_zero_takes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with rundir.exclusive(tmp_path) as lock:
        assert lock is None and not (tmp_path / rundir.LOCK_FILE).exists()
    monkeypatch.setenv("RANK", "0")
    with rundir.exclusive(tmp_path) as lock:
        assert lock is not None and (tmp_path / rundir.LOCK_FILE).exists()


# ---- 2, 11: corrupt, truncated and incomplete checkpoints ------------------------------------
def _garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 2048] = os.urandom(2048)
    path.write_bytes(bytes(data))


FAULTS = {
    "garbage bytes in model.pt": (lambda d: _garble(d / "model.pt"), "model.pt: checksum mismatch"),
    "truncated train_state.pt": (lambda d: os.truncate(d / "train_state.pt", 100), "train_state.pt has 100 bytes"),
    "missing train_state.pt": (lambda d: (d / "train_state.pt").unlink(), "train_state.pt is missing"),
    "garbage meta.json": (lambda d: (d / "meta.json").write_text("{not json"), "meta.json cannot be read"),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_bad_latest_checkpoint_falls_back_to_the_newest_that_verifies(run, fault, capsys):
    newest = ck.list_checkpoints(run)[-1]
    damage, named = FAULTS[fault]
    damage(newest)
    assert ck.resolve_checkpoint(run).name == "step_00000002"
    err = err_lines(capsys.readouterr().err)
    assert len(err) == 1 and named in err[0] and "using" in err[0] and err[0].endswith(
        "step_00000002, the newest checkpoint that verifies"), err
    # Named explicitly, the same checkpoint is a one-line error.
    assert main(train_argv(run, "train.steps=6", resume=str(newest))) == 2
    err = err_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("error: ") and named in err[0], err


def test_corrupt_checkpoint_resume_continues_from_the_good_one_and_keeps_the_bad_aside(run, base_run, capsys):
    _garble(run / "checkpoints" / "step_00000004" / "model.pt")
    assert main(train_argv(run, resume=str(run))) == 0
    out = capsys.readouterr()
    assert "model.pt: checksum mismatch" in out.err and "resumed from" in out.out and "at step 2" in out.out
    abandoned = list((run / ck.ABANDONED_DIR).glob("*-after-step_00000002/step_00000004"))
    assert len(abandoned) == 1 and (abandoned[0] / "model.pt").exists()  # moved aside, not deleted
    assert [p.name for p in ck.list_checkpoints(run)] == ["step_00000002", "step_00000004"]
    assert ck.load_checkpoint(run)["step"] == 4
    # Steps 3 and 4 were recomputed from step 2 bit for bit: nothing of the bad checkpoint leaked in.
    before, after = train_losses(base_run), train_losses(run)
    for s in (3, 4):
        assert after[s] == [before[s][0], before[s][0]]


def test_missing_latest_uses_the_newest_complete_checkpoint(run, capsys):
    (run / "checkpoints" / ck.LATEST).unlink()
    (run / "checkpoints" / "step_00000006").mkdir()  # a step directory never completed
    assert ck.resolve_checkpoint(run).name == "step_00000004"
    err = err_lines(capsys.readouterr().err)
    assert len(err) == 1 and "latest is missing" in err[0] and "step_00000006/meta.json is missing" in err[0]


def test_no_checkpoint_verifies_is_one_line(run, capsys):
    for d in ck.list_checkpoints(run):
        _garble(d / "model.pt")
    assert main(train_argv(run, "train.steps=6", resume=str(run))) == 2
    err = err_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("error: no checkpoint in ") and "verifies" in err[0], err


def test_checkpoint_without_checksums_still_loads(run):
    meta_path = run / "checkpoints" / "step_00000004" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["files"]  # as written before checksums existed
    meta_path.write_text(json.dumps(meta))
    assert ck.load_checkpoint(run)["step"] == 4


def test_sharded_checkpoint_lists_and_verifies_every_shard(tmp_path, capsys, one_thread):
    from deepwish.config import load_config
    from deepwish.data import PackedLoader, ensure_default_data
    from deepwish.model import Transformer
    from deepwish.train import dist_checkpoint as dc
    from deepwish.train.optim import build_optimizer

    cfg = load_config("qwen3_tiny", TINY)
    model = Transformer(cfg.model)
    loader = PackedLoader(str(ensure_default_data()[0]), 32, 4, seed=0)
    for step in (1, 2):
        with warnings.catch_warnings():  # DCP without a process group: "assuming ... a single process"
            warnings.simplefilter("ignore")
            dc.save(tmp_path, step, model=model, optimizer=build_optimizer(model, cfg.train), loader=loader,
                    ema=None, config=to_dict(cfg))
    d = ck.list_checkpoints(tmp_path)[-1]
    files = json.loads((d / "meta.json").read_text())["files"]
    shards = sorted(p.relative_to(d).as_posix() for p in (d / "dcp").iterdir())
    assert set(files) == {"train_state.pt", *shards} and any(s.endswith(".distcp") for s in shards)
    _garble(d / "dcp" / "__0_0.distcp")
    assert ck.read_meta(tmp_path)["step"] == 1
    err = err_lines(capsys.readouterr().err)
    assert len(err) == 1 and "__0_0.distcp: checksum mismatch" in err[0]


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device", "model.pt"),
                                     RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos "
                                                  "1024 vs 960")])
def test_full_disk_during_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, failure, monkeypatch,
                                                                             capsys, one_thread):
    run = tmp_path / "run"
    real_save = torch.save
    calls = []

    def failing_save(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 3:  # the step-4 save's model.pt, after a complete step-2 save
            f.write(b"partial")
            raise failure
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", failing_save)
    assert main(train_argv(run)) == 2
    err = err_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("error: cannot write checkpoint ") and "step_00000004" in err[0], err
    assert ("No space left on device" if isinstance(failure, OSError) else "inline_container") in err[0]
    monkeypatch.setattr(torch, "save", real_save)
    assert [p.name for p in ck.list_checkpoints(run)] == ["step_00000002"]
    assert not list((run / "checkpoints").glob(".tmp-*")) and ck.load_checkpoint(run)["step"] == 2


def test_never_prunes_before_the_new_checkpoint_verifies(tmp_path, monkeypatch):
    model = torch.nn.Linear(2, 2)

    def save(step):
        return ck.save_checkpoint(tmp_path, step, model_state=model.state_dict(), optimizer_state={},
                                  loader_state={}, ema_state=None, config={}, keep_last=1)

    save(1)
    real = ck.manifest
    monkeypatch.setattr(ck, "manifest", lambda d: {k: {**v, "sha256": "0" * 64} for k, v in real(d).items()})
    with pytest.raises(ck.CheckpointError, match="checksum mismatch"):
        save(2)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_00000001"]
    assert ck.load_checkpoint(tmp_path)["step"] == 1


# ---- 3: resume from an older step -------------------------------------------------------------
def test_resume_from_an_older_step_starts_a_branch(run, base_run, capsys):
    older = run / "checkpoints" / "step_00000002"
    assert main(train_argv(run, "train.steps=3", resume=str(older))) == 0
    out = capsys.readouterr().out
    assert "resuming from step_00000002 starts a branch: moved the newer step_00000004 to " in out
    assert [p.name for p in ck.list_checkpoints(run)] == ["step_00000002", "step_00000003"]
    (moved,) = (run / ck.ABANDONED_DIR).glob("*/step_00000004")
    assert ck.verify(moved)["step"] == 4  # the abandoned branch is whole
    assert train_losses(run)[3] == [train_losses(base_run)[3][0]] * 2


# ---- 4: signals ------------------------------------------------------------------------------
@pytest.mark.parametrize("signals", [1, 2])
def test_signal_during_a_save(tmp_path, signals, monkeypatch, capsys, one_thread):
    """One SIGTERM while step 4 is being saved: the save completes and the run stops. A second
    one: the save is abandoned whole and the run stops at once; step 2 stays the latest."""
    run = tmp_path / "run"
    real = ck._write_bytes_synced

    def signalling_write(path, write):
        if path.name == "model.pt" and "step_00000004" in path.parent.name:
            for _ in range(signals):
                os.kill(os.getpid(), signal.SIGTERM)
        return real(path, write)

    monkeypatch.setattr(ck, "_write_bytes_synced", signalling_write)
    handler = signal.getsignal(signal.SIGTERM)
    assert main(train_argv(run, "train.steps=8")) == 128 + signal.SIGTERM
    err = err_lines(capsys.readouterr().err)
    assert len(err) == 1, err
    if signals == 1:
        assert err[0].startswith("[deepwish] stopped by SIGTERM after step 4: saved ")
        assert ck.load_checkpoint(run)["step"] == 4
    else:
        assert err[0] == "[deepwish] second SIGTERM: stopped at once, without a save"
        assert ck.load_checkpoint(run)["step"] == 2
    assert not list((run / "checkpoints").glob(".tmp-*")) and not (run / rundir.LOCK_FILE).exists()
    assert signal.getsignal(signal.SIGTERM) is handler  # the run's handlers are gone after it


def test_sigterm_during_a_step_saves_that_step_and_resume_is_exact(tmp_path, base_run, monkeypatch, capsys,
                                                                   one_thread):
    from deepwish.train import loop
    run = tmp_path / "run"
    real, calls = loop.lm_loss, []

    def signalling_loss(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # inside step 3, which is not a save step
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(loop, "lm_loss", signalling_loss)
    assert main(train_argv(run)) == 128 + signal.SIGTERM
    monkeypatch.setattr(loop, "lm_loss", real)
    assert ck.load_checkpoint(run)["step"] == 3
    assert main(train_argv(run, resume=str(run))) == 0
    assert {s: v for s, v in train_losses(run).items()} == train_losses(base_run)


# ---- 10: torn metrics line --------------------------------------------------------------------
def test_torn_metrics_line_is_skipped_by_readers_and_ended_by_the_next_writer(run, capsys):
    path = run / "metrics.jsonl"
    with open(path, "ab") as f:
        f.write(b'{"kind": "train", "step": 5, "lo')  # killed mid-write
    records = L.read_metrics(run)
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    err = err_lines(capsys.readouterr().err)
    assert len(err) == 1 and "skipped 1 unreadable line" in err[0]
    plot_run(run)
    lg = L.Logger(run, total_steps=5, flops_per_token=1.0, device=torch.device("cpu"), log_every=1,
                  progress_bar=False)
    lg.start(4)
    lg.step(5, 10, {"loss": 1.0, "ce": 1.0, "lr": 1.0, "grad_norm": 1.0})
    lg.close()
    assert "the last line was torn" in capsys.readouterr().out
    assert [r["step"] for r in L.read_metrics(run) if r["kind"] == "train"] == [1, 2, 3, 4, 5]


def test_metrics_line_is_one_write(tmp_path, monkeypatch):
    writes = []
    real = os.write
    fd = L.open_appender(tmp_path / "m.jsonl")
    monkeypatch.setattr(L.os, "write", lambda f, data: (writes.append(data) if f == fd else None) or real(f, data))
    L.append_line(fd, json.dumps({"kind": "x", "step": 1, "big": "y" * 100_000}))
    os.close(fd)
    assert len(writes) == 1 and writes[0].endswith(b"\n")


# ---- 14: like with like ----------------------------------------------------------------------
def test_progress_and_plot_show_ce_and_objective_apart(tmp_path, capsys, monkeypatch):
    from matplotlib.axes import Axes
    lg = L.Logger(tmp_path, total_steps=2, flops_per_token=1.0, device=torch.device("cpu"), log_every=1,
                  progress_bar=False)
    lg.start(0)
    for s in (1, 2):
        lg.step(s, 10, {"loss": 5.5 - s, "ce": 5.0 - s, "lr": 1.0, "grad_norm": 1.0, "aux/mtp": 0.5})
    lg.eval(2, {"val_loss": 3.2})
    lg.close()
    out = capsys.readouterr().out
    assert "loss 3.5000 | ce 3.0000 |" in out and "val ce 3.2000" in out
    labels = []
    real_plot = Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, *a, **k: labels.append(k.get("label")) or real_plot(self, *a, **k))
    plot_run(tmp_path)
    assert labels[:3] == ["train CE", "train objective (CE + aux terms)", "val CE"]


SIGNAL_RANK_1 = """
import os, signal, sys
if os.environ["RANK"] == "1":  # one rank alone is signalled, inside step 3
    from deepwish.train import loop
    real, calls = loop.lm_loss, []
    def signalling_loss(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)
    loop.lm_loss = signalling_loss
from deepwish.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_on_one_torchrun_rank_stops_every_rank_after_the_same_step(tmp_path):
    from deepwish.train.checkpoint import read_meta
    script = tmp_path / "signal_rank1.py"
    script.write_text(SIGNAL_RANK_1)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           *train_argv(run, "train.steps=8", "train.parallel=ddp")]
    out = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    meta = read_meta(run)
    assert meta["format"] == "dcp" and meta["step"] == 3 and meta["world_size"] == 2
    assert sorted(train_losses(run)) == [1, 2, 3]
    assert out.stderr.count("stopped by SIGTERM after step 3: saved ") == 2, out.stderr[-4000:]
    assert "Traceback" not in out.stderr.split("stopped by SIGTERM")[0]


@pytest.mark.parametrize("ending, waits", [("done", True), ("agreed stop", True), ("second signal", False),
                                           ("error", False)])
def test_a_torchrun_process_meets_its_peers_before_the_teardown_only_where_all_end_alike(monkeypatch, ending, waits):
    """A run that finished, or stopped after a step every rank agreed on, meets the other ranks
    before the process group goes; a failure or a second signal (one rank alone) does not wait
    for peers that may never come."""
    from deepwish.train import parallel
    calls = []
    monkeypatch.setattr(parallel, "shutdown", lambda wait_for_peers=False: calls.append(wait_for_peers))
    raised = {"agreed stop": rundir.stopped(signal.SIGTERM, 3, "ckpt", "run"),
              "second signal": rundir.Stopped("second SIGTERM: stopped at once, without a save", 143),
              "error": RuntimeError("boom")}.get(ending)
    with pytest.raises(type(raised)) if raised is not None else contextlib.nullcontext():
        with parallel.process_group_until_done():
            if raised is not None:
                raise raised
    assert calls == [waits]


def test_shutdown_after_a_run_keeps_its_last_barrier_for_the_main_thread_to_free(tmp_path, monkeypatch):
    """The end of a torchrun process (parallel.shutdown's docstring): the last barrier's work stays
    referenced after the group is destroyed, so gloo's worker thread never frees it while the
    interpreter shuts down (the abort that made a 2-rank test fail about 1 run in 20)."""
    import torch.distributed as dist
    from deepwish.train import parallel
    monkeypatch.setattr(parallel, "_LAST_BARRIER", [])
    try:
        for _ in range(2):  # a long-lived process keeps only the last one
            dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
            parallel.shutdown(wait_for_peers=True)
            assert not dist.is_initialized()
            assert len(parallel._LAST_BARRIER) == 1 and parallel._LAST_BARRIER[0].is_completed()
            (tmp_path / "store").unlink(missing_ok=True)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_a_failed_final_barrier_is_said_and_the_group_still_goes(monkeypatch, capsys, tmp_path):
    """A peer that died after all: the barrier's error is one note, never the run's outcome, and the
    process group is destroyed regardless."""
    import torch.distributed as dist
    from deepwish.train import parallel
    monkeypatch.setattr(parallel, "_LAST_BARRIER", [])

    def broken(async_op=False):
        raise RuntimeError("Connection closed by peer\nmore detail")

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        monkeypatch.setattr(dist, "barrier", broken)
        parallel.shutdown(wait_for_peers=True)
        assert not dist.is_initialized()
        assert ("note: the ranks' final barrier failed (RuntimeError: Connection closed by peer); tearing the "
                "process group down anyway") in capsys.readouterr().err
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
