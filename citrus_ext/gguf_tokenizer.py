"""A fast tokenizer rebuilt from the SentencePiece-BPE vocabulary stored in a GGUF file.

transformers' GGUF import turns Gemma-3's vocabulary into a *Unigram* model. Its scores are BPE
merge ranks (``-id``), not log-probabilities, so Unigram's best path prefers many short pieces and
text comes out nearly one character per token. SentencePiece's BPE instead merges, at each step,
the adjacent pair whose merged piece has the highest score; a ``tokenizers`` BPE whose merges are
ranked by that score encodes the same way.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

# GGUF token types (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def spm_bpe_merges(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int]) -> list[tuple[str, str]]:
    """The merges that reproduce SentencePiece BPE: every split of a normal piece into two pieces
    of the vocabulary, ranked by the merged piece's score (highest first), then by its parts'."""
    index = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for token, score, kind in zip(tokens, scores, types):
        if kind != NORMAL or len(token) < 2:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in index and right in index:
                ranked.append((-score, -scores[index[left]], -scores[index[right]], left, right))
    ranked.sort(key=lambda r: r[:3])  # stable: equal ranks keep vocabulary order
    return [(left, right) for *_, left, right in ranked]


def spm_bpe_tokenizer(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int], *,
                      bos: str, unk: str, add_bos: bool = True):
    """A ``tokenizers.Tokenizer`` for a SentencePiece-BPE vocabulary (no dummy prefix: Gemma's).

    Control tokens become special tokens and user-defined ones (e.g. runs of spaces, HTML tags)
    are matched whole, as SentencePiece does; unknown characters fall back to ``<0xXX>`` bytes.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("the GGUF vocabulary repeats a token")
    for name, token in (("bos", bos), ("unk", unk)):
        if token not in vocab:
            raise ValueError(f"{name} token {token!r} is not in the vocabulary")
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=spm_bpe_merges(tokens, scores, types),
                                     unk_token=unk, byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, k in zip(tokens, types) if k == CONTROL])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, k in zip(tokens, types) if k == USER_DEFINED])
    if add_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])])
    return tokenizer


def read_gguf_vocabulary(path: str | Path) -> dict:
    """``tokens``, ``scores``, ``types`` and the special token ids of a GGUF file's tokenizer."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields

    def get(key, default=None):
        return fields[key].contents() if key in fields else default

    if get("tokenizer.ggml.model") != "llama":
        raise ValueError(f"{path}: not a SentencePiece vocabulary (tokenizer.ggml.model="
                         f"{get('tokenizer.ggml.model')!r})")
    return {"tokens": get("tokenizer.ggml.tokens"), "scores": get("tokenizer.ggml.scores"),
            "types": get("tokenizer.ggml.token_type"), "bos_id": get("tokenizer.ggml.bos_token_id"),
            "eos_id": get("tokenizer.ggml.eos_token_id"), "unk_id": get("tokenizer.ggml.unknown_token_id"),
            "pad_id": get("tokenizer.ggml.padding_token_id"),
            "add_bos": bool(get("tokenizer.ggml.add_bos_token", True))}
