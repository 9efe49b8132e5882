"""Where computation runs, resolved once from a user's word ('auto', 'cpu', 'cuda', 'cuda:N').

Every entry point (trainer, `deepwish generate`, `deepwish convert`, benchmarks) resolves its
device here, so the same word means the same device everywhere and a request that cannot be
honoured is the same one-line error everywhere.
"""
from __future__ import annotations

import torch

from deepwish.config import ConfigError


def resolve_device(name: str, local_rank: int | None = None, *, what: str = "device") -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cuda[:N]' must be available; under torchrun
    (`local_rank` given) a CUDA request means this process's own GPU, cuda:local_rank.
    `what` names the setting in errors (e.g. 'train.device', '--device')."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not (name == "cuda" or name.startswith("cuda:")):
        raise ConfigError(f"{what}={name!r} is not auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"{what}={name!r} but CUDA is not available here")
    if local_rank is not None:
        return torch.device("cuda", local_rank)
    return torch.device(name)

