"""Metrics of the evaluation harness on hand-checked examples."""
import math

import pytest

from citrus_ext.eval.metrics import containment, lcs_length, rouge1, rouge_l, score_answer, windowed_nll


def test_containment_ignores_case_and_spacing():
    assert containment("The pass key is 71432.", ["71432"]) == 1.0
    assert containment("It is to  RIDE the old blue tram", ["ride the old blue tram"]) == 1.0
    assert containment("The pass key is 7143.", ["71432"]) == 0.0


def test_containment_is_the_share_of_expected_strings():
    assert containment("1234567, 7654321", ["1234567", "7654321", "1111111", "2222222"]) == 0.5
    with pytest.raises(ValueError):
        containment("x", [])


def test_rouge_on_hand_computed_examples():
    # 5 of 6 unigrams shared both ways (the x2, cat, on, mat): P = R = 5/6.
    assert rouge1("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # LCS "the cat on the mat" = 5 words.
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # "a b c d" vs "b d a": unigrams 3 shared (P 3/4, R 1) -> 6/7; LCS "b d" = 2 (P 1/2, R 2/3) -> 4/7.
    assert rouge1("a b c d", "b d a") == pytest.approx(6 / 7)
    assert rouge_l("a b c d", "b d a") == pytest.approx(4 / 7)
    assert lcs_length(list("abcbdab"), list("bdcaba")) == 4  # the textbook CLRS example


def test_rouge_tokenises_like_rouge_score():
    # Punctuation and case are dropped: identical word sequences score 1.
    assert rouge_l("The Pass-Key: 71432!", "the pass key 71432") == 1.0
    assert rouge1("", "anything") == 0.0 and rouge_l("anything", "") == 0.0


def test_score_answer():
    s = score_answer("The best thing is to fly a red kite.", ["fly a red kite"],
                     "The best thing to do in Oslo is to fly a red kite.")
    assert s["containment"] == 1.0 and s["exact"] == 1.0
    assert 0.5 < s["rougeL"] < 1.0 and 0.5 < s["rouge1"] < 1.0


def test_windowed_nll():
    windows = windowed_nll([1.0, 2.0, 3.0, 4.0, 5.0], 2)
    assert [w["end"] for w in windows] == [2, 4, 5]
    assert [w["tokens"] for w in windows] == [2, 2, 1]
    assert [w["nll"] for w in windows] == [1.5, 3.5, 5.0]
    assert windows[0]["ppl"] == pytest.approx(math.exp(1.5))
    with pytest.raises(ValueError):
        windowed_nll([1.0], 0)
