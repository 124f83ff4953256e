"""``citrus ask`` and ``citrus demo`` end to end, on the real ``citrus_ext.answer`` and SmolLM2.

These run the model on CPU; the 20k-token test (marked slow) takes minutes on 2 cores.
"""
import json

import pytest

from citrus_ext import cli, models, texts
from procs import run_python

FIELDS = ("answer", "method", "budget", "chunk_size", "document_tokens", "peak_cache_states",
          "chunks", "seconds")
# Past the budget, a layer may hold the newest chunk (twice while encoding it), the instruction
# and the generated tokens: see SPEC.md, "Budget".
INSTRUCTION_ALLOWANCE = 128


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(models.ensure_default_model(progress=False))


def citrus(*argv, timeout=3600):
    return run_python("-m", "citrus_ext", *argv, timeout=timeout)


def cache_bound(method, budget, chunk_size, max_new_tokens):
    one_cache = budget + 2 * chunk_size + INSTRUCTION_ALLOWANCE + max_new_tokens
    # citrus_individual keeps a second cache for the instruction (SPEC: about 2x KV memory).
    return 2 * one_cache if method == "citrus_individual" else one_cache


def check_record(record, method, budget, chunk_size, max_new_tokens):
    for key in FIELDS:
        assert key in record, key
    assert isinstance(record["answer"], str)
    assert (record["method"], record["budget"], record["chunk_size"]) == (method, budget, chunk_size)
    assert record["seconds"] > 0 and record["chunks"] >= 1
    if method != "full":
        assert record["peak_cache_states"] <= cache_bound(method, budget, chunk_size, max_new_tokens)


@pytest.mark.slow
def test_ask_json_on_a_20k_token_document(tmp_path, tokenizer):
    fact = "The password of the old lighthouse on Brindle Island is marmalade."
    hay = texts.build_haystack(tokenizer, 20000, fact, 0.4, source="kjv", seed=11)
    path = tmp_path / "long.txt"
    path.write_text(hay.text, encoding="utf-8")
    done = citrus("ask", "--document", path, "--question",
                  "What is the password of the old lighthouse on Brindle Island?", "--json",
                  "--budget", 512, "--chunk-size", 256, "--max-new-tokens", 24)
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    check_record(record, "citrus_shared", 512, 256, 24)
    assert abs(record["document_tokens"] - hay.n_tokens) <= 0.02 * hay.n_tokens
    assert record["chunks"] >= hay.n_tokens // 256
    print(f"\n20k-token ask: {record}")


# The library's own tests run every method; here, one per kind of cache: one evicting cache, two
# caches (the bound doubles), no eviction.
@pytest.mark.parametrize("method", ["citrus_shared", "citrus_individual", "full"])
def test_methods(method, tmp_path, tokenizer, capsys):
    hay = texts.build_haystack(tokenizer, 800, source="essays", seed=5)
    path = tmp_path / "doc.md"
    path.write_text(hay.text, encoding="utf-8")
    code = cli.main(["ask", "--document", str(path), "--question", texts.DEFAULT_QUESTION,
                     "--method", method, "--budget", "256", "--chunk-size", "128",
                     "--max-new-tokens", "8", "--json", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    check_record(json.loads(out), method, 256, 128, 8)


def test_citrus_finds_a_fact_within_reach(tmp_path, tokenizer, capsys):
    """~1.5k tokens, a 768-state budget: eviction happens, and the question's attention with
    neighbour pooling keeps the fact (measured 2026-11-22: "The name of Dolores's cat is
    Biscuit.")."""
    hay = texts.build_haystack(tokenizer, 1500, depth=0.5, source="essays")
    path = tmp_path / "doc.txt"
    path.write_text(hay.text, encoding="utf-8")
    code = cli.main(["ask", "--document", str(path), "--question", texts.DEFAULT_QUESTION,
                     "--quiet", "--max-new-tokens", "32", "--pool", "7"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert texts.DEFAULT_ANSWER_KEY in out.lower(), out


def test_demo_prints_both_answers():
    done = citrus("demo", "--tokens", 1000, "--budget", 256, "--chunk-size", 128, "--quiet")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "tokens of Paul Graham essays" in out and "Question:" in out
    assert "\ncitrus_shared (pool 7): " in out and "\nstreaming_llm: " in out
    assert out.count("peak cache") == 2 and out.count(" s\n") >= 2
