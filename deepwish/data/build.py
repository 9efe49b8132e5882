"""Build token shards from text, JSONL and chat files; and the default Shakespeare shards.

    deepwish data build --input a.txt b.jsonl chats.csv --out DIR [--tokenizer PATH|qwen|default]
                        [--val-fraction 0.01] [--val-input held_out.jsonl ...] [--seed 0]
                        [--chat-template chatml|qwen3|deepseek_v3|HF_PATH] [--chat-loss assistant|all]

(On-disk HF datasets, streamed with a token budget and mixing weights: `--hf-dataset` and
`--source`, see mix.py. The text files under directory trees, e.g. the installed Python's, with a
BPE trained on them: `--tree DIR|python [--bpe-vocab V]`, see text_tree.py. `--tokenizer` defaults
to $TOKENIZER_PATH, else 'default'.)

Input formats (chosen by file extension; anything else is an error):
- `.txt`: the whole file is one document (UTF-8). Split a large corpus into several files, or
  use .jsonl, to get several documents.
- `.jsonl`: one JSON object per non-empty line, either {"text": "..."} (a document) or
  {"messages": [{"role": ..., "content": ...}, ...]} (a chat, rendered with the chat template,
  see chat.py). Other keys are ignored; having both or neither of text/messages is an error.
- `.csv`: a chat table with a header row holding the columns `conversation_id`, `role`,
  `content` (others ignored). Rows with the same conversation_id form one chat, messages in
  row order, chats in order of first appearance.

Every document is encoded without special tokens and closed with the tokenizer's eos (a chat
whose rendering already ends with it is not closed twice).

Loss masks: with `chat_loss="assistant"` (the default) and any chat among the inputs, the
shards carry a loss mask (shards.py): 1 on the assistant tokens of each chat (found by
incremental rendering, chat.py), 0 on the rest of it and on its closing eos; plain-text
documents are trained on whole. A chat with no assistant token, or with nothing else, is an
error naming its row. `chat_loss="all"` trains on every token (no mask). A chat the template
renders as several documents (Qwen3 rewrites history) stays on one side of the split. The
validation split is either `val_fraction` of all documents (chosen by a seeded permutation,
at least one when the fraction is positive) or, with `val_inputs`, exactly the documents of
those files. Output in `out_dir`: train.bin, val.bin (absent when there is no validation
split), tokenizer/ (a copy, so the shards are self-describing) and meta.json.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .chat import ChatTemplate, encode_conversation, require_template_tokens, resolve_template, validate_messages
from .corpus import corpus_hash, read_corpus, split_documents
from .shards import ShardError, read_header, write_shard
from .tokenizer import Tokenizer, default_cache_dir, default_tokenizer, resolve_tokenizer

SUFFIXES = (".txt", ".jsonl", ".csv")
CSV_COLUMNS = ("conversation_id", "role", "content")
_DEFAULT_DATA_RECIPE = "r1"  # bump when ensure_default_data's output would change


class InputError(ValueError):
    """An input file or build option that cannot be used; the message names it (the CLI prints it
    as one line and exits 2)."""


CHAT_LOSSES = ("assistant", "all")


@dataclass(frozen=True)
class Document:
    text: str  # "" for a chat (rendered when encoded, with the build's template)
    is_chat: bool
    source: str  # file[:line] it came from, for error messages
    messages: tuple = ()  # a chat's messages


@dataclass(frozen=True)
class BuildResult:
    train_bin: Path
    val_bin: Path | None
    meta: dict


def read_documents(path: str | Path) -> list[Document]:
    """The documents of one input file (format by extension, see module doc)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"input {path} is a directory; name the files (e.g. {path}/*.txt)")
    if not path.is_file():
        raise FileNotFoundError(f"input {path} does not exist")
    try:
        return _read_documents(path)
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def _read_documents(path: Path) -> list[Document]:
    if path.suffix == ".txt":
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise ValueError(f"{path}: empty text file")
        return [Document(text, False, str(path))]
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix == ".csv":
        return _read_chat_csv(path)
    raise ValueError(f"{path}: unsupported input type {path.suffix!r}; expected one of {SUFFIXES}")


def _read_jsonl(path: Path) -> list[Document]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg})") from e
            if not isinstance(record, dict) or ("text" in record) == ("messages" in record):
                raise ValueError(f"{where}: expected an object with exactly one of 'text' or 'messages'")
            if "text" in record:
                if not isinstance(record["text"], str):
                    raise ValueError(f"{where}: 'text' must be a string")
                docs.append(Document(record["text"], False, where))
            else:
                docs.append(Document("", True, where, tuple(validate_messages(record["messages"], where))))
    if not docs:
        raise ValueError(f"{path}: no documents")
    return docs


