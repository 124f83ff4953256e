"""The SentencePiece-BPE tokenizer rebuilt from a GGUF vocabulary, on a small made-up vocabulary."""
import pytest

from citrus_ext.gguf_tokenizer import BYTE, CONTROL, NORMAL, USER_DEFINED, spm_bpe_merges, spm_bpe_tokenizer

SPECIAL = [("<pad>", CONTROL), ("<eos>", CONTROL), ("<bos>", CONTROL), ("<unk>", 2)]
BYTES = [(f"<0x{b:02X}>", BYTE) for b in range(256)]


def vocabulary(pieces):
    """``pieces``: (piece, score) of normal pieces; the specials and the 256 byte pieces come first."""
    tokens = [t for t, _ in SPECIAL] + [t for t, _ in BYTES] + [p for p, _ in pieces]
    scores = [0.0] * (len(SPECIAL) + len(BYTES)) + [s for _, s in pieces]
    types = [k for _, k in SPECIAL] + [k for _, k in BYTES] + [NORMAL] * len(pieces)
    return tokens, scores, types


def build(pieces, **kwargs):
    tokens, scores, types = vocabulary(pieces)
    return spm_bpe_tokenizer(tokens, scores, types, bos="<bos>", unk="<unk>", **kwargs)


@pytest.mark.parametrize("ab, bc, expected", [(-1.0, -2.0, ["ab", "c"]), (-2.0, -1.0, ["a", "bc"])])
def test_the_higher_scoring_merge_wins(ab, bc, expected):
    pieces = [("a", -10.0), ("b", -11.0), ("c", -12.0), ("ab", ab), ("bc", bc)]
    assert build(pieces, add_bos=False).encode("abc").tokens == expected


def test_merges_are_ranked_by_the_merged_piece():
    tokens, scores, types = vocabulary([("a", -1.0), ("b", -2.0), ("ab", -5.0), ("ba", -4.0), ("aba", -3.0)])
    merges = spm_bpe_merges(tokens, scores, types)
    # "aba" (-3) splits as a+ba and ab+a, a+ba first (its left part scores higher); then ba, then ab.
    assert merges == [("a", "ba"), ("ab", "a"), ("b", "a"), ("a", "b")]


def test_spaces_bytes_and_special_tokens():
    pieces = [("▁", -1.0), ("t", -2.0), ("h", -3.0), ("e", -4.0), ("th", -5.0), ("the", -6.0), ("▁the", -7.0)]
    tokens, scores, types = vocabulary(pieces)
    tokens.append("  ")  # a user-defined piece (Gemma has runs of spaces), matched whole
    scores.append(0.0)
    types.append(USER_DEFINED)
    tok = spm_bpe_tokenizer(tokens, scores, types, bos="<bos>", unk="<unk>")
    encoded = tok.encode("the the  é<eos>")
    assert encoded.tokens == ["<bos>", "the", "▁the", "  ", "<0xC3>", "<0xA9>", "<eos>"]
    assert tok.decode(encoded.ids, skip_special_tokens=True) == "the the  é"
    assert tok.encode("the", add_special_tokens=False).tokens == ["the"]


def test_bad_vocabularies_are_refused():
    tokens, scores, types = vocabulary([("a", -1.0)])
    with pytest.raises(ValueError, match="bos token '<s>'"):
        spm_bpe_tokenizer(tokens, scores, types, bos="<s>", unk="<unk>")
    with pytest.raises(ValueError, match="repeats a token"):
        spm_bpe_tokenizer(tokens + ["a"], scores + [-2.0], types + [NORMAL], bos="<bos>", unk="<unk>")
