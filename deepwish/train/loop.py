"""The training loop, top to bottom: `train(run_cfg, resume)`, on one device or under torchrun.

    set-up:  device, seed, data (+ vocab check), model, optimizer, loss backend, logger
    resume:  model, optimizer, loader position, EMA, RNG states, step from the latest checkpoint
    loop:    lr <- schedule(step); grad_accum micro-batches, each loss / N_global then backward;
             non-finite check (before anything is updated or saved); clip; step; EMA; log;
             save checkpoint; THEN evaluate (a save never follows an evaluation in the same step,
             so a checkpoint never depends on evaluation having run)
    end:     final val loss beside the val shard's unigram entropy, plot, sample

Scale-out (train/parallel.py; the model code never calls torch.distributed): `wrap_model` is the
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
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from deepwish.config import ConfigError, RunConfig, from_dict, load_config, to_dict
from deepwish.train import dist_checkpoint, parallel, rundir
from deepwish.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint, set_rng_state, start_branch
from deepwish.train.log import Logger
from deepwish.train.loss import IGNORE_INDEX, count_targets, lm_loss, resolve_loss_backend
from deepwish.train.nonfinite import raise_nonfinite
from deepwish.train.optim import build_optimizer
from deepwish.train.schedule import apply_lr


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available here")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise ConfigError(f"train.device={name!r} is not auto, cpu or cuda[:N]")
    return torch.device(name)


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
    tok = load_tokenizer(d.tokenizer) if d.tokenizer else None
    for path in (d.train_bin, d.val_bin):
        header = read_header(path)
        if tok is not None:
            check_compatible(header, run_cfg.model.vocab_size, tok.fingerprint)
        elif header.vocab_size > run_cfg.model.vocab_size:
            raise ConfigError(f"{path}: token ids go up to vocab_size {header.vocab_size} but "
                              f"model.vocab_size is {run_cfg.model.vocab_size}")
    return run_cfg, DataSetup(d.train_bin, d.val_bin, tok)


def to_device(batch, device: torch.device):
    return tuple(None if t is None else t.to(device, non_blocking=True) for t in batch)


# ---- model wrapping, EMA ---------------------------------------------------------------------
def wrap_model(model: torch.nn.Module, run_cfg: RunConfig, d: parallel.Dist):
    """The one place where the model is wrapped: per-block torch.compile (compile=auto: on for
    CUDA), activation checkpointing / offload, and DDP or FSDP2, all applied by train/parallel.py.

    Returns what the step calls; checkpoints, evaluation and export use `model` itself (compile
    and FSDP2 modify it in place and keep its parameter names).
    """
    return parallel.parallelize(model, run_cfg, d)


class EMA:
    """Exponential moving average of the parameters (fp32 shadow copies), for evaluation."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for n, p in model.named_parameters():
            self.shadow[n].lerp_(p.detach().float(), 1.0 - self.decay)

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
                p.copy_(self.shadow[n])
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
@torch.no_grad()
def evaluate(model, val_bin: str, run_cfg: RunConfig, device, backend: str, max_batches: int,
             d: parallel.Dist | None = None) -> float:
    """Mean cross-entropy (nats/token) over the first `max_batches` sequential val batches."""
    from deepwish.data import sequential_batches

    tc = run_cfg.train
    was_training = model.training
    model.eval()
    ce, n = 0.0, 0
    try:
        world, rank = (d.world_size, d.rank) if d is not None else (1, 0)
        # Data-parallel: the same windows as one device with the global batch, split over ranks.
        for batch in sequential_batches(val_bin, tc.seq_len, tc.batch_size, max_batches * world, rank, world):
            batch = to_device(batch, device)
            with autocast_context(device, tc.dtype):
                _, m = lm_loss(model, batch, tc, 1, backend=backend)
            ce += float(m["ce_sum"])
            n += int(m["n_targets"])
    finally:
        model.train(was_training)
    if d is not None and d.world_size > 1:
        ce, n = (float(t) for t in d.sum(torch.tensor([ce, float(n)], dtype=torch.float64, device=device)))
    if n == 0:
        raise ValueError(f"{val_bin}: no validation tokens for seq_len={tc.seq_len}")
    return ce / n


