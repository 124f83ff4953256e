"""citrus_ext.answer on tiny random models: equality with generate, limits, batches, errors."""
import pytest
import torch
import transformers

import citrus_ext
from citrus_ext import ChunkedReader, make_policy, split_prompt
from hf_models import char_tokenizer, random_text, tiny_model

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3"]
METHODS = ["cse", "citrus_shared", "citrus_individual", "full", "streaming_llm", "h2o", "tova", "snapkv"]


def plain_generate(model, tok, document, instruction, max_new_tokens):
    doc_ids, instr_ids = split_prompt(tok, document, instruction)
    ids = torch.tensor([doc_ids + instr_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("method", ["cse", "citrus_shared"])
def test_large_budget_equals_generate(kind, method):
    model, tok = tiny_model(kind), char_tokenizer(chat=True)
    document, instruction = random_text(150, seed=1), "what is it?"
    expected = plain_generate(model, tok, document, instruction, 12)
    got = citrus_ext.answer(model, tok, document, instruction, method=method, budget=1000, chunk_size=16,
                            max_new_tokens=12)
    assert got.token_ids == expected
    assert got.stats["tokens_read"] == len(split_prompt(tok, document, instruction)[0])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("positions", ["relative", "original"])
def test_every_method_with_large_budget_equals_generate(method, positions):
    model, tok = tiny_model("llama"), char_tokenizer()
    document, instruction = random_text(100, seed=2), "why?"
    expected = plain_generate(model, tok, document, instruction, 8)
    got = citrus_ext.answer(model, tok, document, instruction, method=method, budget=500, chunk_size=32,
                            max_new_tokens=8, positions=positions)
    assert got.token_ids == expected


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_logits_equal_full_forward(kind):
    model = tiny_model(kind)
    ids = torch.randint(6, 1000, (1, 70), generator=torch.Generator().manual_seed(3))
    document, instruction = ids[:, :60], ids[:, 60:]
    reader = ChunkedReader(model, make_policy("citrus_shared", 100), chunk_size=16)
    reader.read(document, instruction)
    reader.prune(instruction)
    logits = reader.encode_instruction(instruction)
    with torch.no_grad():
        expected = model(ids).logits[:, -1]
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["cse", "citrus_shared", "citrus_individual"])
def test_bounded_cache_and_positions_beyond_the_window(method):
    # The model's window (64 positions) is far smaller than the document.
    model, tok = tiny_model("llama", max_position_embeddings=64), char_tokenizer()
    budget, chunk, new = 24, 8, 5
    peaks = []
    for length in (300, 900):
        got = citrus_ext.answer(model, tok, random_text(length, seed=4), "q?", method=method, budget=budget,
                                chunk_size=chunk, max_new_tokens=new)
        li = got.stats["instruction_tokens"]
        # Reading: the budget, the cached chunk and the new one (and the instruction beside them in
        # CItruS shared); answering: the budget, the instruction and the generated tokens.
        per_cache = max(budget + 2 * chunk + (li if method == "citrus_shared" else 0), budget + li + new)
        caches = 2 if method == "citrus_individual" else 1
        assert max(got.stats["peak_states_per_layer"]) <= caches * per_cache
        assert got.stats["max_position"] <= budget + 2 * chunk + li + new
        assert got.stats["max_position"] < 64
        peaks.append(got.stats["peak_states_per_layer"])
    assert peaks[0] == peaks[1]  # memory does not grow with the document


def test_original_positions_keep_true_indices():
    model = tiny_model("llama")
    ids = torch.randint(6, 1000, (1, 80), generator=torch.Generator().manual_seed(5))
    reader = ChunkedReader(model, make_policy("cse", 10), chunk_size=8, positions="original")
    reader.read(ids[:, :72], ids[:, 72:])
    assert reader.max_position == 71
    origin = reader.cache.layers[0].origin[0, 0]
    assert origin[-8:].tolist() == list(range(64, 72)) and len(origin) == 18


def test_kv_head_selection_and_options():
    model, tok = tiny_model("llama"), char_tokenizer()
    got = citrus_ext.answer(model, tok, random_text(200, seed=6), "q?", method="citrus_shared", budget=16,
                            chunk_size=16, max_new_tokens=3, granularity="kv_head", pool=3, sinks=2,
                            head_reduce="max", query_reduce="max")
    assert len(got.token_ids) == 3
    reader = ChunkedReader(model, make_policy("cse", 16, granularity="kv_head"), chunk_size=16)
    ids = torch.randint(6, 1000, (1, 100))
    reader.read(ids, ids[:, :4])
    origin = reader.cache.layers[1].origin
    assert origin.shape[1] == 2  # one selection per KV head
    assert reader.cache.layers[1].keys.shape[2] == origin.shape[2] == 16 + 4


def test_batch_equals_single():
    model, tok = tiny_model("qwen2"), char_tokenizer(chat=True)
    docs = [random_text(130, seed=7), random_text(70, seed=8)]
    questions = ["first?", "and the second one?"]
    batch = citrus_ext.answer(model, tok, docs, questions, budget=20, chunk_size=16, max_new_tokens=6)
    for i, (d, q) in enumerate(zip(docs, questions)):
        single = citrus_ext.answer(model, tok, d, q, budget=20, chunk_size=16, max_new_tokens=6)
        assert batch.token_ids[i] == single.token_ids
        assert batch.text[i] == single.text
    assert len(batch.stats["rows"]) == 2
    assert batch.stats["tokens_read"] == [r["tokens_read"] for r in batch.stats["rows"]]


# Gemma3 (sliding-window layers) with the CItruS modes only: its windows do not depend on the policy.
BATCH_CASES = [("llama", m) for m in METHODS] + [("gemma3", m) for m in ("cse", "citrus_shared", "citrus_individual")]


@pytest.mark.parametrize("kind,method", BATCH_CASES)
def test_ragged_batch_keeps_what_each_row_keeps_alone(kind, method):
    model = tiny_model(kind)
    g = torch.Generator().manual_seed(11)
    docs = [torch.randint(6, 1000, (n,), generator=g) for n in (75, 30, 52)]
    instrs = [torch.randint(6, 1000, (n,), generator=g) for n in (5, 9, 3)]
    options = {"granularity": "kv_head"} if method == "tova" else {}
    batch = ChunkedReader(model, make_policy(method, 12, **options), chunk_size=8)
    batch.read(docs, instrs)
    batch_tokens = batch.generate(instrs, 6, eos={2})
    for b, (doc, instr) in enumerate(zip(docs, instrs)):
        alone = ChunkedReader(model, make_policy(method, 12, **options), chunk_size=8)
        alone.read(doc[None], instr[None])
        assert alone.generate(instr[None], 6, eos={2})[0] == batch_tokens[b]
        for layer_b, layer_1 in zip(batch.answer_cache.layers, alone.answer_cache.layers):
            n = int(layer_b.lens[b])
            assert torch.equal(layer_b.origin[b, :, :n], layer_1.origin[0])
            torch.testing.assert_close(layer_b.keys[b, :, :n], layer_1.keys[0], rtol=1e-4, atol=1e-5)


def test_chat_template_split():
    tok = char_tokenizer(chat=True)
    doc_ids, instr_ids = split_prompt(tok, "some document", "the question")
    full = tok.apply_chat_template([{"role": "user", "content": "some document\n\nthe question"}],
                                   tokenize=False, add_generation_prompt=True)
    assert tok.decode(doc_ids + instr_ids).replace(" ", "") == full.replace(" ", "")
    assert tok.convert_ids_to_tokens(doc_ids[-1]) == "t"
    assert tok.convert_ids_to_tokens(instr_ids[-1]) == "<|assistant|>"


def test_completion_split_without_chat_template():
    tok = char_tokenizer()
    doc_ids, instr_ids = split_prompt(tok, "some document", "the question")
    assert tok.decode(doc_ids).replace(" ", "") == "somedocument"
    assert tok.decode(instr_ids).replace(" ", "") == "\n\nQuestion:thequestion\nAnswer:"


def test_progress_callback():
    model, tok = tiny_model("llama"), char_tokenizer()
    calls = []
    citrus_ext.answer(model, tok, random_text(50), "q", method="cse", budget=8, chunk_size=16, max_new_tokens=1,
                      progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]


@pytest.mark.parametrize(
    "kwargs,argument",
    [
        (dict(method="nope"), "method"),
        (dict(budget=0), "budget"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(document=""), "document"),
        (dict(instruction="   "), "instruction"),
        (dict(granularity="token"), "granularity"),
        (dict(colour="red"), "colour"),
        (dict(positions="absolute"), "positions"),
    ],
)
def test_bad_arguments(kwargs, argument):
    model, tok = tiny_model("llama"), char_tokenizer()
    call = dict(document="a document", instruction="a question")
    call.update(kwargs)
    with pytest.raises(ValueError, match=f"`{argument}`"):
        citrus_ext.answer(model, tok, call.pop("document"), call.pop("instruction"), **call)


def test_unsupported_model():
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=1000)
    model = transformers.GPT2LMHeadModel(config).eval()
    with pytest.raises(ValueError, match="`model`"):
        citrus_ext.answer(model, char_tokenizer(), "a document", "a question")


