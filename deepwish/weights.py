"""Model weights without the training state: a model from an HF directory or from a deepwish run
or checkpoint directory of either format (single-device `model.pt`, sharded DCP).

    model = load_model("runs/q", device="cuda", dtype=torch.bfloat16)      # latest checkpoint
    state, config = load_weights("runs/q/checkpoints/step_00000400", ema=True)

Generation and export read weights here; the optimizer state is never loaded (a single-device
checkpoint's EMA lives beside the optimizer in train_state.pt, which is then memory-mapped so
only the EMA tensors are read; a DCP checkpoint is asked for the model, or EMA, keys alone).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from deepwish.config import ConfigError, from_dict, runtime_overrides
from deepwish.model.transformer import Transformer
from deepwish.train.checkpoint import DCP_DIR, CheckpointError, load_pt, read_meta


def is_hf_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / "config.json").exists() and (any(p.glob("*.safetensors"))
                                             or (p / "model.safetensors.index.json").exists())


def load_weights(path: str | os.PathLike, ema: bool = False) -> tuple[dict, dict]:
    """(full model state_dict on CPU, run config dict) of a deepwish run or checkpoint directory.
    ema=True: the parameters are the EMA weights (buffers, e.g. router biases, stay the trained ones)."""
    meta = read_meta(path)
    d = meta["path"]
    if meta["format"] != "dcp":
        state = load_pt(d / "model.pt")
        shadow = None
        if ema:
            try:  # memory-mapped: of the training state only the EMA tensors are read
                train_state = torch.load(d / "train_state.pt", map_location="cpu", weights_only=True, mmap=True)
            except (RuntimeError, EOFError, OSError, ValueError) as e:
                raise CheckpointError(f"{d / 'train_state.pt'} cannot be read: {str(e).splitlines()[0]}") from None
            shadow = (train_state.get("ema") or {}).get("shadow")
    else:
        import torch.distributed.checkpoint as dcp
        model = Transformer(from_dict(meta["config"], source=str(d / "meta.json")).model)
        want = {"model": model.state_dict()}
        if ema:
            want["ema"] = {n: p.detach().clone().float() for n, p in model.named_parameters()}
        try:
            dcp.load(want, checkpoint_id=str(d / DCP_DIR), no_dist=True)
        except Exception as e:  # DCP names the missing key; say which checkpoint and what was asked
            if ema:
                raise ConfigError(f"{d}: no EMA weights could be read (train.ema_decay was 0?): {e}") from e
            raise
        state, shadow = want["model"], want.get("ema")
    if ema:
        if shadow is None:
            raise ConfigError(f"{d} has no EMA weights (train.ema_decay was 0)")
        for name, t in shadow.items():
            state[name] = t.to(state[name].dtype)
    return state, meta["config"]


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               ema: bool = False, overrides: tuple[str, ...] | list[str] = ()) -> Transformer:
    """A Transformer in eval mode from an HF directory (config.json + safetensors) or a deepwish
    run/checkpoint directory (either format). `overrides`: `model.KEY=VALUE` for the fields that
    choose how the weights are computed (config.RUNTIME_MODEL_FIELDS: backends, decode options)."""
    if is_hf_dir(path):
        if ema:
            raise ConfigError(f"{path} is an HF directory: it has no EMA weights")
        from deepwish.hf.io import load_hf
        return load_hf(path, dtype=dtype, device=device, overrides=overrides).eval()
    state, config = load_weights(path, ema=ema)
    model = Transformer(runtime_overrides(from_dict(config, source=str(path)).model, overrides))
    model.load_state_dict(state)
    return model.to(device=device, dtype=dtype).eval()