def _read_chat_csv(path: Path) -> list[Document]:
    chats: dict[str, list[dict[str, str]]] = {}
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; a chat CSV needs {list(CSV_COLUMNS)}")
        for row in reader:
            chats.setdefault(row["conversation_id"], []).append({"role": row["role"], "content": row["content"]})
    if not chats:
        raise ValueError(f"{path}: no rows")
    return [
        Document("", True, f"{path} conversation {cid!r}", tuple(validate_messages(m, f"{path} conversation {cid!r}")))
        for cid, m in chats.items()
    ]


def encode_documents(docs: list[Document], tokenizer: Tokenizer) -> list[list[int]]:
    """Ids of each document followed by the eos (chats rendered with ChatML, every token kept)."""
    pieces = encode_masked(docs, tokenizer, resolve_template("chatml"), masked=False)
    return [ids for doc in pieces for ids, _ in doc]


def encode_masked(docs: list[Document], tokenizer: Tokenizer, template: ChatTemplate,
                  masked: bool = True) -> list[list[tuple[list[int], list[int]]]]:
    """Per input document, its encoded pieces (ids ending with the eos, loss mask): one piece
    for text (all ones), one or more for a chat (chat.encode_conversation; the eos is context).
    masked=False: a chat is its whole rendering, every token kept (no assistant turn needed)."""
    if tokenizer.eos_id is None:
        raise ValueError("tokenizer has no eos token; documents could not be told apart by the model")
    eos = tokenizer.eos_id
    texts = iter(tokenizer.encode_batch([d.text for d in docs if not d.is_chat]))
    out = []
    for d in docs:
        if not d.is_chat:
            ids = next(texts)
            out.append([(ids + [eos], [1] * (len(ids) + 1))])
            continue
        if not masked:
            require_template_tokens(tokenizer, template)
            ids = tokenizer.encode(template.render(list(d.messages))) + [eos]
            out.append([(ids, [1] * len(ids))])
            continue
        pieces = []
        for ids, mask in encode_conversation(tokenizer, template, list(d.messages), d.source):
            if not ids or ids[-1] != eos:
                ids, mask = ids + [eos], mask + [0]
            pieces.append((ids, mask))
        out.append(pieces)
    return out


def val_split(n_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of the validation documents: ceil(val_fraction·n) of them (at least one
    if val_fraction > 0), drawn by a permutation seeded with `seed`; never all documents."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction {val_fraction} outside [0, 1)")
    n_val = math.ceil(val_fraction * n_docs) if val_fraction > 0 else 0
    if n_val >= n_docs and n_val > 0:
        raise ValueError(f"val_fraction {val_fraction} of {n_docs} document(s) leaves none for training (a .txt "
                         f"file is one document): give more documents, or held-out ones with --val-input")
    return np.sort(np.random.Generator(np.random.PCG64(seed)).permutation(n_docs)[:n_val])


def _write_split(
    out_dir: Path, train: list[list[int]], val: list[list[int]], tokenizer: Tokenizer, meta: dict,
    train_masks: list[list[int]] | None = None, val_masks: list[list[int]] | None = None,
) -> BuildResult:
    out_dir.mkdir(parents=True, exist_ok=True)
    fp = tokenizer.fingerprint
    train_bin = out_dir / "train.bin"
    write_shard(train_bin, train, tokenizer.vocab_size, fp, loss_masks=train_masks)
    val_bin = None
    if val:
        val_bin = out_dir / "val.bin"
        write_shard(val_bin, val, tokenizer.vocab_size, fp, loss_masks=val_masks)
    tokenizer.save(out_dir / "tokenizer")
    meta = {
        **meta,
        "tokenizer": {
            **meta.get("tokenizer", {}),
            "fingerprint": fp,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "saved": "tokenizer",
        },
        "train": {"path": "train.bin", "docs": len(train), "tokens": sum(map(len, train))},
        "val": None if val_bin is None else {"path": "val.bin", "docs": len(val), "tokens": sum(map(len, val))},
    }
    if train_masks is not None:
        meta["train"]["loss_tokens"] = sum(map(sum, train_masks))
        if val_bin is not None:
            meta["val"]["loss_tokens"] = sum(map(sum, val_masks))
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return BuildResult(train_bin, val_bin, meta)


