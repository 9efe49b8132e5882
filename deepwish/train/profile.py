"""Where the training loop's time goes: torch.profiler over `train.profile_steps` steps of the
real loop (from step `train.profile_start`), on its own batches, schedules and host work.

`bench profile_train` times one synthetic step (random ids, no data loader, no logging, no host
read); the loop itself does more on the host between the GPU's work, and the GPU waits for it.
Each step's host phases are marked (`phase`: `deepwish.data`, `.forward_backward`, `.read` — the
step's one host synchronisation —, `.optimizer`, `.log`, `.save`, `.evaluate`, `.gc`). From the trace:
the window's wall time, the time the GPU ran kernels, copies or fills (the union of their
intervals: overlapping streams count once), and the GPU's idle time split by the host phase
running meanwhile, i.e. what the GPU waited for. Written under RUN_DIR/profile/ (one folder per
rank under data parallelism, profile/rank<r>/): summary.txt (those
figures and the kernels by device time) and trace.json.gz (chrome://tracing or Perfetto); the
figures are printed too. The profiled steps run slower than the others (the profiler's own
cost), which their logged tok/s shows: profile a window apart from the one you time.
"""
from __future__ import annotations

import contextlib
import gzip
import json
import shutil
import time
from pathlib import Path

import torch

PHASE_PREFIX = "deepwish."
DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")  # what keeps the GPU busy, in a kineto trace


def phase(name: str):
    """Mark a host phase of the training step (`deepwish.<name>` in a profiler trace; close to
    free when no profiler records)."""
    return torch.profiler.record_function(PHASE_PREFIX + name)


# ---- intervals (microseconds) ---------------------------------------------------------------------
def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Sorted, merged: the time covered by any of `intervals`."""
    out: list[list[float]] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def gaps(busy: list[tuple[float, float]], window: tuple[float, float]) -> list[tuple[float, float]]:
    """The parts of `window` that no interval of `busy` (merged, sorted) covers."""
    out, t = [], window[0]
    for s, e in busy:
        if e <= t:
            continue
        if s >= window[1]:
            break
        if s > t:
            out.append((t, s))
        t = max(t, e)
    if t < window[1]:
        out.append((t, window[1]))
    return out


def idle_by_phase(busy: list[tuple[float, float]], phases: list[tuple[str, float, float]],
                  window: tuple[float, float]) -> dict[str, float]:
    """The GPU's idle time within `window`, split by the host phase that overlaps it (phases do not
    overlap each other: the loop's top-level steps); idle time under no phase is 'other'."""
    out: dict[str, float] = {}
    phases = sorted(phases, key=lambda p: p[1])
    for s, e in gaps(union(busy), window):
        covered = 0.0
        for name, ps, pe in phases:
            lo, hi = max(s, ps), min(e, pe)
            if hi > lo:
                out[name] = out.get(name, 0.0) + hi - lo
                covered += hi - lo
        if e - s - covered > 0:
            out["other"] = out.get("other", 0.0) + e - s - covered
    return out


HOST_CATEGORIES = ("cpu_op", "user_annotation", "python_function")  # what the host thread runs, nested
# an idle gap shorter than this is the GPU's own time from one kernel to the next queued one
# (a few microseconds each), which no host-side change removes; longer ones are waits for the host
SHORT_GAP_US = 10.0
# runtime calls after which the host has waited for the GPU (its queue drained meanwhile)
BLOCKING = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
            "cuStreamSynchronize", "cuCtxSynchronize", "cuEventSynchronize")


def host_stacks(host: list[tuple[str, float, float]], times: list[float]) -> list[tuple[str, ...]]:
    """For each time of `times` (sorted), the names of the host events covering it, outermost
    first (the events of one thread nest: a sweep with a stack)."""
    host = sorted(host, key=lambda h: (h[1], -h[2]))
    out, stack, i = [], [], 0
    for t in times:
        while i < len(host) and host[i][1] <= t:
            while stack and stack[-1][2] <= host[i][1]:
                stack.pop()
            stack.append(host[i])
            i += 1
        while stack and stack[-1][2] <= t:
            stack.pop()
        out.append(tuple(name for name, s, e in stack if s <= t < e))
    return out


