"""Packing loader: batches of fixed-length windows cut from a memory-mapped shard.

Shape legend: B = batch_size (per rank), T = seq_len, W = world_size.

The shard's documents lie back to back (each ending with eos). Window w is the T + 1 tokens
starting at w·T, so consecutive windows overlap by one token and every token but the first
is a target exactly once per epoch. A batch holds B windows:

    input_ids [B, T] int64   window[:-1]
    targets   [B, T] int64   window[1:]  (the next token, across document ends too);
                             IGNORE_INDEX (-100) where the shard's loss mask is 0
    doc_ids   [B, T] int32   0 for the document the window starts in, +1 at each new document
    positions [B, T] int64   offset inside the document, restarting at 0 at each document
                             start; the document the window starts in counts from 0 at the
                             window start (so positions stay < T whatever the document length)

No loss masking at boundaries: the eos closing a document is a real target (the model must
learn where documents end), and so is the first token of the next document, predicted from
the eos. A model that attends only within a document (doc_ids) sees packed documents exactly
as if they were run apart.

Loss masks (shards written with one, e.g. chats where only the assistant's replies are
trained): a target whose token has mask 0 becomes IGNORE_INDEX, so the model's forward skips it
and the trainer's count of targets (train/loss.py count_targets, summed over micro-batches and
ranks) is the count of unmasked targets. The inputs are unchanged: masked tokens are still
context. A window of only masked targets is legal; it adds nothing to the loss or its normaliser.

Order: per epoch, a permutation of all windows drawn from numpy's PCG64 seeded with
(seed, epoch); step s of an epoch takes windows perm[s·W·B : (s+1)·W·B], rank r the r-th
slice of B of them, so ranks never share a window. The tail of fewer than W·B windows is
dropped each epoch (a different tail each epoch). The position (epoch, step) is the whole
state: a resumed loader yields exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch

from .shards import Shard, ShardHeader, open_shard

IGNORE_INDEX = -100  # = deepwish.model.objective.IGNORE_INDEX (not imported: the data layer needs no model)


class Batch(NamedTuple):
    input_ids: torch.Tensor  # [B, T] int64
    targets: torch.Tensor  # [B, T] int64
    doc_ids: torch.Tensor  # [B, T] int32
    positions: torch.Tensor  # [B, T] int64

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in self))


def n_windows(n_tokens: int, seq_len: int) -> int:
    """Number of windows of seq_len + 1 tokens at stride seq_len."""
    return max(0, (n_tokens - 1) // seq_len)


def window_batch(shard: Shard, window_index: np.ndarray, seq_len: int) -> Batch:
    """The Batch of windows `window_index` [B] (window w starts at token w·seq_len)."""
    starts = window_index.astype(np.int64) * seq_len  # [B]
    idx = starts[:, None] + np.arange(seq_len + 1, dtype=np.int64)  # [B, T+1]
    window = shard.tokens[idx].astype(np.int64)
    inputs = idx[:, :-1]
    offsets = np.asarray(shard.doc_offsets)
    doc = np.searchsorted(offsets, inputs, side="right") - 1  # [B, T] global document index
    # count document changes along the row, so doc_ids are 0, 1, 2... even across empty docs
    doc_ids = np.zeros(doc.shape, dtype=np.int32)
    np.cumsum(doc[:, 1:] != doc[:, :-1], axis=1, out=doc_ids[:, 1:])
    positions = inputs - np.maximum(offsets[doc], starts[:, None])
    targets = window[:, 1:].copy()  # a copy even when B = 1 (a view would carry the mask into the inputs)
    if shard.loss_mask is not None:
        targets[shard.loss_mask[idx[:, 1:]] == 0] = IGNORE_INDEX
    return Batch(
        torch.from_numpy(np.ascontiguousarray(window[:, :-1])),
        torch.from_numpy(targets),
        torch.from_numpy(doc_ids),
        torch.from_numpy(positions),
    )


class PackedLoader:
    """Endless, seeded, rank-sharded iterator of Batches over one shard (see module doc)."""

    def __init__(
        self,
        path: str | Path,
        seq_len: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..world_size-1 (world_size={world_size})")
        self.shard = open_shard(path)
        self.seq_len, self.batch_size = seq_len, batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.n_windows = n_windows(self.shard.header.n_tokens, seq_len)
        self.steps_per_epoch = self.n_windows // (world_size * batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{path}: {self.shard.header.n_tokens} tokens make {self.n_windows} windows of "
                f"seq_len+1={seq_len + 1}; one step needs world_size*batch_size = {world_size * batch_size}"
            )
        self.epoch, self.step = 0, 0
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)

    @property
    def header(self) -> ShardHeader:
        return self.shard.header

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            if self.shuffle:
                self._order = np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(self.n_windows)
            else:
                self._order = np.arange(self.n_windows, dtype=np.int64)
            self._order_epoch = epoch
        return self._order

    def next_batch(self) -> Batch:
        order = self._epoch_order(self.epoch)
        first = (self.step * self.world_size + self.rank) * self.batch_size
        batch = window_batch(self.shard, order[first : first + self.batch_size], self.seq_len)
        self.step += 1
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        return batch

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        return self.next_batch()

    def state_dict(self) -> dict:
        """Position of the next batch plus what must match for it to mean the same batch."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "n_tokens": self.shard.header.n_tokens,
            "fingerprint": self.shard.header.fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at state's (epoch, step); every other field must equal this loader's."""
        mine = self.state_dict()
        for key in ("seed", "shuffle", "seq_len", "batch_size", "world_size", "n_tokens", "fingerprint"):
            if state[key] != mine[key]:
                raise ValueError(
                    f"loader state mismatch: {key} is {state[key]!r} in the checkpoint, {mine[key]!r} here"
                )
        if not (0 <= state["step"] < self.steps_per_epoch and state["epoch"] >= 0):
            raise ValueError(f"loader state out of range: epoch {state['epoch']}, step {state['step']}")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


class Lookahead:
    """A loader whose next batches can be drawn ahead of their step: `take(n)` returns n batches
    (those drawn ahead, or n drawn now), `ahead(n)` draws the next n now and holds them. The
    trainer draws step s+1's batches while the GPU still runs step s (the host would otherwise
    wait for it, then leave the GPU idle while it reads the shard). `state_dict` is the position
    before the held batches, so a checkpoint taken meanwhile resumes at them; everything else is
    the wrapped loader's."""

    def __init__(self, loader: PackedLoader):
        self.loader = loader
        self._held: tuple[list[Batch], dict] | None = None  # (batches, the loader's state before them)

    def take(self, n: int) -> list[Batch]:
        if self._held is None:
            return [self.loader.next_batch() for _ in range(n)]
        held = self._held[0]
        if len(held) != n:
            raise ValueError(f"Lookahead: {len(held)} batches were drawn ahead, {n} are taken")
        self._held = None
        return held

    def ahead(self, n: int) -> None:
        if self._held is not None:
            raise ValueError("Lookahead: batches are already held; take them first")
        state = self.loader.state_dict()
        self._held = ([self.loader.next_batch() for _ in range(n)], state)

    def state_dict(self) -> dict:
        return dict(self._held[1]) if self._held is not None else self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._held = None
        self.loader.load_state_dict(state)

    def __getattr__(self, name):  # batch_size, world_size, header, ...: the wrapped loader's
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)


