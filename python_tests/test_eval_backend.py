"""The harness's bridge to the library: log-probs read chunk by chunk, and answers, on a tiny model."""
import pytest
import torch

import citrus_ext

pytestmark = pytest.mark.skipif(not hasattr(citrus_ext, "ChunkedReader"),
                                reason="needs the chunked reader of the HF integration")


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaForCausalLM(config).eval()


def _reference_nll(model, ids):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none")


def test_read_logprobs_without_eviction_matches_one_forward(tiny_llama):
    from citrus_ext.eval.backend import read_logprobs

    ids = torch.randint(0, 97, (150,), generator=torch.Generator().manual_seed(1)).tolist()
    reference = _reference_nll(tiny_llama, ids)
    for method, budget in (("full", 150), ("cse", 200)):  # a budget above the length evicts nothing
        nll, stats = read_logprobs(tiny_llama, ids, method, budget, 32, [5, 6, 7])
        assert len(nll) == 149 and stats["tokens_read"] == 150
        torch.testing.assert_close(torch.tensor(nll), reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["cse", "citrus_shared", "citrus_individual", "streaming_llm"])
def test_read_logprobs_with_eviction(tiny_llama, method):
    from citrus_ext.eval.backend import read_logprobs

    ids = torch.randint(0, 97, (200,), generator=torch.Generator().manual_seed(2)).tolist()
    done = []
    nll, stats = read_logprobs(tiny_llama, ids, method, 48, 32, [5, 6, 7], lambda d, t: done.append((d, t)))
    assert len(nll) == 199 and all(x > 0 for x in nll)
    assert done[-1] == (7, 7)
    assert max(stats["peak_states_per_layer"]) <= 2 * (48 + 2 * 32)  # two caches for individual
    # The first chunk is read with an empty cache: its log-probs cannot depend on the policy.
    torch.testing.assert_close(torch.tensor(nll[:31]), _reference_nll(tiny_llama, ids[:32]), rtol=1e-4, atol=1e-4)


def test_individual_reads_with_cse_log_probs(tiny_llama):
    # SPEC: the chunk never attends to the instruction cache, so reading (and perplexity) is CSE's;
    # the instruction's choice shows only in the answer cache.
    from citrus_ext.eval.backend import read_logprobs

    ids = torch.randint(0, 97, (200,), generator=torch.Generator().manual_seed(3)).tolist()
    cse, _ = read_logprobs(tiny_llama, ids, "cse", 48, 32, [5, 6, 7])
    individual, _ = read_logprobs(tiny_llama, ids, "citrus_individual", 48, 32, [5, 6, 7])
    shared, _ = read_logprobs(tiny_llama, ids, "citrus_shared", 48, 32, [5, 6, 7])
    assert individual == cse
    assert shared != cse  # the shared cache is chosen by the instruction, so its reading differs


def test_model_info(tiny_llama):
    from citrus_ext.eval.backend import model_info

    info = model_info(tiny_llama)
    assert info["window"] == 512 and info["layers"] == 2
    assert info["kv_bytes_per_state"] == 2 * 2 * 16 * 4  # K and V, 2 KV heads, head_dim 16, fp32


class _ModTokenizer:
    """Words to ids below the tiny model's vocabulary; no chat template (plain prompt split)."""

    chat_template = None
    eos_token_id = None

    def __call__(self, text, add_special_tokens=True):
        import re
        import zlib
        from types import SimpleNamespace

        return SimpleNamespace(input_ids=[5 + zlib.crc32(w.encode()) % 90 for w in re.findall(r"\s*\S+", text)])

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


@pytest.mark.parametrize("method", ["cse", "citrus_shared", "citrus_individual"])
def test_answer_fn_matches_citrus_answer_and_reports_needle_retention(tiny_llama, method):
    from citrus_ext.eval.backend import answer_fn

    tokenizer = _ModTokenizer()
    document = " ".join(f"w{i % 37}" for i in range(160))
    kwargs = dict(method=method, budget=40, chunk_size=32, max_new_tokens=6)
    ours = answer_fn(tiny_llama, tokenizer)(document, "what was said", needle_spans=[(50, 60), (150, 160)],
                                            **kwargs)
    reference = citrus_ext.answer(tiny_llama, tokenizer, document, "what was said", **kwargs)
    assert ours.token_ids == reference.token_ids and ours.text == reference.text
    read, final = ours.stats["needle_kept_read"], ours.stats["needle_kept_final"]
    assert len(read) == len(final) == 2
    # The newest chunk (tokens 128-159) is always in the cache after reading: so is the second needle.
    assert all(0.5 <= share <= 1.0 for share in read)
    assert all(0.0 <= share <= 1.0 for share in final)
    # The map says which needle tokens each layer kept; its share is the reported one.
    maps = ours.stats["needle_map"]
    assert len(maps) == 2 and all(len(m) == 20 for m in maps)
    assert [m.count("#") / 20 for m in maps] == pytest.approx(final)


