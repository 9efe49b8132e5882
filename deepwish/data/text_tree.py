"""Token shards from the text files under directory trees, e.g. the running Python's own standard
library and site-packages: a corpus of code and documentation that any machine with the project's
dependencies already holds, so an offline machine can build it in place.

    deepwish data build --tree python [--tree DIR ...] --out DIR [--bpe-vocab 50304 | --tokenizer T]
                        [--token-budget N] [--val-fraction 0.01] [--suffixes .py,.md,.rst,.txt]

Definitions (everything below depends on the files' contents only, never on where the trees are
installed or in which order the file system lists them: two machines holding the same files build
byte-identical shards, and the printed corpus fingerprint says whether they did):
- trees: each --tree is a directory; `python` names the interpreter's own: its stdlib, purelib
  and platlib (sysconfig) and site.getsitepackages(), those that exist, a tree inside another
  dropped (it would be read twice).
- files: every regular file under a tree whose name ends in one of `suffixes` (directory links
  are not followed; file links are read). One file is one document: its bytes decoded as UTF-8.
  Skipped, and counted in the summary: files that are not UTF-8, and files that are empty or
  whitespace only (empty `__init__.py`s are common). A content seen before is kept once.
- order: documents sorted by the sha256 of their bytes (a fixed pseudo-random order that mixes
  packages; the loader shuffles windows anyway).
- split: a document is validation when the first 8 bytes of its sha256, read as an integer
  divided by 2**64, are below `val_fraction`: a fixed file-hash split, independent of which other
  files a machine holds. Near-duplicates (files that differ by a line) are not detected and can
  fall on both sides; both runs of a comparison see the same split, so it is a fair yardstick,
  not a measure of generalisation to unseen code.
- budget: documents are taken in that order, whole, until the next one would take the total
  (train + validation) past `token_budget`; none: every document. The order and the split read
  the same hash prefix, so the tree's validation documents are all first in the order: under a
  budget, validation is the whole tree's split (the same documents at every budget, so losses
  compare across budgets), more than `val_fraction` of the built tokens (the speedrun corpus:
  2.48M validation against 21.5M training tokens at 0.02), and a budget below the tree's
  validation tokens holds no training document (an error).
- tokenizer: with `bpe_vocab` V, a byte-level BPE of V ids (tokenizer.train_bpe: eos id 0) trained
  on the first `bpe_sample_bytes` of training documents in that order (whole documents; the
  sample is fixed by the contents, so the tokenizer is too); otherwise the tokenizer given.
- fingerprint: the first 16 hex digits of sha256 over train.bin then val.bin (whose headers hold
  the tokenizer's fingerprint): equal fingerprints, identical shards.

Output in out_dir: train.bin, val.bin, tokenizer/, meta.json (counts, the trees, the fingerprint),
meta.json written last, so its presence means a complete build.
"""
from __future__ import annotations

import hashlib
import json
import os
import site
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

from .shards import ShardWriter
from .tokenizer import Tokenizer, train_bpe

SUFFIXES = (".py", ".md", ".rst", ".txt")
PYTHON_TREES = "python"  # the --tree spelling of the interpreter's own directories
_RECIPE = "t1"  # recorded in meta.json; bump when the same files would give other shards


class TreeError(ValueError):
    """A tree or option that cannot be used; the message names it."""


@dataclass(frozen=True)
class TreeDoc:
    sha: bytes  # sha256 of the file's bytes: order, split and deduplication key
    text: str
    path: str  # one path it was read from (the first in sorted order), for meta and errors


def python_trees() -> list[Path]:
    """The interpreter's stdlib and site-packages directories that exist, outermost only."""
    paths = sysconfig.get_paths()
    found = [paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths]
    found += site.getsitepackages() + [site.getusersitepackages()]
    return outermost([Path(p) for p in found if p and Path(p).is_dir()])