def build_shards(
    inputs: list[str | Path],
    out_dir: str | Path,
    tokenizer: Tokenizer,
    val_fraction: float = 0.01,
    val_inputs: list[str | Path] = (),
    seed: int = 0,
    tokenizer_spec: str | None = None,
    chat_template: str | ChatTemplate = "chatml",
    chat_loss: str = "assistant",
) -> BuildResult:
    """Tokenize `inputs` into out_dir/{train,val}.bin + meta.json (see module doc).

    Validation is `val_fraction` of the documents, or, when `val_inputs` is given, exactly
    the documents of those files (then val_fraction must be 0). `tokenizer_spec` is only
    recorded in meta.json (how the tokenizer was named: a path, "qwen", "default").
    chat_template: a template or its spelling (chat.resolve_template); chat_loss: "assistant"
    (loss masks on chats) or "all".
    """
    if not inputs:
        raise ValueError("no inputs")
    if val_inputs and val_fraction != 0:
        raise ValueError("give val_fraction=0 when naming val_inputs (both would pick validation documents)")
    if chat_loss not in CHAT_LOSSES:
        raise ValueError(f"chat_loss {chat_loss!r} is not one of {CHAT_LOSSES}")
    template = resolve_template(chat_template) if isinstance(chat_template, str) else chat_template
    docs = [d for p in inputs for d in read_documents(p)]
    masked = chat_loss == "assistant"
    pieces = encode_masked(docs, tokenizer, template, masked)
    if val_inputs:
        val_docs = [d for p in val_inputs for d in read_documents(p)]
        train_p, val_p = pieces, encode_masked(val_docs, tokenizer, template, masked)
        docs = docs + val_docs
    else:
        is_val = np.zeros(len(pieces), dtype=bool)
        is_val[val_split(len(pieces), val_fraction, seed)] = True
        train_p = [x for x, v in zip(pieces, is_val) if not v]
        val_p = [x for x, v in zip(pieces, is_val) if v]
    train = [ids for doc in train_p for ids, _ in doc]
    val = [ids for doc in val_p for ids, _ in doc]
    masked = masked and any(d.is_chat for d in docs)
    train_masks = [m for doc in train_p for _, m in doc] if masked else None
    val_masks = [m for doc in val_p for _, m in doc] if masked else None
    if masked and not any(map(any, train_masks)):
        raise ValueError(f"no training document has a token to train on (inputs {[str(p) for p in inputs]})")
    meta = {
        "format": "deepwish-shards",
        "inputs": [str(p) for p in inputs],
        "val_inputs": [str(p) for p in val_inputs],
        "val_fraction": val_fraction,
        "seed": seed,
        "tokenizer": {"spec": tokenizer_spec},
        "chat_template": template.to_json() if any(d.is_chat for d in docs) else None,
        "chat_loss": chat_loss if any(d.is_chat for d in docs) else None,
    }
    return _write_split(Path(out_dir), train, val, tokenizer, meta, train_masks, val_masks)


