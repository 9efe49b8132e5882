"""On-disk HF datasets (arrow IPC stream as save_to_disk writes it, parquet, jsonl) -> shards,
streamed, with a token budget and mixing weights; files written here with pyarrow."""
import json

import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from deepwish.cli import main as cli_main  # noqa: E402
from deepwish.data.build import main  # noqa: E402
from deepwish.data.hf_dataset import DatasetInputError  # noqa: E402
from deepwish.data.chat import render_chat  # noqa: E402
from deepwish.data.corpus import read_corpus, split_documents  # noqa: E402
from deepwish.data.hf_dataset import data_files, iter_texts  # noqa: E402
from deepwish.data.mix import Source, build_mix, is_validation, parse_source  # noqa: E402
from deepwish.data.shards import open_shard  # noqa: E402
from deepwish.data.tokenizer import train_bpe  # noqa: E402

CHAT = [{"role": "user", "content": "Who's there?"}, {"role": "assistant", "content": "Nay, answer me."}]


@pytest.fixture(scope="module")
def tok():
    return train_bpe(split_documents(read_corpus())[:2], vocab_size=512)


def texts_of(path, tokenizer):
    shard = open_shard(path)
    o = shard.doc_offsets
    return [tokenizer.decode(shard.tokens[o[d]:o[d + 1]].tolist()[:-1]) for d in range(shard.header.n_docs)]


def save_to_disk_layout(d, table, split="train", batch_rows=3):
    """What datasets' save_to_disk writes for one split: an Arrow IPC *stream* + state/info json."""
    d.mkdir(parents=True)
    with pa.OSFile(str(d / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as w:
            for b in table.to_batches(max_chunksize=batch_rows):
                w.write_batch(b)
    (d / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}],
                                              "_split": split, "_format_type": None}))
    (d / "dataset_info.json").write_text(json.dumps({"features": {c: {"dtype": "string", "_type": "Value"}
                                                                  for c in table.column_names}}))
    return d


TEXTS = [f"Document number {i}: the quick brown fox {'jumps ' * (i % 4)}over." for i in range(10)]


def test_arrow_stream_parquet_jsonl_read_the_same_texts(tmp_path, tok):
    table = pa.table({"text": TEXTS, "id": list(range(10))})
    arrow_dir = save_to_disk_layout(tmp_path / "ds", table)
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=4)
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(TEXTS)))
    for path in (arrow_dir, tmp_path / "t.parquet", tmp_path / "t.jsonl"):
        got = [t for texts, is_chat in iter_texts(path, batch_rows=4) for t in texts]
        assert got == TEXTS, path
        out = tmp_path / f"out_{path.name}"
        r = build_mix([Source(str(path))], out, tok, val_fraction=0.0, progress=False)
        assert texts_of(r.train_bin, tok) == TEXTS and r.val_bin is None
        assert r.meta["train"]["tokens"] == sum(len(tok.encode(t)) + 1 for t in TEXTS)


def test_dataset_dict_split_and_messages_field_render_chatml(tmp_path, tok):
    msgs = pa.array([CHAT, CHAT[:1] + [{"role": "assistant", "content": "Stand."}]],
                    type=pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])))
    root = tmp_path / "dd"
    save_to_disk_layout(root / "train", pa.table({"conv": msgs}), "train")
    save_to_disk_layout(root / "test", pa.table({"conv": msgs.slice(0, 1)}), "test")
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    assert data_files(root, "test") == [root / "test" / "data-00000-of-00001.arrow"]
    with pytest.raises(ValueError, match="no split 'valid'"):
        data_files(root, "valid")
    tok_dir = tok.save(tmp_path / "tok")
    assert main(["--hf-dataset", str(root), "--split", "train", "--messages-field", "conv", "--out",
                 str(tmp_path / "o"), "--val-fraction", "0", "--tokenizer", str(tok_dir)]) == 0
    assert texts_of(tmp_path / "o" / "train.bin", tok) == [render_chat(CHAT), render_chat(CHAT[:1] + [
        {"role": "assistant", "content": "Stand."}])]


def test_token_budget_and_weights(tmp_path, tok):
    a = tmp_path / "a.parquet"
    b = tmp_path / "b.jsonl"
    pq.write_table(pa.table({"text": [f"alpha {i} " * 3 for i in range(50)]}), a)
    b.write_text("".join(json.dumps({"text": f"beta {i}"}) + "\n" for i in range(4)))  # small: up-sampled
    lengths = {p: [len(tok.encode(t)) + 1 for ts, _ in iter_texts(p) for t in ts] for p in (a, b)}
    budget = 400
    r = build_mix([parse_source(f"{a}:3"), parse_source(f"{b}:1")], tmp_path / "mix", tok, token_budget=budget,
                  val_fraction=0.1, progress=False)
    total = r.meta["train"]["tokens"] + r.meta["val"]["tokens"]
    assert total <= budget
    sa, sb = r.meta["sources"]
    assert (sa["quota_tokens"], sb["quota_tokens"]) == (300, 100)
    assert 300 - max(lengths[a]) < sa["tokens"] <= 300 and 100 - max(lengths[b]) < sb["tokens"] <= 100
    assert sb["epochs_completed"] >= 1 and sb["docs"] > 4  # the small source was read again
    assert sa["docs"] < 50  # the large one was cut
    n = r.meta["train"]["docs"] + r.meta["val"]["docs"]
    assert r.meta["val"]["docs"] == sum(is_validation(i, 0.1) for i in range(n)) == -(-n // 10)
    # interleaved: both sources appear in the first quarter of the training shard
    first = texts_of(r.train_bin, tok)[: r.meta["train"]["docs"] // 4]
    assert any(t.startswith("alpha") for t in first) and any(t.startswith("beta") for t in first)


def test_cli_errors_and_progress(tmp_path, capsys, tok, monkeypatch):
    monkeypatch.setenv("TOKENIZER_PATH", str(tok.save(tmp_path / "tok")))  # the default of --tokenizer
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps({"body": "x"}) + "\n")
    assert cli_main(["data", "build", "--hf-dataset", str(p), "--out", str(tmp_path / "o")]) == 2
    assert "neither a 'text' nor a 'messages' field" in capsys.readouterr().err
    assert cli_main(["data", "build", "--source", f"{p}:2", "--out", str(tmp_path / "o")]) == 2
    assert "need --token-budget" in capsys.readouterr().err
    assert cli_main(["data", "build", "--input", str(p), "--hf-dataset", str(p), "--out", str(tmp_path / "o")]) == 2
    assert "exactly one of" in capsys.readouterr().err
    with pytest.raises(DatasetInputError, match="weight -1"):
        parse_source("x.jsonl:-1")
    assert parse_source("dir/with:colon") == Source("dir/with:colon", 1.0)
    p.write_text("".join(json.dumps({"body": f"row {i} of the table"}) + "\n" for i in range(30)))
    assert cli_main(["data", "build", "--hf-dataset", str(p), "--text-field", "body", "--out", str(tmp_path / "o"),
                     "--token-budget", "60", "--val-fraction", "0.2"]) == 0
    out = capsys.readouterr().out
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert meta["train"]["tokens"] + meta["val"]["tokens"] <= 60 and "wrote" in out