def test_gemma3_sliding_layers_keep_a_plain_window():
    model = tiny_model("gemma3")  # layers 0 and 2 slide over 12 positions
    ids = torch.randint(6, 1000, (1, 110), generator=torch.Generator().manual_seed(9))
    reader = ChunkedReader(model, make_policy("citrus_shared", 10), chunk_size=8)
    reader.read(ids[:, :100], ids[:, 100:])
    for i, layer in enumerate(reader.cache.layers):
        origin = layer.origin[0, 0].tolist()
        if i in (0, 2):
            assert origin == list(range(89, 100))  # the newest window - 1 tokens, never score-evicted
        else:
            assert len(origin) == 10 + 4 and origin[-4:] == [96, 97, 98, 99]


def test_custom_loop_with_the_evict_op():
    # Custom code reads without eviction, then scores each layer itself with torch.ops.citrus.evict.
    model = tiny_model("llama")
    ids = torch.randint(6, 1000, (1, 40), generator=torch.Generator().manual_seed(10))
    reader = ChunkedReader(model, make_policy("full", 1), chunk_size=8)
    reader.read(ids[:, :32], ids[:, 32:])
    for i in range(len(reader.cache.layers)):
        keys = reader.rotated_keys(i)
        query = keys[:, :, -4:].repeat_interleave(2, dim=1)  # any [B, Hq, Lq, D] queries will do
        values = reader.cache.layers[i].values
        _, _, kept = torch.ops.citrus.evict(query, keys, values, 10, 0.25, None, "layer", False)
        reader.keep(i, kept)
        assert reader.cache.layers[i].stored == 10
        assert reader.cache.layers[i].origin[0, 0].tolist() == kept[0, 0].tolist()
    shares = reader.retention(range(28, 32))
    assert len(shares) == 2 and all(0.0 <= float(s) <= 1.0 for s in shares)
    assert reader.decode(reader.encode_instruction(ids[:, 32:]), 3, eos=()) is not None


