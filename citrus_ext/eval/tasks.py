"""Retrieval tasks: a long document, an instruction about it, and the expected answer.

Every generator is deterministic in its ``seed`` and returns a :class:`Sample` whose document is
``n_tokens`` tokens long (counted with the tokenizer the model reads with, without special
tokens) and whose asked needle sits at relative ``depth``: the share of the document's other
tokens that come before it (0 = the needle opens the document, 1 = it closes it).

``passkey``
    A 5-digit pass key hidden in the repetitive filler of the passkey-retrieval literature
    ("The grass is green. The sky is blue. ..."), asked for at the end.
``niah``
    Needle in a haystack: a sentence ("The best thing to do in <city> is <activity>.") hidden in
    Paul Graham essays (``citrus_ext.texts.build_haystack``), asked as a question.
``multikey``, ``multivalue``, ``multiquery``, ``vartrack``
    RULER-style synthetic tasks (Hsieh et al., 2024), written here: several "special magic
    number" needles of which one is asked (multi-key), one key with several numbers, all asked
    (multi-value), several keys asked at once (multi-query), and a chain of variable
    assignments ``VAR A = 12345. VAR B = VAR A. ...`` whose names are asked (variable tracking).
    They use the repetitive filler, so the only information in the document is the needles.

The instruction is kept apart from the document: :func:`citrus_ext.answer` puts
``document + "\\n\\n" + instruction`` in the user turn of the model's chat template and reads
the instruction part separately (see ``benchmarks/README.md`` for the exact prompt).
"""
from __future__ import annotations

import bisect
import random
import zlib
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from citrus_ext.texts import count_tokens

# The filler of the passkey task of Mohtashami & Jaggi (2023), used by most long-context papers.
NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
         "There and back again.")

_CITIES = ("Lisbon", "Nairobi", "Oslo", "Montevideo", "Hanoi", "Tbilisi", "Quito", "Reykjavik",
           "Dakar", "Osaka", "Valletta", "Tallinn", "Cusco", "Hobart", "Lyon", "Bergen")
_ACTIVITIES = ("ride the old blue tram to the lighthouse", "eat grilled corn at the night market",
               "swim in the cold lake before sunrise", "fly a red kite on the northern hill",
               "read poetry in the botanical garden", "buy warm bread from the harbour bakery",
               "watch the puppet theatre on the main square", "climb the clock tower at noon",
               "paint the fishing boats at the pier", "drink mint tea in the covered bazaar")
_ADJECTIVES = ("amber", "brisk", "calm", "dusty", "eager", "frozen", "gentle", "hollow", "ivory",
               "jolly", "lucky", "mellow", "noble", "olive", "proud", "quiet", "rusty", "silent",
               "tidy", "vivid", "wild", "young", "zesty", "bold")
_NOUNS = ("falcon", "harbor", "meadow", "lantern", "canyon", "violin", "glacier", "orchard",
          "compass", "thistle", "beacon", "pebble", "saddle", "walnut", "ember", "quarry", "tulip",
          "anchor", "marble", "cactus", "willow", "otter", "ribbon", "kettle")
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class Sample:
    """One evaluation example.

    Attributes
    ----------
    task : str
        Task name (a key of :data:`TASKS`).
    document : str
        The long context, without the instruction.
    instruction : str
        The question (with its answer-format cue), read after the document.
    answers : tuple of str
        Strings a correct answer contains; the containment score is the share found.
    reference : str
        The reference answer ROUGE is computed against.
    n_tokens : int
        Document length in tokens.
    depth : float
        Where the asked (first) needle sits: the share of the other tokens before it.
    needle_spans : tuple of (int, int)
        Token span ``[start, end)`` of every needle, in document order.
    seed : int
        The seed the sample was drawn with.
    min_new_tokens : int
        The fewest answer tokens that can hold a complete answer (0: the run's setting is enough).
        Set for the tasks whose answer lists several items, which a 32-token answer cuts short.
    """

    task: str
    document: str
    instruction: str
    answers: tuple[str, ...]
    reference: str
    n_tokens: int
    depth: float
    needle_spans: tuple[tuple[int, int], ...] = field(default=())
    seed: int = 0
    min_new_tokens: int = 0


def sample_seed(seed: int, *parts) -> int:
    """A stable seed for one sample from a base seed and its coordinates.

    Python's ``hash`` is salted per process, so a CRC of the text is used: the same cell gets the
    same document in every run and for every method (paired comparisons).
    """
    return zlib.crc32(repr((seed,) + tuple(parts)).encode())


