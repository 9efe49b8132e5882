"""Checkpoints of data-parallel runs with torch.distributed.checkpoint (DCP), resharding on load.

Layout (the run directory and `latest` protocol of train/checkpoint.py, another payload):
    RUN/checkpoints/step_00000100/dcp/            DCP: .metadata + one .distcp file per rank
                                                  (model, optimizer and EMA, keyed by parameter name)
    RUN/checkpoints/step_00000100/train_state.pt  step, RNG states (rank 0), loader position
    RUN/checkpoints/step_00000100/meta.json       format "dcp", step, config, versions, git, world size
    RUN/checkpoints/latest

A save is collective: rank 0 prepares `.tmp-step_...`, every rank writes its shards into it, rank
0 writes the rest, fsyncs, renames it into place and then replaces `latest`, as the single-device
writer does. The run directory must be on a file system every rank sees.

Restoring (`restore`) accepts either format into any layout: a DCP checkpoint into an FSDP2/DDP
model of any world size or into a plain single-process model (DCP reshards: the saved shards are
matched to the loading ranks' shards by parameter name and offset), and a single-device
checkpoint (model.pt) into an FSDP2/DDP model (full state dicts, sliced per rank). The optimizer
state travels keyed by parameter name (torch.distributed.checkpoint.state_dict), so it reshards
like the parameters.

Integrity (train/checkpoint.py): rank 0 lists every shard with its size and SHA-256 in meta.json
after all ranks have written; on load every rank verifies the whole checkpoint on its own (same
files, same verdict, no collective), so each rank reads it once more than DCP does.

The loader position is stored as a window position of the global batch (`world_size ×
batch_size` windows per step). Resuming with another world size therefore needs the same global
batch (e.g. 2 ranks × 4 = 1 rank × 8); anything else is an error naming both.

Weights alone (generation, export) are read by `deepwish.weights`, in one process, from either
format, never loading the optimizer state.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from deepwish.train.parallel import state_name

from deepwish.train.checkpoint import (CKPT_DIR, DCP_DIR, FORMAT_VERSION, CheckpointError, _first_line, _fsync_path,
                                       _write_bytes_synced, is_dcp_checkpoint, load_checkpoint,
                                       load_pt, publish, resolve_any, rng_state, set_rng_state, staged,
                                       step_dir_name, write_meta)


def _world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# ---- state dicts ----------------------------------------------------------------------------------
def _optimizers(optimizer) -> list[torch.optim.Optimizer]:
    return list(optimizer.optimizers.values()) if hasattr(optimizer, "optimizers") else [optimizer]


def _live_state(model: nn.Module, optimizer, ema) -> dict:
    """Name-keyed model/optimizer/EMA state whose tensors are this rank's shards (DCP's input and,
    for load, the buffers DCP fills in place)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, _optimizers(optimizer))
    state = {"model": msd, "optimizer": osd}
    if ema is not None:
        state["ema"] = dict(ema.shadow)
    return state


