import json
import subprocess
import sys

import pytest

from deepwish.data.corpus import read_corpus, split_documents
from deepwish.data.tokenizer import (
    EOS_TOKEN,
    IM_END,
    IM_START,
    Tokenizer,
    default_tokenizer,
    load_tokenizer,
    resolve_tokenizer,
    train_bpe,
)

SAMPLES = [
    "To be, or not to be: that is the question.",
    "  leading spaces, tabs\tand\nnewlines\r\n\n",
    "digits 1234567890 and 3.14159",
    "naïve café — 東京 😀 ١٢٣",
    f"{IM_START}user\nhi{IM_END}\n{EOS_TOKEN}",
    "",
]


@pytest.fixture(scope="module")
def plays():
    return split_documents(read_corpus())


def test_train_bpe_is_deterministic_and_round_trips(plays, tmp_path):
    a = train_bpe(plays[:3], vocab_size=600)
    b = train_bpe(plays[:3], vocab_size=600, path=tmp_path / "tok")
    assert a.vocab_size == 600 and a.eos_id == 0
    assert (a.token_to_id(IM_START), a.token_to_id(IM_END)) == (1, 2)
    assert a.fingerprint == b.fingerprint
    for s in SAMPLES:
        assert a.encode(s) == b.encode(s)
        assert a.decode(a.encode(s)) == s
    assert a.encode(EOS_TOKEN) == [0]
    # saved copy loads back identical, eos included
    c = load_tokenizer(tmp_path / "tok")
    assert (c.fingerprint, c.eos_id, c.vocab_size) == (a.fingerprint, 0, 600)
    assert c.encode(plays[0][:2000]) == a.encode(plays[0][:2000])


def test_train_bpe_same_in_a_fresh_single_threaded_process(plays, tmp_path):
    here = train_bpe(plays[:2], vocab_size=400)
    code = (
        "from deepwish.data.corpus import read_corpus, split_documents\n"
        "from deepwish.data.tokenizer import train_bpe\n"
        "print(train_bpe(split_documents(read_corpus())[:2], vocab_size=400).fingerprint)\n"
    )
    env = {"RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == here.fingerprint


def test_fingerprint_changes_with_vocab(plays):
    assert train_bpe(plays[:2], 400).fingerprint != train_bpe(plays[:2], 401).fingerprint


def test_default_tokenizer_is_cached(tmp_path):
    a = default_tokenizer(cache_dir=tmp_path)
    files = list((tmp_path / "tokenizers").glob("shakespeare-bpe2048-*/tokenizer.json"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    b = default_tokenizer(cache_dir=tmp_path)
    assert files[0].stat().st_mtime_ns == mtime  # loaded, not retrained
    assert a.fingerprint == b.fingerprint and a.vocab_size == 2048
    text = read_corpus()[:5000]
    assert a.decode(a.encode(text)) == text
    assert len(a.encode(text)) < len(text) / 2.5  # BPE actually merges
    assert resolve_tokenizer("default", cache_dir=tmp_path).fingerprint == a.fingerprint


def test_load_tokenizer_errors_and_eos_override(tmp_path, plays):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid HF tokenizer.json"):
        load_tokenizer(tmp_path / "bad.json")
    tok = train_bpe(plays[:1], vocab_size=300, path=tmp_path / "t")
    assert load_tokenizer(tmp_path / "t" / "tokenizer.json", eos_token=IM_END).eos_id == 2
    with pytest.raises(ValueError, match="eos_token '<nope>' is not in the tokenizer's vocabulary"):
        load_tokenizer(tmp_path / "t", eos_token="<nope>")
    # HF's dict form of a special token in tokenizer_config.json
    (tmp_path / "t" / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": IM_START}}))
    assert Tokenizer.load(tmp_path / "t").eos_id == 1
    with pytest.raises(FileNotFoundError, match="not 'default', 'qwen', or an existing path"):
        resolve_tokenizer(str(tmp_path / "missing"))
    assert tok.eos_id == 0


def test_vocab_too_small_is_refused(plays):
    with pytest.raises(ValueError, match="vocab_size 100 < 259"):
        train_bpe(plays[:1], vocab_size=100)
