import re

import pytest

from deepwish.data.corpus import PLAYS, corpus_path, read_corpus, split_documents, strip_gutenberg


def test_corpus_is_plays_only():
    text = read_corpus()
    assert 1_000_000 < len(text) < 1_600_000
    docs = split_documents(text)
    assert len(docs) == len(PLAYS)
    assert docs[0].startswith("HAMLET") and docs[-1].startswith("THE TEMPEST")
    assert all("by William Shakespeare" in d[:200] for d in docs)
    assert not re.search(r"\b(gutenberg|e-?texts?|e-?books?|small print)\b", text, re.I)
    assert corpus_path().stat().st_size < 700_000  # stored compressed


def test_strip_gutenberg_modern_and_old_markers():
    body = "ACT I.\nEnter the King.\n"
    modern = (
        "The Project Gutenberg EBook of X\nlicence words\n"
        "*** START OF THE PROJECT GUTENBERG EBOOK X ***\n\n" + body
        + "\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\nmore licence\n"
    )
    assert strip_gutenberg(modern) == body
    old = "Project Gutenberg Etext\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n" + body
    old += "End of Project Gutenberg Etext of X\n"
    assert strip_gutenberg(old) == body


def test_strip_gutenberg_refuses_leftover_boilerplate():
    with pytest.raises(ValueError, match="boilerplate left at line 2"):
        strip_gutenberg("ACT I.\nThis eBook is for the use of anyone\n")
