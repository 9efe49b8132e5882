"""Binary token shards: one file of documents, memory-mapped for reading.

Layout (little-endian), version 2 (version 1 is the same without the flags word and the mask):

    offset  size  field
    0       8     magic b"DWSHARD1"
    8       4     format version (uint32) = 1
    12      4     token dtype code (uint32): 2 = uint16 (vocab <= 65536), 4 = uint32
    16      8     n_tokens (uint64)
    24      8     vocab_size (uint64) of the tokenizer that wrote the ids
    32      8     n_docs (uint64)
    40      32    tokenizer fingerprint, ASCII, NUL-padded
    72      4     flags (uint32; version 2): bit 0 = a loss-mask channel follows the offsets
    76      52    zero padding (header is HEADER_BYTES = 128, so tokens stay aligned)
    128           tokens: n_tokens ids, documents back to back (each document as given to
                  write_shard; the builder ends every document with the eos id)
    ...           doc_offsets: n_docs + 1 int64, document d is tokens[offsets[d]:offsets[d+1]]
    ...           loss_mask (only with flag bit 0): n_tokens uint8, 1 = the token is a training
                  target (e.g. an assistant's reply), 0 = context only (system, user, template)

Boundaries are stored, not recovered from eos, so a shard is correct even for a tokenizer
without an eos or for text that contains the eos string; the loader reads them to build
per-position document ids. The file size is fully determined by the header, so truncation
is detected exactly.

Version 1 files (no flags word; the bytes at 72 are zero padding there) are read as shards
without a mask: every token a target. A shard without a mask is still written as version 2 with
flags 0, so its bytes differ from version 1 only in the version field.
"""
from __future__ import annotations

import os
import shutil
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"DWSHARD1"
VERSION = 2
READABLE_VERSIONS = (1, 2)
HEADER_BYTES = 128
FINGERPRINT_BYTES = 32
_HEADER = struct.Struct(f"<8sIIQQQ{FINGERPRINT_BYTES}s")
_FLAGS = struct.Struct("<I")  # at _HEADER.size (72), version 2
FLAG_LOSS_MASK = 1
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


class ShardError(ValueError):
    """A shard file that cannot be read as written, or that does not fit the model."""


@dataclass(frozen=True)
class ShardHeader:
    version: int
    dtype_code: int  # bytes per token: 2 (uint16) or 4 (uint32)
    n_tokens: int
    vocab_size: int
    n_docs: int
    fingerprint: str
    flags: int = 0  # FLAG_LOSS_MASK when a loss-mask channel is stored

    @property
    def dtype(self) -> np.dtype:
        return _DTYPES[self.dtype_code]

    @property
    def has_loss_mask(self) -> bool:
        return bool(self.flags & FLAG_LOSS_MASK)

    def mask_offset(self) -> int:
        return HEADER_BYTES + self.n_tokens * self.dtype_code + (self.n_docs + 1) * 8

    def file_size(self) -> int:
        return self.mask_offset() + (self.n_tokens if self.has_loss_mask else 0)


@dataclass(frozen=True)
class Shard:
    path: Path
    header: ShardHeader
    tokens: np.ndarray  # [n_tokens] uint16/uint32, read-only memmap
    doc_offsets: np.ndarray  # [n_docs + 1] int64, read-only memmap
    loss_mask: np.ndarray | None = None  # [n_tokens] uint8 (1 = target), read-only memmap; None = all targets


def dtype_code_for(vocab_size: int) -> int:
    return 2 if vocab_size <= 65536 else 4


def write_shard(path: str | Path, docs: list[list[int]], vocab_size: int, fingerprint: str,
                loss_masks: list[list[bool]] | None = None) -> ShardHeader:
    """Write documents (lists of ids, each already ending with eos if wanted) to `path`.

    Every id must be in [0, vocab_size); the file is written to a temporary name and renamed,
    so a reader never sees a partial shard. loss_masks: one 0/1 list per document, as long as
    it (stored as the loss-mask channel); None = no channel (every token a target).
    """
    path = Path(path)
    fp = fingerprint.encode("ascii")
    if not 0 < len(fp) <= FINGERPRINT_BYTES:
        raise ShardError(f"fingerprint must be 1..{FINGERPRINT_BYTES} ASCII bytes, got {fingerprint!r}")
    if vocab_size <= 0 or vocab_size > 2**32:
        raise ShardError(f"vocab_size {vocab_size} outside 1..2**32")
    code = dtype_code_for(vocab_size)
    if loss_masks is not None:
        if len(loss_masks) != len(docs):
            raise ShardError(f"{len(loss_masks)} loss masks for {len(docs)} documents")
        for d, (doc, m) in enumerate(zip(docs, loss_masks)):
            if len(m) != len(doc):
                raise ShardError(f"document {d}: loss mask of {len(m)} entries for {len(doc)} tokens")
    flags = FLAG_LOSS_MASK if loss_masks is not None else 0
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    offsets = np.zeros(len(docs) + 1, dtype="<i8")
    np.cumsum(lengths, out=offsets[1:])
    header = ShardHeader(VERSION, code, int(offsets[-1]), vocab_size, len(docs), fingerprint, flags)
    raw = _HEADER.pack(MAGIC, VERSION, code, header.n_tokens, vocab_size, header.n_docs, fp) + _FLAGS.pack(flags)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")  # unique per writer
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as f:
        f.write(raw.ljust(HEADER_BYTES, b"\0"))
        for d, doc in enumerate(docs):  # one document at a time: memory stays O(longest doc)
            ids = np.asarray(doc, dtype=np.int64)
            if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
                tmp.unlink()
                bad = int(ids.max()) if ids.max() >= vocab_size else int(ids.min())
                raise ShardError(f"document {d}: token id {bad} outside [0, vocab_size={vocab_size})")
            f.write(ids.astype(_DTYPES[code]).tobytes())
        f.write(offsets.tobytes())
        for m in loss_masks or ():
            f.write((np.asarray(m, dtype=np.int64) != 0).astype(np.uint8).tobytes())
    tmp.replace(path)
    return header


