"""The data checked against a resolved training configuration, before the first step.

Every problem is collected (none raised on the way), so a run that cannot start says all of
them at once: a shard that does not open, token ids outside the model's vocabulary, a loss mask
that keeps no token, a training shard too small for one step of the global batch, a validation
shard too small for one evaluation batch on every rank.
"""
from __future__ import annotations

from .loader import n_windows
from .shards import ShardError, check_token_ids, count_loss_targets, open_shard


def data_problems(train_bin: str, val_bin: str, vocab_size: int, seq_len: int, batch_size: int,
                  world_size: int = 1) -> list[str]:
    """Problems of the (train, val) shards for this model and batch shape; [] when they fit."""
    out: list[str] = []
    for role, path in (("train", train_bin), ("val", val_bin)):
        try:
            shard = open_shard(path)
            check_token_ids(shard, vocab_size)
        except (ShardError, FileNotFoundError) as e:
            out.append(f"data.{role}_bin: {e}")
            continue
        if shard.loss_mask is not None and count_loss_targets(shard) == 0:
            out.append(f"data.{role}_bin: {path} has a loss mask that keeps no token (no assistant reply to "
                       f"train on); nothing would be learned")
            continue
        windows = n_windows(shard.header.n_tokens, seq_len)
        need = world_size * batch_size  # one training step, or one evaluation batch per rank
        if windows < need:
            what = "one step" if role == "train" else "one evaluation batch per rank"
            remedy = "more training text" if role == "train" else \
                "more validation text (data build's --val-fraction or --val-input)"
            out.append(f"data.{role}_bin: {path} has {shard.header.n_tokens} tokens = {windows} windows of "
                       f"seq_len+1={seq_len + 1}; {what} needs {need} (world_size {world_size} x batch_size "
                       f"{batch_size}): give {remedy} or a smaller train.batch_size")
    return out
