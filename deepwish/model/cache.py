"""Decoding caches: preallocated, fixed shapes, one object per layer.

The slot of a token in a KV cache is its position, so writing is a scatter at `positions` and
the attention mask is `slot <= query position` (plus the window for sliding-window layers).
This serves prefill and one-token decode alike, lets a batch hold prompts of different
lengths (right-padded: a pad token's slot is overwritten by the real token at that position
before any real query can see it), and keeps every shape static so a decode step can be
captured as a CUDA graph.

Mixers build their own cache type through `make_cache`; `ModelCache` is just the list.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


class CacheFullError(RuntimeError):
    """A sequence would grow past the cache length."""


def take_rows_(t: torch.Tensor, index: torch.Tensor) -> None:
    """t[b] <- t[index[b]] along the batch dimension, in place: the storage stays, so a decode
    step captured as a CUDA graph keeps reading the reordered cache (beam search)."""
    t.copy_(t.index_select(0, index))


def scatter_rows_(buf: torch.Tensor, dim: int, slots: torch.Tensor, values: torch.Tensor) -> None:
    """buf[b, .., slots[b, t], ..] <- values[b, .., t, ..] along `dim` (1 or 2), by one scatter_.
    buf [B, L, ...] (dim 1) or [B, H, L, ...] (dim 2), slots [B, T], values shaped like buf with T at dim."""
    shape = [1] * buf.dim()
    shape[0], shape[dim] = slots.shape
    buf.scatter_(dim, slots.view(shape).expand(values.shape), values.to(buf.dtype))


def index_put_rows_(buf: torch.Tensor, dim: int, slots: torch.Tensor, values: torch.Tensor) -> None:
    """The same write as `scatter_rows_`, as an index_put_ (buf[rows, slots] = values)."""
    rows = torch.arange(buf.shape[0], device=buf.device)[:, None]
    if dim == 1:
        buf[rows, slots] = values.to(buf.dtype)
    elif dim == 2:  # advanced indices around a slice: the indexed dims come first, [B, T, H, ...]
        buf[rows, :, slots] = values.transpose(1, 2).to(buf.dtype)
    else:
        raise ValueError(f"index_put_rows_: dim must be 1 or 2, got {dim}")


def write_rows_(buf: torch.Tensor, dim: int, slots: torch.Tensor, values: torch.Tensor) -> None:
    """Write a chunk of T tokens into a cache buffer at per-row slots (see `scatter_rows_`).

    Eagerly a scatter_ is one kernel. Under torch.compile the same write is made an index_put_:
    inductor performs an index_put_ on a graph input in place, but lowers a scatter_ there to a
    copy of the whole buffer, the scatter and a copy back, i.e. moves the cache twice per layer and
    step (measured in the generated code; gpt-fast writes its cache this way for the same reason).
    Both forms write the same values."""
    if torch.compiler.is_compiling():
        index_put_rows_(buf, dim, slots, values)
    else:
        scatter_rows_(buf, dim, slots, values)


@dataclass
class KVCache:
    k: torch.Tensor  # [B, Hkv, L, D]
    v: torch.Tensor  # [B, Hkv, L, Dv]

    @classmethod
    def empty(cls, batch: int, max_len: int, n_kv_heads: int, head_dim: int, v_head_dim: int | None = None,
              dtype=torch.float32, device=None) -> "KVCache":
        v_dim = head_dim if v_head_dim is None else v_head_dim
        return cls(torch.zeros(batch, n_kv_heads, max_len, head_dim, dtype=dtype, device=device),
                   torch.zeros(batch, n_kv_heads, max_len, v_dim, dtype=dtype, device=device))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, Hkv, T, D] at slots `positions` [B, T]; return the whole cache."""
        write_rows_(self.k, 2, positions, k)
        write_rows_(self.v, 2, positions, v)
        return self.k, self.v

    def keys_for(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write, then return (keys, values, key positions [B, L]) for the queries at `positions`.
        The attention mask is built from key positions, so a ring cache (model/ring_cache.py),
        whose slots are not positions, plugs into the same attention code."""
        k_all, v_all = self.update(positions, k, v)
        return k_all, v_all, torch.arange(self.max_len, device=positions.device).expand(positions.shape[0], -1)

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()

    def reorder(self, index: torch.Tensor) -> None:
        """Row b becomes row index[b] (beam search); in place."""
        take_rows_(self.k, index)
        take_rows_(self.v, index)


@dataclass
class RecurrentCache:
    """State of a recurrent mixer (Gated DeltaNet): fixed size whatever the sequence length.

    A zero state is exactly "nothing seen yet" (the conv reads zeros before a sequence starts and
    the recurrence starts from S = 0), so a fresh cache needs no flag; a cache reused for a new
    sequence must be `reset()` first, since unlike a KV cache nothing here is overwritten by slot.
    """

    conv_state: torch.Tensor  # [B, D_conv, W-1]: the last W-1 conv inputs, oldest first
    recurrent_state: torch.Tensor  # [B, HV, K, V] fp32

    @classmethod
    def empty(cls, batch: int, conv_dim: int, conv_width: int, n_v_heads: int, k_head_dim: int, v_head_dim: int,
              dtype=torch.float32, device=None) -> "RecurrentCache":
        return cls(torch.zeros(batch, conv_dim, conv_width - 1, dtype=dtype, device=device),
                   torch.zeros(batch, n_v_heads, k_head_dim, v_head_dim, dtype=torch.float32, device=device))

    def reset(self) -> None:
        self.conv_state.zero_()
        self.recurrent_state.zero_()

    def reorder(self, index: torch.Tensor) -> None:
        """Row b becomes row index[b] (beam search); in place."""
        take_rows_(self.conv_state, index)
        take_rows_(self.recurrent_state, index)


@dataclass
class MLACache:
    """Multi-head latent attention cache (DeepSeek-V2/V3): per token only the normalised latent
    c_kv and the shared, already-rotated rope key, kv_lora_rank + qk_rope_head_dim numbers
    (512 + 64 = 576 at V3 sizes) whatever the head count. Heads are recovered from the latent
    by the absorbed up-projections in model/mla.py."""

    c_kv: torch.Tensor  # [B, L, kv_lora_rank]
    k_pe: torch.Tensor  # [B, L, qk_rope_head_dim]

    @classmethod
    def empty(cls, batch: int, max_len: int, kv_lora_rank: int, rope_dim: int, dtype=torch.float32,
              device=None) -> "MLACache":
        return cls(torch.zeros(batch, max_len, kv_lora_rank, dtype=dtype, device=device),
                   torch.zeros(batch, max_len, rope_dim, dtype=dtype, device=device))

    @property
    def max_len(self) -> int:
        return self.c_kv.shape[1]

    def update(self, positions: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write c_kv [B, T, R], k_pe [B, T, P] at slots `positions` [B, T]; return the whole cache."""
        write_rows_(self.c_kv, 1, positions, c_kv)
        write_rows_(self.k_pe, 1, positions, k_pe)
        return self.c_kv, self.k_pe

    def reset(self) -> None:
        self.c_kv.zero_()
        self.k_pe.zero_()

    def reorder(self, index: torch.Tensor) -> None:
        """Row b becomes row index[b] (beam search); in place."""
        take_rows_(self.c_kv, index)
        take_rows_(self.k_pe, index)


class ModelCache:
    """Per-layer caches of one model, in layer order (index = layer index)."""

    def __init__(self, layers: list, max_len: int, batch: int):
        self.layers = layers
        self.max_len = max_len
        self.batch = batch

    def __getitem__(self, i: int):
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    def reset(self) -> None:
        for c in self.layers:
            c.reset()

    def reorder(self, index: torch.Tensor) -> None:
        """Every layer's row b becomes its row index[b] (index [batch] int64: beam search keeps
        the continued beams); in place, whatever the cache kind."""
        if index.shape != (self.batch,):
            raise ValueError(f"reorder index of shape {tuple(index.shape)} for a cache of batch {self.batch}")
        for c in self.layers:
            c.reorder(index)

    def nbytes(self) -> int:
        """Bytes held by all tensors of the cache."""
        total = 0
        for c in self.layers:
            for v in vars(c).values():
                if isinstance(v, torch.Tensor):
                    total += v.numel() * v.element_size()
        return total