class ShardWriter:
    """The streaming form of write_shard, for inputs too large to hold: documents are appended
    one at a time (`add`), tokens go straight to disk, and `close` writes the offsets and the
    header (whose counts are known only then) and renames the file into place. Memory: the
    document offsets (8 bytes a document) and one document. A document added with a loss mask
    gives the shard its mask channel (documents added without one are all ones in it); the mask
    bytes go to a side file until `close` appends them."""

    def __init__(self, path: str | Path, vocab_size: int, fingerprint: str):
        self.path = Path(path)
        self.fp = fingerprint.encode("ascii")
        if not 0 < len(self.fp) <= FINGERPRINT_BYTES:
            raise ShardError(f"fingerprint must be 1..{FINGERPRINT_BYTES} ASCII bytes, got {fingerprint!r}")
        if vocab_size <= 0 or vocab_size > 2**32:
            raise ShardError(f"vocab_size {vocab_size} outside 1..2**32")
        self.vocab_size, self.fingerprint = vocab_size, fingerprint
        self.code = dtype_code_for(vocab_size)
        self.offsets = [0]
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.tmp, "wb")
        self.f.write(b"\0" * HEADER_BYTES)  # the real header is written by close()
        self.mask_tmp = self.tmp.with_name(self.tmp.name + ".mask")
        self.mask_f = open(self.mask_tmp, "wb")
        self.masked = False  # some document came with a loss mask

    @property
    def n_tokens(self) -> int:
        return self.offsets[-1]

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    def add(self, doc: list[int], loss_mask: list[int] | None = None) -> None:
        ids = np.asarray(doc, dtype=np.int64)
        if loss_mask is not None and len(loss_mask) != len(doc):
            self.abort()
            raise ShardError(f"document {self.n_docs}: loss mask of {len(loss_mask)} entries for {len(doc)} tokens")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = int(ids.max()) if ids.max() >= self.vocab_size else int(ids.min())
            self.abort()
            raise ShardError(f"document {self.n_docs}: token id {bad} outside [0, vocab_size={self.vocab_size})")
        self.f.write(ids.astype(_DTYPES[self.code]).tobytes())
        self.offsets.append(self.offsets[-1] + int(ids.size))
        self.masked |= loss_mask is not None
        m = np.ones(ids.size, np.uint8) if loss_mask is None else (np.asarray(loss_mask) != 0).astype(np.uint8)
        self.mask_f.write(m.tobytes())

    def close(self) -> ShardHeader:
        flags = FLAG_LOSS_MASK if self.masked else 0
        header = ShardHeader(VERSION, self.code, self.n_tokens, self.vocab_size, self.n_docs, self.fingerprint, flags)
        self.f.write(np.asarray(self.offsets, dtype="<i8").tobytes())
        self.mask_f.close()
        if self.masked:
            with open(self.mask_tmp, "rb") as m:
                shutil.copyfileobj(m, self.f)
        self.mask_tmp.unlink()
        self.f.seek(0)
        self.f.write((_HEADER.pack(MAGIC, VERSION, self.code, header.n_tokens, self.vocab_size, header.n_docs,
                                   self.fp) + _FLAGS.pack(flags)).ljust(HEADER_BYTES, b"\0"))
        self.f.close()
        self.tmp.replace(self.path)
        return header

    def abort(self) -> None:
        """Drop the partial file (a failed build leaves nothing behind)."""
        for f in (self.f, self.mask_f):
            if not f.closed:
                f.close()
        self.tmp.unlink(missing_ok=True)
        self.mask_tmp.unlink(missing_ok=True)


