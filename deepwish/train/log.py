"""Training progress: a line every N steps, metrics.jsonl always, optional TensorBoard / MLflow.

MLflow: the tracking URI, experiment and run come from MLflow's own environment variables
(MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME / _ID, MLFLOW_RUN_ID) unless the config names them
(train.mlflow_experiment or train.mlflow_experiment_id, train.mlflow_run_name); without MLFLOW_TRACKING_URI a file store inside
the run directory is used. The run id is kept in RUN/mlflow.json and in every checkpoint's
meta.json, so `--resume` continues the same MLflow run (metrics continue at the resumed step).
Params are the flattened resolved config; the config file and the plot are artifacts.

MFU = (tokens/s × model FLOPs per token) / device peak, counted by train/mfu.py (the same count
and peak table as `deepwish bench train`). The peak is a *measured* dense bf16 matmul ceiling
where we have one (H100 777, H200 774 TFLOP/s), otherwise the vendor's dense bf16 figure; an
unknown device or the CPU reports MFU as n/a rather than a guess.

metrics.jsonl is appended one whole line per write(2) on an O_APPEND descriptor (no user-space
buffer, so a killed process leaves every finished record on disk). A kill can still tear the
line being written: the next writer ends it with a newline before appending, and `read_metrics`
skips such a line with a note.

Losses: `loss` is the objective that was minimised (CE + z-loss + weighted auxiliary terms such as
DeepSeek's MTP loss), `ce` the next-token cross-entropy alone, which is what `val_loss` measures;
the progress line shows `ce` beside `loss` when they differ, and the plot draws the CEs together.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch

from deepwish.train.mfu import PEAKS, device_peak_flops, mfu as model_flops_utilisation  # noqa: F401 (re-exported)

# Dense bf16 peak FLOP/s by a substring of the device name (train/mfu.py's table, without the bandwidth).
PEAK_BF16_FLOPS: tuple[tuple[str, float, str], ...] = tuple((k, f, s) for k, f, _, s in PEAKS)


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA max allocated on GPU; peak resident set size of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _require(module: str, feature: str, extra: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as e:
        raise ImportError(f"train.{feature}=true needs the '{extra}' package, which is not installed "
                          f"(pip install {extra}); or set train.{feature}=false") from e


def is_file_store(uri: str) -> bool:
    """A `file:` URI or a plain path: MLflow's filesystem tracking backend."""
    scheme = uri.split(":", 1)[0] if ":" in uri else ""
    return scheme == "file" or len(scheme) <= 1  # "" or a Windows drive letter


def mlflow_experiment_args(name: str, experiment_id: str = "") -> dict:
    """The experiment a run logs to: `train.mlflow_experiment` when set, else
    `train.mlflow_experiment_id`, else MLflow's own MLFLOW_EXPERIMENT_ID / MLFLOW_EXPERIMENT_NAME,
    else "deepwish"."""
    if name:
        return {"experiment_name": name}
    if experiment_id:
        return {"experiment_id": experiment_id}
    if os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return {"experiment_id": os.environ["MLFLOW_EXPERIMENT_ID"]}
    return {"experiment_name": os.environ.get("MLFLOW_EXPERIMENT_NAME") or "deepwish"}


MLFLOW_RUN_FILE = "mlflow.json"  # RUN/mlflow.json: the MLflow run this run directory logs to


def read_mlflow_run(run_dir: str | os.PathLike) -> dict | None:
    """{'run_id', 'experiment_id', 'tracking_uri'} of RUN/mlflow.json, or None when absent."""
    path = Path(run_dir) / MLFLOW_RUN_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def mlflow_run_to_continue(run_dir: str | os.PathLike, explicit_run_id: str | None, resumed_meta: dict | None
                           ) -> dict | None:
    """The MLflow run a training run logs to, when it is an existing one: `--mlflow-run-id`,
    else MLflow's MLFLOW_RUN_ID, else (resuming) the run recorded in the checkpoint's meta.json or
    in RUN/mlflow.json. None: start a new MLflow run."""
    if explicit_run_id:
        return {"run_id": explicit_run_id}
    if os.environ.get("MLFLOW_RUN_ID"):
        return {"run_id": os.environ["MLFLOW_RUN_ID"]}
    if resumed_meta is not None:
        return resumed_meta.get("mlflow") or read_mlflow_run(run_dir)
    return None


