"""A run directory has one writer at a time, and a signal stops a run at a step boundary.

Lock: `RUN/.lock` holds the owner's pid, host and start time, and the owner holds an advisory
`flock` on it for as long as it trains. The kernel drops a `flock` when its process dies, so a
lock file whose lock nobody holds is stale (its owner was killed): the next writer reports it in
one line and takes it over. A second writer while the owner lives is a `RunDirError` naming the
owner. Only the process that writes checkpoints and metrics takes it: rank 0 under torchrun
(`RANK` in the environment), every process otherwise. `flock` is advisory and per host on file
systems that do not forward it (some NFS set-ups): there the pid/host line is only a label.

Signals: inside `stop_on_signals()` the first SIGINT or SIGTERM only sets a flag; the training
loop reads it at the end of each step (`stop_requested`; under a process group all-reduced with
the step's own values, `stop_request_tensor`, so every rank stops at the same step without a
second host synchronisation), saves, and raises `Stopped`. A second signal raises `Stopped` at once, without a
save: the last checkpoint is whatever was written before (a save being written is abandoned
whole, train/checkpoint.py). The exit status is 128 + the signal number, as a shell reports it.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

LOCK_FILE = ".lock"


class RunDirError(RuntimeError):
    """The run directory is in use by another writer, or cannot be locked."""


class Stopped(BaseException):
    """The run stopped on SIGINT/SIGTERM; `code` is the exit status (128 + signal number).
    A BaseException, like KeyboardInterrupt: no `except Exception` on the way out swallows it.
    agreed: every rank stops after the same step, with a save (the first signal); a second signal
    stops only the process that received it."""

    def __init__(self, message: str, code: int, agreed: bool = False):
        super().__init__(message)
        self.code = code
        self.agreed = agreed


def stopped(signum: int, step: int, checkpoint, run_dir) -> Stopped:
    """The Stopped of a run that finished `step`, saved `checkpoint` and stops on `signum`."""
    return Stopped(f"stopped by {signal.Signals(signum).name} after step {step}: saved {checkpoint}; continue "
                   f"with --resume {run_dir}", 128 + signum, agreed=True)


def run_dir_of(out_dir: str | os.PathLike, resume: bool | str | os.PathLike) -> Path:
    """The run directory that train(run_cfg, resume) writes into: --resume's run directory (the
    run above it when a checkpoint directory is given), else train.out_dir."""
    if isinstance(resume, bool) or not resume:
        return Path(out_dir)
    p = Path(resume)
    if p.parent.name == "checkpoints" and p.name.startswith("step_"):
        return p.parent.parent
    return p


def _is_writer() -> bool:
    return int(os.environ.get("RANK", "0") or 0) == 0


def _describe(info: dict) -> str:
    when = info.get("started")
    since = time.strftime(" since %Y-%m-%d %H:%M:%S UTC", time.gmtime(when)) if isinstance(when, (int, float)) else ""
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}{since}"


def _read_info(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        info = json.loads(raw.decode())
        return info if isinstance(info, dict) else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {"raw": raw[:80].decode(errors="replace")} if raw.strip() else {}


class RunLock:
    """The exclusive lock of one run directory (module docstring). `acquire` / `release`, or `with`."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None
        self._created_dir = False

    def acquire(self) -> RunLock:
        if not self.run_dir.exists():
            try:
                self.run_dir.mkdir(parents=True)
                self._created_dir = True
            except FileExistsError:
                pass
            except OSError as e:
                raise RunDirError(f"cannot create run directory {self.run_dir}: {e.strerror}") from None
        for _ in range(10):  # retry when the file was replaced between open and flock (see below)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise RunDirError(f"cannot lock run directory {self.run_dir} ({self.path}: {e.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                info = _read_info(fd)
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise RunDirError(f"run directory {self.run_dir} is in use by another training run "
                                      f"({_describe(info)}, lock {self.path}); wait for it, stop it, or choose "
                                      f"another --out") from None
                raise RunDirError(f"cannot lock run directory {self.run_dir}: {e.strerror}") from None
            # The owner before us unlinks the file before unlocking it: if the path no longer names
            # the inode we locked, we hold a lock on a deleted file; start again on the new one.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            break
        else:
            raise RunDirError(f"cannot lock run directory {self.run_dir}: {self.path} keeps being replaced")
        stale = _read_info(fd)
        if stale:
            print(f"[deepwish] note: stale lock in {self.run_dir} from {_describe(stale)}, which ended without "
                  f"releasing it (killed?); taking it over", file=sys.stderr, flush=True)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "argv": sys.argv}
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps(info).encode())
            os.fsync(fd)
        except OSError as e:
            os.close(fd)
            raise RunDirError(f"cannot write the lock file {self.path}: {e.strerror}") from None
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # before unlocking: a waiter that locks the old inode retries
        os.close(self._fd)
        self._fd = None
        if self._created_dir:  # nothing was written (e.g. the configuration was rejected)
            with contextlib.suppress(OSError):
                self.run_dir.rmdir()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def exclusive(run_dir: str | os.PathLike, resume: bool | str | os.PathLike = False):
    """Hold the run directory's lock for the block, if this process is the writer (rank 0).
    A --resume target that does not exist is left alone (loading it reports the error)."""
    if not _is_writer() or (resume and not Path(run_dir).exists()):
        yield None
        return
    with RunLock(run_dir) as lock:
        yield lock


# ---- signals ------------------------------------------------------------------------------
class _StopFlag:
    """Set by the first SIGINT/SIGTERM inside `stop_on_signals`; read once per training step."""

    def __init__(self):
        self.installed = False
        self.signum: int | None = None

    def handler(self, signum, frame) -> None:
        if self.signum is not None:  # the second signal: stop now
            raise Stopped(f"second {signal.Signals(signum).name}: stopped at once, without a save", 128 + signum)
        self.signum = signum
        if _is_writer():
            print(f"[deepwish] {signal.Signals(signum).name}: finishing this step, then saving and stopping "
                  f"(send it again to stop at once)", flush=True)


STOP = _StopFlag()


@contextlib.contextmanager
def stop_on_signals():
    """Install the SIGINT/SIGTERM handlers (module docstring) for the block; a no-op outside the
    main thread, where Python cannot install signal handlers."""
    if STOP.installed or threading.current_thread() is not threading.main_thread():
        yield STOP
        return
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    STOP.installed, STOP.signum = True, None
    try:
        for s in old:
            signal.signal(s, STOP.handler)
        yield STOP
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        STOP.installed, STOP.signum = False, None


def _collective(d) -> bool:
    return d is not None and d.active and d.world_size > 1


def stop_request_tensor(d):
    """Under a process group: this rank's stop request (0 or the signal number) as a device
    tensor, all-reduced (MAX) in stream order, so the training step reads it together with its
    other values (one host synchronisation a step); None without a process group or handlers.
    Collective: every rank calls it at the same point of each step."""
    if not (STOP.installed and _collective(d)):
        return None
    import torch
    import torch.distributed as dist

    t = torch.tensor([STOP.signum or 0], dtype=torch.float32, device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.reshape(())


def stop_requested(d=None, reduced: int | None = None) -> int | None:
    """The signal number if a stop was requested on any rank. Under a process group: `reduced`,
    the step's read of `stop_request_tensor`, when the caller has it (every rank then stops at
    the same step), else a collective of its own (every rank calls it at the same point)."""
    if not STOP.installed:
        return None
    if not _collective(d):
        return STOP.signum or None
    if reduced is None:
        reduced = int(stop_request_tensor(d).item())
    return int(reduced) or None
