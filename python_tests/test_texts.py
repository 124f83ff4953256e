"""Offline texts and the needle-in-a-haystack builder (tokenizer only, no model)."""
import pytest
from transformers import AutoTokenizer

from citrus_ext import models, texts


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(models.ensure_default_model(progress=False))


def test_essays_are_cleaned():
    essays = texts.paul_graham_essays()
    assert len(essays) == 49 and "addiction" in essays
    joined = "".join(essays.values())
    assert "\x92" not in joined and "\x97" not in joined and "\xa0" not in joined
    assert "accelerating.We" not in essays["addiction"]  # glued paragraphs split again
    assert "accelerating.\nWe" in essays["addiction"]


def test_kjv_chapters():
    chapters = texts.kjv_chapters()
    assert len(chapters) == 1189  # the Protestant canon
    book, chapter, text = chapters[0]
    assert (book, chapter) == ("Genesis", 1)
    assert text.startswith("In the beginning God created the heavens and the earth. And the earth")
    assert not any(ch.isdigit() for ch in text[:200])  # verse references removed
    assert chapters[-1][0] == "Revelation"


def test_text_units_seeds():
    canonical = texts.text_units("essays")
    assert texts.text_units("essays", seed=3) == texts.text_units("essays", seed=3)
    assert texts.text_units("essays", seed=3) != canonical
    assert sorted(texts.text_units("essays", seed=3)) == sorted(canonical)
    assert texts.text_units("kjv", seed=1)[0] != texts.text_units("kjv")[0]
    with pytest.raises(texts.TextSourceError, match="unknown text source"):
        texts.text_units("pg19")


def test_sentence_starts():
    text = 'One. "Two?" Three!\nFour'
    assert texts.sentence_starts(text) == [0, 5, 12, 19, len(text)]


@pytest.mark.parametrize("source", texts.SOURCES)
@pytest.mark.parametrize("n_tokens,depth", [(400, 0.0), (1500, 0.5), (1500, 1.0), (3000, 0.25)])
def test_build_haystack(tokenizer, source, n_tokens, depth):
    needle = "The secret ingredient of the soup is smoked paprika."
    hay = texts.build_haystack(tokenizer, n_tokens, needle, depth, source=source, seed=7)
    ids = tokenizer(hay.text, add_special_tokens=False).input_ids
    assert hay.n_tokens == len(ids)
    assert n_tokens - 150 <= hay.n_tokens <= n_tokens  # short by at most about a sentence
    assert hay.text.count(needle) == 1 and hay.text[hay.needle_start:].startswith(needle)
    start, end = hay.needle_tokens
    assert tokenizer.decode(ids[start:end]).strip() == needle
    assert abs(hay.depth - depth) < 0.1
    # On a sentence boundary: the needle follows a sentence end (or starts the document).
    assert hay.needle_start == 0 or hay.text[:hay.needle_start].rstrip()[-1] in ".!?\"')\u2019\u201d]"
    assert hay.text == texts.build_haystack(tokenizer, n_tokens, needle, depth, source=source,
                                            seed=7).text


def test_build_haystack_long(tokenizer):
    hay = texts.build_haystack(tokenizer, 20000)
    assert 19800 <= hay.n_tokens <= 20000
    assert hay.needle == texts.DEFAULT_NEEDLE and 0.45 < hay.depth < 0.55


def test_build_haystack_errors(tokenizer):
    with pytest.raises(ValueError, match="depth"):
        texts.build_haystack(tokenizer, 1000, depth=1.5)
    with pytest.raises(ValueError, match="no room"):
        texts.build_haystack(tokenizer, 10)
    with pytest.raises(ValueError, match="empty"):
        texts.build_haystack(tokenizer, 1000, needle="  ")
    with pytest.raises(ValueError, match="holds only"):
        texts.build_haystack(tokenizer, 10_000_000, source="essays")