def outermost(dirs: list[Path]) -> list[Path]:
    """`dirs` resolved, sorted, without duplicates and without any directory inside another."""
    resolved = sorted({d.resolve() for d in dirs})
    out: list[Path] = []
    for d in resolved:
        if not any(d == o or o in d.parents for o in out):
            out.append(d)
    return out


def resolve_trees(specs: list[str]) -> list[Path]:
    """--tree values -> directories (`python` expanded), each checked to exist."""
    if not specs:
        raise TreeError("no --tree given")
    dirs: list[Path] = []
    for s in specs:
        if s == PYTHON_TREES:
            dirs += python_trees()
        elif not Path(s).is_dir():
            raise TreeError(f"--tree {s}: not a directory (nor '{PYTHON_TREES}', the interpreter's own trees)")
        else:
            dirs.append(Path(s))
    return outermost(dirs)


def tree_files(trees: list[Path], suffixes: tuple[str, ...] = SUFFIXES) -> list[Path]:
    """Regular files under `trees` ending in one of `suffixes`, sorted, directory links not followed."""
    files = []
    for root in trees:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(suffixes)]
    return [f for f in files if f.is_file()]


def read_tree_documents(files: list[Path]) -> tuple[list[TreeDoc], dict]:
    """The distinct documents of `files`, sorted by content hash, and the skip counts."""
    docs: dict[bytes, TreeDoc] = {}
    counts = {"files": len(files), "not_utf8": 0, "empty": 0, "duplicate": 0, "bytes": 0}
    for f in files:
        data = f.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            counts["not_utf8"] += 1
            continue
        if not text.strip():
            counts["empty"] += 1
            continue
        sha = hashlib.sha256(data).digest()
        if sha in docs:
            counts["duplicate"] += 1
            continue
        docs[sha] = TreeDoc(sha, text, str(f))
        counts["bytes"] += len(data)
    return [docs[k] for k in sorted(docs)], counts


def is_validation(sha: bytes, val_fraction: float) -> bool:
    """The fixed file-hash split (module doc)."""
    return int.from_bytes(sha[:8], "big") / 2**64 < val_fraction


def bpe_sample(docs: list[TreeDoc], val_fraction: float, sample_bytes: int) -> list[str]:
    """Training documents in order, whole, until their UTF-8 size reaches `sample_bytes`."""
    out, size = [], 0
    for d in docs:
        if size >= sample_bytes:
            break
        if not is_validation(d.sha, val_fraction):
            out.append(d.text)
            size += len(d.text.encode("utf-8"))
    return out


