"""Task generators: requested length, needle at the requested depth, determinism by seed."""
import re
from types import SimpleNamespace

import pytest
from eval_fakes import SMOLLM_DIR, WordTokenizer

from citrus_ext.eval.tasks import TASKS, compose, make_sample, passkey, sample_seed, vartrack

SYNTHETIC = ["passkey", "multikey", "multivalue", "multiquery", "vartrack"]


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False).input_ids


def _check_sample(tokenizer, sample, n_tokens, depth, tolerance):
    ids = _ids(tokenizer, sample.document)
    assert sample.n_tokens == len(ids)
    assert n_tokens - tolerance <= len(ids) <= n_tokens
    # The asked needle starts at the requested depth, to within one filler sentence; a variable
    # chain's later links must follow its first, which pushes the first away from the very end.
    slack = tolerance
    if sample.task == "vartrack":
        first = round(sample.depth * n_tokens)
        slack += sum(b - a for a, b in sample.needle_spans if a > first)
    assert abs(sample.depth - depth) <= slack / n_tokens
    for value in sample.answers:
        assert value in sample.document
    for start, end in sample.needle_spans:
        assert 0 <= start < end <= len(ids)


@pytest.mark.parametrize("task", SYNTHETIC)
@pytest.mark.parametrize("n_tokens", [300, 2048, 5000])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_synthetic_tasks_hit_length_and_depth(task, n_tokens, depth):
    tokenizer = WordTokenizer()
    sample = make_sample(task, tokenizer, n_tokens, depth, seed=3)
    _check_sample(tokenizer, sample, n_tokens, depth, tolerance=6)


NEEDLE = re.compile(r" ?(The pass key is (\d+)\. Remember it\. \2 is the pass key\."
                    r"|One of the special magic numbers for [a-z]+-[a-z]+ is: \d+\."
                    r"|VAR [A-Z]{5} = (VAR [A-Z]{5}|\d+)\.)")


@pytest.mark.parametrize("task", SYNTHETIC)
def test_needle_spans_hold_the_needles(task):
    tokenizer = WordTokenizer()
    sample = make_sample(task, tokenizer, 1500, 0.4, seed=1)
    words = re.findall(r"\s*\S+", sample.document)  # WordTokenizer's tokens
    pieces = ["".join(words[a:b]) for a, b in sample.needle_spans]
    assert all(NEEDLE.fullmatch(p) for p in pieces), pieces
    assert len(pieces) == len(NEEDLE.findall(sample.document))


@pytest.mark.parametrize("task", SYNTHETIC)
def test_deterministic_by_seed(task):
    tokenizer = WordTokenizer()
    a, b = (make_sample(task, tokenizer, 800, 0.5, seed=7) for _ in range(2))
    c = make_sample(task, tokenizer, 800, 0.5, seed=8)
    assert a == b
    assert a.document != c.document and a.answers != c.answers


def test_sample_seed_is_stable_and_distinct():
    assert sample_seed(0, "passkey", 2048, 0.5, 0) == sample_seed(0, "passkey", 2048, 0.5, 0)
    assert sample_seed(0, "passkey", 2048, 0.5, 0) != sample_seed(0, "passkey", 2048, 0.5, 1)
    assert sample_seed(0, "passkey", 2048, 0.5, 0) == 633529027  # fixed across processes


def test_vartrack_chain_reads_in_order():
    sample = vartrack(WordTokenizer(), 3000, 0.2, seed=5, hops=4)
    names = sample.answers
    assert len(names) == 5
    positions = [sample.document.index(f"VAR {name} =") for name in names]
    assert positions == sorted(positions)
    assert re.search(rf"VAR {names[0]} = \d+\.", sample.document)
    for prev, name in zip(names, names[1:]):
        assert f"VAR {name} = VAR {prev}." in sample.document


