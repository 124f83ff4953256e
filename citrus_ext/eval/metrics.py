"""Scores of an answer against the expected one, and perplexity over windows of tokens read.

``containment``
    The share of expected strings found in the answer, after lower-casing and collapsing
    whitespace (RULER's ``string_match_all``); 1.0 means every expected string is there.
``rouge1``, ``rougeL``
    ROUGE-1 and ROUGE-L F1 (Lin, 2004) on lower-cased alphanumeric words, as the reference
    ``rouge-score`` package computes them without stemming.
``windowed_nll``
    Token-level negative log-likelihood averaged over consecutive windows of tokens read, so a
    long read gives a perplexity curve against the number of tokens read.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

_WORD = re.compile(r"[a-z0-9]+")


def _normalize(text: str) -> str:
    return " ".join(text.lower().split())


def containment(prediction: str, expected: Sequence[str]) -> float:
    """Share of ``expected`` strings contained in ``prediction`` (case and spacing ignored).

    Parameters
    ----------
    prediction : str
        The model's answer.
    expected : sequence of str
        Strings a correct answer contains (at least one).

    Returns
    -------
    float
        In ``[0, 1]``.
    """
    if not expected:
        raise ValueError("expected must hold at least one string")
    text = _normalize(prediction)
    return sum(_normalize(e) in text for e in expected) / len(expected)


def words(text: str) -> list[str]:
    """Lower-cased alphanumeric words of ``text`` (the ROUGE tokenisation)."""
    return _WORD.findall(text.lower())


def _f1(overlap: int, n_pred: int, n_ref: int) -> float:
    if overlap == 0:
        return 0.0
    precision, recall = overlap / n_pred, overlap / n_ref
    return 2 * precision * recall / (precision + recall)


def rouge1(prediction: str, reference: str) -> float:
    """ROUGE-1 F1: unigram overlap (with multiplicity) of prediction and reference."""
    pred, ref = Counter(words(prediction)), Counter(words(reference))
    return _f1(sum((pred & ref).values()), sum(pred.values()), sum(ref.values()))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two word lists (O(len(a)·len(b)))."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1: longest common word subsequence of prediction and reference."""
    pred, ref = words(prediction), words(reference)
    return _f1(lcs_length(pred, ref), len(pred), len(ref))


def score_answer(prediction: str, answers: Sequence[str], reference: str) -> dict:
    """All retrieval metrics of one answer.

    Returns
    -------
    dict
        ``containment`` (share of answers found), ``exact`` (1.0 if all found, else 0.0),
        ``rouge1`` and ``rougeL`` (F1 against ``reference``).
    """
    share = containment(prediction, answers)
    return {"containment": share, "exact": float(share == 1.0),
            "rouge1": rouge1(prediction, reference), "rougeL": rouge_l(prediction, reference)}


def windowed_nll(nll: Sequence[float], window: int) -> list[dict]:
    """Average token NLL over consecutive windows of ``window`` tokens.

    Parameters
    ----------
    nll : sequence of float
        NLL (natural log) of each predicted token, in reading order.
    window : int
        Tokens per window; the last window may be shorter.

    Returns
    -------
    list of dict
        One per window: ``end`` (tokens predicted so far), ``tokens`` (in the window), ``nll``
        (mean) and ``ppl`` (``exp(nll)``).
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    out = []
    for start in range(0, len(nll), window):
        part = nll[start:start + window]
        mean = math.fsum(part) / len(part)
        out.append({"end": start + len(part), "tokens": len(part), "nll": mean, "ppl": math.exp(mean)})
    return out