def _set_live_state(model: nn.Module, optimizer, ema, state: dict, full: bool) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    opts = StateDictOptions(full_state_dict=full, strict=True)
    set_state_dict(model, _optimizers(optimizer), model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"], options=opts)
    if ema is not None:
        if state.get("ema") is None:
            raise ValueError("train.ema_decay>0 but the checkpoint has no EMA")
        missing = set(ema.shadow) ^ set(state["ema"])
        if missing:
            raise ValueError(f"EMA names differ between checkpoint and model: {sorted(missing)[:5]}")
        for name, t in state["ema"].items():
            if full:
                _copy_full_into(ema.shadow[name], t)
            elif t is not ema.shadow[name]:
                ema.shadow[name].copy_(t)


def _copy_full_into(dst: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full tensor into `dst`, which may be a DTensor shard of it."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        if isinstance(dst, DTensor):
            part = distribute_tensor(full.to(dst.device_mesh.device_type), dst.device_mesh, dst.placements,
                                     src_data_rank=None).to_local()
            dst.to_local().copy_(part)
        else:
            dst.copy_(full)


def _name_keyed_optimizer_state(model: nn.Module, optimizer, saved: dict) -> dict:
    """A single-device ChainedOptimizer state ({name: torch optimizer state_dict}, parameters by
    index) -> the name-keyed full optimizer state that set_state_dict expects."""
    names = {id(p): state_name(n) for n, p in model.named_parameters()}  # as get_state_dict spells them
    out = {"state": {}, "param_groups": []}
    parts = optimizer.optimizers if hasattr(optimizer, "optimizers") else {"": optimizer}
    if hasattr(optimizer, "optimizers") and set(saved) != set(parts):
        raise ValueError(f"optimizer state has parts {sorted(saved)}, expected {sorted(parts)}")
    for key, opt in parts.items():
        sd = saved[key] if key else saved
        for live, group in zip(opt.param_groups, sd["param_groups"]):
            fqns = [names[id(p)] for p in live["params"]]
            if len(fqns) != len(group["params"]):
                raise ValueError(f"optimizer group {group.get('name')!r}: {len(group['params'])} parameters saved, "
                                 f"{len(fqns)} now")
            for fqn, idx in zip(fqns, group["params"]):
                if idx in sd["state"]:
                    out["state"][fqn] = sd["state"][idx]
            out["param_groups"].append({**group, "params": fqns})
    return out


# ---- save ---------------------------------------------------------------------------------------
def save(run_dir: str | os.PathLike, step: int, *, model: nn.Module, optimizer, loader, ema, config: dict,
         keep_last: int = 2, meta_extra: dict | None = None) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory. `meta_extra`: more keys
    for meta.json (rank 0's are written)."""
    import torch.distributed.checkpoint as dcp

    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    rank, world = _world()
    root = Path(run_dir) / CKPT_DIR
    name = step_dir_name(step)
    final = root / name
    tmp = root / f".tmp-{name}"
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        except OSError:  # not raised here (the others would wait at the barrier): dcp.save fails on every rank
            pass
    _barrier()
    state = _live_state(model, optimizer, ema)
    try:
        dcp.save(state, checkpoint_id=str(tmp / DCP_DIR))
    except Exception as e:  # DCP gathers every rank's failure into one exception on every rank
        raise CheckpointError(f"cannot write checkpoint {final}: {_first_line(e)}; the previous checkpoints "
                              f"are untouched") from None
    _barrier()
    if rank == 0:
        with staged(tmp, final):
            loader_state = {**loader.state_dict(), "global_batch": loader.batch_size * loader.world_size}
            train_state = {"format": FORMAT_VERSION, "step": step, "rng": rng_state(), "loader": loader_state}
            _write_bytes_synced(tmp / "train_state.pt", lambda f: torch.save(train_state, f))
            for f in (tmp / DCP_DIR).iterdir():
                _fsync_path(f)
            write_meta(tmp, step, config, kind="dcp", world_size=world, **(meta_extra or {}))
            _fsync_path(tmp / DCP_DIR)
            _fsync_path(tmp)
            publish(root, tmp, name, keep_last)
    _barrier()
    return final


# ---- restore ------------------------------------------------------------------------------------
def _restore_loader(loader, saved: dict) -> None:
    """Move `loader` to the saved position of the same global batch, whatever the world size."""
    mine = loader.state_dict()
    for key in ("seed", "shuffle", "seq_len", "n_tokens", "fingerprint"):
        if saved[key] != mine[key]:
            raise ValueError(f"loader state mismatch: {key} is {saved[key]!r} in the checkpoint, {mine[key]!r} here")
    saved_global = saved.get("global_batch", saved["batch_size"] * saved["world_size"])
    now_global = loader.batch_size * loader.world_size
    if saved_global != now_global:
        raise ValueError(f"the checkpoint's global batch is {saved_global} windows per step "
                         f"({saved['world_size']} ranks x {saved['batch_size']}); this run has {now_global} "
                         f"({loader.world_size} x {loader.batch_size}); set train.batch_size so they match")
    loader.load_state_dict({**mine, "epoch": saved["epoch"], "step": saved["step"]})


def restore(path: str | os.PathLike, *, model: nn.Module, optimizer, loader, ema) -> int:
    """Load a checkpoint of either format into the live (possibly sharded) model, optimizer, EMA
    and loader, and set the RNG states; collective under a process group. Returns the step."""
    import torch.distributed.checkpoint as dcp

    d = resolve_any(path)
    if is_dcp_checkpoint(d):
        state = _live_state(model, optimizer, ema)
        try:
            dcp.load(state, checkpoint_id=str(d / DCP_DIR))
        except Exception as e:  # verified files that DCP still cannot read: name the checkpoint
            raise CheckpointError(f"{d / DCP_DIR} cannot be read: {_first_line(e)}") from None
        _set_live_state(model, optimizer, ema, state, full=False)
        train_state = load_pt(d / "train_state.pt")
        if train_state.get("format") != FORMAT_VERSION:
            raise ValueError(f"{d}: checkpoint format {train_state.get('format')} is not {FORMAT_VERSION}")
    else:
        ck = load_checkpoint(d)
        state = {"model": ck["model"], "optimizer": _name_keyed_optimizer_state(model, optimizer, ck["optimizer"]),
                 "ema": ck["ema"]["shadow"] if ck["ema"] is not None else None}
        _set_live_state(model, optimizer, ema, state, full=True)
        train_state = {"step": ck["step"], "rng": ck["rng"], "loader": ck["loader"]}
    _restore_loader(loader, train_state["loader"])
    set_rng_state(train_state["rng"])
    return int(train_state["step"])