def test_streaming_llm_keeps_sinks_and_recent_states():
    model = tiny_model("llama")
    ids = torch.randint(6, 1000, (1, 64), generator=torch.Generator().manual_seed(12))
    reader = ChunkedReader(model, make_policy("streaming_llm", 10), chunk_size=8)
    reader.read(ids[:, :60], ids[:, 60:])
    expected = [0, 1, 2, 3] + list(range(50, 56)) + list(range(56, 60))
    assert all(layer.origin[0, 0].tolist() == expected for layer in reader.cache.layers)


def test_tqdm_progress():
    model, tok = tiny_model("llama"), char_tokenizer()
    got = citrus_ext.answer(model, tok, random_text(40), "q", method="tova", budget=8, chunk_size=16,
                            max_new_tokens=1, progress=True)
    assert got.stats["chunks"] == 3


def test_scaled_rope_equals_generate():
    # YaRN scales cos/sin by attention_scaling != 1; the identity RoPE position must carry it.
    rope = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 64}
    model, tok = tiny_model("llama", rope_parameters=rope), char_tokenizer()
    model = type(model)(model.config).eval()  # rebuild so the rotary embedding reads the new rope
    assert model.model.rotary_emb.attention_scaling != 1.0
    document, instruction = random_text(120, seed=13), "where?"
    expected = plain_generate(model, tok, document, instruction, 8)
    got = citrus_ext.answer(model, tok, document, instruction, method="cse", budget=500, chunk_size=32,
                            max_new_tokens=8)
    assert got.token_ids == expected


def test_uniform_sliding_window_model_equals_generate():
    # Mistral with a window on every layer: layers are still score-evicted, under the window mask.
    model, tok = tiny_model("mistral", sliding_window=24), char_tokenizer()
    document, instruction = random_text(100, seed=14), "who?"
    expected = plain_generate(model, tok, document, instruction, 8)
    got = citrus_ext.answer(model, tok, document, instruction, method="citrus_shared", budget=500, chunk_size=16,
                            max_new_tokens=8)
    assert got.token_ids == expected
