"""The Hugging Face reader on CUDA against the same reader on CPU (same tiny model, same input).

The CUDA path differs in its attention kernel (memory-efficient SDPA with a padded bias and a
padded lse) and in every op's kernel; kept states, generated tokens and peak sizes must agree.
Kept sets may differ only where two scores tie to rounding, so a few swapped states are allowed.
"""
import copy

import pytest
import torch

from citrus_ext import ChunkedReader, make_policy
from hf_models import tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

METHODS = ["cse", "citrus_shared", "citrus_individual", "full", "streaming_llm", "h2o", "tova", "snapkv"]


def _read(model, method, docs, instructions, chunk_size, budget):
    reader = ChunkedReader(model, make_policy(method, budget), chunk_size)
    history = []
    for start in range(0, max(len(d) for d in docs), chunk_size):
        reader.read_chunk([d[start:start + chunk_size] for d in docs], instructions)
        caches = [reader.cache] + ([reader.instruction_cache] if reader.instruction_cache is not None else [])
        history.append([layer.origin.cpu().clone() for cache in caches for layer in cache.layers])
    tokens = reader.generate(instructions, 8, eos=())
    return history, tokens, reader.stats(0)["peak_states_per_layer"]


def _agree(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of kept states (per row and head) that both readers kept."""
    same = total = 0
    for ra, rb in zip(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])):
        sa, sb = set(ra[ra >= 0].tolist()), set(rb[rb >= 0].tolist())
        same += len(sa & sb)
        total += max(len(sa), len(sb))
    return same / max(total, 1)


@pytest.mark.parametrize("method", METHODS)
def test_cuda_reader_matches_cpu(method):
    model = tiny_model("llama")
    gpu = copy.deepcopy(model).cuda()
    g = torch.Generator().manual_seed(7)
    docs = [torch.randint(6, 1000, (90,), generator=g), torch.randint(6, 1000, (61,), generator=g)]
    instructions = [torch.randint(6, 1000, (9,), generator=g), torch.randint(6, 1000, (6,), generator=g)]
    cpu_hist, cpu_tokens, cpu_peak = _read(model, method, docs, instructions, 16, 24)
    gpu_hist, gpu_tokens, gpu_peak = _read(gpu, method, docs, instructions, 16, 24)
    assert cpu_peak == gpu_peak
    assert len(cpu_hist) == len(gpu_hist)
    shares = []
    for step, (a_layers, b_layers) in enumerate(zip(cpu_hist, gpu_hist)):
        for layer, (a, b) in enumerate(zip(a_layers, b_layers)):
            assert a.shape == b.shape, f"step {step} layer {layer}: {tuple(a.shape)} != {tuple(b.shape)}"
            shares.append(_agree(a, b))
    assert min(shares) >= 0.9 and sum(shares) / len(shares) >= 0.98, shares
    assert gpu_tokens == cpu_tokens


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_reader_half_precision_runs_and_bounds_the_cache(dtype):
    model = tiny_model("llama", dtype=dtype).cuda()
    g = torch.Generator().manual_seed(3)
    doc, instruction = torch.randint(6, 1000, (200,), generator=g), torch.randint(6, 1000, (7,), generator=g)
    reader = ChunkedReader(model, make_policy("citrus_shared", 20), 32)
    reader.read(doc, instruction)
    # As on CPU: the budget, the cached chunk and the new one, and the instruction beside them.
    assert reader.stats()["peak_states_per_layer"] == [20 + 2 * 32 + 7] * 2
    tokens = reader.generate(instruction, 5, eos=())
    assert len(tokens[0]) == 5
    for layer in reader.cache.layers:
        assert torch.isfinite(layer.keys.float()).all() and torch.isfinite(layer.values.float()).all()
