"""The training loop, top to bottom: `train(run_cfg, resume)`, on one device or under torchrun.

    start_run        device, seed, data (+ vocab check), model (wrapped), optimizer, loss backend,
                     loader, the resumed state (restore_state), logger
    train_steps      (train.compile_warmup: every scheduled shape compiled first, train/warmup.py), then
                     per step: lr <- schedule(step); optimizer_step (grad_accum micro-batches, each
                     out.loss with the step's global normaliser, then backward; non-finite check
                     before anything is updated or saved; clip; update; EMA; router biases);
                     log_step; save_state; THEN evaluate (a save never follows an evaluation in
                     the same step, so a checkpoint never depends on evaluation having run)
    finish_run       final val loss beside the val shard's unigram entropy; then plot, sample

Scale-out (train/parallel.py; the model code never calls torch.distributed): `parallelize` is the
one place the model is compiled, checkpointed, offloaded and wrapped in DDP or FSDP2; each rank
reads its own slice of the global batch; the step's target count is all-reduced before any
backward (and each rank back-propagates world_size × loss, the reducers averaging); logged sums
and MoE loads are summed over ranks; rank 0 alone logs; data-parallel checkpoints are sharded
(train/dist_checkpoint.py, resumable with another number of ranks).

Vocabulary policy: with the embedded corpus (no data paths given) the model's vocab_size is set
to the corpus tokenizer's, with a printed note, so a preset sized for a large tokenizer still
trains on the small one. With user shards nothing is changed: a shard whose ids exceed the
model's vocab_size (or written by another tokenizer than data.tokenizer) is an error.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from deepwish.config import ConfigError, RunConfig, from_dict, load_config, preset_path, to_dict
from deepwish.train import dist_checkpoint, parallel, rundir
from deepwish.train.checkpoint import (list_checkpoints, load_checkpoint, read_meta, resolve_any, save_checkpoint,
                                       set_rng_state, start_branch)
from deepwish.train.log import Logger, mlflow_run_to_continue
from deepwish.train.loss import checked_target_count, eval_objective, lm_loss, resolve_loss_backend
from deepwish.train.nonfinite import raise_nonfinite
from deepwish.train.optim import build_optimizer
from deepwish.train.profile import StepProfiler, phase
from deepwish.train.schedule import accum_at, apply_lr, seq_len_at, split_rows


def warn_if_cpu_oversubscribed(device: torch.device) -> None:
    """A loud note, not a change: on a busy machine OpenMP's spin-waiting makes multi-threaded CPU
    training up to ~10x slower (measured: 2 threads on 2 busy cores, 0.3 -> 3 CPU-s per step)."""
    if device.type != "cpu" or torch.get_num_threads() < 2 or os.environ.get("OMP_WAIT_POLICY"):
        return
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores:
        print(f"[deepwish] note: load average {load:.1f} on {cores} cores with {torch.get_num_threads()} torch "
              f"threads; OpenMP spin-waits will slow training a lot. Set OMP_WAIT_POLICY=PASSIVE or "
              f"OMP_NUM_THREADS=1 in the environment.", flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds CUDA too


def autocast_context(device: torch.device, dtype: str):
    """bf16 autocast on GPU; fp32 on CPU (CPU bf16 matmuls are slow and not what is studied)."""
    if dtype not in ("bf16", "fp32"):
        raise ConfigError(f"train.dtype={dtype!r} is not bf16 or fp32")
    if device.type == "cuda" and dtype == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---- data -------------------------------------------------------------------------------
@dataclasses.dataclass
class DataSetup:
    train_bin: str
    val_bin: str
    tokenizer: object | None  # deepwish.data Tokenizer, or None when none was given


RUN_TOKENIZER = "tokenizer"  # RUN_DIR/tokenizer/: a copy of the run's tokenizer (HF layout)


def prepare_data(run_cfg: RunConfig) -> tuple[RunConfig, DataSetup]:
    """Locate shards and tokenizer; apply the vocabulary policy (module docstring)."""
    from deepwish.data import ensure_default_data
    from deepwish.data.shards import check_compatible, read_header
    from deepwish.data.tokenizer import load_tokenizer

    d = run_cfg.data
    if not d.train_bin:
        if d.val_bin or d.tokenizer:
            raise ConfigError("data.val_bin/data.tokenizer were given without data.train_bin; give all "
                              "paths or none (none = the embedded corpus)")
        train_bin, val_bin, tok = ensure_default_data()
        header = read_header(train_bin)
        if run_cfg.model.vocab_size != header.vocab_size:
            print(f"[deepwish] note: embedded corpus tokenizer has {header.vocab_size} ids; "
                  f"model.vocab_size {run_cfg.model.vocab_size} -> {header.vocab_size}", flush=True)
            run_cfg = dataclasses.replace(run_cfg, model=dataclasses.replace(run_cfg.model,
                                                                             vocab_size=header.vocab_size))
        return run_cfg, DataSetup(str(train_bin), str(val_bin), tok)
    if not d.val_bin:
        raise ConfigError("data.train_bin given without data.val_bin")
    # stored resolved, so that --resume and generate --ckpt work from any working directory
    d = dataclasses.replace(d, **{k: str(Path(getattr(d, k)).resolve()) for k in ("train_bin", "val_bin", "tokenizer")
                                  if getattr(d, k)})
    run_cfg = dataclasses.replace(run_cfg, data=d)
    tok_path = d.tokenizer
    copy = Path(run_cfg.train.out_dir) / RUN_TOKENIZER
    tok_file = Path(tok_path) / "tokenizer.json" if tok_path and Path(tok_path).is_dir() else Path(tok_path)
    if tok_path and not tok_file.is_file() and (copy / "tokenizer.json").is_file():
        print(f"[deepwish] note: {tok_path} is gone; using the run's copy {copy}", flush=True)
        tok_path = str(copy)  # the shards' fingerprint check below still guards against another tokenizer
    tok = load_tokenizer(tok_path) if tok_path else None
    for path in (d.train_bin, d.val_bin):
        if not Path(path).is_file():
            continue  # check_run's data_problems names every missing shard in one error
        header = read_header(path)
        if tok is not None:
            check_compatible(header, run_cfg.model.vocab_size, tok.fingerprint)
        elif header.vocab_size > run_cfg.model.vocab_size:
            raise ConfigError(f"{path}: token ids go up to vocab_size {header.vocab_size} but "
                              f"model.vocab_size is {run_cfg.model.vocab_size}")
    return run_cfg, DataSetup(d.train_bin, d.val_bin, tok)


def to_device(batch, device: torch.device):
    """The batch on `device`, its document ids dropped when every row holds one document.

    Document ids only isolate documents from each other; a row of one document attends exactly as
    plain causal input does, and the plain path is SDPA's flash kernel, faster than any masked
    kernel (reports/attention.md). Long documents make such batches common (the embedded corpus at
    2048 tokens: 61 of 64 rows, 5 of 8 batches). Checked here, on the host copy, so the model never
    waits on the GPU to decide."""
    input_ids, targets, doc_ids, positions = batch
    if doc_ids is not None and not doc_ids.is_cuda and bool((doc_ids == doc_ids[:, :1]).all()):
        doc_ids = None
    pin = device.type == "cuda"
    return tuple(None if t is None else _host_to_device(t, device, pin) for t in (input_ids, targets, doc_ids, positions))


def _host_to_device(t: torch.Tensor, device: torch.device, pin: bool) -> torch.Tensor:
    # A copy from pageable host memory makes the host wait until every kernel already queued has
    # run (the whole previous micro-batch), after which the GPU idles while the host launches the
    # next one. Staged in pinned memory the copy is queued like a kernel and the host stays ahead;
    # the caching host allocator keeps the pinned source until the copy has been done.
    if pin and t.device.type == "cpu" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


# ---- EMA -----------------------------------------------------------------------------------------
class EMA:
    """Exponential moving average of the parameters (fp32 shadow copies), for evaluation. Keyed by
    the parameters' state-dict names (wrapper prefixes dropped), so the averages load into a
    model wrapped otherwise (another activation-checkpointing setting, another format)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {parallel.state_name(n): p.detach().float().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for n, p in model.named_parameters():
            self.shadow[parallel.state_name(n)].lerp_(p.detach().float(), 1.0 - self.decay)

    @staticmethod
    def _reshard(model: torch.nn.Module) -> None:
        """Under FSDP2 a forward can leave some modules unsharded (their parameters plain tensors
        until the next reshard); swap weights only between sharded states, so that the saved and
        the restored parameters are both DTensors of the same shard."""
        try:
            from torch.distributed.fsdp import FSDPModule
        except ImportError:
            return
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module):
        """Temporarily load the averaged weights into `model`."""
        self._reshard(model)
        saved = {n: p.detach().clone() for n, p in model.named_parameters()}
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(self.shadow[parallel.state_name(n)])
        try:
            yield
        finally:
            self._reshard(model)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(saved[n])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.shadow = {n: t.float() for n, t in state["shadow"].items()}