def test_needle_kept_counts_heads_separately():
    from types import SimpleNamespace

    from citrus_ext.eval.backend import needle_kept, needle_map

    layer_level = SimpleNamespace(origin=torch.tensor([[[0, 2, 3, 7]]]))
    head_level = SimpleNamespace(origin=torch.tensor([[[0, 2, 3, 7], [1, 2, 5, 6]]]))
    cache = SimpleNamespace(layers=[layer_level, head_level])
    assert needle_kept(cache, torch.tensor([2, 3, 4, 5])) == [0.5, 0.5]  # head 0 keeps 2/4, head 1 keeps 2/4
    assert needle_kept(cache, torch.tensor([7])) == [1.0, 0.5]
    assert needle_kept(cache, torch.tensor([], dtype=torch.long)) == []
    assert needle_map(cache, torch.tensor([2, 3, 4, 5])) == ["##..", "#+.+"]


def test_cli_runs_a_cell_and_records_the_environment(tiny_llama, tmp_path, monkeypatch):
    """`citrus eval retrieval` end to end on the tiny model: the cell says where it ran (torch's thread
    count among it, since CPU answers can change with it)."""
    import json

    from citrus_ext.eval import backend, cli

    monkeypatch.setattr(backend, "load_model", lambda path, dtype, device: (tiny_llama, _ModTokenizer()))
    args = ["retrieval", "--tasks", "passkey", "--methods", "cse", "--budgets", "32", "--chunk-sizes", "32",
            "--lengths", "256", "--depths", "0.5", "--samples", "1", "--out", str(tmp_path), "--no-plots", "--quiet"]
    assert cli.main(args) == 0
    (path,) = (tmp_path / "cells").glob("*.json")
    cell = json.loads(path.read_text())
    env = cell["info"]["environment"]
    assert env["device"] == "cpu" and env["threads"] == torch.get_num_threads()
    assert env["torch"] == torch.__version__ and env["date"].startswith("20")
    assert cell["info"]["window"] == 512 and cell["stats"]["peak_states"] > 0


def test_inspect_sees_the_final_answer_cache(tiny_llama):
    """The ``inspect`` hook gets the cache the answer is decoded from, and does not change the answer."""
    from citrus_ext.eval.backend import answer_fn

    run = answer_fn(tiny_llama, _ModTokenizer())
    document = " ".join(f"w{i % 37}" for i in range(160))
    kwargs = dict(method="citrus_shared", budget=40, chunk_size=32, max_new_tokens=6, needle_spans=[(50, 60)])
    seen = []
    inspected = run(document, "what was said", inspect=lambda cache, ids, offset, needle: seen.append(
        ([layer.origin.shape[-1] for layer in cache.layers], len(ids), offset, needle.tolist())), **kwargs)
    assert inspected.token_ids == run(document, "what was said", **kwargs).token_ids
    ((sizes, n_ids, offset, needle),) = seen
    assert sizes == [40, 40]  # pruned to the budget in both layers
    assert n_ids == 160 and offset == 0 and needle == list(range(50, 60))  # no chat template here


