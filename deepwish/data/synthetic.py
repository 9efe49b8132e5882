"""Synthetic token shards for `deepwish train --debug`: a first check of a new preset that needs
no tokenizer and no data.

Each document is an arithmetic sequence modulo the vocabulary, `a, a+s, a+2s, ...` with a random
start `a` and a random stride `s` in 1..7: a model that sees two tokens can predict the rest, so
the loss falls quickly from ln(vocab_size) when training works (and stays there when it does not,
e.g. a broken mask or a detached gradient). No eos: ids span the whole vocabulary, so every
embedding row and logit is exercised.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .shards import write_shard

FINGERPRINT = "synthetic"


def synthetic_documents(n_tokens: int, vocab_size: int, doc_len: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    docs, left = [], n_tokens
    while left > 0:
        n = min(doc_len, left)
        a, s = int(rng.integers(vocab_size)), int(rng.integers(1, 8))
        docs.append((a + s * np.arange(n, dtype=np.int64)) % vocab_size)
        left -= n
    return docs


def write_synthetic_shards(out_dir: str | Path, vocab_size: int, seq_len: int, train_windows: int,
                           val_windows: int, seed: int = 0) -> tuple[Path, Path]:
    """train.bin / val.bin in out_dir holding at least `train_windows` / `val_windows` windows of
    seq_len + 1 tokens; documents are one window long."""
    out = Path(out_dir)
    paths = []
    for name, windows, s in (("train", train_windows, seed), ("val", val_windows, seed + 1)):
        docs = synthetic_documents(windows * (seq_len + 1), vocab_size, seq_len + 1, s)
        write_shard(out / f"{name}.bin", docs, vocab_size, FINGERPRINT)
        paths.append(out / f"{name}.bin")
    return paths[0], paths[1]