def read_header(path: str | Path) -> ShardHeader:
    """Parse and validate the header of `path` (magic, version, dtype, file size)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no shard at {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < 8 or raw[:8] != MAGIC:
        raise ShardError(f"{path}: not a deepwish shard (magic {raw[:8]!r}, expected {MAGIC!r})")
    if len(raw) < HEADER_BYTES:
        raise ShardError(f"{path}: truncated shard: {size} bytes, shorter than the {HEADER_BYTES}-byte header")
    _, version, code, n_tokens, vocab_size, n_docs, fp = _HEADER.unpack_from(raw)
    if version not in READABLE_VERSIONS:
        raise ShardError(f"{path}: unsupported shard format version {version} (this reader knows "
                         f"{', '.join(map(str, READABLE_VERSIONS))})")
    if code not in _DTYPES:
        raise ShardError(f"{path}: unknown token dtype code {code} (expected 2 or 4)")
    flags = _FLAGS.unpack_from(raw, _HEADER.size)[0] if version >= 2 else 0
    if flags & ~FLAG_LOSS_MASK:
        raise ShardError(f"{path}: unknown header flags {flags:#x} (this reader knows {FLAG_LOSS_MASK:#x}: loss mask)")
    header = ShardHeader(version, code, n_tokens, vocab_size, n_docs, fp.rstrip(b"\0").decode("ascii"), flags)
    if size != header.file_size():
        mask = " + loss mask" if header.has_loss_mask else ""
        raise ShardError(
            f"{path}: truncated or corrupt shard: {size} bytes on disk, header "
            f"({n_tokens} tokens x {code} B, {n_docs} docs{mask}) implies {header.file_size()}"
        )
    return header


def open_shard(path: str | Path) -> Shard:
    """Memory-map a shard read-only after validating its header."""
    path = Path(path)
    header = read_header(path)
    tokens = np.memmap(path, dtype=header.dtype, mode="r", offset=HEADER_BYTES, shape=(header.n_tokens,))
    offsets = np.memmap(
        path,
        dtype="<i8",
        mode="r",
        offset=HEADER_BYTES + header.n_tokens * header.dtype_code,
        shape=(header.n_docs + 1,),
    )
    if offsets[0] != 0 or offsets[-1] != header.n_tokens or np.any(np.diff(offsets) < 0):
        raise ShardError(f"{path}: corrupt document offsets (not 0..{header.n_tokens}, non-decreasing)")
    mask = None
    if header.has_loss_mask and header.n_tokens == 0:
        mask = np.zeros(0, dtype=np.uint8)
    elif header.has_loss_mask:
        mask = np.memmap(path, dtype=np.uint8, mode="r", offset=header.mask_offset(), shape=(header.n_tokens,))
    return Shard(path, header, tokens, offsets, mask)


def count_loss_targets(shard: Shard, chunk: int = 1 << 24) -> int:
    """Tokens the loss trains on: the set entries of the loss mask (every token without one)."""
    if shard.loss_mask is None:
        return shard.header.n_tokens
    return sum(int(np.count_nonzero(shard.loss_mask[i : i + chunk])) for i in range(0, shard.header.n_tokens, chunk))


def max_token_id(shard: Shard, chunk: int = 1 << 24) -> int:
    """The largest id in the shard (-1 when empty), read in chunks of the memory map: one pass,
    bounded memory."""
    top = -1
    for i in range(0, shard.header.n_tokens, chunk):
        top = max(top, int(shard.tokens[i : i + chunk].max()))
    return top


def check_token_ids(shard: Shard, vocab_size: int) -> None:
    """Raise ShardError, naming the shard, if any id is >= `vocab_size` (the model's embedding
    rows): such an id would fail inside the embedding at whatever step first reads it."""
    top = max_token_id(shard)
    if top >= vocab_size:
        raise ShardError(f"{shard.path}: holds token id {top}, outside the model's vocabulary "
                         f"(model.vocab_size={vocab_size})")


def check_compatible(header: ShardHeader, vocab_size: int, fingerprint: str) -> None:
    """Raise ShardError unless data written with `header` fits a model/tokenizer pair.

    vocab_size: the model's embedding rows, which may exceed the tokenizer's (padded
    vocabularies, e.g. Qwen3's 151936 rows for 151669 ids) but never fall short of it.
    fingerprint: the tokenizer's; must equal the one the shard was written with.
    """
    if header.fingerprint != fingerprint:
        raise ShardError(
            f"tokenizer mismatch: shard was written by tokenizer {header.fingerprint!r}, "
            f"the model uses tokenizer {fingerprint!r}"
        )
    if header.vocab_size > vocab_size:
        raise ShardError(
            f"vocab mismatch: shard ids go up to vocab_size {header.vocab_size}, "
            f"the model has vocab_size {vocab_size}"
        )