def needle_depth(span: tuple[int, int], n_tokens: int) -> float:
    """Relative depth of a needle: the share of the document's other tokens that precede it
    (0 = the needle opens the document, 1 = it closes it)."""
    start, end = span
    rest = n_tokens - (end - start)
    return start / rest if rest else 0.0


def _check(n_tokens: int, depth: float) -> None:
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if n_tokens < 64:
        raise ValueError(f"n_tokens must be at least 64, got {n_tokens}")


def compose(tokenizer, n_tokens: int, needles: Sequence[tuple[float, str]],
            filler: Sequence[str] = NOISE) -> tuple[str, tuple[tuple[int, int], ...]]:
    """Build a document of ``n_tokens`` tokens from repeated filler sentences and needles.

    Parameters
    ----------
    tokenizer : transformers tokenizer
        Lengths are counted in its tokens.
    n_tokens : int
        Target document length; the result is at most one filler sentence shorter.
    needles : sequence of (float, str)
        ``(depth, sentence)`` pairs. A needle goes in at the filler sentence boundary that puts
        the nearest to ``depth`` of the document's other tokens before it; needles in the
        document follow their depths, and equal depths keep their given order.
    filler : sequence of str
        Sentences repeated in order to fill the document.

    Returns
    -------
    text : str
    spans : tuple of (int, int)
        Token span of each needle in ``text``, in the order of ``needles``.
    """
    # Sentences are joined by one space; BPE tokenizers start a word with its space, so token
    # counts of " " + sentence add up (checked by the tests on the real tokenizer).
    cost = {s: count_tokens(tokenizer, " " + s) for s in set(filler) | {n for _, n in needles}}
    room = n_tokens - sum(cost[n] for _, n in needles)
    if room < 1:
        raise ValueError(f"n_tokens={n_tokens} is too short for the needles")
    sentences, used = [], 0
    while used + cost[filler[len(sentences) % len(filler)]] <= room:
        sentences.append(filler[len(sentences) % len(filler)])
        used += cost[sentences[-1]]
    boundaries = [0]
    for s in sentences:
        boundaries.append(boundaries[-1] + cost[s])
    # Needles go in by depth (stable, so equal depths keep their given order); each lands on the
    # filler boundary that puts depth * (other tokens) before it, counting the needles before it.
    total = used + sum(cost[n] for _, n in needles)
    slots: dict[int, int] = {}
    before, low = 0, 0
    for j in sorted(range(len(needles)), key=lambda j: needles[j][0]):
        depth, needle = needles[j]
        target = depth * (total - cost[needle]) - before
        i = bisect.bisect_left(boundaries, target, lo=low)
        if i == len(boundaries) or (i > low and target - boundaries[i - 1] <= boundaries[i] - target):
            i -= 1
        slots[j], low, before = i, i, before + cost[needle]
    pieces: list[tuple[str, Optional[int]]] = []
    cursor = 0
    for j in sorted(slots, key=lambda j: (slots[j], needles[j][0])):
        pieces += [(s, None) for s in sentences[cursor:slots[j]]]
        pieces.append((needles[j][1], j))
        cursor = slots[j]
    pieces += [(s, None) for s in sentences[cursor:]]
    text = " ".join(p for p, _ in pieces)
    spans: list[tuple[int, int]] = [(0, 0)] * len(needles)
    offset = 0
    for k, (piece, j) in enumerate(pieces):
        # The first piece has no leading space, so count it as it appears in the text.
        length = count_tokens(tokenizer, piece) if k == 0 else cost[piece]
        if j is not None:
            spans[j] = (offset, offset + length)
        offset += length
    return text, tuple(spans)


def _finish(task: str, tokenizer, text: str, spans, instruction: str, answers: Sequence[str],
            reference: str, seed: int, list_answer: bool = False) -> Sample:
    # The first needle given is the one placed at the requested depth (the asked one).
    n = count_tokens(tokenizer, text)
    # A listed answer gets room for each item plus 10 tokens of frame around it, and 16 for a
    # preamble: small models restate the question, then number the items ("1. 5821470\n") or
    # restate them ("- VAR IZQJA = 96566\n").
    min_new = 16 + sum(count_tokens(tokenizer, a) + 10 for a in answers) if list_answer else 0
    return Sample(task=task, document=text, instruction=instruction, answers=tuple(answers),
                  reference=reference, n_tokens=n, depth=needle_depth(spans[0], n),
                  needle_spans=tuple(sorted(spans)), seed=seed, min_new_tokens=min_new)


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def _keys(rng: random.Random, count: int) -> list[str]:
    pairs = rng.sample([(a, n) for a in _ADJECTIVES for n in _NOUNS], count)
    return [f"{a}-{n}" for a, n in pairs]


