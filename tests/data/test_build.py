import csv
import json

import pytest

from deepwish.data.build import InputError, build_shards, ensure_default_data, main, read_documents, val_split
from deepwish.data.chat import encode_chat, render_chat
from deepwish.data.corpus import read_corpus, split_documents
from deepwish.data.loader import PackedLoader
from deepwish.data.shards import check_compatible, open_shard, read_header
from deepwish.data.tokenizer import IM_END, IM_START, load_tokenizer, train_bpe

CHAT = [
    {"role": "system", "content": "Speak as a player."},
    {"role": "user", "content": "Who's there?"},
    {"role": "assistant", "content": "Nay, answer me: stand, and unfold yourself."},
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_bpe(split_documents(read_corpus())[:2], vocab_size=512)


def doc_texts(path, tokenizer):
    shard = open_shard(path)
    offsets = shard.doc_offsets
    out = []
    for d in range(shard.header.n_docs):
        ids = shard.tokens[offsets[d] : offsets[d + 1]].tolist()
        assert ids[-1] == tokenizer.eos_id
        out.append(tokenizer.decode(ids[:-1]))
    return out


def write_inputs(tmp_path):
    (tmp_path / "a.txt").write_text("First document.\n\nStill the first.\n")
    with open(tmp_path / "b.jsonl", "w") as f:
        f.write(json.dumps({"text": "Second document.", "id": 7}) + "\n\n")
        f.write(json.dumps({"messages": CHAT}) + "\n")
    with open(tmp_path / "c.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["conversation_id", "role", "content", "extra"])
        w.writerow(["x", "user", "Hi, with a comma", ""])
        w.writerow(["y", "user", "Other chat", ""])
        w.writerow(["x", "assistant", 'Hello "there"\nsecond line', ""])
    return [tmp_path / "a.txt", tmp_path / "b.jsonl", tmp_path / "c.csv"]


def test_build_all_formats(tmp_path, tok):
    inputs = write_inputs(tmp_path)
    # chat_loss="all": every token kept, so the chat without a reply ('y') is a document too
    result = build_shards(inputs, tmp_path / "out", tok, val_fraction=0.0, tokenizer_spec="toy", chat_loss="all")
    expected = [
        "First document.\n\nStill the first.\n",
        "Second document.",
        render_chat(CHAT),
        render_chat([{"role": "user", "content": "Hi, with a comma"},
                     {"role": "assistant", "content": 'Hello "there"\nsecond line'}]),
        render_chat([{"role": "user", "content": "Other chat"}]),
    ]
    assert doc_texts(result.train_bin, tok) == expected
    assert result.val_bin is None and not (tmp_path / "out" / "val.bin").exists()
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["train"]["docs"] == 5 and meta["val"] is None
    assert meta["tokenizer"]["fingerprint"] == tok.fingerprint and meta["tokenizer"]["spec"] == "toy"
    assert meta["train"]["tokens"] == read_header(result.train_bin).n_tokens
    saved = load_tokenizer(tmp_path / "out" / "tokenizer")
    assert saved.fingerprint == tok.fingerprint
    check_compatible(read_header(result.train_bin), 512, saved.fingerprint)
    # chat control strings are single tokens
    ids = open_shard(result.train_bin).tokens.tolist()
    assert ids.count(tok.token_to_id(IM_START)) == 6 and ids.count(tok.token_to_id(IM_END)) == 6


def test_val_split_and_val_inputs(tmp_path, tok):
    with open(tmp_path / "many.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"text": f"document number {i}"}) + "\n")
    r = build_shards([tmp_path / "many.jsonl"], tmp_path / "o1", tok, val_fraction=0.1, seed=5)
    val = doc_texts(r.val_bin, tok)
    train = doc_texts(r.train_bin, tok)
    assert len(val) == 4 and len(train) == 36 and not set(val) & set(train)
    again = build_shards([tmp_path / "many.jsonl"], tmp_path / "o2", tok, val_fraction=0.1, seed=5)
    assert r.val_bin.read_bytes() == again.val_bin.read_bytes()  # deterministic
    assert len(val_split(3, 0.01, 0)) == 1
    with pytest.raises(ValueError, match="leaves none for training"):
        val_split(1, 0.5, 0)
    (tmp_path / "held.txt").write_text("held out")
    held = [tmp_path / "held.txt"]
    r = build_shards([tmp_path / "many.jsonl"], tmp_path / "o3", tok, val_fraction=0.0, val_inputs=held)
    assert doc_texts(r.val_bin, tok) == ["held out"] and len(doc_texts(r.train_bin, tok)) == 40
    with pytest.raises(ValueError, match="give val_fraction=0 when naming val_inputs"):
        build_shards([tmp_path / "many.jsonl"], tmp_path / "o4", tok, val_inputs=[tmp_path / "held.txt"])


def test_bad_inputs_are_named(tmp_path, tok):
    (tmp_path / "x.md").write_text("hi")
    with pytest.raises(ValueError, match=r"x.md: unsupported input type '.md'"):
        read_documents(tmp_path / "x.md")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected an object with exactly one of 'text' or 'messages'"):
        read_documents(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"text": \n')
    with pytest.raises(ValueError, match=r"broken.jsonl:1: invalid JSON"):
        read_documents(tmp_path / "broken.jsonl")
    (tmp_path / "role.jsonl").write_text(json.dumps({"messages": [{"role": "narrator", "content": "x"}]}) + "\n")
    with pytest.raises(ValueError, match=r"role.jsonl:1: message 0 has role 'narrator'"):
        read_documents(tmp_path / "role.jsonl")
    (tmp_path / "c.csv").write_text("id,role,content\n1,user,hi\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['conversation_id'\]"):
        read_documents(tmp_path / "c.csv")
    (tmp_path / "e.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty text file"):
        read_documents(tmp_path / "e.txt")
    # a tokenizer without ChatML tokens cannot build chat data
    from deepwish.data.tokenizer import Tokenizer

    bare = Tokenizer(tok.hf, eos_token=None)
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ValueError, match="tokenizer has no eos token"):
        build_shards([tmp_path / "t.jsonl"], tmp_path / "o", bare, val_fraction=0)
    # any HF tokenizer works for text, but chat needs the two ChatML tokens
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    hf = HFTokenizer(models.WordLevel({"<eos>": 0, "[UNK]": 1, "x": 2}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    word = Tokenizer(hf, eos_token="<eos>")
    r = build_shards([tmp_path / "t.jsonl"], tmp_path / "w", word, val_fraction=0)
    assert open_shard(r.train_bin).tokens.tolist() == [2, 0] and len(word.fingerprint) == 16
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": CHAT}) + "\n")
    with pytest.raises(ValueError, match="tokenizer has no <.im_start.> / <.im_end.> token"):
        build_shards([tmp_path / "chat.jsonl"], tmp_path / "w2", word, val_fraction=0)


def test_cli_main(tmp_path, tok, capsys):
    inputs = write_inputs(tmp_path)
    tok.save(tmp_path / "tok")
    rc = main(["--input", *map(str, inputs), "--out", str(tmp_path / "cli"), "--tokenizer", str(tmp_path / "tok"),
               "--val-fraction", "0.2", "--chat-loss", "all"])
    assert rc == 0
    assert "wrote" in capsys.readouterr().out
    meta = json.loads((tmp_path / "cli" / "meta.json").read_text())
    assert meta["train"]["docs"] == 4 and meta["val"]["docs"] == 1
    with pytest.raises(InputError, match="either --val-fraction or --val-input"):
        main(["--input", str(inputs[0]), "--out", str(tmp_path / "x"), "--val-fraction", "0.1",
              "--val-input", str(inputs[0])])


def test_encode_chat_mask(tok):
    ids, mask = encode_chat(tok, CHAT)
    assert ids == tok.encode(render_chat(CHAT)) and len(mask) == len(ids)
    masked = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(masked) == CHAT[2]["content"] + IM_END
    assert render_chat(CHAT[:2], add_generation_prompt=True).endswith(f"{IM_END}\n{IM_START}assistant\n")
    with pytest.raises(ValueError, match="contains a ChatML control token"):
        render_chat([{"role": "user", "content": f"x{IM_END}"}])


def test_ensure_default_data(tmp_path):
    train_bin, val_bin, tokenizer = ensure_default_data(tmp_path)
    train, val = read_header(train_bin), read_header(val_bin)
    assert (train.n_docs, val.n_docs) == (10, 1) and train.fingerprint == tokenizer.fingerprint
    assert 300_000 < train.n_tokens < 600_000 and tokenizer.vocab_size == 2048
    assert tokenizer.decode(open_shard(val_bin).tokens[:10].tolist()).startswith("THE TEMPEST")
    before = train_bin.read_bytes()
    again = ensure_default_data(tmp_path)
    assert again[0] == train_bin and train_bin.read_bytes() == before
    other = ensure_default_data(tmp_path / "elsewhere")  # a fresh build gives the same bytes
    assert other[0].read_bytes() == before and other[1].read_bytes() == val_bin.read_bytes()
    PackedLoader(train_bin, 256, 8)  # usable by the trainer as is
