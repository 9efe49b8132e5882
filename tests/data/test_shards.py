import random
import struct

import numpy as np
import pytest

from deepwish.data.shards import (
    HEADER_BYTES,
    MAGIC,
    ShardError,
    check_compatible,
    open_shard,
    read_header,
    write_shard,
)


def random_docs(vocab_size, n_docs=7, max_len=300):
    docs = [[random.randrange(vocab_size) for _ in range(random.randrange(0, max_len))] for _ in range(n_docs)]
    docs[0].append(vocab_size - 1)  # the largest id must survive the dtype
    return docs


@pytest.mark.parametrize("vocab_size, dtype", [(2048, np.uint16), (65536, np.uint16), (151669, np.uint32)])
def test_round_trip(tmp_path, vocab_size, dtype):
    docs = random_docs(vocab_size)
    header = write_shard(tmp_path / "s.bin", docs, vocab_size, "abc123")
    shard = open_shard(tmp_path / "s.bin")
    assert shard.header == header == read_header(tmp_path / "s.bin")
    assert shard.tokens.dtype == dtype
    assert header.n_tokens == sum(map(len, docs)) and header.n_docs == len(docs)
    assert (header.vocab_size, header.fingerprint) == (vocab_size, "abc123")
    for d, doc in enumerate(docs):
        a, b = shard.doc_offsets[d], shard.doc_offsets[d + 1]
        assert shard.tokens[a:b].tolist() == doc
    assert not shard.tokens.flags.writeable


def test_out_of_range_id_is_refused(tmp_path):
    with pytest.raises(ShardError, match=r"document 1: token id 2048 outside \[0, vocab_size=2048\)"):
        write_shard(tmp_path / "s.bin", [[1, 2], [2048]], 2048, "fp")
    with pytest.raises(ShardError, match="token id -1"):
        write_shard(tmp_path / "s.bin", [[-1]], 2048, "fp")
    assert list(tmp_path.iterdir()) == []  # no partial file left behind
    with pytest.raises(ShardError, match="fingerprint must be 1..32 ASCII bytes"):
        write_shard(tmp_path / "s.bin", [[1]], 2048, "x" * 33)


def test_wrong_magic(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"GARBAGE!" + bytes(200))
    with pytest.raises(ShardError, match="not a deepwish shard"):
        open_shard(tmp_path / "x.bin")
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(ShardError, match="not a deepwish shard"):
        open_shard(tmp_path / "empty.bin")


def test_truncated_and_padded(tmp_path):
    path = tmp_path / "s.bin"
    write_shard(path, random_docs(1000), 1000, "fp")
    raw = path.read_bytes()
    path.write_bytes(raw[:-3])
    with pytest.raises(ShardError, match="truncated or corrupt shard"):
        open_shard(path)
    path.write_bytes(raw + b"\0")
    with pytest.raises(ShardError, match="truncated or corrupt shard"):
        open_shard(path)
    path.write_bytes(raw[:40])
    with pytest.raises(ShardError, match="shorter than the 128-byte header"):
        open_shard(path)


def test_unsupported_version_and_dtype(tmp_path):
    path = tmp_path / "s.bin"
    write_shard(path, [[1, 2, 3]], 10, "fp")
    raw = bytearray(path.read_bytes())
    raw[8:12] = struct.pack("<I", 7)
    path.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match="unsupported shard format version 7"):
        open_shard(path)
    raw[8:12] = struct.pack("<I", 1)
    raw[12:16] = struct.pack("<I", 3)
    path.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match="unknown token dtype code 3"):
        open_shard(path)
    assert raw[:8] == MAGIC and len(raw) == HEADER_BYTES + 3 * 2 + 2 * 8


def test_check_compatible(tmp_path):
    header = write_shard(tmp_path / "s.bin", [[1, 2]], 151669, "aaaa")
    check_compatible(header, 151936, "aaaa")  # padded model vocab is fine
    check_compatible(header, 151669, "aaaa")
    with pytest.raises(ShardError, match="written by tokenizer 'aaaa', the model uses tokenizer 'bbbb'"):
        check_compatible(header, 151936, "bbbb")
    with pytest.raises(ShardError, match="vocab_size 151669, the model has vocab_size 2048"):
        check_compatible(header, 2048, "aaaa")