# ---- MoE -------------------------------------------------------------------------------------
def moe_metrics(tokens_per_expert: torch.Tensor) -> dict[str, float]:
    """tokens_per_expert [L, E] summed over the step -> max and min expert load relative to the
    mean (1.0 = perfectly balanced), worst over layers."""
    load = tokens_per_expert.float() / tokens_per_expert.float().mean(dim=-1, keepdim=True).clamp_min(1e-9)
    return {"moe/max_load": float(load.max()), "moe/min_load": float(load.min())}


def update_router_bias(model, layers: list[int], tokens_per_expert: torch.Tensor, rate: float) -> None:
    """DeepSeek-V3 aux-loss-free balancing: one bias step per optimizer step, from the step's loads."""
    for layer, tpe in zip(layers, tokens_per_expert):
        model.blocks[layer].ffn.update_correction_bias(tpe, rate)


# ---- the loop --------------------------------------------------------------------------------
def _check_resume_config(saved: dict, run_cfg: RunConfig, path) -> None:
    saved_model = saved.get("model", {})
    now = to_dict(run_cfg.model)
    diff = sorted(k for k in set(saved_model) | set(now) if saved_model.get(k) != now.get(k))
    if diff:
        raise ConfigError(f"cannot resume from {path}: model config differs in "
                          + ", ".join(f"{k} ({saved_model.get(k)!r} saved vs {now.get(k)!r} now)" for k in diff))
    tdiff = sorted(k for k, v in to_dict(run_cfg.train).items() if saved.get("train", {}).get(k) != v)
    if tdiff:
        print(f"[deepwish] note: resuming with changed train settings: {', '.join(tdiff)}", flush=True)


def train(run_cfg: RunConfig, resume: bool | str = False, *, progress_bar: bool | None = None) -> dict:
    """Train per `run_cfg`; returns a summary dict (see the end of this function).

    resume: False = fresh run in train.out_dir (which must hold no checkpoint); True = continue
    from the latest checkpoint in train.out_dir; a path = continue from that run directory (or
    checkpoint directory), writing into that run directory.

    The run directory is locked for the call, and SIGINT/SIGTERM stop it after the current step
    with a save (train/rundir.py: `RunDirError`, `Stopped`).
    """
    with rundir.exclusive(rundir.run_dir_of(run_cfg.train.out_dir, resume), resume), rundir.stop_on_signals():
        return _train(run_cfg, resume, progress_bar=progress_bar)