# ---- evaluation -----------------------------------------------------------------------------
def evaluation_forward(model, batch, tc, device, objective):
    """One validation batch through the model (in eval mode, under no_grad: the caller's), as
    `evaluate` runs it and the compile warm-up (train/warmup.py) rehearses it: (the model's
    output, the batch's target count, made and checked on its host copy)."""
    n = checked_target_count(batch[1], model.cfg.vocab_size)
    objective = dataclasses.replace(objective, checked_targets=n)
    input_ids, targets, doc_ids, positions = to_device(batch, device)
    with autocast_context(device, tc.dtype):
        return model(input_ids, positions=positions, doc_ids=doc_ids, targets=targets, objective=objective), n


@torch.no_grad()
def evaluate(model, val_bin: str, run_cfg: RunConfig, device, backend: str, max_batches: int,
             d: parallel.Dist | None = None) -> float:
    """Mean cross-entropy (nats/token) over the first `max_batches` sequential val batches."""
    from deepwish.data import sequential_batches

    tc = run_cfg.train
    objective = eval_objective(tc, backend)
    was_training = model.training
    model.eval()
    # summed on the device, read once at the end (a read per batch drains the GPU's queue each time);
    # the target count is the host's
    ce_sum, n = torch.zeros((), dtype=torch.float64, device=device), 0
    try:
        world, rank = (d.world_size, d.rank) if d is not None else (1, 0)
        # Data-parallel: the same windows as one device with the global batch, split over ranks.
        for batch in sequential_batches(val_bin, tc.seq_len, tc.batch_size, max_batches * world, rank, world):
            out, n_batch = evaluation_forward(model, batch, tc, device, objective)
            ce_sum += out.ce_sum.double()
            n += n_batch
    finally:
        model.train(was_training)
    if d is not None and d.world_size > 1:
        ce, n = (float(t) for t in d.sum(torch.stack([ce_sum, torch.tensor(float(n), dtype=torch.float64,
                                                                          device=device)])))
    else:
        ce = float(ce_sum)
    if n == 0:
        raise ValueError(f"{val_bin}: no (unmasked) validation targets in {max_batches} batches of seq_len={tc.seq_len}")
    return ce / n


# ---- MoE -------------------------------------------------------------------------------------
def moe_metrics(tokens_per_expert: torch.Tensor) -> dict[str, float]:
    """tokens_per_expert [L, E] summed over the step -> max and min expert load relative to the
    mean (1.0 = perfectly balanced), worst over layers."""
    load = tokens_per_expert.float() / tokens_per_expert.float().mean(dim=-1, keepdim=True).clamp_min(1e-9)
    return {"moe/max_load": float(load.max()), "moe/min_load": float(load.min())}


