"""The fast path (fused scores from lse, op top-k and compaction) against the plain SPEC reference."""
import pytest
import torch

from citrus_ext import ChunkedReader, make_policy
from hf_models import tiny_model
from spec_reference_model import ReferenceReader

CASES = [(8, 12), (16, 24), (5, 40), (16, 7)]  # (chunk_size, budget)


def fast_snapshot(reader):
    caches = [reader.cache] + ([reader.instruction_cache] if reader.instruction_cache is not None else [])
    return [layer.origin[0, 0].clone() for cache in caches for layer in cache.layers]


# Every case on Llama; one on Qwen3 (QK-norm) keeps the suite fast.
MODEL_CASES = [("llama", *case) for case in CASES] + [("qwen3", *CASES[0])]


@pytest.mark.parametrize("method", ["cse", "citrus_shared", "citrus_individual"])
@pytest.mark.parametrize("kind,chunk_size,budget", MODEL_CASES)
def test_same_kept_states_and_tokens_as_reference(kind, method, chunk_size, budget):
    model = tiny_model(kind)
    g = torch.Generator().manual_seed(chunk_size * 100 + budget)
    document = torch.randint(6, 1000, (90,), generator=g)
    instruction = torch.randint(6, 1000, (9,), generator=g)
    eos = {2}

    ref = ReferenceReader(model, method, budget, chunk_size)
    ref.read(document, instruction)
    ref_tokens = ref.generate(instruction, 10, eos)

    reader = ChunkedReader(model, make_policy(method, budget), chunk_size)
    history = []
    for start in range(0, len(document), chunk_size):
        reader.read_chunk(document[None, start : start + chunk_size], instruction[None])
        history.append(fast_snapshot(reader))
    reader.prune(instruction[None])
    history.append(fast_snapshot(reader))
    tokens = reader.decode(reader.encode_instruction(instruction[None]), 10, eos)[0]

    assert len(history) == len(ref.history)
    for step, (fast, slow) in enumerate(zip(history, ref.history)):
        for layer, (a, b) in enumerate(zip(fast, slow)):
            assert torch.equal(a, b), f"step {step} layer {layer}: {a.tolist()} != {b.tolist()}"
    # Eviction really happened (the budget is below the document length).
    assert len(history[-1][-1]) == budget  # the answer cache, pruned by the instruction
    assert tokens == ref_tokens
