"""Shards from directory trees of text files (data/text_tree.py): contents alone fix the shards."""
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from deepwish.data.build import main
from deepwish.data.shards import open_shard
from deepwish.data.text_tree import (TreeError, build_tree_shards, is_validation, outermost, python_trees,
                                     resolve_trees, tree_files)
from deepwish.data.tokenizer import load_tokenizer


def make_tree(root: Path, reverse: bool = False) -> Path:
    """40 small modules, a README, a duplicate, an empty __init__.py, a non-UTF-8 file, a .so."""
    files = {f"pkg/mod{i}.py": f"def f{i}(x):\n    return x * {i} + {i * i}  # {'ab' * (i % 7)}\n" for i in range(40)}
    files["pkg/sub/README.md"] = "# A package\n\nIt multiplies.\n"
    files["other/copy_of_mod3.py"] = files["pkg/mod3.py"]
    files["pkg/sub/__init__.py"] = "\n"
    for rel, text in sorted(files.items(), reverse=reverse):  # another creation order, same contents
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "other" / "latin1.txt").write_bytes(b"caf\xe9\n")
    (root / "other" / "binary.so").write_bytes(b"\x00\x01")
    return root


def docs_of(path, tok):
    shard = open_shard(path)
    o = shard.doc_offsets
    out = []
    for d in range(shard.header.n_docs):
        ids = shard.tokens[o[d]:o[d + 1]].tolist()
        assert ids[-1] == tok.eos_id
        out.append(tok.decode(ids[:-1]))
    return out


def test_tree_shards_depend_on_contents_only(tmp_path):
    a = make_tree(tmp_path / "machine_a" / "site-packages")
    b = make_tree(tmp_path / "elsewhere" / "b", reverse=True)
    meta_a = build_tree_shards([a], tmp_path / "out_a", bpe_vocab=300, val_fraction=0.2, log=lambda s: None)
    meta_b = build_tree_shards([b], tmp_path / "out_b", bpe_vocab=300, val_fraction=0.2, log=lambda s: None)
    assert meta_a["fingerprint"] == meta_b["fingerprint"]
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "out_a" / name).read_bytes() == (tmp_path / "out_b" / name).read_bytes()
    assert meta_a["files"] == {"files": 44, "not_utf8": 1, "empty": 1, "duplicate": 1,
                               "bytes": meta_a["files"]["bytes"]}
    assert meta_a["documents"] == 41 and meta_a["tokenizer"]["vocab_size"] <= 300
    # the documents, in sha256 order, split by their own hash, each decoding to its file's text
    texts = {p.read_bytes() for p in tree_files([a]) if p.read_bytes().strip() and p.suffix != ".txt"}
    ordered = sorted(texts, key=lambda t: hashlib.sha256(t).digest())
    tok = load_tokenizer(tmp_path / "out_a" / "tokenizer")
    val = [t.decode() for t in ordered if is_validation(hashlib.sha256(t).digest(), 0.2)]
    train = [t.decode() for t in ordered if not is_validation(hashlib.sha256(t).digest(), 0.2)]
    assert 0 < len(val) < len(train)
    assert docs_of(tmp_path / "out_a" / "train.bin", tok) == train
    assert docs_of(tmp_path / "out_a" / "val.bin", tok) == val
    meta = json.loads((tmp_path / "out_a" / "meta.json").read_text())
    assert meta["fingerprint"] == hashlib.sha256((tmp_path / "out_a" / "train.bin").read_bytes()
                                                 + (tmp_path / "out_a" / "val.bin").read_bytes()).hexdigest()[:16]


def test_tree_budget_and_given_tokenizer(tmp_path):
    tree = make_tree(tmp_path / "t")
    full = build_tree_shards([tree], tmp_path / "full", bpe_vocab=300, val_fraction=0.2, log=lambda s: None)
    tok = load_tokenizer(tmp_path / "full" / "tokenizer")
    total = full["train"]["tokens"] + full["val"]["tokens"]
    cut = build_tree_shards([tree], tmp_path / "cut", tok, token_budget=total // 2, val_fraction=0.2,
                            log=lambda s: None)
    n = cut["train"]["tokens"] + cut["val"]["tokens"]
    assert cut["tokenizer"]["fingerprint"] == tok.fingerprint
    assert n <= total // 2 < n + 40  # whole documents: stops before the one that would pass the budget
    assert cut["documents_used"] < full["documents_used"] == 41
    # the cut corpus is the full one's prefix in hash order
    both = docs_of(tmp_path / "cut" / "train.bin", tok)
    assert both == docs_of(tmp_path / "full" / "train.bin", tok)[:len(both)]
    # validation documents come first in that order: under a budget, the split is the whole tree's
    assert docs_of(tmp_path / "cut" / "val.bin", tok) == docs_of(tmp_path / "full" / "val.bin", tok)
    # a budget inside them holds no training document, and the error says what budget would
    with pytest.raises(TreeError, match=r"0 training and \d+ validation document\(s\).*a budget above their \d+ tokens"):
        build_tree_shards([tree], tmp_path / "tiny", tok, token_budget=full["val"]["tokens"] - 1, val_fraction=0.2,
                          log=lambda s: None)


def test_tree_errors_and_python_trees(tmp_path):
    tree = make_tree(tmp_path / "t")
    with pytest.raises(TreeError, match="exactly one"):
        build_tree_shards([tree], tmp_path / "o", None, log=lambda s: None)
    with pytest.raises(TreeError, match="val_fraction"):
        build_tree_shards([tree], tmp_path / "o", bpe_vocab=300, val_fraction=0.0, log=lambda s: None)
    with pytest.raises(TreeError, match="not a directory"):
        resolve_trees([str(tmp_path / "missing")])
    with pytest.raises(TreeError, match="no .rst"):
        build_tree_shards([tree], tmp_path / "o", bpe_vocab=300, suffixes=(".rst",), log=lambda s: None)
    with pytest.raises(TreeError, match="0 validation"):  # one document: nothing to hold out
        build_tree_shards([tree / "other"], tmp_path / "o", bpe_vocab=300, suffixes=(".py",), log=lambda s: None)
    assert outermost([tree / "pkg", tree, tree / "pkg" / "sub"]) == [tree.resolve()]
    stdlib = Path(os.__file__).resolve().parent
    assert any(t == stdlib or t in stdlib.parents for t in python_trees())
    assert resolve_trees(["python", str(stdlib)]) == python_trees()  # nested trees are read once


def test_tree_cli(tmp_path, capsys):
    tree = make_tree(tmp_path / "t")
    assert main(["--tree", str(tree), "--bpe-vocab", "300", "--val-fraction", "0.2", "--suffixes", ".py,.md",
                 "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert f"corpus fingerprint {meta['fingerprint']}" in out
    assert meta["files"]["files"] == 43 and meta["files"]["not_utf8"] == 0  # the .txt is not read
    from deepwish.data.build import InputError
    with pytest.raises(InputError, match="not both"):
        main(["--tree", str(tree), "--bpe-vocab", "300", "--tokenizer", "default", "--out", str(tmp_path / "x")])
    with pytest.raises(InputError, match="applies to --tree"):
        main(["--input", str(tree / "pkg" / "sub" / "README.md"), "--bpe-vocab", "300", "--out", str(tmp_path / "x")])
    shutil.rmtree(tmp_path / "out")