# ---- set-up ------------------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
    """Everything a training run holds, built once by `start_run`."""

    cfg: RunConfig
    run_dir: Path
    d: parallel.Dist
    data: DataSetup
    model: torch.nn.Module  # the unwrapped model: checkpoints, evaluation, router biases, export
    step_model: torch.nn.Module  # what the step calls: the model, or its DDP wrapper
    optimizer: object
    ema: EMA | None
    backend: str  # the loss backend, resolved
    loader: object
    logger: object
    start_step: int = 0
    last_ckpt: str | None = None

    @property
    def device(self) -> torch.device:
        return self.d.device


def resume_problems(saved: dict, run_cfg: RunConfig, world_size: int) -> list[str]:
    """What a resumed run cannot change: the model, and what fixes the data order (the shards,
    seq_len, seed and the global batch). A changed train setting otherwise is a printed note."""
    out = []
    saved_model = saved["config"].get("model", {})
    now = to_dict(run_cfg.model)
    diff = sorted(k for k in set(saved_model) | set(now) if saved_model.get(k) != now.get(k))
    if diff:
        out.append(f"cannot resume from {saved['path']}: model config differs in "
                   + ", ".join(f"{k} ({saved_model.get(k)!r} saved vs {now.get(k)!r} now)" for k in diff))
    st, sd = saved["config"].get("train", {}), saved["config"].get("data", {})
    tc = run_cfg.train
    moved = [f"data.{k} ({sd.get(k)!r} saved vs {getattr(run_cfg.data, k)!r} now)" for k in ("train_bin", "val_bin")
             if not _same_path(sd.get(k, ""), getattr(run_cfg.data, k))]
    moved += [f"train.{k} ({st.get(k)!r} saved vs {getattr(tc, k)!r} now)" for k in ("seq_len", "seed")
              if k in st and st[k] != getattr(tc, k)]
    if moved:
        out.append(f"--resume continues the same data in the same order, but {', '.join(moved)} changed; to train "
                   f"these weights on other data or settings start a new run with --init-from {saved['path']}")
    saved_global = st.get("batch_size", tc.batch_size) * saved.get("world_size", 1)
    if saved_global != tc.batch_size * world_size:
        out.append(f"train.batch_size={tc.batch_size}: the checkpoint's global batch is {saved_global} sequences per "
                   f"step ({saved.get('world_size', 1)} ranks x {st.get('batch_size')}), this run's "
                   f"{tc.batch_size * world_size} ({world_size} x {tc.batch_size}); keep the global batch on resume")
    tdiff = sorted(k for k, v in to_dict(tc).items() if st.get(k) != v and k not in ("out_dir",))
    if tdiff and not out:
        print(f"[deepwish] note: resuming with changed train settings: {', '.join(tdiff)}", flush=True)
    if "steps" in st and st["steps"] != tc.steps and not out:
        print(f"[deepwish] note: train.steps {st['steps']} -> {tc.steps} re-plans the learning-rate schedule for the "
              f"remaining steps (the schedule's horizon is train.steps); train.extend_steps keeps the schedule and "
              f"continues at its final rate", flush=True)
    return out


@contextlib.contextmanager
def _resume_errors(path):
    """A checkpoint whose data position does not fit this run's data is one clear error."""
    try:
        yield
    except ValueError as e:
        if "loader state" not in str(e) and "global batch" not in str(e):
            raise
        raise ConfigError(f"cannot resume from {path}: {e}; to train these weights on other data start a new run "
                          f"with --init-from {path}") from None


def _same_path(a: str, b: str) -> bool:
    """Whether two data paths name the same file ("" = the embedded corpus: equal only to "")."""
    if not a and not b:
        return True
    if not a or not b:
        return False
    return Path(a).resolve() == Path(b).resolve()


def check_run(run_cfg: RunConfig, ckpt: dict | None, init_from: str | None = None) -> tuple[RunConfig, DataSetup]:
    """Validate the resolved configuration, then the data against it (and, resuming, against
    the checkpoint): every problem found is listed in one ConfigError. Returns the config with
    the vocabulary policy applied and data paths made absolute, and the located data."""
    from deepwish.config import config_problems, raise_problems
    from deepwish.data.validate import data_problems

    problems = config_problems(run_cfg)
    tc = run_cfg.train
    world = int(os.environ.get("WORLD_SIZE", "1")) if tc.parallel != "none" else 1
    data = None
    if not any(p.startswith("data.") for p in problems):
        run_cfg, data = prepare_data(run_cfg)
        if tc.seq_len >= 2 and tc.batch_size >= 1:
            problems += data_problems(data.train_bin, data.val_bin, run_cfg.model.vocab_size, tc.seq_len,
                                      tc.batch_size, world)
    if ckpt is not None:
        problems += resume_problems(ckpt, run_cfg, world)
    if init_from is not None:
        from deepwish.train.init_from import init_problems
        problems += init_problems(init_from, run_cfg.model)
    raise_problems(problems)
    return run_cfg, data


def open_run_dir(run_cfg: RunConfig, resume: bool | str) -> tuple[RunConfig, Path, dict | None]:
    """The run directory (train.out_dir, or the one being resumed) and, when resuming, the
    metadata of the checkpoint to continue from. A fresh run refuses a directory with checkpoints."""
    run_dir = Path(resume if isinstance(resume, (str, Path)) and not isinstance(resume, bool)
                   else run_cfg.train.out_dir)
    meta = None
    if resume:
        meta = read_meta(run_dir)  # either format; tensors are loaded after the model is built
        if meta["path"].parent.parent != run_dir and (run_dir / "meta.json").exists():
            run_dir = meta["path"].parent.parent  # a checkpoint directory was given
    elif list_checkpoints(run_dir):
        raise ConfigError(f"{run_dir} already holds checkpoints; resume it (--resume {run_dir}) or choose "
                          f"another train.out_dir / --out")
    run_cfg = dataclasses.replace(run_cfg, train=dataclasses.replace(run_cfg.train, out_dir=str(run_dir)))
    return run_cfg, run_dir, meta


