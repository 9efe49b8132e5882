"""Scale-out, applied from this one module: the model code stays single-device (DESIGN.md §10).

    init_distributed(tc)        process group from torchrun's RANK / WORLD_SIZE / LOCAL_RANK
                                (nccl on CUDA, gloo on CPU) -> a frozen `Dist`
    parallelize(model, cfg, d)  per block: activation checkpoint -> torch.compile -> activation
                                offload; torch.compile of the stack's modules between the blocks
                                (`Transformer.stack_modules`); then FSDP2 (`fully_shard` per Block,
                                then the root) or DDP; returns the module the training step calls
    Dist.sum / sum_int          the collectives a data-parallel step needs: the GLOBAL target count
                                (loss normalisation) and the logged sums
    clip_grad_norm              gradient clipping that also reduces over FSDP2 shards

Loss scaling: DDP and FSDP2 *average* gradients over ranks, but the trainer's loss is already a
sum over every rank's tokens divided by the global target count (train/loss.py). So each rank
back-propagates `world_size × loss` (`Dist.grad_scale`), and the averaged gradient is exactly
the single-device gradient of the same global batch. (A reducer set to sum would do the same;
the scale works identically on every torch version this code supports.)

Only the standard wrappers are used, applied from outside: `nn.Module.compile` (in place: names
unchanged), torch's `checkpoint_wrapper` / `offload_wrapper` (their state dicts drop the wrapper
prefix, so state-dict keys and the HF name tables stay those of the single-device model and
checkpoints move freely between single-device, DDP and FSDP2 runs), `fully_shard` and DDP. The
model's forward already returns everything the loss needs (model/transformer.py), so DDP and
FSDP2 wrap it as it is; the trainer keeps the unwrapped module for everything but the forward.

Order per block: compile the block, then activation checkpointing around it (the backward
re-runs the compiled forward), then activation offload (`save_on_cpu`), then FSDP2 last, so its
all-gathers stay eager and overlap (its hooks are excluded from dynamo).

Choices and simplifications:
- FSDP2 mixed precision: bf16 parameters for compute on CUDA (fp32 on CPU, where bf16 matmuls
  are slow and not what is studied), fp32 gradient reduction, fp32 master weights and optimizer
  state. The root keeps its parameters gathered after forward: they are needed at once for the
  backward.
- `selective` activation checkpointing recomputes every other block (layer-level selective AC,
  as torchtitan's `ac_freq=2`): about half the activation memory of `none` for a third of the
  extra compute of `full`.
- `reshard_after_forward=false` (ZeRO-2-like): every block keeps its gathered parameters from
  its forward until its backward (one all-gather per step instead of two, at the memory of the
  whole unsharded model during the step); gradients are still reduce-scattered and optimizer
  state stays sharded. The default `true` frees them after each block's forward (ZeRO-3-like).
- `offload=params` shards parameters, gradients and optimizer state on the CPU through FSDP2's
  CPUOffloadPolicy (the optimizer step then runs on the CPU); `offload=activations` keeps every
  tensor saved for backward in pinned host memory (`torch.autograd.graph.save_on_cpu`).
- DDP wraps the model itself; a model with parameters that some steps leave unused (MTP heads
  at λ = 0, DSA indexers with the indexer loss off) gets DDP's static graph.
- EMA under FSDP2 is the trainer's EMA over `named_parameters()`, built after sharding: its
  shadows are DTensors with the parameters' placements, so each rank averages only its shard.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from deepwish.config import ConfigError, raise_problems, train_problems
from deepwish.device import resolve_device
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class Dist:
    """Where this process stands. `backend` None: no process group (train.parallel=none)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None
    # a gloo group beside an NCCL one, for host integers (sum_int): no round trip through the GPU's queue
    host_group: object = field(default=None, compare=False, repr=False)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.backend is not None

    @property
    def grad_scale(self) -> float:
        """Multiplier of the loss before backward: the reducers average over ranks (module doc)."""
        return float(self.world_size)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) a tensor in place over ranks and return it; identity without a group."""
        if self.active and self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def sum_int(self, n: int) -> int:
        """A host integer summed over ranks. Beside an NCCL group it goes over the host group: a
        device tensor would be queued behind the GPU's work, and reading it back would make the host
        wait for that work to finish before it launches the next (the step's count of targets comes
        before its forward)."""
        if not (self.active and self.world_size > 1):
            return n
        if self.host_group is not None:
            t = torch.tensor([n], dtype=torch.int64)
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.host_group)
            return int(t.item())
        return int(self.sum(torch.tensor([n], dtype=torch.int64, device=self.device)).item())

    def barrier(self) -> None:
        if self.active and self.world_size > 1:
            dist.barrier()


def validate(tc) -> None:
    """Raise one ConfigError naming every problem of a TrainConfig (config.train_problems)."""
    raise_problems(train_problems(tc), "invalid train configuration")


def init_distributed(tc) -> Dist:
    """The process group for `tc.parallel` (TrainConfig); reused if one is already initialised.

    parallel=none: no group, world size 1, and it is an error to be launched by torchrun with
    several processes (every rank would train its own copy). ddp/fsdp: torchrun's environment
    must be set (torchrun --nproc_per_node=1 for one device).
    """
    validate(tc)
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if tc.parallel == "none":
        if env_world > 1:
            raise ConfigError(f"launched with WORLD_SIZE={env_world} but train.parallel=none: every rank would "
                              f"train its own copy; set train.parallel=ddp or fsdp")
        return Dist(0, 1, 0, resolve_device(tc.device, what="train.device"), None)
    missing = [k for k in TORCHRUN_ENV if k not in os.environ]
    if missing:
        raise ConfigError(f"train.parallel={tc.parallel} needs torchrun's environment ({', '.join(missing)} unset): "
                          f"torchrun --nproc_per_node=N -m deepwish train ...")
    rank, world, local_rank = (int(os.environ[k]) for k in TORCHRUN_ENV)
    device = resolve_device(tc.device, local_rank, what="train.device")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_initialized():
        if dist.get_world_size() != world or dist.get_rank() != rank:
            raise RuntimeError(f"a process group of world size {dist.get_world_size()} (rank {dist.get_rank()}) "
                               f"already exists, but the environment says {world} (rank {rank})")
        backend = dist.get_backend()
    else:
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    # collective: every rank calls init_distributed at the same point
    host_group = dist.new_group(backend="gloo") if backend == "nccl" and world > 1 else None
    return Dist(rank, world, local_rank, device, backend, host_group)


@contextlib.contextmanager
def process_group_until_done():
    """The body of a torchrun process's run: the process group is destroyed when the body ends,
    after meeting the peers where every rank ends the same way (success, or a signal stop all
    ranks agreed on), at once after a failure (see shutdown). A no-op in one process."""
    from deepwish.train.rundir import Stopped
    try:
        yield
    except Stopped as e:
        shutdown(wait_for_peers=e.agreed)
        raise
    except BaseException:
        shutdown()
        raise
    shutdown(wait_for_peers=True)


# The last barrier's work, held until the interpreter itself lets go of it (see shutdown).
_LAST_BARRIER: list = []


def shutdown(wait_for_peers: bool = False) -> None:
    """Destroy the process group if one exists (end of a torchrun process).

    wait_for_peers: meet the other ranks first (after a successful run, or a stop every rank
    agreed on). Rank 0 finishes later than the others (plot, sample); tearing a gloo group down
    while a peer is still using it can abort the process. Never after a failure: a dead peer would
    leave the barrier hanging.

    The barrier's work object is kept (`_LAST_BARRIER`). Gloo's barrier holds the collectives still
    in flight when it was called until it is itself destroyed, and those launched inside a
    backward (DDP's all-reduces, FSDP2's reduce-scatters) carry autograd's stashed Python context
    in their thread-local state; freeing that takes the GIL. Left to gloo, the barrier is freed by
    its worker thread just after it completes, which can be after the main thread has begun
    shutting the interpreter down: that thread then cannot take the GIL, is unwound through a
    noexcept destructor and aborts the process ("terminate called without an active exception",
    about 1 run in 20 of a 2-rank CPU test under torch 2.13). Held here, the work is freed by the
    main thread, when the module is torn down (or replaced by the next call's). A barrier that
    fails (a peer died after all) is said in one line; the group is destroyed regardless."""
    if dist.is_initialized():
        if wait_for_peers:
            try:
                work = dist.barrier(async_op=True)
                _LAST_BARRIER[:] = [work]  # the one before (a long-lived process) is freed here, by this thread
                work.wait()
            except Exception as e:  # a peer failed after all: nothing to meet, and the run's own outcome
                # (returned or being raised) must not be replaced by this one
                first = str(e).splitlines()[0] if str(e) else ""
                print(f"[deepwish] note: the ranks' final barrier failed ({type(e).__name__}: {first[:200]}); "
                      f"tearing the process group down anyway", file=sys.stderr, flush=True)
        dist.destroy_process_group()


# ---- per-block wrapping ----------------------------------------------------------------------
def compile_enabled(tc, device: torch.device) -> bool:
    return tc.compile == "on" or (tc.compile == "auto" and device.type == "cuda")


def checkpointed_blocks(mode: str, n_layers: int) -> list[int]:
    """Indices of the blocks whose activations are recomputed in backward."""
    if mode == "full":
        return list(range(n_layers))
    if mode == "selective":
        return list(range(0, n_layers, 2))
    return []


def inductor_arguments(compile_mode: str) -> dict:
    """train.compile_mode -> torch.compile's keyword: inductor's own modes by name; "coordinate-descent"
    is inductor's coordinate_descent_tuning alone (no mode names it: max-autotune adds it to the GEMM
    template search)."""
    if compile_mode == "coordinate-descent":
        return {"options": {"coordinate_descent_tuning": True}}
    return {"mode": compile_mode}


def wrap_block(block: nn.Module, *, checkpoint: bool, compile: bool, offload_activations: bool,
               compile_mode: str = "default") -> nn.Module:
    """compile (in place, inductor's `compile_mode`) -> activation checkpointing -> activation
    offload; returns the module that takes the block's place (the block itself when neither
    wrapper applies)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (CheckpointImpl, checkpoint_wrapper,
                                                                             offload_wrapper)
    if compile:
        block.compile(**inductor_arguments(compile_mode))
    if checkpoint:
        # Non-reentrant: takes keyword arguments, nests with autograd and traces under torch.compile.
        block = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    if offload_activations:
        block = offload_wrapper(block)
    return block