def _train(run_cfg: RunConfig, resume: bool | str, *, progress_bar: bool | None) -> dict:
    from deepwish.data import PackedLoader
    from deepwish.model import Transformer

    # -- set-up --
    run_dir = Path(resume if isinstance(resume, (str, Path)) and not isinstance(resume, bool) else run_cfg.train.out_dir)
    ckpt = None
    if resume:
        ckpt = dist_checkpoint.read_meta(run_dir)  # either format; tensors are loaded after the model is built
        if ckpt["path"].parent.parent != run_dir and (run_dir / "meta.json").exists():
            run_dir = ckpt["path"].parent.parent  # a checkpoint directory was given
    elif list_checkpoints(run_dir):
        raise ConfigError(f"{run_dir} already holds checkpoints; resume it (--resume {run_dir}) or choose "
                          f"another train.out_dir / --out")
    run_cfg = dataclasses.replace(run_cfg, train=dataclasses.replace(run_cfg.train, out_dir=str(run_dir)))
    tc = run_cfg.train
    d = parallel.init_distributed(tc)  # no process group for parallel=none
    device = d.device
    warn_if_cpu_oversubscribed(device)
    seed_everything(tc.seed)
    run_cfg, data = prepare_data(run_cfg)
    if ckpt is not None:
        _check_resume_config(ckpt["config"], run_cfg, ckpt["path"])
    if tc.steps < 1 or tc.batch_size < 1 or tc.grad_accum < 1 or tc.seq_len < 2:
        raise ConfigError(f"train: steps, batch_size, grad_accum must be >= 1 and seq_len >= 2 "
                          f"(got {tc.steps}, {tc.batch_size}, {tc.grad_accum}, {tc.seq_len})")
    if tc.seq_len > run_cfg.model.max_seq_len:
        raise ConfigError(f"train.seq_len={tc.seq_len} exceeds model.max_seq_len={run_cfg.model.max_seq_len}")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(to_dict(run_cfg), indent=1))

    model = Transformer(run_cfg.model).to(device)
    step_model = wrap_model(model, run_cfg, d)
    optimizer = build_optimizer(model, tc, distributed=d.active)
    ema = EMA(model, tc.ema_decay) if tc.ema_decay > 0 else None
    backend = resolve_loss_backend(tc.loss_backend, device)
    loader = PackedLoader(data.train_bin, tc.seq_len, tc.batch_size, rank=d.rank, world_size=d.world_size,
                          seed=tc.seed)
    has_moe = any(ffn == "moe" for _, ffn in run_cfg.model.layer_types)
    bias_rate = run_cfg.model.bias_update_rate if run_cfg.model.router == "sigmoid" else 0.0

    start_step = 0
    last_ckpt: str | None = None
    if ckpt is not None and d.main:  # resuming an older step: newer checkpoints move aside, never lost
        start_branch(run_dir, ckpt["path"])
    if ckpt is not None and (d.active or ckpt["format"] == "dcp"):  # sharded state, or resharding
        start_step = dist_checkpoint.restore(ckpt["path"], model=model, optimizer=optimizer, loader=loader, ema=ema)
        last_ckpt = str(ckpt["path"])
        if d.main:
            print(f"[deepwish] resumed from {ckpt['path']} at step {start_step} ({d.world_size} ranks)", flush=True)
        ckpt = None
    if ckpt is not None:
        ckpt = load_checkpoint(ckpt["path"])
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        loader.load_state_dict(ckpt["loader"])
        if ema is not None:
            if ckpt["ema"] is None:
                raise ConfigError(f"{ckpt['path']}: train.ema_decay>0 but the checkpoint has no EMA")
            ema.load_state_dict(ckpt["ema"])
        set_rng_state(ckpt["rng"])
        start_step = ckpt["step"]
        last_ckpt = str(ckpt["path"])
        print(f"[deepwish] resumed from {ckpt['path']} at step {start_step}", flush=True)

    tokens_per_step = tc.batch_size * tc.seq_len * tc.grad_accum * d.world_size
    logger = parallel.NullLogger() if not d.main else Logger(
        run_dir, total_steps=tc.steps, flops_per_token=model.flops_per_token(tc.seq_len),
                    device=device, log_every=tc.log_every, tensorboard=tc.tensorboard, mlflow=tc.mlflow,
                    config=to_dict(run_cfg), progress_bar=progress_bar)
    logger.print(f"[deepwish] run {run_dir} | {model.num_params() / 1e6:.2f}M params | device {device} | "
                 f"{tc.optimizer} | {tokens_per_step} tokens/step | loss backend {backend}")

    def save(done: int) -> str:
        if d.active:  # collective, sharded (torch.distributed.checkpoint)
            return str(dist_checkpoint.save(run_dir, done, model=model, optimizer=optimizer, loader=loader, ema=ema,
                                            config=to_dict(run_cfg), keep_last=tc.keep_checkpoints))
        path = save_checkpoint(run_dir, done, model_state=model.state_dict(), optimizer_state=optimizer.state_dict(),
                               loader_state=loader.state_dict(), ema_state=ema.state_dict() if ema else None,
                               config=to_dict(run_cfg), keep_last=tc.keep_checkpoints)
        return str(path)

    train_losses: dict[int, float] = {}
    val_losses: dict[int, float] = {}
    batches = iter(loader)
    step_model.train()
    logger.start(start_step)
    t_start = time.perf_counter()
    try:
        for step in range(start_step, tc.steps):
            done = step + 1
            lr_f = apply_lr(optimizer, step, tc)
            micro = [next(batches) for _ in range(tc.grad_accum)]
            n_global = d.sum_int(sum(count_targets(b[1]) for b in micro))  # over micro-batches and ranks
            ce = torch.zeros((), device=device)
            z = torch.zeros((), device=device)
            aux: dict[str, torch.Tensor] = {}
            tpe = None
            moe_layers = None
            for i, b in enumerate(micro):
                b = to_device(b, device)
                with parallel.grad_sync(step_model, last=i == len(micro) - 1):  # DDP: reduce once per step
                    with autocast_context(device, tc.dtype):
                        loss, m = lm_loss(step_model, b, tc, n_global, backend=backend, step=step)
                    (loss * d.grad_scale).backward()  # DDP/FSDP2 average over ranks (train/parallel.py)
                ce += m["ce_sum"]
                z += m["z_sum"]
                for k, v in m.items():
                    if k.startswith(("aux/", "extra/")):
                        aux[k] = aux.get(k, 0.0) + v
                if "moe/tokens_per_expert" in m:
                    tpe = m["moe/tokens_per_expert"] if tpe is None else tpe + m["moe/tokens_per_expert"]
                    moe_layers = m["moe/layers"]
            ce, z, aux, tpe = parallel.sum_step_metrics(d, ce, z, aux, tpe)
            loss_value = float((ce + z) / n_global + sum(aux.values(), torch.zeros((), device=device)))
            clip = tc.grad_clip if tc.grad_clip > 0 else float("inf")
            grad_norm = parallel.clip_grad_norm(model.parameters(), clip)
            if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                what = f"loss ({loss_value})" if not math.isfinite(loss_value) else f"gradient norm ({grad_norm})"

                def rerun():
                    total = None
                    for b in micro:
                        with autocast_context(device, tc.dtype):
                            l, _ = lm_loss(step_model, to_device(b, device), tc, n_global, backend=backend, step=step)
                        total = l if total is None else total + l
                    return total
                raise_nonfinite(model, rerun, done, what, last_ckpt)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(model)
            if bias_rate > 0 and tpe is not None:
                update_router_bias(model, moe_layers, tpe, bias_rate)
            train_losses[done] = loss_value
            metrics = {"loss": loss_value, "ce": float(ce) / n_global, "lr": lr_f * tc.lr,
                       "lr_factor": lr_f, "grad_norm": grad_norm, "n_targets": n_global}
            if tc.z_loss:
                metrics["z_loss"] = float(z) / n_global
            metrics.update({k: float(v) for k, v in aux.items()})
            if has_moe and tpe is not None:
                metrics.update(moe_metrics(tpe))
            rec = logger.step(done, tokens_per_step, metrics)
            if rec is not None and has_moe and tpe is not None:
                logger.expert_load(done, moe_layers, tpe)  # per-layer histograms (JSONL, TensorBoard)
            saved = done % tc.save_every == 0 or done == tc.steps
            if saved:
                last_ckpt = save(done)
            if (signum := rundir.stop_requested(d)) is not None:  # SIGINT/SIGTERM: this step is done
                raise rundir.stopped(signum, done, last_ckpt if saved else save(done), run_dir)
            if done % tc.eval_every == 0 or done == tc.steps:  # after the save, never before it
                with (ema.applied(model) if ema else contextlib.nullcontext()):
                    val = evaluate(model, data.val_bin, run_cfg, device, backend, tc.eval_batches, d)
                val_losses[done] = val
                logger.eval(done, {"val_loss": val})
        train_time = time.perf_counter() - t_start

        # -- end of run --
        summary = {"run_dir": str(run_dir), "steps": tc.steps, "start_step": start_step,
                   "train_losses": train_losses, "val_losses": val_losses,
                   "final_train_loss": train_losses.get(tc.steps), "checkpoint": last_ckpt,
                   "train_seconds": train_time, "device": str(device), "loss_backend": backend,
                   "num_params": model.num_params(), "vocab_size": run_cfg.model.vocab_size}
        if val_losses:
            summary["final_val_loss"] = val_losses[max(val_losses)]
        else:  # resumed at the last step: nothing ran
            with (ema.applied(model) if ema else contextlib.nullcontext()):
                summary["final_val_loss"] = evaluate(model, data.val_bin, run_cfg, device, backend, tc.eval_batches,
                                                      d)
        from deepwish.data import unigram_entropy
        summary["unigram_entropy"] = float(unigram_entropy(data.val_bin))
        logger.write({"kind": "final", "step": tc.steps, "val_loss": summary["final_val_loss"],
                      "unigram_entropy": summary["unigram_entropy"]})
        logger.print(f"[deepwish] final val loss {summary['final_val_loss']:.4f} nats/token | unigram entropy of "
                     f"the val shard {summary['unigram_entropy']:.4f} nats/token")
    finally:
        logger.close()

    from deepwish.train.plot import plot_run
    summary["plot"] = str(plot_run(run_dir)) if d.main else None  # rank 0 alone writes metrics.jsonl
    if d.main:
        print(f"[deepwish] plot: {summary['plot']}", flush=True)
    summary["sample"] = sample_text(model, data.tokenizer, tc, device)
    if summary["sample"] is not None and d.main:
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
    with autocast_context(device, tc.dtype):
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
    parser.add_argument("--out", default=None, help="run directory (sets train.out_dir)")
    parser.add_argument("--parallel", default=None, choices=("none", "ddp", "fsdp"),
                        help="data parallelism under torchrun (sets train.parallel; --set still applies after)")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """preset (or the saved config of the run being resumed) <- --config file <- --out <- --set."""
    import yaml

    if args.preset is None and args.config is None:
        if not args.resume:
            raise ConfigError("deepwish train needs --preset NAME or --config FILE (or --resume RUN_DIR)")
        run_dir = args.resume if isinstance(args.resume, str) else (args.out or RunConfig().train.out_dir)
        meta = dist_checkpoint.resolve_any(run_dir) / "meta.json"  # single-device or sharded (DCP) checkpoint
        d, source = json.loads(meta.read_text())["config"], f"{meta} (saved config)"
    else:
        d, source = to_dict(load_config(args.preset or args.config)), str(args.preset or args.config)
    if args.preset is not None and args.config is not None:
        path = Path(args.config)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping with model/train/data sections")
        for section, updates in data.items():
            if section not in d:
                raise ConfigError(f"{path}: unknown section {section!r} (model, train, data)")
            if not isinstance(updates or {}, dict):
                raise ConfigError(f"{path}: section {section!r} must be a mapping")
            d[section].update(updates or {})
        source = str(path)
    cfg = from_dict(d, source)
    overrides = ([f"train.out_dir={args.out}"] if args.out else []) + (
        [f"train.parallel={args.parallel}"] if getattr(args, "parallel", None) else []) + list(args.overrides)
    for ov in overrides:
        if "=" not in ov or "." not in ov.split("=", 1)[0]:
            raise ConfigError(f"--set {ov!r}: expected section.key=value, e.g. model.n_layers=4")
        key, value = ov.split("=", 1)
        section, name = key.split(".", 1)
        d = to_dict(cfg)
        if section not in d:
            raise ConfigError(f"--set {ov}: unknown section {section!r} (model, train, data)")
        d[section][name] = yaml.safe_load(value) if value else value
        cfg = from_dict(d, f"--set {ov}")
    return cfg


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    resume = args.resume
    if resume is True and args.out:
        resume = args.out
    try:
        summary = train(cfg, resume=resume)
    except BaseException:
        parallel.shutdown()
        raise
    parallel.shutdown(wait_for_peers=True)
    print(f"[deepwish] done: {summary['run_dir']}", flush=True)
    return 0