def restore_state(run: Run, meta: dict) -> None:
    """Model, optimizer, loader position, EMA, RNG states and step from checkpoint `meta`."""
    d = run.d
    if d.main:  # resuming an older step: newer checkpoints move aside, never lost
        start_branch(run.run_dir, meta["path"])
    if d.active or meta["format"] == "dcp":  # sharded state, or resharding
        with _resume_errors(meta["path"]):
            run.start_step = dist_checkpoint.restore(meta["path"], model=run.model, optimizer=run.optimizer,
                                                     loader=run.loader, ema=run.ema)
    else:
        ckpt = load_checkpoint(meta["path"])
        run.model.load_state_dict(ckpt["model"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
        with _resume_errors(meta["path"]):
            run.loader.load_state_dict(ckpt["loader"])
        if run.ema is not None:
            if ckpt["ema"] is None:
                raise ConfigError(f"{ckpt['path']}: train.ema_decay>0 but the checkpoint has no EMA")
            run.ema.load_state_dict(ckpt["ema"])
        set_rng_state(ckpt["rng"])
        run.start_step = ckpt["step"]
    run.last_ckpt = str(meta["path"])
    if d.main:
        ranks = f" ({d.world_size} ranks)" if d.active else ""
        print(f"[deepwish] resumed from {meta['path']} at step {run.start_step}{ranks}", flush=True)
        tc = run.cfg.train
        if run.start_step >= total_steps(tc):  # extend_steps counts from train.steps, not from the checkpoint
            print(f"[deepwish] nothing to train: the run is at step {run.start_step} and takes {total_steps(tc)} "
                  f"(train.steps {tc.steps} + train.extend_steps {tc.extend_steps}); raise train.extend_steps "
                  f"to go further", flush=True)


def start_run(run_cfg: RunConfig, resume: bool | str, progress_bar: bool | None, init_from: str | None = None,
              init_ema: bool = False, mlflow_run_id: str | None = None) -> Run:
    """Set-up: run directory, device, seed, data, model (wrapped), optimizer, EMA, loss backend,
    loader, the resumed state, logger."""
    from deepwish.data import Lookahead, PackedLoader
    from deepwish.model import Transformer

    if resume and init_from:
        raise ConfigError("--resume continues a run, --init-from starts a new one from weights: give one of them")
    if mlflow_run_id and not run_cfg.train.mlflow:
        raise ConfigError(f"--mlflow-run-id {mlflow_run_id} needs train.mlflow=true")
    run_cfg, run_dir, meta = open_run_dir(run_cfg, resume)
    run_cfg, data = check_run(run_cfg, meta, init_from)  # the configuration and the data, before anything runs
    tc = run_cfg.train
    d = parallel.init_distributed(tc)  # no process group for parallel=none
    warn_if_cpu_oversubscribed(d.device)
    seed_everything(tc.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(to_dict(run_cfg), indent=1))
    if data.tokenizer is not None and d.main:  # the run directory is self-contained for generate/convert
        data.tokenizer.save(run_dir / RUN_TOKENIZER)

    model = Transformer(run_cfg.model).to(d.device)
    if init_from is not None:  # weights only, before any wrapping; everything else starts fresh
        from deepwish.train.init_from import load_init
        fresh = load_init(model, init_from, ema=init_ema)
        if d.main:
            print(f"[deepwish] initialised from the {'EMA ' if init_ema else ''}weights of {init_from}", flush=True)
            if fresh:  # dense attention -> NSA: the new parameters start from the model's own initialisation
                kinds = sorted({n.partition(".mixer.")[2] for n in fresh})
                layers = len({n.partition(".mixer.")[0] for n in fresh})
                print(f"[deepwish] newly initialised in {layers} NSA layer(s) (not in the weights): "
                      f"{', '.join(kinds)}", flush=True)
    step_model = parallel.parallelize(model, run_cfg, d)
    optimizer = build_optimizer(model, tc, distributed=d.active)
    run = Run(cfg=run_cfg, run_dir=run_dir, d=d, data=data, model=model, step_model=step_model,
              optimizer=optimizer, ema=EMA(model, tc.ema_decay) if tc.ema_decay > 0 else None,
              backend=resolve_loss_backend(tc.loss_backend, d.device),
              loader=Lookahead(PackedLoader(data.train_bin, tc.seq_len, tc.batch_size, rank=d.rank,
                                            world_size=d.world_size, seed=tc.seed)), logger=None)
    if meta is not None:
        restore_state(run, meta)
    run.logger = parallel.NullLogger() if not d.main else Logger(
        run_dir, total_steps=total_steps(tc), flops_per_token=model.flops_per_token(tc.seq_len), device=d.device,
        log_every=tc.log_every, tensorboard=tc.tensorboard, mlflow=tc.mlflow, config=to_dict(run_cfg),
        progress_bar=progress_bar, mlflow_continue=mlflow_run_to_continue(run_dir, mlflow_run_id, meta))
    run.logger.artifact(run_dir / "config.json")  # the resolved config (MLflow)
    run.logger.print(f"[deepwish] run {run_dir} | {model.num_params() / 1e6:.2f}M params | device {d.device} | "
                     f"{tc.optimizer} | {tokens_per_step(run)} tokens/step | loss backend {run.backend}")
    return run


def total_steps(tc) -> int:
    """Steps the run takes: the schedule's horizon train.steps, then train.extend_steps at its final rate."""
    return tc.steps + tc.extend_steps


def tokens_per_step(run: Run, step: int = 0) -> int:
    tc = run.cfg.train
    return tc.batch_size * tc.seq_len * accum_at(step, tc) * run.d.world_size


# ---- one optimizer step ----------------------------------------------------------------------------
@dataclasses.dataclass
class StepResult:
    loss: float  # the objective (CE + weighted auxiliary losses), summed over ranks
    ce: float  # mean cross-entropy of the step's targets
    grad_norm: float
    n_targets: int
    z: float
    aux: dict  # 'aux/<name>' -> float, weighted as added to the loss
    loads: dict  # layer -> tokens per expert [E] summed over micro-batches and ranks
    stop: int | None = None  # under a process group: the stop signal requested on any rank, read with the step


def forward_backward(run: Run, micro: list, step: int, n_global: int, counts: list[int] | None = None) -> tuple:
    """Every micro-batch of the step through the model, backward each; the step's summed CE,
    z-loss, weighted auxiliary losses and expert loads (this rank). counts: each micro-batch's
    `checked_target_count` when the caller has them (None: made here)."""
    tc, device = run.cfg.train, run.device
    ce = torch.zeros((), device=device)
    z = torch.zeros((), device=device)
    aux: dict[str, torch.Tensor] = {}
    loads: dict[int, torch.Tensor] = {}
    for i, b in enumerate(micro):
        # the micro-batch's targets checked and counted on its host copy: the loss reads nothing back
        checked = counts[i] if counts is not None else checked_target_count(b[1], run.cfg.model.vocab_size)
        b = to_device(b, device)
        with parallel.grad_sync(run.step_model, last=i == len(micro) - 1):  # DDP: reduce once per step
            with autocast_context(device, tc.dtype):
                loss, m = lm_loss(run.step_model, b, tc, n_global, backend=run.backend, step=step,
                                  checked_targets=checked)
            (loss * run.d.grad_scale).backward()  # DDP/FSDP2 average over ranks (train/parallel.py)
        ce += m["ce_sum"]
        z += m["z_sum"]
        for k, v in m.items():
            if k.startswith("aux/"):
                aux[k] = aux.get(k, 0.0) + v
        for layer, load in m.get("moe/loads", {}).items():
            loads[layer] = loads[layer] + load if layer in loads else load
    return ce, z, aux, loads


def optimizer_step(run: Run, step: int, micro: list, meanwhile=None) -> StepResult:
    """One optimizer step: forward/backward of every micro-batch, non-finite check (before
    anything is updated or saved), clipping, update, EMA, router-bias step. `meanwhile()`: host
    work run after the step's GPU work is queued and before the host waits for it (the loop
    draws the next step's batches there)."""
    tc = run.cfg.train
    with phase("data"):
        counts = [checked_target_count(b[1], run.cfg.model.vocab_size) for b in micro]
        n_counted = run.d.sum_int(sum(counts))  # over micro-batches and ranks
    # Loss-masked data (SFT) can, rarely, give a step no target at all: its cross-entropy is then
    # an empty sum with zero gradient, and dividing it by 1 keeps it so.
    n_global = max(n_counted, 1)
    with phase("forward_backward"):
        ce, z, aux, loads = forward_backward(run, micro, step, n_global, counts)
    with phase("clip"):
        ce, z, aux, loads = parallel.sum_step_metrics(run.d, ce, z, aux, loads)
        loss = (ce + z) / n_global + sum(aux.values(), torch.zeros((), device=run.device))
        clip = tc.grad_clip if tc.grad_clip > 0 else float("inf")
        # clipped in place, or inside the update (fused AdamW, Muon: take_grad_scale); nothing updated yet
        norm = parallel.clip_grad_norm(run.model.parameters(), clip, run.optimizer)
    # One host synchronisation a step: the loss and gradient norm (the non-finite check needs them
    # before the update) and the logged sums are read together, so the GPU's queue drains once.
    keys = sorted(aux)
    stop = rundir.stop_request_tensor(run.d)  # the ranks' stop requests, read in the same synchronisation
    if meanwhile is not None:
        with phase("data"):
            meanwhile()
    with phase("read"):
        scalars = torch.stack([torch.as_tensor(t, device=run.device).float().reshape(())
                               for t in (loss, norm, ce, z, *(aux[k] for k in keys),
                                         *([] if stop is None else [stop]))]).tolist()
    loss_value, grad_norm, ce_sum, z_sum = scalars[:4]
    aux_values = dict(zip(keys, scalars[4:4 + len(keys)]))
    stop_signal = None if stop is None else int(scalars[-1])
    if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
        what = f"loss ({loss_value})" if not math.isfinite(loss_value) else f"gradient norm ({grad_norm})"

        def rerun():
            total = None
            for b in micro:
                with autocast_context(run.device, tc.dtype):
                    l, _ = lm_loss(run.step_model, to_device(b, run.device), tc, n_global, backend=run.backend,
                                   step=step)
                total = l if total is None else total + l
            return total
        raise_nonfinite(run.model, rerun, step + 1, what, run.last_ckpt)
    with phase("optimizer"):
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        if run.ema is not None:
            run.ema.update(run.model)
        rate = run.cfg.model.bias_update_rate if run.cfg.model.router in ("sigmoid", "centroid") else 0.0
        if rate > 0 and loads:
            run.model.update_router_bias(loads, rate)
    return StepResult(loss=loss_value, ce=ce_sum / n_global, grad_norm=grad_norm, n_targets=n_counted,
                      z=z_sum / n_global, aux=aux_values, loads=loads, stop=stop_signal)


def log_step(run: Run, done: int, lr_f: float, r: StepResult) -> None:
    tc = run.cfg.train
    metrics = {"loss": r.loss, "ce": r.ce, "lr": lr_f * tc.lr, "lr_factor": lr_f, "grad_norm": r.grad_norm,
               "n_targets": r.n_targets, **r.aux}
    if tc.z_loss:
        metrics["z_loss"] = r.z
    layers = sorted(r.loads)
    tpe = torch.stack([r.loads[k] for k in layers]) if layers else None
    if tpe is not None:
        metrics.update(moe_metrics(tpe))
    rec = run.logger.step(done, tokens_per_step(run, done - 1), metrics)
    if rec is not None and tpe is not None:
        run.logger.expert_load(done, layers, tpe)  # per-layer histograms (JSONL, TensorBoard)


def save_state(run: Run, done: int) -> str:
    """A checkpoint of everything the run needs to continue exactly (sharded under data parallelism)."""
    tc = run.cfg.train
    # the MLflow run, so that --resume from this checkpoint continues it (rank 0 writes meta.json)
    meta_extra = {"mlflow": run.logger.mlflow_run} if run.logger.mlflow_run else None
    if run.d.active:  # collective, sharded (torch.distributed.checkpoint)
        return str(dist_checkpoint.save(run.run_dir, done, model=run.model, optimizer=run.optimizer,
                                        loader=run.loader, ema=run.ema, config=to_dict(run.cfg),
                                        keep_last=tc.keep_checkpoints, meta_extra=meta_extra))
    return str(save_checkpoint(run.run_dir, done, model_state=run.model.state_dict(),
                               optimizer_state=run.optimizer.state_dict(), loader_state=run.loader.state_dict(),
                               ema_state=run.ema.state_dict() if run.ema else None, config=to_dict(run.cfg),
                               keep_last=tc.keep_checkpoints, meta_extra=meta_extra))


def validation_loss(run: Run) -> float:
    tc = run.cfg.train
    with (run.ema.applied(run.model) if run.ema else contextlib.nullcontext()):
        return evaluate(run.model, run.data.val_bin, run.cfg, run.device, run.backend, tc.eval_batches, run.d)


# ---- the loop --------------------------------------------------------------------------------
def train_steps(run: Run) -> tuple[dict[int, float], dict[int, float]]:
    """The loop: lr <- schedule(step); one optimizer step; log; save; THEN evaluate (a save never
    follows an evaluation in the same step, so a checkpoint never depends on evaluation having
    run). Returns the train and validation losses by step."""
    tc = run.cfg.train
    train_losses: dict[int, float] = {}
    val_losses: dict[int, float] = {}
    run.step_model.train()
    if tc.compile_warmup:  # compilation of every scheduled shape, before the clock starts (train/warmup.py)
        from deepwish.train.warmup import warm_up
        warm_up(run, forward_backward, total_steps(tc),
                evaluation=lambda batch: evaluation_forward(run.model, batch, tc, run.device,
                                                            eval_objective(tc, run.backend)))
    run.logger.start(run.start_step)
    collector = HostGarbage(tc.gc_every)
    profiler = StepProfiler(tc.profile_start, tc.profile_steps, run.run_dir / "profile" / (
        f"rank{run.d.rank}" if run.d.world_size > 1 else ""), run.device, run.logger)
    try:
        for step in range(run.start_step, total_steps(tc)):
            done = step + 1
            profiler.before(step)
            with phase("data"):
                lr_f = apply_lr(run.optimizer, step, tc)
                length = seq_len_at(step, tc)  # scheduled shapes (train/schedule.py): pure functions of the step
                micro = run.loader.take(accum_at(step, tc))  # drawn while the GPU ran the step before
            # the next step's batches are read from the shard while the GPU runs this one (the
            # loader's checkpointed position stays before them: data/loader.py Lookahead)
            ahead = (lambda: run.loader.ahead(accum_at(done, tc))) if done < total_steps(tc) else None
            result = optimizer_step(run, step, micro if length == tc.seq_len else [split_rows(b, length) for b in micro],
                                    meanwhile=ahead)
            train_losses[done] = result.loss
            with phase("log"):
                log_step(run, done, lr_f, result)
            saved = done % tc.save_every == 0 or done == total_steps(tc)
            if saved:
                with run.logger.paused(), phase("save"):  # saves and evaluations are not in the logged tok/s
                    run.last_ckpt = save_state(run, done)
            if (signum := rundir.stop_requested(run.d, result.stop)) is not None:  # SIGINT/SIGTERM: this step is done
                raise rundir.stopped(signum, done, run.last_ckpt if saved else save_state(run, done), run.run_dir)
            if done % tc.eval_every == 0 or done == total_steps(tc):  # after the save, never before it
                with run.logger.paused(), phase("evaluate"):
                    val_losses[done] = validation_loss(run)
                run.logger.eval(done, {"val_loss": val_losses[done]})
            with phase("gc"):
                collector.after(done)
            profiler.after(step)
    finally:
        profiler.close()
        collector.close()
    return train_losses, val_losses


class HostGarbage:
    """Python's garbage collection on the loop's schedule (train.gc_every; 0: untouched): what is
    alive when the loop starts is frozen (gc.freeze: later collections skip it), automatic
    collection is off, and a full collection runs every `every` steps, so the host never stops for
    a collection of the whole heap inside a step's launches. `close` restores the collector."""

    def __init__(self, every: int):
        self.every = every
        self.was_enabled = gc.isenabled()
        if every > 0:
            gc.collect()
            gc.freeze()
            gc.disable()

    def after(self, done: int) -> None:
        if self.every > 0 and done % self.every == 0:
            gc.collect()

    def close(self) -> None:
        if self.every > 0:
            gc.unfreeze()
            if self.was_enabled:
                gc.enable()


def finish_run(run: Run, train_losses: dict, val_losses: dict, train_seconds: float) -> dict:
    """The summary: final validation loss beside the val shard's unigram entropy."""
    from deepwish.data import unigram_entropy

    tc = run.cfg.train
    summary = {"run_dir": str(run.run_dir), "steps": total_steps(tc), "start_step": run.start_step,
               "train_losses": train_losses, "val_losses": val_losses,
               "final_train_loss": train_losses.get(total_steps(tc)), "checkpoint": run.last_ckpt,
               "train_seconds": train_seconds, "device": str(run.device), "loss_backend": run.backend,
               "num_params": run.model.num_params(), "vocab_size": run.cfg.model.vocab_size}
    # resumed at the last step: nothing ran, evaluate now
    summary["final_val_loss"] = val_losses[max(val_losses)] if val_losses else validation_loss(run)
    summary["unigram_entropy"] = float(unigram_entropy(run.data.val_bin))
    run.logger.write({"kind": "final", "step": total_steps(tc), "val_loss": summary["final_val_loss"],
                      "unigram_entropy": summary["unigram_entropy"]})
    run.logger.print(f"[deepwish] final val loss {summary['final_val_loss']:.4f} nats/token | unigram entropy of "
                     f"the val shard {summary['unigram_entropy']:.4f} nats/token")
    return summary


def train(run_cfg: RunConfig, resume: bool | str = False, *, progress_bar: bool | None = None,
          init_from: str | None = None, init_ema: bool = False, mlflow_run_id: str | None = None) -> dict:
    """Train per `run_cfg`; returns a summary dict (`finish_run`, plus 'plot' and 'sample').

    resume: False = fresh run in train.out_dir (which must hold no checkpoint); True = continue
    from the latest checkpoint in train.out_dir; a path = continue from that run directory (or
    checkpoint directory), writing into that run directory.
    init_from: a fresh run whose model starts from these weights (train/init_from.py; init_ema: the
    source's EMA weights); optimizer, schedule and data position start fresh.
    mlflow_run_id: log to this existing MLflow run (train.mlflow=true); resuming without it
    continues the run recorded in the checkpoint (train/log.py `mlflow_run_to_continue`).

    The run directory is locked for the call, and SIGINT/SIGTERM stop it after the current step
    with a save (train/rundir.py: `RunDirError`, `Stopped`).
    """
    with rundir.exclusive(rundir.run_dir_of(run_cfg.train.out_dir, resume), resume), rundir.stop_on_signals():
        return _train(run_cfg, resume, progress_bar, init_from, init_ema, mlflow_run_id)


def _train(run_cfg: RunConfig, resume: bool | str, progress_bar: bool | None, init_from: str | None = None,
           init_ema: bool = False, mlflow_run_id: str | None = None) -> dict:
    from deepwish.train.plot import plot_run

    run = start_run(run_cfg, resume, progress_bar, init_from, init_ema, mlflow_run_id)
    status = "FAILED"
    try:
        t0 = time.perf_counter()
        train_losses, val_losses = train_steps(run)
        summary = finish_run(run, train_losses, val_losses, time.perf_counter() - t0)
        summary["plot"] = str(plot_run(run.run_dir)) if run.d.main else None  # rank 0 alone writes metrics.jsonl
        if run.d.main:
            print(f"[deepwish] plot: {summary['plot']}", flush=True)
            run.logger.artifact(summary["plot"])
        status = "FINISHED"
    except rundir.Stopped:
        status = "KILLED"  # stopped by a signal after a save: --resume continues the same MLflow run
        raise
    finally:
        run.logger.close(status)
    summary["sample"] = sample_text(run.model, run.data.tokenizer, run.cfg.train, run.device)
    if summary["sample"] is not None and run.d.main:
        print(f"[deepwish] sample:\n{summary['sample']}", flush=True)
    return summary


def sample_text(model, tokenizer, tc, device) -> str | None:
    """A short sample from the trained model (top-k sampling), or None without a tokenizer."""
    if tokenizer is None or tc.sample_tokens <= 0:
        if tc.sample_tokens > 0:
            print("[deepwish] no sample: no tokenizer was given (data.tokenizer)", flush=True)
        return None
    from deepwish.generate import generate

    prompt = tokenizer.encode(tc.sample_prompt)
    if not prompt:
        raise ConfigError(f"train.sample_prompt={tc.sample_prompt!r} encodes to no tokens")
    model.eval()
    # Eager, not through the training step's compiled blocks: a few dozen decode steps cost less than
    # compiling the prefill's and the decode step's shapes at the end of every run, and the decode
    # path's host-side checks stay out of dynamo (torch 2.11's failed there on a symbolic stride).
    with autocast_context(device, tc.dtype), torch.compiler.set_stance("force_eager"):
        new = generate(model, [prompt], max_new_tokens=tc.sample_tokens, temperature=0.8, top_k=50,
                       seed=tc.seed)
    return tokenizer.decode(prompt + new[0])


# ---- CLI -------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `deepwish train`."""
    parser.add_argument("--preset", default=None, help="preset name (deepwish/configs/NAME.yaml) or YAML path")
    parser.add_argument("--config", default=None,
                        help="YAML file applied on top of the preset (same model/train/data sections)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one field, e.g. --set train.steps=100 (repeatable, applied last)")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN_DIR",
                        help="continue from the latest checkpoint of RUN_DIR (default: train.out_dir); "
                             "without --preset/--config the run's saved config is used")
    parser.add_argument("--init-from", default=None, metavar="RUN_OR_CHECKPOINT_OR_HF_DIR",
                        help="start a new run from these weights (fresh optimizer, schedule and data position); "
                             "without --preset/--config the source's model (and a deepwish run's settings) is used")
    parser.add_argument("--init-ema", action="store_true", help="with --init-from: start from the source's EMA weights")
    parser.add_argument("--out", default=None, help="run directory (sets train.out_dir)")
    parser.add_argument("--parallel", default=None, choices=("none", "ddp", "fsdp"),
                        help="data parallelism under torchrun (sets train.parallel; --set still applies after)")
    parser.add_argument("--debug", action="store_true",
                        help="first check of a new preset: 20 steps on synthetic tokens (data/synthetic.py; no "
                             "data or tokenizer needed) in runs/debug/PRESET (one process: replacing the previous "
                             "check there) unless --out; --set still applies")
    parser.add_argument("--precision", default=None, choices=("fp32", "bf16"),
                        help="compute precision: the alias of --set train.dtype (bf16 autocast on GPU; fp32 on CPU)")
    parser.add_argument("--mlflow-run-id", default=None, metavar="RUN_ID",
                        help="log to this existing MLflow run (sets train.mlflow=true); --resume continues the "
                             "run recorded in the checkpoint without it")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """preset (or the saved config of the run being resumed) <- --config file <- --out <- --set,
    layered by `config.load_config`."""
    overrides = (debug_overrides(args) if getattr(args, "debug", False) else []) + (
        [f"train.out_dir={args.out}"] if args.out else []) + (
        [f"train.parallel={args.parallel}"] if getattr(args, "parallel", None) else []) + (
        ["train.mlflow=true"] if getattr(args, "mlflow_run_id", None) else []) + (
        [f"train.dtype={args.precision}"] if getattr(args, "precision", None) else []) + list(args.overrides)
    init_from = getattr(args, "init_from", None)
    if args.preset is None and args.config is None and init_from and not args.resume:
        from deepwish.train.init_from import is_hf_dir, source_config
        if is_hf_dir(init_from):
            base = from_dict({"model": to_dict(source_config(init_from))}, f"{init_from}/config.json")
        else:
            meta = resolve_any(init_from) / "meta.json"
            base = from_dict(json.loads(meta.read_text())["config"], f"{meta} (saved config)")
        return load_config(None, overrides, base=base)
    if args.preset is None and args.config is None:
        if not args.resume:
            raise ConfigError("deepwish train needs --preset NAME or --config FILE (or --resume RUN_DIR, or "
                              "--init-from SRC)")
        run_dir = args.resume if isinstance(args.resume, str) else (args.out or RunConfig().train.out_dir)
        meta = resolve_any(run_dir) / "meta.json"  # single-device or sharded (DCP) checkpoint
        saved = from_dict(json.loads(meta.read_text())["config"], f"{meta} (saved config)")
        return load_config(None, overrides, base=saved)
    if args.preset is None:
        from deepwish.config import require_model_shape
        require_model_shape(preset_path(args.config))
    files = [args.config] if args.preset is not None and args.config is not None else []
    return load_config(args.preset or args.config, overrides, files=files)


DEBUG_SETTINGS = ("train.steps=20", "train.eval_every=10", "train.eval_batches=2", "train.save_every=20",
                  "train.log_every=5", "train.warmup_steps=2", "train.sample_tokens=0")


def debug_overrides(args: argparse.Namespace) -> list[str]:
    if args.resume or getattr(args, "init_from", None):
        raise ConfigError("--debug starts a fresh run on synthetic tokens; it does not combine with --resume or "
                          "--init-from")
    return [*DEBUG_SETTINGS, f"train.out_dir={debug_dir(args)}"]


def debug_dir(args: argparse.Namespace) -> str:
    """--debug's own run directory, where --out does not name one."""
    return f"runs/debug/{Path(args.preset or args.config or 'run').stem}"


def replace_debug_run(run_dir: Path) -> None:
    """Empty --debug's own directory of a previous check (its synthetic shards mark it), so the
    check runs again after each edit of the preset. Only there (the caller's test): a directory
    named by --out or train.out_dir keeps the usual refusal, as does a debug run still training
    in it (its lock; two --debug runs of one preset started together can still race between this
    lock and the run's own), and so does one process of several under torchrun."""
    import shutil
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or not (run_dir / "synthetic").is_dir():
        return  # under torchrun every rank would race to delete: the refusal stands
    with rundir.RunLock(run_dir):
        for child in run_dir.iterdir():
            if child.name == rundir.LOCK_FILE:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    print(f"[deepwish] --debug: replaced the previous check in {run_dir}", flush=True)


def with_synthetic_data(cfg: RunConfig) -> RunConfig:
    """--debug: point data.* at synthetic shards (written under the run directory) sized for the run."""
    from deepwish.config import DataConfig
    from deepwish.data.synthetic import write_synthetic_shards
    if cfg.data.train_bin or cfg.data.tokenizer:
        raise ConfigError("--debug trains on synthetic tokens; drop the data.* settings (or drop --debug)")
    tc = cfg.train
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_step = world * tc.batch_size * max(1, getattr(tc, "grad_accum", 1))
    train_bin, val_bin = write_synthetic_shards(Path(tc.out_dir) / "synthetic", cfg.model.vocab_size, tc.seq_len,
                                                train_windows=per_step * min(tc.steps, 64),
                                                val_windows=world * tc.batch_size * max(1, tc.eval_batches),
                                                seed=tc.seed)
    print(f"[deepwish] --debug: synthetic tokens (vocab {cfg.model.vocab_size}) in {train_bin.parent}; the loss "
          f"should fall below ln(vocab) = {math.log(cfg.model.vocab_size):.2f}", flush=True)
    return dataclasses.replace(cfg, data=DataConfig(train_bin=str(train_bin), val_bin=str(val_bin)))


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if getattr(args, "debug", False):
        if not args.out and not any(o.startswith("train.out_dir=") for o in args.overrides):
            replace_debug_run(Path(cfg.train.out_dir))  # --debug's own directory, nothing the user named
        cfg = with_synthetic_data(cfg)
    resume = args.resume
    if resume is True and args.out:
        resume = args.out
    with parallel.process_group_until_done():
        summary = train(cfg, resume=resume, init_from=getattr(args, "init_from", None),
                        init_ema=getattr(args, "init_ema", False), mlflow_run_id=getattr(args, "mlflow_run_id", None))
    print(f"[deepwish] done: {summary['run_dir']}", flush=True)
    return 0