def _has_optional_branches(model: nn.Module) -> bool:
    """Parameters that some steps leave unused: MTP heads (λ = 0) and DSA indexers (loss off)."""
    return model.cfg.n_mtp > 0 or any(m == "dsa" for m, _ in model.cfg.layer_types)


def grad_sync(step_model, last: bool):
    """Context of one micro-batch's forward and backward: under DDP, gradients are all-reduced
    only with the step's last micro-batch (no_sync before it). FSDP2 keeps reduce-scattering every
    micro-batch (sharded gradients, less memory), as does a single device (nothing to do). A DDP
    model with a static graph (MTP / indexer parameters outside some steps) also reduces every
    micro-batch: DDP's no_sync does not compose with static_graph."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    if isinstance(step_model, DDP) and not last and not step_model.static_graph:
        return step_model.no_sync()
    return contextlib.nullcontext()


def _fsdp_shard(model: nn.Module, d: Dist, offload_params: bool, reshard_after_forward: bool) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(d.device.type, (d.world_size,))
    param_dtype = torch.bfloat16 if d.device.type == "cuda" else torch.float32
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy(pin_memory=d.device.type == "cuda") if offload_params else OffloadPolicy()
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=reshard_after_forward)
    if model.mtp is not None:
        for m in model.mtp:
            fully_shard(m, mesh=mesh, mp_policy=mp, offload_policy=offload,
                        reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=False)


def parallelize(model: nn.Module, run_cfg, d: Dist) -> nn.Module:
    """Apply compile, checkpointing, offload and data parallelism per `run_cfg.train`; returns the
    module the training step calls (`model` itself, or its DDP wrapper). `model` is modified in
    place and remains the module to checkpoint, evaluate and export."""
    tc = run_cfg.train
    validate(tc)
    if tc.parallel == "none" and d.active:
        raise ConfigError("parallelize: a process group exists but train.parallel=none")
    if tc.parallel != "none" and not d.active:
        raise ConfigError(f"parallelize: train.parallel={tc.parallel} but no process group (init_distributed)")
    on_cuda = d.device.type == "cuda"
    use_compile = compile_enabled(tc, d.device)
    if use_compile:  # blocks that differ (GPT-family windows, value-embedding layers) and each scheduled
        # window are one graph each of the one Block.forward, far more than dynamo's default 8, past
        # which a block silently runs eager. Counted for gpt_124m's 16 scheduled shapes (CPU, 2026-12-04):
        # 48 graphs with the own attention kernel (its window an argument), 138 with SDPA (a mask per
        # window), which the earlier limit of 64 left half eager.
        import torch._dynamo.config as dynamo_config
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 512)
    ac = set(checkpointed_blocks(tc.activation_checkpoint, len(model.blocks)))
    for i in range(len(model.blocks)):
        model.blocks[i] = wrap_block(model.blocks[i], checkpoint=i in ac, compile=use_compile,
                                     offload_activations=tc.offload == "activations", compile_mode=tc.compile_mode)
    if use_compile:  # the elementwise glue between the blocks too (final norm, x0 norm, skip entries)
        for m in model.stack_modules():
            m.compile(**inductor_arguments(tc.compile_mode))
    step_model = model
    if tc.parallel == "fsdp":
        _fsdp_shard(model, d, offload_params=tc.offload == "params", reshard_after_forward=tc.reshard_after_forward)
    elif tc.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        step_model = DDP(model, device_ids=[d.device.index] if on_cuda else None,
                         static_graph=_has_optional_branches(model))
    if d.main:
        zero = (" (ZeRO-3-like: parameters resharded after forward)" if tc.reshard_after_forward else
                " (ZeRO-2-like: parameters kept gathered from forward to backward)") if tc.parallel == "fsdp" else ""
        compiled = "off" if not use_compile else "on" if tc.compile_mode == "default" else f"on ({tc.compile_mode})"
        print(f"[deepwish] parallel {tc.parallel}{zero} x{d.world_size} ({d.backend or 'no group'}) | compile "
              f"{compiled} | activation checkpoint {tc.activation_checkpoint} "
              f"({len(ac)}/{len(model.blocks)} blocks) | offload {tc.offload}", file=sys.stderr, flush=True)
    return step_model


# ---- gradient clipping over shards ------------------------------------------------------------
def clip_grad_norm(params, max_norm: float, optimizer=None) -> torch.Tensor:
    """Global gradient 2-norm (over every shard and rank), clipped to `max_norm`; returns the norm
    as a 0-d tensor, unread: the caller reads it with the step's other scalars in one host
    synchronisation (a read here would drain the GPU's queue before the update is launched).

    Under FSDP2 the norm torch computes is a DTensor with a pending reduction: materialising it
    all-reduces the shard norms, and the clip coefficient is then applied to the local shards.

    optimizer: the `ChainedOptimizer` about to step, if any. Its optimizers that can scale gradients
    inside their own update (fused AdamW, Muon) take the coefficient (`ChainedOptimizer.take_grad_scale`);
    only the other parameters' gradients are scaled here. Clipping's separate pass over every gradient
    (fp32, read and written: 1.8 ms a step at Qwen3-0.6B on an H100) is then left to the update's own
    pass.
    """
    from torch.distributed.tensor import DTensor

    params = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0, False, None) if params else torch.zeros(())
    if isinstance(norm, DTensor):
        local = norm.to_local()
        if local.device.type != norm.device_mesh.device_type:  # CPU-offloaded shards, NCCL group
            norm = DTensor.from_local(local.to(norm.device_mesh.device_type), norm.device_mesh, norm.placements)
        norm = norm.full_tensor()
    if params and max_norm < float("inf"):
        if optimizer is not None and hasattr(optimizer, "take_grad_scale"):
            # torch's clip_grads_with_norm_ coefficient, computed the same way
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            taken = optimizer.take_grad_scale(coef)
            params = [p for p in params if id(p) not in taken]
        if params:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=None)
    return norm


# ---- logging on non-zero ranks ---------------------------------------------------------------
class NullLogger:
    """What ranks other than 0 log: nothing (rank 0 writes metrics.jsonl and prints)."""

    def print(self, line: str) -> None:
        pass

    def write(self, record: dict) -> None:
        pass

    def start(self, step: int) -> None:
        pass

    def paused(self):
        return contextlib.nullcontext()

    def step(self, step: int, tokens: int, metrics: dict) -> None:
        return None

    def eval(self, step: int, metrics: dict) -> None:
        pass

    def expert_load(self, step: int, layers: list[int], tokens_per_expert: torch.Tensor) -> None:
        pass

    def artifact(self, path) -> None:
        pass

    mlflow_run = None

    def close(self, status: str = "FINISHED") -> None:
        pass



def sum_step_metrics(d: Dist, ce: torch.Tensor, z: torch.Tensor, aux: dict, loads: dict):
    """Sum a step's logged sums over ranks (CE and z sums, share-weighted auxiliary losses, MoE
    expert loads {layer: [E]}), so rank 0 logs and every rank's router-bias update sees the
    global loads."""
    if not (d.active and d.world_size > 1):
        return ce, z, aux, loads
    keys = sorted(aux)
    packed = d.sum(torch.stack([ce.float(), z.float(), *[torch.as_tensor(aux[k], device=ce.device).float()
                                                         for k in keys]]))
    aux = {k: packed[2 + i] for i, k in enumerate(keys)}
    if loads:
        layers = sorted(loads)
        summed = d.sum(torch.stack([loads[k] for k in layers]))
        loads = {k: summed[i] for i, k in enumerate(layers)}
    return packed[0], packed[1], aux, loads


def state_name(param_name: str) -> str:
    """A parameter's name as the model's state dict spells it: the activation-checkpoint and
    offload wrappers' prefix dropped (their state-dict hooks drop it the same way)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX
    return param_name.replace(_CHECKPOINT_PREFIX, "")
