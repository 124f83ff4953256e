"""The Hugging Face reader on CUDA against the same reader on CPU (same tiny model, same input).

The CUDA path differs in its attention kernel (memory-efficient SDPA with a padded bias and a
padded lse for ragged rows, flash attention for rows without padding), in every op's kernel and
in replaying CUDA graphs; kept states, generated tokens and peak sizes must agree. The flash
path and the graphs are also checked on their own against a materialised reference and against
the eager reader.
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


def _materialised(query, key, value, mask, scale):
    """Plain attention in float64 with the probabilities materialised: out [B, n, Hq, D], lse [B, Hq, n]."""
    b, hq, n, d = query.shape
    g = hq // key.shape[1]
    k, v = (t.double().repeat_interleave(g, dim=1) for t in (key, value))
    logits = query.double() @ k.transpose(-1, -2) * scale + mask.double().view(b, 1, g, n, -1)[:, 0, 0][:, None]
    lse = torch.logsumexp(logits, dim=-1)
    return (torch.softmax(logits, dim=-1) @ v).transpose(1, 2), lse


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch,widths", [(1, [16]), (2, [33]), (1, [40, 7]), (2, [24, 9]), (3, [5, 11, 1])])
def test_flash_attention_matches_materialised_reference(dtype, batch, widths):
    """The flash path (lower-right causal per segment, varlen for several) against the block mask."""
    from citrus_ext.attention import Layout, flash_attention_with_lse, flash_packing

    hq, hkv, d, c = 8, 2, 64, 50
    n = sum(widths)
    g = torch.Generator().manual_seed(batch * 100 + n)
    q, k, v = (torch.randn(batch, h, length, d, generator=g).to(dtype)
               for h, length in ((hq, n), (hkv, c + n), (hkv, c + n)))
    layout = Layout([(f"s{i}", w) for i, w in enumerate(widths)], torch.tensor([widths] * batch))
    mask = layout.mask(torch.full((batch,), c), c, None, hq // hkv, torch.float32, "cpu")
    scale = d ** -0.5
    ref_out, ref_lse = _materialised(q, k, v, mask, scale)
    starts = [sum(widths[:i]) for i in range(len(widths))]
    packing = flash_packing(batch, c, list(zip(starts, widths)), "cuda") if len(widths) > 1 else None
    out, lse = flash_attention_with_lse(q.cuda(), k.cuda(), v.cuda(), scale, packing)
    assert out.shape == (batch, n, hq, d) and lse.shape == (batch, hq, n) and lse.dtype == torch.float32
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    torch.testing.assert_close(out.cpu().double(), ref_out, atol=tol, rtol=0)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, atol=1e-4, rtol=1e-5)


def _history(reader, docs, instructions, chunk_size):
    history = []
    for start in range(0, max(len(d) for d in docs), chunk_size):
        reader.read_chunk([d[start:start + chunk_size] for d in docs], instructions)
        caches = [reader.cache] + ([reader.instruction_cache] if reader.instruction_cache is not None else [])
        history.append([(layer.origin.cpu().clone(), layer.keys.float().cpu().clone())
                        for cache in caches for layer in cache.layers])
    return history, reader.generate(instructions, 6, eos=())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_replay_the_eager_reader(method, dtype, monkeypatch):
    """Once shapes repeat the reader replays CUDA graphs; it must keep exactly what the eager
    reader keeps, state for state and bit for bit, in a ragged batch (one row ends early)."""
    from citrus_ext import attention

    monkeypatch.setattr(attention, "CHECK_COUNTS", False)  # a host check would break the capture
    model = tiny_model("llama", dtype=dtype).cuda()
    g = torch.Generator().manual_seed(11)
    docs = [torch.randint(6, 1000, (200,), generator=g), torch.randint(6, 1000, (150,), generator=g)]
    instructions = [torch.randint(6, 1000, (7,), generator=g), torch.randint(6, 1000, (5,), generator=g)]
    runs = {}
    for graphs in (False, True):
        reader = ChunkedReader(model, make_policy(method, 24), 16, cuda_graphs=graphs)
        runs[graphs] = _history(reader, docs, instructions, 16)
        if graphs and method != "full":  # the full cache grows: no two forwards share shapes
            assert reader.graphs.captures >= 1 and reader.graphs.replays >= 3, (reader.graphs.captures,
                                                                                reader.graphs.replays)
            assert not reader.graphs.failed
    (eager_hist, eager_tokens), (graph_hist, graph_tokens) = runs[False], runs[True]
    assert len(eager_hist) == len(graph_hist)
    for step, (a_layers, b_layers) in enumerate(zip(eager_hist, graph_hist)):
        for layer, ((oa, ka), (ob, kb)) in enumerate(zip(a_layers, b_layers)):
            assert torch.equal(oa, ob), f"step {step} layer {layer}: kept states differ"
            assert torch.equal(ka, kb), f"step {step} layer {layer}: keys differ"
    assert graph_tokens == eager_tokens


@pytest.mark.parametrize("method", ["cse", "citrus_shared", "citrus_individual"])
def test_flash_reader_matches_masked_reader(method):
    """A bf16 reader of one row takes the flash path; with flash switched off it takes the masked
    memory-efficient path. Both must keep the same states up to rounding ties."""
    model = tiny_model("llama", dtype=torch.bfloat16).cuda()
    g = torch.Generator().manual_seed(5)
    docs, instructions = [torch.randint(6, 1000, (120,), generator=g)], [torch.randint(6, 1000, (9,), generator=g)]
    histories = []
    for flash in (True, False):
        previous = torch.backends.cuda.flash_sdp_enabled()
        torch.backends.cuda.enable_flash_sdp(flash)
        try:
            reader = ChunkedReader(model, make_policy(method, 24), 16, cuda_graphs=False)
            histories.append(_history(reader, docs, instructions, 16)[0])
        finally:
            torch.backends.cuda.enable_flash_sdp(previous)
    shares = [_agree(a[0], b[0]) for sa, sb in zip(*histories) for a, b in zip(sa, sb)]
    assert min(shares) >= 0.9 and sum(shares) / len(shares) >= 0.97, shares


def test_cuda_graphs_free_their_memory_with_the_reader(monkeypatch):
    """A reader's graphs (and their memory pools) go when the reader goes, without waiting for the
    garbage collector: nothing a graph keeps refers back to the reader."""
    from citrus_ext import attention

    monkeypatch.setattr(attention, "CHECK_COUNTS", False)
    model = tiny_model("llama").cuda()
    g = torch.Generator().manual_seed(2)
    doc, instruction = torch.randint(6, 1000, (160,), generator=g), torch.randint(6, 1000, (7,), generator=g)
    sizes = []
    for _ in range(3):  # the first read also creates per-stream library workspaces, kept for reuse
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        reader = ChunkedReader(model, make_policy("citrus_shared", 24), 16)
        reader.read(doc, instruction)
        assert reader.graphs.captures >= 1 and torch.cuda.memory_allocated() > base
        del reader
        torch.cuda.synchronize()
        sizes.append(torch.cuda.memory_allocated() - base)
    assert sizes[1:] == [0, 0], sizes