def file_fingerprint(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()[:16]


def build_tree_shards(trees: list[Path], out_dir: str | Path, tokenizer: Tokenizer | None = None, *,
                      bpe_vocab: int | None = None, bpe_sample_bytes: int = 32_000_000,
                      token_budget: int | None = None, val_fraction: float = 0.01,
                      suffixes: tuple[str, ...] = SUFFIXES, batch_docs: int = 512, log=print) -> dict:
    """Shards of the documents under `trees` in out_dir (module doc); returns meta.json's dict."""
    if (tokenizer is None) == (bpe_vocab is None):
        raise TreeError("give exactly one of a tokenizer or bpe_vocab (a BPE trained on the trees)")
    if not 0.0 < val_fraction < 1.0:
        raise TreeError(f"val_fraction {val_fraction} outside (0, 1): the speedrun needs a validation split")
    if token_budget is not None and token_budget <= 0:
        raise TreeError(f"token_budget {token_budget} must be > 0")
    if not suffixes or not all(s.startswith(".") for s in suffixes):
        raise TreeError(f"suffixes {suffixes}: give file endings starting with a dot, e.g. .py,.md")
    t0 = time.perf_counter()
    files = tree_files(trees, suffixes)
    docs, counts = read_tree_documents(files)
    if not docs:
        raise TreeError(f"no {'/'.join(suffixes)} text under {[str(t) for t in trees]}")
    log(f"[deepwish] {counts['files']} files under {len(trees)} tree(s): {len(docs)} documents, "
        f"{counts['bytes'] / 1e6:.1f} MB ({counts['duplicate']} duplicate, {counts['empty']} empty, "
        f"{counts['not_utf8']} not UTF-8 skipped) in {time.perf_counter() - t0:.1f} s")
    tok_meta = {}
    if bpe_vocab is not None:
        t1 = time.perf_counter()
        sample = bpe_sample(docs, val_fraction, bpe_sample_bytes)
        tokenizer = train_bpe(sample, bpe_vocab)
        tok_meta = {"trained": "bpe", "vocab": bpe_vocab, "sample_docs": len(sample),
                    "sample_bytes": sum(len(s.encode("utf-8")) for s in sample)}
        log(f"[deepwish] BPE of {tokenizer.vocab_size} ids trained on {len(sample)} documents "
            f"({tok_meta['sample_bytes'] / 1e6:.1f} MB) in {time.perf_counter() - t1:.1f} s: {tokenizer.fingerprint}")
    if tokenizer.eos_id is None:
        raise TreeError("tokenizer has no eos token; documents could not be told apart by the model")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # written last: its presence means a complete build
    writers = {s: ShardWriter(out / f"{s}.bin", tokenizer.vocab_size, tokenizer.fingerprint) for s in ("train", "val")}
    t2 = time.perf_counter()
    total, used, full = 0, 0, False
    try:
        for i in range(0, len(docs), batch_docs):
            chunk = docs[i:i + batch_docs]
            for d, ids in zip(chunk, tokenizer.encode_batch([d.text for d in chunk])):
                n = len(ids) + 1
                if token_budget is not None and total + n > token_budget:
                    full = True
                    break
                writers["val" if is_validation(d.sha, val_fraction) else "train"].add(ids + [tokenizer.eos_id])
                total += n
                used += 1
            if full:
                break
        if writers["train"].n_docs == 0 or writers["val"].n_docs == 0:
            raise TreeError(f"{used} document(s) within the budget give "
                            f"{writers['train'].n_docs} training and {writers['val'].n_docs} validation "
                            f"document(s); both must be non-empty (the tree's validation documents come first "
                            f"in the hash order: a budget above their {writers['val'].n_tokens} tokens, or "
                            f"another val_fraction)")
        heads = {s: w.close() for s, w in writers.items()}
    except BaseException:
        for w in writers.values():  # a closed writer's file is in place; abort drops only partial ones
            w.abort()
        raise
    tokenizer.save(out / "tokenizer")
    fingerprint = file_fingerprint([out / "train.bin", out / "val.bin"])
    meta = {
        "format": "deepwish-shards", "recipe": f"text-tree-{_RECIPE}", "fingerprint": fingerprint,
        "trees": [str(t) for t in trees], "suffixes": list(suffixes), "python": sys.version.split()[0],
        "files": counts, "documents": len(docs), "documents_used": used, "token_budget": token_budget,
        "val_fraction": val_fraction, "val_rule": "sha256[:8] / 2**64 < val_fraction",
        "tokenizer": {**tok_meta, "fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size,
                      "eos_id": tokenizer.eos_id, "saved": "tokenizer"},
        "train": {"path": "train.bin", "docs": heads["train"].n_docs, "tokens": heads["train"].n_tokens},
        "val": {"path": "val.bin", "docs": heads["val"].n_docs, "tokens": heads["val"].n_tokens},
        "bytes_per_token": round(sum(len(d.text.encode("utf-8")) for d in docs[:used]) / max(total - used, 1), 4),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    log(f"[deepwish] wrote {out / 'train.bin'}: {meta['train']['docs']} docs, {meta['train']['tokens']:,} tokens; "
        f"{out / 'val.bin'}: {meta['val']['docs']} docs, {meta['val']['tokens']:,} tokens "
        f"({meta['bytes_per_token']} bytes/token, encoded in {time.perf_counter() - t2:.1f} s) | "
        f"tokenizer {tokenizer.fingerprint} | corpus fingerprint {fingerprint}")
    return meta
