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


def test_model_info(tiny_llama):
    from citrus_ext.eval.backend import model_info

    info = model_info(tiny_llama)
    assert info["window"] == 512 and info["layers"] == 2
    assert info["kv_bytes_per_state"] == 2 * 2 * 16 * 4  # K and V, 2 KV heads, head_dim 16, fp32
