"""Token shards from on-disk datasets, streamed, with a token budget and per-source mixing weights.

    deepwish data build --hf-dataset PATH --out DIR [--split S] [--text-field F | --messages-field F]
                        [--token-budget N]
    deepwish data build --source A:3 --source B:1 --token-budget N --out DIR [...]

Each source is read by hf_dataset.py (save_to_disk arrow, parquet, jsonl). Definitions:
- token budget N: the shards (train and validation together) hold at most N tokens. Documents
  are whole: a source stops at the first document that would take it past its quota, so the
  total is within one document of N.
- weights: `--source PATH:W` (W > 0; `PATH` alone means W = 1). Source s gets the quota
  N · W_s / sum(W) tokens. A source with fewer tokens than its quota is read again from the
  start (up-sampled; the passes are reported as epochs), a larger one is cut at its quota
  (down-sampled, the first documents in reading order are kept). Weights need --token-budget;
  one source without a budget is read once, whole.
- order: documents of the sources are interleaved, always from the source furthest behind its
  quota (smallest tokens taken / quota), so any prefix of the shard has the mix's proportions.
- validation: document i of the output (counted over all sources) is held out when
  ceil((i+1)·f) > ceil(i·f), f = val_fraction: the first document, then one in every 1/f, spread
  evenly without knowing the total in advance (ceil(n·f) of n documents, as `--input` does).
- chats: rendered with `chat_template` (chat.py, ChatML by default); with chat_loss="assistant"
  (the default) the shards carry a loss mask on the assistant's tokens (plain-text documents of
  other sources are all ones in it), and a conversation the template splits into several
  documents (Qwen3) stays whole on one side of the split; "all" keeps every token.
Memory is bounded: one record batch per source, the document offsets, and one document.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .chat import ChatTemplate, encode_conversation, require_template_tokens, resolve_template
from .hf_dataset import DatasetInputError, iter_texts
from .shards import ShardWriter
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class MixResult:
    train_bin: Path
    val_bin: Path | None
    meta: dict


@dataclass(frozen=True)
class Source:
    path: str
    weight: float = 1.0


def parse_source(spec: str) -> Source:
    """`PATH:WEIGHT` or `PATH` (weight 1). The weight is what follows the last colon, when that
    parses as a number; a path that itself ends in `:<number>` needs an explicit `:1` after it."""
    path, sep, tail = spec.rpartition(":")
    if sep:
        try:
            weight = float(tail)
        except ValueError:
            return Source(spec)
        if not (weight > 0 and math.isfinite(weight)):
            raise DatasetInputError(f"--source {spec}: weight {tail} must be a finite number > 0")
        if not path:
            raise DatasetInputError(f"--source {spec}: no path before the weight")
        return Source(path, weight)
    return Source(spec)


def is_validation(i: int, val_fraction: float) -> bool:
    """Document i (0-based) goes to validation; see the module doc."""
    return val_fraction > 0 and math.ceil(round((i + 1) * val_fraction, 9)) > math.ceil(round(i * val_fraction, 9))


class _Stream:
    """Encoded records of one source, each a list of documents (ids + eos, loss mask or None),
    re-reading the source from the start when `repeat`."""

    def __init__(self, src: Source, quota: float, tokenizer: Tokenizer, repeat: bool, read_args: dict,
                 template: ChatTemplate, masked: bool):
        self.src, self.quota, self.tok, self.repeat, self.read_args = src, quota, tokenizer, repeat, read_args
        self.template, self.masked = template, masked
        self.tokens = self.docs = 0
        self.epochs = 0  # completed passes over the source
        self.done = False
        self._it = self._documents()

    def _documents(self) -> Iterator[list[tuple[list[int], list[int] | None]]]:
        eos = self.tok.eos_id
        while True:
            n = 0
            for items, is_chat in iter_texts(self.src.path, render=False, **self.read_args):
                if is_chat:
                    require_template_tokens(self.tok, self.template)
                if is_chat and self.masked:
                    for messages, where in items:
                        n += 1
                        yield [(ids + [eos], mask + [0]) if ids[-1:] != [eos] else (ids, mask)
                               for ids, mask in encode_conversation(self.tok, self.template, messages, where)]
                    continue
                texts = [self.template.render(m) for m, _ in items] if is_chat else items
                for ids in self.tok.encode_batch(texts):
                    n += 1
                    yield [(ids + [eos], None)]
            if n == 0:
                raise DatasetInputError(f"{self.src.path}: no documents")
            self.epochs += 1
            if not self.repeat:
                return

    def next(self) -> list[tuple[list[int], list[int] | None]] | None:
        return next(self._it, None)


def build_mix(sources: list[Source], out_dir: str | Path, tokenizer: Tokenizer, *, token_budget: int | None = None,
              val_fraction: float = 0.01, split: str | None = None, text_field: str | None = None,
              messages_field: str | None = None, tokenizer_spec: str | None = None, batch_rows: int = 1024,
              progress: bool | None = None, chat_template: str | ChatTemplate = "chatml",
              chat_loss: str = "assistant") -> MixResult:
    """Stream `sources` into out_dir/{train,val}.bin + tokenizer/ + meta.json (module doc)."""
    from tqdm import tqdm

    if not sources:
        raise DatasetInputError("no sources")
    if token_budget is not None and token_budget <= 0:
        raise DatasetInputError(f"--token-budget {token_budget} must be > 0")
    if token_budget is None and (len(sources) > 1 or sources[0].weight != 1.0):
        raise DatasetInputError("mixing weights need --token-budget N (each source's share is a share of N tokens)")
    if not 0.0 <= val_fraction < 1.0:
        raise DatasetInputError(f"val_fraction {val_fraction} outside [0, 1)")
    if tokenizer.eos_id is None:
        raise DatasetInputError("tokenizer has no eos token; documents could not be told apart by the model")
    if chat_loss not in ("assistant", "all"):
        raise DatasetInputError(f"chat_loss {chat_loss!r} is not one of ('assistant', 'all')")
    template = resolve_template(chat_template) if isinstance(chat_template, str) else chat_template
    total_w = sum(s.weight for s in sources)
    read_args = dict(split=split, text_field=text_field, messages_field=messages_field, batch_rows=batch_rows)
    streams = [_Stream(s, math.inf if token_budget is None else token_budget * s.weight / total_w, tokenizer,
                       repeat=token_budget is not None, read_args=read_args, template=template,
                       masked=chat_loss == "assistant") for s in sources]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    writers = {"train": ShardWriter(out / "train.bin", tokenizer.vocab_size, tokenizer.fingerprint),
               "val": ShardWriter(out / "val.bin", tokenizer.vocab_size, tokenizer.fingerprint)}
    bar = tqdm(total=token_budget, unit="tok", unit_scale=True, desc="data build", file=sys.stderr,
               disable=(not progress) if progress is not None else None)
    n_out = 0
    try:
        while True:
            live = [s for s in streams if not s.done]
            if not live:
                break
            s = min(live, key=lambda s: s.tokens / s.quota if s.quota != math.inf else s.tokens)
            record = s.next()
            size = 0 if record is None else sum(len(ids) for ids, _ in record)
            if record is None or s.tokens + size > s.quota:
                s.done = True
                continue
            writer = writers["val" if is_validation(n_out, val_fraction) else "train"]
            for ids, mask in record:
                writer.add(ids, mask)
            n_out += 1
            s.tokens += size
            s.docs += 1
            bar.update(size)
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        bar.close()
    if writers["train"].n_docs == 0:
        for w in writers.values():
            w.abort()
        raise DatasetInputError(f"no training documents: {n_out} document(s) read"
                         + (f", all within the validation fraction {val_fraction}" if n_out else "")
                         + (f"; a budget of {token_budget} tokens may be smaller than one document" if token_budget
                            else ""))
    train_h = writers["train"].close()
    if writers["val"].n_docs:
        val_h = writers["val"].close()
    else:
        writers["val"].abort()
        val_h = None
    tokenizer.save(out / "tokenizer")
    meta = {
        "format": "deepwish-shards",
        "sources": [{"path": s.src.path, "weight": s.src.weight,
                     "quota_tokens": None if s.quota == math.inf else round(s.quota),
                     "tokens": s.tokens, "docs": s.docs, "epochs_completed": s.epochs} for s in streams],
        "split": split, "text_field": text_field, "messages_field": messages_field,
        "token_budget": token_budget, "val_fraction": val_fraction, "val_rule": "ceil((i+1)f) > ceil(i f)",
        "tokenizer": {"spec": tokenizer_spec, "fingerprint": tokenizer.fingerprint,
                      "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id, "saved": "tokenizer"},
        "chat_template": template.to_json(), "chat_loss": chat_loss,
        "train": {"path": "train.bin", "docs": train_h.n_docs, "tokens": train_h.n_tokens},
        "val": None if val_h is None else {"path": "val.bin", "docs": val_h.n_docs, "tokens": val_h.n_tokens},
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return MixResult(out / "train.bin", None if val_h is None else out / "val.bin", meta)
