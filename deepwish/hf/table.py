"""Name-table entries: how one deepwish tensor is made from HF checkpoint tensors and back.

Each family module (`hf/qwen3.py`, ...) lists its whole mapping as a list of `Entry`; the
loader and the saver only walk that list, so a checkpoint's layout is visible in one place.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Entry:
    ours: str  # deepwish state_dict key
    hf: tuple[str, ...]  # HF checkpoint keys it is built from
    pack: Callable[[list[torch.Tensor]], torch.Tensor]  # HF tensors -> ours
    unpack: Callable[[torch.Tensor], list[torch.Tensor]]  # ours -> HF tensors (same order as hf)


def one(ours: str, hf: str) -> Entry:
    return Entry(ours, (hf,), lambda ts: ts[0], lambda t: [t])


def cat(ours: str, hf: list[str], dim: int = 0) -> Entry:
    """ours = concatenation of equally sized HF tensors along `dim` (e.g. gate ‖ up)."""
    n = len(hf)
    return Entry(ours, tuple(hf), lambda ts: torch.cat(ts, dim), lambda t: list(t.chunk(n, dim)))


def stack(ours: str, hf: list[str]) -> Entry:
    """ours [E, ...] = stack of per-expert HF tensors."""
    return Entry(ours, tuple(hf), lambda ts: torch.stack(ts), lambda t: list(t.unbind(0)))


def stack_cat(ours: str, hf: list[list[str]], dim: int = 0) -> Entry:
    """ours [E, ...] = stack over experts of (concatenation of each expert's parts along dim)."""
    E, n = len(hf), len(hf[0])
    flat = tuple(k for parts in hf for k in parts)

    def pack(ts):
        return torch.stack([torch.cat(ts[e * n:(e + 1) * n], dim) for e in range(E)])

    def unpack(t):
        return [p for e in range(E) for p in t[e].chunk(n, dim)]

    return Entry(ours, flat, pack, unpack)
