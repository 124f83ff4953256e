"""The ``citrus`` command line without the real ``citrus_ext.answer``.

Argument and input errors, document reading, and the output formats; where an answer is needed,
a stub stands in for ``citrus_ext.answer`` and for the model (tests with the real one live in
``test_cli_answer.py``).
"""
import io
import json
import sys
from types import SimpleNamespace

import pytest

import citrus_ext
from citrus_ext import cli, models, texts
from procs import run_python



def run(argv, capsys):
    """Run ``citrus argv`` in-process; return (exit status, stdout, stderr)."""
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def document(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text("The vault code is 4711. " * 50, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(models.ensure_default_model(progress=False))


@pytest.fixture
def stub(monkeypatch, tokenizer):
    """Replace the model loader and citrus_ext.answer; record every call of the latter."""
    calls = []

    def fake_answer(model, tok, document, instruction, *, method="citrus_shared", budget=768,
                    chunk_size=256, max_new_tokens=64, progress=None, **options):
        n_tokens = len(tok(document, add_special_tokens=False).input_ids)
        chunks = -(-n_tokens // chunk_size)
        for done in range(1, chunks + 1):
            if progress is not None:
                progress(done, chunks)
        calls.append(dict(document=document, instruction=instruction, method=method,
                          budget=budget, chunk_size=chunk_size, max_new_tokens=max_new_tokens,
                          progress=progress, options=options))
        text = " Her cat is named Biscuit. " if method == "citrus_shared" else " I don't know. "
        # The statistics under the library's names (citrus_ext.api.Answer).
        peak = min(n_tokens, budget + chunk_size)
        stats = {"tokens_read": n_tokens, "peak_states_per_layer": [peak - 1, peak, peak - 2],
                 "chunks": chunks, "wall_s": 0.25, "instruction_tokens": 12}
        return SimpleNamespace(text=text, token_ids=[1, 2], stats=stats)

    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=8192))
    monkeypatch.setattr(cli, "_load", lambda args: (model, tokenizer))
    monkeypatch.setattr(citrus_ext, "answer", fake_answer, raising=False)
    return calls


def test_help(capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0 and "ask" in out and "demo" in out
    code, out, _ = run(["ask", "--help"], capsys)
    assert code == 0
    for option in ("--document", "--question", "--method", "--budget", "--chunk-size", "--model",
                   "--max-new-tokens", "--dtype", "--device", "--json", "--quiet"):
        assert option in out
    code, out, _ = run(["demo", "--help"], capsys)
    assert code == 0 and "--tokens" in out and "--budget" in out


def test_no_command(capsys):
    code, _, err = run([], capsys)
    assert code == 2 and "usage: citrus" in err


@pytest.mark.parametrize("argv,message", [
    (["ask", "--question", "q"], "--document"),
    (["ask", "--document", "DOC"], "--question"),
    (["ask", "--document", "DOC", "--question", "q", "--method", "magic"], "invalid choice"),
    (["ask", "--document", "DOC", "--question", "q", "--budget", "0"], "at least 1"),
    (["ask", "--document", "DOC", "--question", "q", "--budget", "-5"], "at least 1"),
    (["ask", "--document", "DOC", "--question", "q", "--budget", "lots"], "positive integer"),
    (["ask", "--document", "DOC", "--question", "q", "--pool", "4"], "must be odd"),
    (["ask", "--document", "DOC", "--question", "q", "--chunk-size", "0"], "at least 1"),
    (["ask", "--document", "DOC", "--question", "q", "--max-new-tokens", "0"], "at least 1"),
    (["ask", "--document", "DOC", "--question", "q", "--dtype", "int3"], "invalid choice"),
    (["ask", "--document", "DOC", "--question", "  "], "question is empty"),
    (["ask", "--document", "DOC", "--question", "q", "--model", "/no/such/model"], "does not exist"),
    (["ask", "--document", "/no/such/file.txt", "--question", "q"], "No such file"),
    (["demo", "--tokens", "0"], "at least 1"),
    (["demo", "--depth", "2"], "[0, 1]"),
    (["demo", "--source", "pg19"], "invalid choice"),
    (["frobnicate"], "invalid choice"),
])
def test_usage_errors_are_one_line(argv, message, document, capsys):
    code, out, err = run([str(document) if a == "DOC" else a for a in argv], capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err
    assert err.startswith("citrus")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CUDA is available here")
def test_missing_cuda_is_a_usage_error(document, capsys):
    code, _, err = run(["ask", "--document", document, "--question", "q", "--device", "cuda"], capsys)
    assert code == 2 and "CUDA is not available" in err


@pytest.mark.parametrize("content,message", [
    (b"", "is empty"),
    (b" \n\t\n", "is empty"),
    ("caf\u00e9".encode("latin-1"), "not UTF-8"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "not UTF-8"),
    (b"text\x00more", "NUL"),
])
def test_bad_documents(tmp_path, content, message, capsys):
    path = tmp_path / "doc.txt"
    path.write_bytes(content)
    code, _, err = run(["ask", "--document", path, "--question", "q"], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    with pytest.raises(cli.UsageError, match=message):
        cli.read_document("-", stdin=io.BytesIO(content))


def test_directory_is_not_a_document(tmp_path, capsys):
    code, _, err = run(["ask", "--document", tmp_path, "--question", "q"], capsys)
    assert code == 2 and "cannot read document" in err


def test_read_document(tmp_path):
    markdown = tmp_path / "notes.md"
    markdown.write_bytes("\ufeff# Title\n\nZo\u00eb's caf\u00e9 \u2014 \u65e5\u672c\n".encode("utf-8"))
    assert cli.read_document(str(markdown)) == "# Title\n\nZo\u00eb's caf\u00e9 \u2014 \u65e5\u672c\n"
    assert cli.read_document("-", stdin=io.BytesIO("r\u00e9sum\u00e9".encode())) == "r\u00e9sum\u00e9"


def test_ask_prints_the_answer(stub, document, capsys):
    code, out, err = run(["ask", "--document", document, "--question", "What is the code?",
                          "--budget", "64", "--chunk-size", "32", "--max-new-tokens", "9",
                          "--method", "cse"], capsys)
    assert code == 0 and out == "I don't know.\n"
    (call,) = stub
    assert call["document"] == document.read_text() and call["instruction"] == "What is the code?"
    assert (call["method"], call["budget"], call["chunk_size"], call["max_new_tokens"]) == (
        "cse", 64, 32, 9)
    assert callable(call["progress"])
    assert err == ""  # stderr is not a terminal under pytest: no progress bar


def test_ask_json(stub, document, capsys):
    code, out, _ = run(["ask", "--document", document, "--question", "q", "--json"], capsys)
    assert code == 0 and len(out.splitlines()) == 1
    record = json.loads(out)
    for key in ("answer", "method", "budget", "chunk_size", "document_tokens", "peak_cache_states",
                "seconds", "chunks", "model"):
        assert key in record
    assert record["answer"] == "Her cat is named Biscuit."
    assert record["peak_cache_states"] == max(record["peak_states_per_layer"])
    assert record["seconds"] == 0.25
    assert record["document_tokens"] == record["tokens_read"] and record["instruction_tokens"] == 12
    assert (record["method"], record["budget"], record["chunk_size"]) == ("citrus_shared", 768, 256)


def test_ask_reads_stdin(stub, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", SimpleNamespace(buffer=io.BytesIO(b"Stdin text. " * 10)))
    code, out, _ = run(["ask", "--document", "-", "--question", "q"], capsys)
    assert code == 0 and stub[0]["document"] == "Stdin text. " * 10


def test_cli_stats_names():
    library = {"tokens_read": 900, "peak_states_per_layer": [300, 320], "chunks": 4, "wall_s": 2.5}
    assert cli.cli_stats(library) == {**library, "document_tokens": 900, "peak_cache_states": 320,
                                      "seconds": 2.5}
    own = {"document_tokens": 900, "peak_cache_states": 320, "chunks": 4, "seconds": 2.5}
    assert cli.cli_stats(own) == own


@pytest.mark.parametrize("error,status", [(ValueError("citrus: `budget` must be >= 1"), 2),
                                          (RuntimeError("kernel exploded\nsecond line"), 1)])
def test_answer_failures_are_one_line(stub, monkeypatch, document, error, status, capsys):
    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr(citrus_ext, "answer", failing)
    code, out, err = run(["ask", "--document", document, "--question", "q"], capsys)
    assert code == status and out == "" and len(err.strip().splitlines()) == 1
    assert str(error).splitlines()[0].removeprefix("citrus: ") in err and "citrus: `" not in err


def test_progress_bar(capsys):
    bar = cli.ChunkProgress("reading", enabled=True)
    for done in range(1, 5):
        bar(done, 4)
    assert bar.bar.n == 4 and bar.bar.total == 4
    bar.close()
    assert "reading" in capsys.readouterr().err
    quiet = cli.ChunkProgress("reading", enabled=False)
    quiet(1, 4)
    assert quiet.bar is None and capsys.readouterr().err == ""


def test_demo(stub, capsys):
    code, out, _ = run(["demo", "--tokens", "1500", "--budget", "128", "--chunk-size", "64",
                        "--quiet"], capsys)
    assert code == 0
    assert [c["method"] for c in stub] == ["citrus_shared", "streaming_llm"]
    assert stub[0]["options"] == {"pool": 7} and stub[1]["options"] == {}
    assert stub[0]["document"] == stub[1]["document"] and texts.DEFAULT_NEEDLE in stub[0]["document"]
    assert stub[0]["instruction"] == texts.DEFAULT_QUESTION
    assert "tokens of Paul Graham essays" in out and "window is 8,192" in out
    assert "citrus_shared (pool 7): Her cat is named Biscuit." in out
    assert "recalled the fact (biscuit)" in out
    assert "streaming_llm: I don't know." in out and "missed the fact" in out
    assert out.count("peak cache 192 states") == 2


@pytest.mark.parametrize("answer, terms, verdict", [
    ("Eat a sandwich and sit in Dolores Park.", ("sandwich", "dolores park"),
     "recalled the fact (sandwich, dolores park)"),
    ("To eat a SANDWICH.", ("sandwich", "dolores park"),
     "recalled part of the fact (sandwich; not dolores park)"),
    ("Visit the Golden Gate Bridge.", ("sandwich", "dolores park"), "missed the fact"),
    ("The cat is called BISCUIT.", texts.DEFAULT_FACT_TERMS, "recalled the fact (biscuit)"),
    ("Dolores's cat is a fictional character.", texts.DEFAULT_FACT_TERMS, "missed the fact"),
])
def test_recall_verdict(answer, terms, verdict):
    assert cli._recall_verdict(answer, terms) == verdict


def test_module_entry_point_has_no_traceback(tmp_path):
    # The real process: python -m citrus_ext, as `citrus` runs it.
    empty = tmp_path / "empty.md"
    empty.write_text("")
    done = run_python("-m", "citrus_ext", "ask", "--document", empty, "--question", "q", timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [f"citrus ask: error: {empty} is empty"]


def test_eval_is_a_citrus_command(tmp_path, capsys):
    """`citrus eval` reaches the evaluation harness (listing cells needs no model)."""
    code, out, _ = run(["eval", "retrieval", "--out", tmp_path, "--list", "--tasks", "passkey", "--methods", "cse",
                        "--budgets", "256", "--chunk-sizes", "256", "--lengths", "2048", "--depths", "0.5",
                        "--samples", "1"], capsys)
    assert code == 0
    assert out.split() == ["todo", "passkey__L2048__d0.5__s0__cse__b256__c256"]