def _benchmark_script(name: str):
    """A script of ``benchmarks/`` imported as a module (they import each other by name)."""
    import importlib
    import sys
    from pathlib import Path

    folder = str(Path(__file__).resolve().parents[1] / "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(name)


def test_inspect_cell_splits_kept_states_by_origin():
    layer_contents = _benchmark_script("inspect_cell").layer_contents

    # template head 0-3, document 4-39, needle 10-12; kept: 2 head, needle 10 and 11, rest 4-8 (a run
    # of 5) and 20, 22 (scattered); 50 is past the document (instruction or answer) and not counted.
    origin = torch.tensor([[0, 1, 4, 5, 6, 7, 8, 10, 11, 20, 22, 50]])
    row = layer_contents(origin, offset=4, n_doc=40, needle={10, 11, 12})
    assert (row["head"], row["needle"], row["rest"]) == (2, 2, 7)
    assert row["rest_in_runs"] == pytest.approx(5 / 7) and row["rest_ids"] == [4, 5, 6, 7, 8, 20, 22]


@pytest.mark.parametrize("method", ["citrus_shared", "citrus_individual", "h2o"])
def test_ablate_cell_answers_from_edited_copies(tiny_llama, method):
    from citrus_ext import ChunkedReader, make_policy

    ablate = _benchmark_script("ablate_cell")
    ids = torch.randint(0, 97, (1, 160), generator=torch.Generator().manual_seed(3))
    instr = torch.tensor([[5, 6, 7]])

    def read():
        reader = ChunkedReader(tiny_llama, make_policy(method, 40), 32)
        reader.read(ids, instr)
        reader.prune(instr)
        return reader

    reader = read()
    replay = ablate.Replay(reader, instr, eos=[], max_new_tokens=6)
    saved = [layer.origin.clone() for layer in replay.saved.layers]
    # Unedited, the replay answers as a reader that was never copied.
    assert replay.answer() == _fresh_answer(read(), instr)
    kept = saved[0][0, 0]
    gone = kept[:5]
    replay.answer(lambda layer, row: torch.isin(row, gone))
    for layer, before in zip(reader.answer_cache.layers, saved):
        for head, row in enumerate(before[0]):
            # the instruction and the answer (160 on) follow the document in the cache
            left = {i for i in layer.origin[0, head].tolist() if 0 <= i < 160}
            assert left == set(row.tolist()) - set(gone.tolist())
    # The saved cache is untouched: the next answer starts from it again.
    assert [layer.origin.tolist() for layer in replay.saved.layers] == [o.tolist() for o in saved]
    assert replay.answer() == _fresh_answer(read(), instr)


def _fresh_answer(reader, instr):
    (tokens,) = reader.decode(reader.encode_instruction(instr), 6, [])
    return tokens


def test_ablate_cell_finds_copies_and_partial_layers():
    ablate = _benchmark_script("ablate_cell")
    assert ablate.digit_runs([" The", " key", " ", "2", "5", " is", "1", "."]) == [[3, 4], [6]]
    needle = torch.arange(10, 20)
    copies = [torch.tensor([12, 13]), torch.tensor([16, 17])]
    edits = ablate.ablations(needle, copies, layers=2, document=range(4, 40))
    row = torch.tensor([1, 5, 12, 13, 16, 18, 30])  # copy 1 whole, copy 2 only in part
    mask = edits["without each copy where its layer keeps it only in part"](0, row)
    assert row[mask].tolist() == [16]
    assert row[edits["without copy 1 in layer 1"](1, row)].tolist() == [12, 13]
    assert not edits["without copy 1 in layer 1"](0, row).any()
    assert row[edits["without the needle"](0, row)].tolist() == [12, 13, 16, 18]
    assert row[edits["without the document outside the needle"](0, row)].tolist() == [5, 30]
    assert row[edits["without the chat template's head but its first state"](0, row)].tolist() == [1]
    assert not edits["without the chat template's head but its first state"](0, torch.tensor([0, 4, 12])).any()
    assert not edits["as read"](0, row).any()
    # ChatML head: <|im_start|> system text <|im_end|> \n <|im_start|> user \n (specials 1 and 2)
    head = [1, 50, 51, 52, 2, 10, 1, 60, 10]
    spans = ablate.head_parts(head, {1, 2})
    assert spans == [range(1, 4), range(4, 6), range(6, 9)]
    named = ablate.ablations(needle, copies, layers=2, document=range(9, 40), per_layer=False,
                             parts={"user": spans[2], "system": spans[0]})
    states = torch.tensor([0, 3, 6, 8, 9])
    assert states[named["without user"](0, states)].tolist() == [6, 8]
    assert states[named["without system"](0, states)].tolist() == [3]
    assert ablate.head_parts([7], {1}) == [] and ablate.head_parts([1, 5, 6], set()) == [range(1, 3)]
    quick = ablate.ablations(needle, copies, layers=2, document=range(4, 40), per_layer=False)
    assert set(edits) - set(quick) == {f"without copy {c} in layer {l}" for c in (1, 2) for l in (0, 1)}
    assert "without the needles that hold no answer" not in edits
    split = ablate.ablations(needle, copies, layers=2, document=range(4, 40), per_layer=False,
                             others=torch.arange(15, 20))
    assert row[split["without the needles that hold no answer"](0, row)].tolist() == [16, 18]
