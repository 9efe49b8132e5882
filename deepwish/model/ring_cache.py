"""Sliding-window KV cache as a ring buffer, for layers trained with a window (mixer 'swa').

A windowed layer never looks further back than `window` tokens, so it needs `window` slots, not
one per position: slot = position % S with S = window + slack. Each slot also stores the
position it holds, and the attention mask is built from those stored positions
(k_pos <= q_pos and k_pos > q_pos - window), so after the ring wraps nothing but the window is
visible. Empty slots hold a position far in the future and are masked by causality.

Why slack: a write at position p evicts position p - S. Speculative decoding writes up to k+1
tokens ahead of what it later accepts; with S >= window + k + 1 those writes only evict
positions already outside every future query's window. Plain decoding needs slack 0.

Two paths, by the chunk length T (a static shape, so each is graph-capturable):
- T == 1 (decode): write, then attend over the ring; the evicted entry (p - S) is outside the
  window anyway.
- T > 1 (prefill, verification): a chunk may evict keys its own earlier queries still need, so
  the queries attend over [the ring before the write | the chunk], and then only the last
  min(T, S) tokens of the chunk are written. Ring entries at or after the chunk's first
  position are stale (rejected speculation) and are hidden.

Deviations: the chunk must be consecutive positions per row (prefill and decode always are);
ModelCache.max_len still bounds positions (CacheFullError as for any cache), it just no
longer costs memory in the windowed layers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from deepwish.model.cache import ModelCache, take_rows_, write_rows_

EMPTY = 2 ** 62  # position of an empty slot: beyond any query, hence masked by causality


@dataclass
class RingKVCache:
    k: torch.Tensor  # [B, Hkv, S, D]
    v: torch.Tensor  # [B, Hkv, S, Dv]
    pos: torch.Tensor  # [B, S] int64: position held by each slot (EMPTY if none)
    window: int
    slack: int

    @classmethod
    def empty(cls, batch: int, window: int, slack: int, n_kv_heads: int, head_dim: int,
              dtype=torch.float32, device=None) -> "RingKVCache":
        if window < 1 or slack < 0:
            raise ValueError(f"ring cache needs window >= 1 and slack >= 0, got window={window}, slack={slack}")
        S = window + slack
        return cls(torch.zeros(batch, n_kv_heads, S, head_dim, dtype=dtype, device=device),
                   torch.zeros(batch, n_kv_heads, S, head_dim, dtype=dtype, device=device),
                   torch.full((batch, S), EMPTY, dtype=torch.long, device=device), window, slack)

    @property
    def slots(self) -> int:
        return self.k.shape[2]

    def _write(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        slot = positions % self.slots  # [B, T], distinct within a row when T <= S
        write_rows_(self.k, 2, slot, k)
        write_rows_(self.v, 2, slot, v)
        write_rows_(self.pos, 1, slot, positions)

    def keys_for(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """positions [B, T], k, v [B, Hkv, T, D] -> (keys, values [B, Hkv, Tk, D], key positions [B, Tk])
        for the queries at `positions`; the chunk is stored as a side effect."""
        T = positions.shape[1]
        if T == 1:
            self._write(positions, k, v)
            return self.k, self.v, self.pos
        stale = self.pos >= positions[:, :1]
        old_pos = self.pos.masked_fill(stale, EMPTY)
        keys = torch.cat([self.k, k.to(self.k.dtype)], dim=2)
        values = torch.cat([self.v, v.to(self.v.dtype)], dim=2)
        key_pos = torch.cat([old_pos, positions], dim=1)
        keep = min(T, self.slots)
        self._write(positions[:, -keep:], k[:, :, -keep:], v[:, :, -keep:])
        return keys, values, key_pos

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()
        self.pos.fill_(EMPTY)

    def reorder(self, index: torch.Tensor) -> None:
        """Row b becomes row index[b] (beam search); in place, slot positions included."""
        for t in (self.k, self.v, self.pos):
            take_rows_(t, index)


def make_ring_cache(model, batch: int, max_len: int, slack: int = 0, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> ModelCache:
    """Like `model.make_cache`, but every sliding-window attention layer gets a RingKVCache of
    window + slack slots; other layers get their usual cache. `slack` >= k + 1 for speculation."""
    if max_len > model.cfg.max_seq_len:
        raise ValueError(f"cache length {max_len} exceeds the model's max_seq_len {model.cfg.max_seq_len}")
    p = model.embed.weight
    dtype, device = dtype or p.dtype, device or p.device
    layers, windowed = [], 0
    for b in model.blocks:
        window = getattr(b.mixer, "window", 0)
        if window > 0:
            layers.append(RingKVCache.empty(batch, window, slack, b.mixer.n_kv_heads, b.mixer.head_dim, dtype, device))
            windowed += 1
        else:
            layers.append(b.mixer.make_cache(batch, max_len, dtype, device))
    if not windowed:
        raise ValueError("the model has no sliding-window layers (mixer 'swa' with sliding_window > 0); "
                         "a ring cache would change nothing: use model.make_cache")
    return ModelCache(layers, max_len, batch)