def ensure_default_data(
    cache_dir: str | Path | None = None, vocab_size: int = 2048
) -> tuple[Path, Path, Tokenizer]:
    """Shards of the embedded corpus with the default tokenizer, built on first use.

    (train_bin, val_bin, tokenizer); val is the last play (The Tempest), train the other ten.
    Cached under `cache_dir` (default default_cache_dir())/data/, keyed by corpus hash and
    tokenizer fingerprint; built in a private directory and renamed into place, so concurrent ranks
    are safe and the result is the same bytes every time.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    tokenizer = default_tokenizer(vocab_size, cache_dir=root)
    target = root / "data" / f"shakespeare-{corpus_hash()}-{tokenizer.fingerprint}-{_DEFAULT_DATA_RECIPE}"
    train_bin, val_bin = target / "train.bin", target / "val.bin"
    if not _valid_default(train_bin, val_bin, tokenizer):
        plays = split_documents(read_corpus())
        docs = encode_documents([Document(p, False, "embedded corpus") for p in plays], tokenizer)
        tmp = target.parent / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        meta = {"format": "deepwish-shards", "inputs": ["embedded corpus (deepwish/data/corpus)"], "val": "last play"}
        _write_split(tmp, docs[:-1], docs[-1:], tokenizer, {**meta, "tokenizer": {"spec": "default"}})
        if target.exists():  # a stale or broken entry under this key
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the rename; its result is identical
            shutil.rmtree(tmp, ignore_errors=True)
        if not _valid_default(train_bin, val_bin, tokenizer):
            raise RuntimeError(f"default data at {target} is unreadable after building it")
    return train_bin, val_bin, tokenizer


def _valid_default(train_bin: Path, val_bin: Path, tokenizer: Tokenizer) -> bool:
    try:
        return all(read_header(p).fingerprint == tokenizer.fingerprint for p in (train_bin, val_bin))
    except (FileNotFoundError, ShardError):
        return False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", default=None, help=f"input files ({', '.join(SUFFIXES)})")
    # on-disk HF datasets, streamed (data/mix.py, data/hf_dataset.py)
    parser.add_argument("--hf-dataset", default=None, metavar="PATH",
                        help="a datasets save_to_disk directory, or a folder/file of .arrow/.parquet/.jsonl")
    parser.add_argument("--source", action="append", default=[], metavar="PATH[:WEIGHT]",
                        help="one source of a weighted mix (repeatable); source s gets "
                             "token_budget * W_s / sum(W) tokens (needs --token-budget)")
    # the text files under directory trees (data/text_tree.py)
    parser.add_argument("--tree", action="append", default=[], metavar="DIR|python",
                        help="a directory whose text files (--suffixes) are the documents (repeatable); 'python': "
                             "this interpreter's stdlib and site-packages")
    parser.add_argument("--bpe-vocab", type=int, default=None, metavar="V",
                        help="with --tree: train a byte-level BPE of V ids on the trees' training documents "
                             "(instead of --tokenizer)")
    parser.add_argument("--suffixes", default=None, help="with --tree: file endings, comma-separated "
                                                         "(default .py,.md,.rst,.txt)")
    parser.add_argument("--split", default=None, help="split of a DatasetDict or split-named files (default train)")
    parser.add_argument("--text-field", default=None, help="column holding the text (default: 'text')")
    parser.add_argument("--messages-field", default=None,
                        help="column holding chat messages, rendered with --chat-template (default: 'messages')")
    parser.add_argument("--token-budget", type=int, default=None,
                        help="at most this many tokens in the shards (whole documents)")
    parser.add_argument("--out", required=True, help="output directory (train.bin, val.bin, meta.json)")
    parser.add_argument("--tokenizer", default=None,
                        help="'default' (Shakespeare BPE), 'qwen', or a path "
                             "(default: $TOKENIZER_PATH, else 'default')")
    parser.add_argument(
        "--val-fraction", type=float, default=None, help="fraction of documents held out (default 0.01)"
    )
    parser.add_argument("--val-input", nargs="+", default=[], help="files held out as validation instead")
    parser.add_argument("--seed", type=int, default=0, help="seed of the validation split")
    parser.add_argument("--chat-template", default="chatml",
                        help="how chats are rendered: chatml | qwen3 | deepseek_v3 | an HF tokenizer_config.json, "
                             ".jinja file or directory holding one")
    parser.add_argument("--chat-loss", default="assistant", choices=CHAT_LOSSES,
                        help="assistant: chats carry a loss mask on the assistant's tokens; all: every token")


def run(args: argparse.Namespace) -> int:
    trees = getattr(args, "tree", None)
    if sum(bool(x) for x in (args.input, getattr(args, "hf_dataset", None), getattr(args, "source", None), trees)) != 1:
        raise InputError("give exactly one of --input FILE..., --hf-dataset PATH, --source PATH[:WEIGHT]... "
                         "or --tree DIR|python...")
    if trees:
        return _run_tree(args)
    for name in ("bpe_vocab", "suffixes"):
        if getattr(args, name, None) is not None:
            raise InputError(f"--{name.replace('_', '-')} applies to --tree")
    if args.tokenizer is None:
        args.tokenizer = os.environ.get("TOKENIZER_PATH") or "default"
    hf_args = getattr(args, "hf_dataset", None) or getattr(args, "source", None)  # absent in older callers
    if hf_args:
        return _run_mix(args)
    for name in ("split", "text_field", "messages_field", "token_budget"):
        if getattr(args, name, None) is not None:
            raise InputError(f"--{name.replace('_', '-')} applies to --hf-dataset/--source, not to --input")
    if args.val_input and args.val_fraction is not None:
        raise InputError("give either --val-fraction or --val-input, not both")
    val_fraction = 0.0 if args.val_input else (0.01 if args.val_fraction is None else args.val_fraction)
    try:
        tokenizer = resolve_tokenizer(args.tokenizer)
        result = build_shards(
            args.input, args.out, tokenizer, val_fraction, args.val_input, args.seed, tokenizer_spec=args.tokenizer,
            chat_template=getattr(args, "chat_template", "chatml"), chat_loss=getattr(args, "chat_loss", "assistant"),
        )
    except InputError:
        raise
    except (ValueError, ShardError) as e:  # every check above raises these with the file and the reason
        raise InputError(str(e)) from None
    print_summary(result, tokenizer)
    return 0


def print_summary(result: BuildResult, tokenizer: Tokenizer) -> None:
    train, val = result.meta["train"], result.meta["val"]

    def trained(part):  # the loss-mask count, when the shard has one
        return f" ({part['loss_tokens']} trained)" if "loss_tokens" in part else ""
    print(
        f"wrote {result.train_bin}: {train['docs']} docs, {train['tokens']} tokens{trained(train)}"
        + (f"; {result.val_bin}: {val['docs']} docs, {val['tokens']} tokens{trained(val)}" if val
           else "; no validation split")
        + f" (tokenizer {tokenizer.fingerprint}, vocab {tokenizer.vocab_size})"
    )


def _run_tree(args: argparse.Namespace) -> int:
    from .text_tree import SUFFIXES, TreeError, build_tree_shards, resolve_trees
    for name in ("split", "text_field", "messages_field"):
        if getattr(args, name, None) is not None:
            raise InputError(f"--{name.replace('_', '-')} applies to --hf-dataset/--source, not to --tree")
    if args.val_input:
        raise InputError("--val-input applies to --input; --tree splits by file hash (--val-fraction)")
    if args.bpe_vocab is not None and args.tokenizer is not None:
        raise InputError("give either --bpe-vocab (a BPE trained on the trees) or --tokenizer, not both")
    suffixes = tuple(s.strip() for s in args.suffixes.split(",") if s.strip()) if args.suffixes else SUFFIXES
    try:
        tokenizer = None
        if args.bpe_vocab is None:
            spec = args.tokenizer or os.environ.get("TOKENIZER_PATH") or "default"
            tokenizer = resolve_tokenizer(spec)
        build_tree_shards(resolve_trees(args.tree), args.out, tokenizer, bpe_vocab=args.bpe_vocab,
                          token_budget=args.token_budget, suffixes=suffixes,
                          val_fraction=0.01 if args.val_fraction is None else args.val_fraction)
    except (TreeError, ShardError) as e:
        raise InputError(str(e)) from None
    except ValueError as e:  # train_bpe's vocab check names the value
        raise InputError(str(e)) from None
    return 0


def _run_mix(args: argparse.Namespace) -> int:
    from .hf_dataset import DatasetInputError
    from .mix import Source, build_mix, parse_source
    if args.val_input:
        raise InputError("--val-input applies to --input; with --hf-dataset/--source use --val-fraction")
    try:
        sources = [Source(args.hf_dataset)] if args.hf_dataset else [parse_source(s) for s in args.source]
        tokenizer = resolve_tokenizer(args.tokenizer)
        result = build_mix(sources, args.out, tokenizer, token_budget=args.token_budget,
                           val_fraction=0.01 if args.val_fraction is None else args.val_fraction, split=args.split,
                           text_field=args.text_field, messages_field=args.messages_field,
                           tokenizer_spec=args.tokenizer, chat_template=getattr(args, "chat_template", "chatml"),
                           chat_loss=getattr(args, "chat_loss", "assistant"))
    except (DatasetInputError, ShardError) as e:
        raise InputError(str(e)) from None
    except ValueError as e:  # chat validation names the file and row
        raise InputError(str(e)) from None
    train, val = result.meta["train"], result.meta["val"]
    for s in result.meta["sources"]:
        print(f"source {s['path']}: weight {s['weight']:g}, {s['tokens']} tokens, {s['docs']} docs"
              + (f" (quota {s['quota_tokens']}, {s['epochs_completed']} full pass(es))" if s["quota_tokens"] else ""))
    print(f"wrote {result.train_bin}: {train['docs']} docs, {train['tokens']} tokens"
          + (f"; {result.val_bin}: {val['docs']} docs, {val['tokens']} tokens" if val else "; no validation split")
          + f" (tokenizer {tokenizer.fingerprint}, vocab {tokenizer.vocab_size})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deepwish data build", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