def _other_depths(rng: random.Random, count: int) -> list[float]:
    return [rng.random() for _ in range(count)]


def passkey(tokenizer, n_tokens: int, depth: float, seed: int = 0) -> Sample:
    """Passkey retrieval: a 5-digit key in repetitive filler.

    Parameters
    ----------
    tokenizer : transformers tokenizer
    n_tokens : int
        Document length in tokens.
    depth : float
        Relative position of the key sentence, in ``[0, 1]``.
    seed : int
        Picks the key.

    Returns
    -------
    Sample
    """
    _check(n_tokens, depth)
    key = _number(random.Random(seed), 5)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    text, spans = compose(tokenizer, n_tokens, [(depth, needle)])
    instruction = "What is the pass key? Answer with the number only."
    return _finish("passkey", tokenizer, text, spans, instruction, [key], key, seed)


def niah(tokenizer, n_tokens: int, depth: float, seed: int = 0,
         haystack_fn: Optional[Callable] = None) -> Sample:
    """Needle in a haystack: a sentence hidden in Paul Graham essays, asked as a question.

    Parameters
    ----------
    tokenizer : transformers tokenizer (fast: offsets locate the needle)
    n_tokens : int
        Document length in tokens.
    depth : float
        Relative position of the needle, in ``[0, 1]``; the needle lands on the nearest
        sentence boundary of the essays.
    seed : int
        Picks the city, the activity and the essays' order.
    haystack_fn : callable, optional
        ``haystack_fn(tokenizer, n_tokens, needle, depth, seed=...)`` returning an object with
        ``text``, ``n_tokens`` and ``needle_tokens``; defaults to
        ``citrus_ext.texts.build_haystack`` on the essays (tests inject their own).

    Returns
    -------
    Sample
        ``answers`` is the activity; ``reference`` (for ROUGE) is the needle sentence.
    """
    _check(n_tokens, depth)
    if haystack_fn is None:
        haystack_fn = _essay_haystack
    rng = random.Random(seed)
    city, activity = rng.choice(_CITIES), rng.choice(_ACTIVITIES)
    needle = f"The best thing to do in {city} is to {activity}."
    hay = haystack_fn(tokenizer, n_tokens, needle, depth, seed=seed)
    instruction = (f"What is the best thing to do in {city}? Answer in one sentence, using the "
                   "text above.")
    start, end = hay.needle_tokens
    return Sample(task="niah", document=hay.text, instruction=instruction, answers=(activity,),
                  reference=needle, n_tokens=hay.n_tokens, depth=needle_depth((start, end), hay.n_tokens),
                  needle_spans=((start, end),), seed=seed)


def _essay_haystack(tokenizer, n_tokens, needle, depth, *, seed):
    """The essays' haystack builder of ``citrus_ext.texts`` (imported on first use)."""
    from citrus_ext.texts import build_haystack

    return build_haystack(tokenizer, n_tokens, needle, depth, source="essays", seed=seed)