def test_compose_keeps_needle_order_on_one_boundary():
    text, spans = compose(WordTokenizer(), 200, [(0.5, "First needle."), (0.5, "Second needle.")])
    assert text.index("First needle.") < text.index("Second needle.")
    assert spans[0][1] == spans[1][0]


def test_bad_arguments():
    with pytest.raises(ValueError):
        passkey(WordTokenizer(), 1000, 1.5)
    with pytest.raises(ValueError):
        passkey(WordTokenizer(), 10, 0.5)
    with pytest.raises(ValueError):
        make_sample("nope", WordTokenizer(), 1000, 0.5, 0)


def test_niah_uses_the_injected_haystack():
    seen = {}

    def haystack(tokenizer, n_tokens, needle, depth, *, seed):
        seen.update(n_tokens=n_tokens, depth=depth, seed=seed)
        text = "filler " * 50 + needle + " filler" * 49
        n = len(needle.split())
        return SimpleNamespace(text=text, n_tokens=100 + n, needle_tokens=(50, 50 + n))

    sample = make_sample("niah", WordTokenizer(), 128, 0.5, seed=4, haystack_fn=haystack)
    assert seen == {"n_tokens": 128, "depth": 0.5, "seed": 4}
    assert sample.answers[0] in sample.reference and sample.reference in sample.document
    assert "What is the best thing to do in" in sample.instruction
    assert sample.depth == pytest.approx(50 / 100)


@pytest.fixture(scope="module")
def smollm_tokenizer():
    if not (SMOLLM_DIR / "tokenizer.json").exists():
        pytest.skip("the converted SmolLM2 tokenizer is not on this machine")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SMOLLM_DIR)


@pytest.mark.parametrize("task", SYNTHETIC)
def test_real_tokenizer_lengths_and_spans(smollm_tokenizer, task):
    sample = make_sample(task, smollm_tokenizer, 4096, 0.5, seed=0)
    _check_sample(smollm_tokenizer, sample, 4096, 0.5, tolerance=12)
    ids = _ids(smollm_tokenizer, sample.document)
    for start, end in sample.needle_spans:
        piece = smollm_tokenizer.decode(ids[start:end])
        assert NEEDLE.fullmatch(piece), piece


def test_real_niah(smollm_tokenizer):
    pytest.importorskip("citrus_ext.texts")
    sample = make_sample("niah", smollm_tokenizer, 4096, 0.25, seed=0)
    assert 4096 - 80 <= sample.n_tokens <= 4096
    assert abs(sample.depth - 0.25) < 0.05
    start, end = sample.needle_spans[0]
    assert sample.reference in smollm_tokenizer.decode(_ids(smollm_tokenizer, sample.document)[start:end])


@pytest.mark.parametrize("task", ["multivalue", "multiquery", "vartrack"])
def test_listed_answers_get_room_for_a_numbered_answer(smollm_tokenizer, task):
    # At the folder's 32 tokens SmolLM2 ran out after two of four numbers; the sample asks for
    # enough to restate the question and number every item.
    sample = make_sample(task, smollm_tokenizer, 2048, 0.5, seed=0)
    numbered = ("The special magic numbers mentioned in the text above are:\n\n"
                + "\n".join(f"{i}. {item}" for i, item in enumerate(sample.answers, 1)))
    restated = ("The text contains the following variables:\n\n"
                + "\n".join(f"- VAR {item} = 96566" for item in sample.answers))
    longest = max(len(_ids(smollm_tokenizer, numbered)), len(_ids(smollm_tokenizer, restated)))
    assert sample.min_new_tokens >= longest > 32


@pytest.mark.parametrize("task", ["passkey", "multikey"])
def test_single_answers_keep_the_run_setting(task):
    assert make_sample(task, WordTokenizer(), 600, 0.5, seed=0).min_new_tokens == 0


def test_every_task_is_listed():
    assert set(TASKS) == {"passkey", "niah", "multikey", "multivalue", "multiquery", "vartrack"}
