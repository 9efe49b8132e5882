"""`deepwish train --init-from SRC`: a fresh run that starts from existing weights.

SRC is a deepwish run directory, a checkpoint directory (either format) or an HF directory.
Only the weights are read (the EMA weights instead with `--init-ema`): never the optimizer
state, the schedule position, the data position or the RNG states, which all start fresh. The
run's model section must describe the same network as the weights; the fields that only shape
training (initialisation, kernel choice, balancing-loss weights) may differ.
"""
from __future__ import annotations

from pathlib import Path

import torch

from deepwish.config import ConfigError, ModelConfig, from_dict, to_dict
from deepwish.weights import is_hf_dir, load_weights

# Model fields that do not change what the weights mean: free to differ from the source.
TRAINING_ONLY_FIELDS = ("init_std", "attn_backend", "gdn_backend", "dsa_backend", "router_aux_loss_coef",
                        "seq_aux_loss_coef", "bias_update_rate")


def source_config(path: str | Path) -> ModelConfig:
    """The model config the weights at `path` were made with (no tensor is read)."""
    if is_hf_dir(path):
        from deepwish.hf.io import config_from_hf
        return config_from_hf(path)
    from deepwish.train.checkpoint import read_meta
    meta = read_meta(path)
    return from_dict(meta["config"], source=str(meta["path"] / "meta.json")).model


def init_problems(path: str | Path, model: ModelConfig) -> list[str]:
    """One problem naming every model field in which `model` differs from the weights at `path`."""
    try:
        theirs = to_dict(source_config(path))
    except (OSError, ValueError) as e:  # a missing or unreadable source, named
        return [f"--init-from {path}: {e}"]
    ours = to_dict(model)
    diff = [k for k in ours if k not in TRAINING_ONLY_FIELDS and ours[k] != theirs.get(k)]
    if not diff:
        return []
    return [f"--init-from {path}: the model section differs from the weights' in "
            + ", ".join(f"{k} ({theirs.get(k)!r} in the weights vs {ours[k]!r} here)" for k in diff)]


def load_init_weights(path: str | Path, ema: bool = False) -> dict[str, torch.Tensor]:
    """The weights at `path` as a CPU state_dict (deepwish.weights: never the optimizer state);
    ema=True: the EMA weights of a deepwish checkpoint."""
    if is_hf_dir(path):
        if ema:
            raise ConfigError(f"--init-ema: {path} is an HF directory, which holds no EMA weights")
        from deepwish.hf.io import load_hf
        return load_hf(path, dtype=torch.float32).state_dict()
    return load_weights(path, ema=ema)[0]