def _magic(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def _keyed_needles(tokenizer, n_tokens: int, depth: float, seed: int, n: int):
    """``n`` distinct keys, each with its 7-digit number, composed into filler: the first needle at
    ``depth``, the others at seeded random depths. Returns (keys, values, text, spans)."""
    _check(n_tokens, depth)
    rng = random.Random(seed)
    keys = _keys(rng, n)
    values = [_number(rng, 7) for _ in keys]
    depths = [depth] + _other_depths(rng, n - 1)
    text, spans = compose(tokenizer, n_tokens, [(d, _magic(k, v)) for d, k, v in zip(depths, keys, values)])
    return keys, values, text, spans


def multikey(tokenizer, n_tokens: int, depth: float, seed: int = 0, n_keys: int = 4) -> Sample:
    """RULER multi-key NIAH: ``n_keys`` key/number needles, one key asked.

    The asked needle sits at ``depth``; the distractors at seeded random depths.

    Parameters
    ----------
    tokenizer : transformers tokenizer
    n_tokens : int
    depth : float
    seed : int
    n_keys : int
        Needles in the document (1 asked + distractors).

    Returns
    -------
    Sample
    """
    keys, values, text, spans = _keyed_needles(tokenizer, n_tokens, depth, seed, n_keys)
    instruction = (f"What is the special magic number for {keys[0]} mentioned in the text above? "
                   "Answer with the number only.")
    return _finish("multikey", tokenizer, text, spans, instruction, [values[0]], values[0], seed)


def multivalue(tokenizer, n_tokens: int, depth: float, seed: int = 0, n_values: int = 4) -> Sample:
    """RULER multi-value NIAH: one key with ``n_values`` numbers, all asked.

    The first number sits at ``depth``, the others at seeded random depths.

    Parameters
    ----------
    tokenizer : transformers tokenizer
    n_tokens : int
    depth : float
    seed : int
    n_values : int

    Returns
    -------
    Sample
    """
    _check(n_tokens, depth)
    rng = random.Random(seed)
    key = _keys(rng, 1)[0]
    values = [_number(rng, 7) for _ in range(n_values)]
    depths = [depth] + _other_depths(rng, n_values - 1)
    text, spans = compose(tokenizer, n_tokens, [(d, _magic(key, v)) for d, v in zip(depths, values)])
    instruction = (f"What are all the special magic numbers for {key} mentioned in the text "
                   "above? Answer with the numbers only, separated by commas.")
    return _finish("multivalue", tokenizer, text, spans, instruction, values, ", ".join(values), seed,
                   list_answer=True)


def multiquery(tokenizer, n_tokens: int, depth: float, seed: int = 0, n_queries: int = 4) -> Sample:
    """RULER multi-query NIAH: ``n_queries`` keys, each with its number, all asked at once.

    The first asked needle sits at ``depth``, the others at seeded random depths.

    Parameters
    ----------
    tokenizer : transformers tokenizer
    n_tokens : int
    depth : float
    seed : int
    n_queries : int

    Returns
    -------
    Sample
    """
    keys, values, text, spans = _keyed_needles(tokenizer, n_tokens, depth, seed, n_queries)
    instruction = (f"What are the special magic numbers for {', '.join(keys[:-1])} and {keys[-1]} "
                   "mentioned in the text above? Answer with the numbers only, in that order, "
                   "separated by commas.")
    return _finish("multiquery", tokenizer, text, spans, instruction, values, ", ".join(values), seed,
                   list_answer=True)


def vartrack(tokenizer, n_tokens: int, depth: float, seed: int = 0, hops: int = 4,
             distractor_chains: int = 1) -> Sample:
    """RULER variable tracking: ``VAR A = 12345.`` then ``hops`` re-assignments, names asked.

    The first assignment sits at ``depth``; each following one of the chain lands at a seeded
    depth after the previous one, so the chain reads in order. Distractor chains (another value)
    go anywhere.

    Parameters
    ----------
    tokenizer : transformers tokenizer
    n_tokens : int
    depth : float
    seed : int
    hops : int
        Re-assignments after the first (the answer has ``hops + 1`` names).
    distractor_chains : int

    Returns
    -------
    Sample
    """
    _check(n_tokens, depth)
    rng = random.Random(seed)
    names: list[str] = []
    while len(names) < (hops + 1) * (1 + distractor_chains):
        name = "".join(rng.choices(_LETTERS, k=5))
        if name not in names:
            names.append(name)
    needles: list[tuple[float, str]] = []
    chains = [names[i * (hops + 1):(i + 1) * (hops + 1)] for i in range(1 + distractor_chains)]
    values = rng.sample(range(10000, 100000), 1 + distractor_chains)
    for c, (chain, value) in enumerate(zip(chains, values)):
        d = depth if c == 0 else rng.random()
        needles.append((d, f"VAR {chain[0]} = {value}."))
        for prev, name in zip(chain, chain[1:]):
            d = d + (1.0 - d) * rng.random() * 0.5  # later than the previous link, so order holds
            needles.append((d, f"VAR {name} = VAR {prev}."))
    text, spans = compose(tokenizer, n_tokens, needles)
    instruction = (f"Find all variables that are assigned the value {values[0]} in the text above, "
                   "directly or through other variables. Answer with the variable names only, "
                   "separated by spaces.")
    return _finish("vartrack", tokenizer, text, spans, instruction, chains[0], " ".join(chains[0]),
                   seed, list_answer=True)


TASKS: dict[str, Callable[..., Sample]] = {
    "passkey": passkey, "niah": niah, "multikey": multikey, "multivalue": multivalue,
    "multiquery": multiquery, "vartrack": vartrack,
}


def make_sample(task: str, tokenizer, n_tokens: int, depth: float, seed: int, **kwargs) -> Sample:
    """Build one sample of ``task`` (a key of :data:`TASKS`).

    Raises
    ------
    ValueError
        For an unknown task.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    return TASKS[task](tokenizer, n_tokens, depth, seed, **kwargs)