def where(stack: tuple[str, ...], depth: int = 2) -> str:
    """A host stack as its phase and innermost `depth` events: 'forward_backward: a > b'."""
    phase_names = [n[len(PHASE_PREFIX):] for n in stack if n.startswith(PHASE_PREFIX)]
    inner = [n for n in stack if not n.startswith(PHASE_PREFIX)][-depth:]
    return f"{phase_names[-1] if phase_names else 'other'}: {' > '.join(inner) or '-'}"


def trace_figures(trace: dict) -> dict:
    """From a kineto (chrome) trace: the window (first phase start .. last phase or device event
    end), the GPU's busy time and its idle time by phase (microseconds); the phases' host time."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    phases = [(e["name"][len(PHASE_PREFIX):], float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events
              if e.get("cat") == "user_annotation" and str(e.get("name", "")).startswith(PHASE_PREFIX)]
    busy = [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events if e.get("cat") in DEVICE_CATEGORIES]
    if not phases:
        raise ValueError("the trace holds no deepwish.* phase: nothing of the training loop was recorded")
    start = min(p[1] for p in phases)
    end = max([p[2] for p in phases] + [e for _, e in busy])
    merged = union(busy)
    busy_us = sum(min(e, end) - max(s, start) for s, e in merged if e > start and s < end)
    host = {}
    for name, s, e in phases:
        host[name] = host.get(name, 0.0) + e - s
    # What the host was doing while the GPU waited: each idle gap's time goes to the host events
    # covering the gap's start (the work that held back the next launch) on the thread with the
    # deepest stack then (the loop's own, or the autograd engine's, which runs the backward on
    # CUDA), labelled with the loop's phase; each blocking runtime call (a synchronisation drains
    # the queue) to the events of the thread that made it.
    loop_tids = {e.get("tid") for e in events if e.get("cat") == "user_annotation"
                 and str(e.get("name", "")).startswith(PHASE_PREFIX)}
    threads: dict = {}
    for e in events:
        if e.get("cat") in HOST_CATEGORIES:
            threads.setdefault(e.get("tid"), []).append((str(e["name"]), float(e["ts"]), float(e["ts"]) + float(e["dur"])))
    order = sorted(threads, key=lambda tid: tid not in loop_tids)  # the loop's thread first: it wins ties

    def stacks_at(times: list[float]) -> dict:
        return {tid: host_stacks(threads[tid], times) for tid in order}

    def label(by_tid: dict, i: int, *caller) -> str:  # caller: the thread that made the call, if one did
        phase_stack = next((by_tid[t][i] for t in order if t in loop_tids), ())
        inner = by_tid[caller[0]][i] if caller and caller[0] in by_tid else max(
            (by_tid[t][i] for t in order), key=len, default=())
        return where(tuple(n for n in phase_stack if n.startswith(PHASE_PREFIX)) + inner)

    idle_gaps = [g for g in gaps(merged, (start, end)) if g[1] - g[0] > 0] if busy else []
    short = [e - s for s, e in idle_gaps if e - s < SHORT_GAP_US]
    idle_at: dict[str, list[float]] = {}
    by_tid = stacks_at([g[0] for g in idle_gaps])
    for i, (s, e) in enumerate(idle_gaps):
        acc = idle_at.setdefault(label(by_tid, i), [0, 0.0])
        acc[0] += 1
        acc[1] += e - s
    calls = sorted((float(e["ts"]), float(e["dur"]), str(e["name"]), e.get("tid")) for e in events
                   if e.get("cat") in ("cuda_runtime", "cuda_driver") and str(e.get("name")) in BLOCKING)
    blocking: dict[str, list[float]] = {}
    by_tid = stacks_at([c[0] for c in calls])
    for i, (t, dur, name, tid) in enumerate(calls):
        acc = blocking.setdefault(f"{name} in {label(by_tid, i, tid)}", [0, 0.0])
        acc[0] += 1
        acc[1] += dur
    return {"wall_us": end - start, "busy_us": busy_us, "device_events": len(busy),
            "idle_us": idle_by_phase(busy, phases, (start, end)) if busy else {}, "host_us": host,
            "idle_at": idle_at, "blocking": blocking, "short_gaps": (len(short), sum(short)),
            "long_gaps": (len(idle_gaps) - len(short), sum(e - s for s, e in idle_gaps) - sum(short))}


def summary_lines(fig: dict, first: int, last: int, rows: int = 12) -> list[str]:
    n = last - first + 1
    ms = 1e-3
    head = f"profile: steps {first}-{last}: wall {fig['wall_us'] * ms:.1f} ms ({fig['wall_us'] * ms / n:.1f} a step)"
    host = ", ".join(f"{k} {v * ms / n:.2f}" for k, v in sorted(fig["host_us"].items(), key=lambda kv: -kv[1]))
    if not fig["device_events"]:
        return [head + "; no GPU work in the trace (a CPU run)", f"profile: host phases, ms a step: {host}"]
    busy = fig["busy_us"]
    idle = fig["wall_us"] - busy
    by = ", ".join(f"{k} {v * ms / n:.2f}" for k, v in sorted(fig["idle_us"].items(), key=lambda kv: -kv[1]))
    lines = [head + f", GPU busy {busy * ms / n:.1f} ms a step ({100 * busy / fig['wall_us']:.0f}%), "
                    f"idle {idle * ms / n:.1f}",
             f"profile: GPU idle by host phase, ms a step: {by}",
             f"profile: host phases, ms a step: {host}"]
    if "short_gaps" in fig:
        (ns, ts), (nl, tl) = fig["short_gaps"], fig["long_gaps"]
        lines.append(f"profile: idle gaps a step: {ns / n:g} shorter than {SHORT_GAP_US:g} us ({ts * ms / n:.2f} ms: "
                     f"kernel-to-kernel time), {nl / n:g} longer ({tl * ms / n:.2f} ms: waits for the host)")
    for title, table in (("GPU idle by what the host ran at the gap's start", fig.get("idle_at", {})),
                         ("blocking runtime calls (host waits for the GPU)", fig.get("blocking", {}))):
        if table:
            lines.append(f"profile: {title}, ms a step (count):")
            lines += [f"profile:   {v[1] * ms / n:8.2f} ({v[0] / n:g})  {k}"
                      for k, v in sorted(table.items(), key=lambda kv: -kv[1][1])[:rows]]
    return lines


class StepProfiler:
    """torch.profiler over steps [start, start + n) of the loop (0-based step indices; a resumed run
    past them profiles none). `before(step)` / `after(step)` around each step; `close()` on the
    way out (stops a window the run left early, writing nothing)."""

    def __init__(self, start: int, n: int, out: Path, device: torch.device, logger):
        self.first, self.last = start, start + n - 1
        self.out = Path(out)
        self.device, self.logger = device, logger
        self.prof = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def before(self, step: int) -> None:
        if self.last < self.first or step != self.first:
            return
        acts = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        self._sync()  # the window starts with an empty queue: its first idle time is the loop's own
        self.prof = torch.profiler.profile(activities=acts)
        self.prof.__enter__()

    def after(self, step: int) -> None:
        if self.prof is None or step != self.last:
            return
        self._sync()
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)
        with self.logger.paused():  # the summary's work is not training time
            t0 = time.perf_counter()
            self.out.mkdir(parents=True, exist_ok=True)
            raw = self.out / "trace.json"
            prof.export_chrome_trace(str(raw))
            fig = trace_figures(json.loads(raw.read_text()))
            with open(raw, "rb") as src, gzip.open(self.out / "trace.json.gz", "wb") as dst:
                shutil.copyfileobj(src, dst)
            raw.unlink()
            lines = summary_lines(fig, self.first + 1, self.last + 1)  # steps as the log numbers them
            cuda = self.device.type == "cuda"
            table = prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                              row_limit=30, max_name_column_width=70)
            (self.out / "summary.txt").write_text("\n".join(lines) + "\n\n" + table + "\n")
            for line in lines:
                self.logger.print(f"[deepwish] {line}")
            self.logger.print(f"[deepwish] profile: {self.out / 'summary.txt'}, {self.out / 'trace.json.gz'} "
                              f"({time.perf_counter() - t0:.1f} s to write)")

    def close(self) -> None:
        if self.prof is not None:
            prof, self.prof = self.prof, None
            with contextlib.suppress(Exception):
                prof.__exit__(None, None, None)