def sequential_batches(
    path: str | Path,
    seq_len: int,
    batch_size: int,
    max_batches: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[Batch]:
    """Validation batches: windows 0, 1, 2... in order, full batches only, at most
    `max_batches` in all (None = every full batch), rounded down to a multiple of
    world_size; batch j goes to rank j % world_size."""
    shard = open_shard(path)
    total = n_windows(shard.header.n_tokens, seq_len) // batch_size
    if total == 0:
        raise ValueError(
            f"{path}: {shard.header.n_tokens} tokens hold no full batch of {batch_size} windows of {seq_len + 1}"
        )
    if max_batches is not None:
        total = min(total, max_batches)
    total -= total % world_size  # every rank gets the same number of batches
    if total == 0:
        raise ValueError(f"{path}: fewer full batches than world_size={world_size}")
    for j in range(rank, total, world_size):
        yield window_batch(shard, np.arange(j * batch_size, (j + 1) * batch_size), seq_len)


def unigram_entropy(path: str | Path) -> float:
    """Entropy (nats per token) of the shard's token frequencies: the loss of a model that
    predicts every token from its frequency alone, comparable with cross-entropy loss. With a
    loss mask, only the tokens it keeps count (those the validation loss is measured on)."""
    shard = open_shard(path)
    counts = np.zeros(shard.header.vocab_size, dtype=np.int64)
    chunk = 1 << 24  # bincount makes an intp copy; bound it
    for i in range(0, shard.header.n_tokens, chunk):
        ids = shard.tokens[i : i + chunk]
        if shard.loss_mask is not None:  # the tokens the loss is measured on
            ids = ids[shard.loss_mask[i : i + chunk] != 0]
        counts += np.bincount(ids, minlength=shard.header.vocab_size)
    n = counts.sum()
    if n == 0:
        raise ValueError(f"{path}: no (unmasked) tokens, so no entropy")
    p = counts[counts > 0] / n
    return float(-(p * np.log(p)).sum())