def mlflow_tracking_uri(run_dir: Path, saved_uri: str | None) -> str:
    """MLFLOW_TRACKING_URI (a server, a database, `databricks`: MLflow's own variables, credentials
    included, apply), else the URI the continued run was logged to, else a file store inside the
    run directory (no server)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or saved_uri or (run_dir / "mlruns").resolve().as_uri()


def _flat_params(config: dict) -> dict[str, str]:
    """`section.key` -> value as text (MLflow params are strings of at most a few hundred chars)."""
    return {f"{s}.{k}": str(v)[:250] for s, sec in config.items() if isinstance(sec, dict) for k, v in sec.items()}


class Logger:
    """Writes metrics.jsonl under `run_dir` and prints progress; one instance per run."""

    def __init__(self, run_dir: str | os.PathLike, *, total_steps: int, flops_per_token: float,
                 device: torch.device, log_every: int, tensorboard: bool = False, mlflow: bool = False,
                 config: dict | None = None, window: int = 20, progress_bar: bool | None = None,
                 mlflow_experiment: str | None = None, mlflow_continue: dict | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.total_steps = total_steps
        self.flops_per_token = flops_per_token
        self.device = device
        self.log_every = max(1, log_every)
        self.peak_flops, self.peak_note = device_peak_flops(device)
        self._times: deque[tuple[float, int]] = deque(maxlen=window + 1)  # (clock, tokens so far)
        self._tokens = 0
        self._paused_s = 0.0  # seconds spent in `paused()` blocks: not on the training clock
        self._jsonl = open_appender(self.run_dir / "metrics.jsonl")
        self._tb = None
        self._mlflow = None
        if tensorboard:
            tb = _require("torch.utils.tensorboard", "tensorboard", "tensorboard")
            self._tb = tb.SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        use_bar = sys.stdout.isatty() if progress_bar is None else progress_bar
        self._bar = None
        if use_bar:
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, dynamic_ncols=True, leave=True, file=sys.stdout)
        self.print(f"[deepwish] MFU peak: {self.peak_note}")
        self.mlflow_run: dict | None = None  # {'run_id', 'experiment_id', 'tracking_uri'}: saved with checkpoints
        if mlflow:
            self._start_mlflow(_require("mlflow", "mlflow", "mlflow"), config or {}, mlflow_experiment, mlflow_continue)

    def _start_mlflow(self, mlf, config: dict, experiment: str | None, cont: dict | None) -> None:
        """Open the MLflow run: `cont` (mlflow_run_to_continue) continues an existing run, else a new
        run named `train.mlflow_run_name` (default: the run directory's name) in the experiment of
        mlflow_experiment_args. Params are the flattened resolved config; a continued run gets the
        params it lacks (MLflow params cannot change: a changed value is noted, not logged)."""
        train = config.get("train") or {}
        uri = mlflow_tracking_uri(self.run_dir, (cont or {}).get("tracking_uri"))
        if is_file_store(uri):
            # MLflow 3 refuses file stores unless MLFLOW_ALLOW_FILE_STORE=true (it prefers a
            # database backend); a file store is what was asked for here, by default or by
            # MLFLOW_TRACKING_URI, so opt in unless the variable is already set either way.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlf.set_tracking_uri(uri)
        params = _flat_params(config)
        if cont:
            active = mlf.start_run(run_id=cont["run_id"])  # the run's own experiment
            have = mlf.get_run(cont["run_id"]).data.params
            changed = sorted(k for k in params if k in have and have[k] != params[k])
            if changed:
                self.print(f"[deepwish] note: MLflow params cannot change; the continued run keeps its values of "
                           f"{', '.join(changed)} (the new ones are in this run's config.json artifact)")
            params = {k: v for k, v in params.items() if k not in have}
        else:
            if experiment is None:
                experiment = train.get("mlflow_experiment", "")
            mlf.set_experiment(**mlflow_experiment_args(experiment, train.get("mlflow_experiment_id", "")))
            active = mlf.start_run(run_name=train.get("mlflow_run_name") or self.run_dir.name)
        if params:
            mlf.log_params(params)
        self._mlflow = mlf
        self.mlflow_run = {"run_id": active.info.run_id, "experiment_id": active.info.experiment_id,
                           # a URI chosen by the environment is kept for --resume; the default is re-derived
                           "tracking_uri": uri if os.environ.get("MLFLOW_TRACKING_URI") or (cont or {}).get(
                               "tracking_uri") else None}
        (self.run_dir / MLFLOW_RUN_FILE).write_text(json.dumps(self.mlflow_run, indent=1))
        self.print(f"[deepwish] MLflow: {'continuing' if cont else 'new'} run {active.info.run_id} (experiment "
                   f"{active.info.experiment_id}) at {uri}")

    def artifact(self, path: str | os.PathLike) -> None:
        """Log a file (the resolved config, the plot) as an MLflow artifact of the run."""
        if self._mlflow is not None:
            self._mlflow.log_artifact(str(path))

    # ---- output ----------------------------------------------------------------------
    def print(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def write(self, record: dict[str, Any]) -> None:
        """One JSON line; every record has `kind` and `step`."""
        append_line(self._jsonl, json.dumps(record))
        step = record.get("step", 0)
        batch = {}
        for k, v in record.items():
            if k in ("kind", "step") or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            tag = f"{record['kind']}/{k}"
            if self._tb is not None:
                self._tb.add_scalar(tag, v, step)
            if math.isfinite(v):
                batch[tag.replace("/", "_")] = v
        if self._mlflow is not None and batch:
            self._mlflow.log_metrics(batch, step=step)  # one request per record

    def expert_load(self, step: int, layers: list[int], tokens_per_expert: torch.Tensor) -> None:
        """MoE expert-load histograms, one per layer: the raw counts tokens_per_expert [L, E] and,
        per layer, max/min load relative to the mean and the coefficient of variation (JSONL
        record `moe`, TensorBoard scalars `moe/layer{i}/...` and histograms over expert index)."""
        counts = tokens_per_expert.detach().double().cpu()
        mean = counts.mean(dim=-1).clamp_min(1e-9)
        rec: dict[str, Any] = {"kind": "moe", "step": step, "layers": list(layers),
                               "tokens_per_expert": counts.long().tolist()}
        for layer, c, m in zip(layers, counts, mean):
            rec[f"layer{layer}/max_load"] = float(c.max() / m)
            rec[f"layer{layer}/min_load"] = float(c.min() / m)
            rec[f"layer{layer}/cv"] = float(c.std(unbiased=False) / m)
        self.write(rec)
        if self._tb is not None:
            E = counts.shape[-1]
            idx = torch.arange(E, dtype=torch.float64)
            for layer, c in zip(layers, counts):
                n = float(c.sum())
                self._tb.add_histogram_raw(f"moe/layer{layer}/tokens_per_expert", min=0.0, max=float(E - 1), num=n,
                                           sum=float((idx * c).sum()), sum_squares=float((idx * idx * c).sum()),
                                           bucket_limits=(idx + 0.5).tolist(), bucket_counts=c.tolist(),
                                           global_step=step)

    # ---- per step ----------------------------------------------------------------------
    def _clock(self) -> float:
        """The training clock: wall time less what `paused()` blocks took."""
        return time.perf_counter() - self._paused_s

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (evaluation, checkpoint saves) is kept out of tok/s, MFU and the ETA's
        step time: they report the training steps' rate, whatever the evaluation schedule."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._paused_s += time.perf_counter() - t0

    def start(self, step: int) -> None:
        """Mark the clock at `step` (run start or resume) so tok/s excludes set-up time."""
        self._times.clear()
        self._times.append((self._clock(), self._tokens))
        if self._bar is not None:
            self._bar.n = step
            self._bar.refresh()

    def step(self, step: int, tokens: int, metrics: dict[str, float]) -> dict[str, float] | None:
        """Record a finished optimizer step (1-based `step`); print/write every `log_every`."""
        self._tokens += tokens
        before = self._times[-1][0] if self._times else None
        self._times.append((self._clock(), self._tokens))
        if self._bar is not None:
            self._bar.update(1)
        if step % self.log_every and step != self.total_steps:
            return None
        (t0, n0), (t1, n1) = self._times[0], self._times[-1]
        # this step alone: the window's rate (tok_s) carries a slow early step (a kernel compiled on
        # first use) for `window` steps; a median of step_tok_s over a run does not
        step_s = None if before is None else max(t1 - before, 1e-9)
        step_tok_s = None if step_s is None else tokens / step_s
        steps_in_window = len(self._times) - 1
        dt = max(t1 - t0, 1e-9)
        tok_s = (n1 - n0) / dt
        step_time = dt / max(steps_in_window, 1)
        mfu = model_flops_utilisation(tok_s, self.flops_per_token, self.peak_flops)
        mem = peak_memory_bytes(self.device)
        eta = step_time * (self.total_steps - step)
        rec = {"kind": "train", "step": step, **metrics, "tok_s": tok_s, "mfu": mfu, "step_s": step_s,
               "step_tok_s": step_tok_s,
               "step_mfu": None if step_tok_s is None else model_flops_utilisation(step_tok_s, self.flops_per_token,
                                                                                   self.peak_flops),
               "peak_mem_gib": mem / 2**30, "time": time.time()}
        self.write(rec)
        mfu_s = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
        mem_s = f"{mem / 2**30:.2f}GiB" + ("" if self.device.type == "cuda" else " rss")
        parts = [f"step {step}/{self.total_steps}", f"loss {metrics['loss']:.4f}"]
        if "ce" in metrics and metrics["ce"] != metrics["loss"]:  # the objective has more than CE in it
            parts.append(f"ce {metrics['ce']:.4f}")
        parts += [f"lr {metrics['lr']:.2e}", f"gnorm {metrics['grad_norm']:.3f}"]
        parts += [f"{k} {metrics[k]:.4f}" for k in sorted(metrics) if k.startswith("aux/")]
        if "moe/max_load" in metrics:
            parts.append(f"moe max/min load {metrics['moe/max_load']:.2f}/{metrics['moe/min_load']:.2f}")
        parts += [f"{tok_s:,.0f} tok/s", f"MFU {mfu_s}", f"mem {mem_s}", f"ETA {_fmt_duration(eta)}"]
        line = " | ".join(parts)
        if self._bar is not None:
            self._bar.set_postfix_str(f"ce {metrics['ce']:.4f}" if "ce" in metrics else f"loss {metrics['loss']:.4f}")
        self.print(line)
        return rec

    def eval(self, step: int, metrics: dict[str, float]) -> None:
        self.write({"kind": "val", "step": step, **metrics, "time": time.time()})
        self.print(f"step {step}/{self.total_steps} | " + " | ".join(
            f"{'val ce' if k == 'val_loss' else k} {v:.4f}" for k, v in metrics.items()))

    def close(self, status: str = "FINISHED") -> None:
        """status: the MLflow run's end state, FINISHED | FAILED | KILLED (a stopped, resumable run)."""
        if self._bar is not None:
            self._bar.close()
        os.close(self._jsonl)
        if self._tb is not None:
            self._tb.close()
        if self._mlflow is not None:
            self._mlflow.end_run(status=status)


def open_appender(path: Path) -> int:
    """An O_APPEND descriptor on `path`; a torn last line (no final newline) is ended first, so
    the next record starts on a line of its own."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    size = os.fstat(fd).st_size
    if size:
        with open(path, "rb") as f:
            f.seek(size - 1)
            torn = f.read(1) != b"\n"
        if torn:
            os.write(fd, b"\n")
            print(f"[deepwish] note: {path}: the last line was torn (a kill during a write); ended it, readers "
                  f"skip it", flush=True)
    return fd


def append_line(fd: int, line: str) -> None:
    """Append `line` and a newline with one write(2) (a short write, rare, is completed)."""
    data = (line + "\n").encode()
    while data:
        data = data[os.write(fd, data):]


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The records of RUN/metrics.jsonl; lines torn by a kill are skipped with one note on stderr."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    records, torn = [], []
    for i, line in enumerate(path.read_bytes().split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            rec = None
        if isinstance(rec, dict):
            records.append(rec)
        else:
            torn.append(i)
    if torn:
        print(f"[deepwish] note: {path}: skipped {len(torn)} unreadable line(s) (line "
              f"{', '.join(map(str, torn[:5]))}; torn by a kill during a write?)", file=sys.stderr, flush=True)
    return records
