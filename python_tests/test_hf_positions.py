"""Positions: keys that survive many evictions equal RoPE applied afresh (no drift)."""
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from citrus_ext import ChunkedReader, make_policy
from citrus_ext.attention import rotate
from hf_models import tiny_model


def test_no_rotation_drift_after_1000_evictions_bf16():
    model = tiny_model("llama", dtype=torch.bfloat16)
    chunk, budget, chunks = 2, 16, 1010
    ids = torch.randint(6, 1000, (1, chunk * chunks), generator=torch.Generator().manual_seed(0))
    reader = ChunkedReader(model, make_policy("cse", budget, sinks=4), chunk_size=chunk)
    entered: dict[int, torch.Tensor] = {}  # token index -> its un-rotated key as it entered layer 0
    layer = reader.cache.layers[0]
    for start in range(0, ids.shape[1], chunk):
        reader.read_chunk(ids[:, start : start + chunk], ids[:, :3])
        for j in range(layer.stored - chunk, layer.stored):
            entered[int(layer.origin[0, 0, j])] = layer.keys[0, :, j].clone()
    assert reader.chunks - 1 >= 1000  # every chunk after the first evicted
    origin = layer.origin[0, 0]
    assert origin[:4].tolist() == [0, 1, 2, 3]  # the protected sinks survived every eviction
    fresh = torch.stack([entered[int(i)] for i in origin], dim=1)[None]  # [1, Hkv, L, D]
    assert torch.equal(layer.keys, fresh)

    # The keys attention uses now, against the model's own RoPE applied afresh at the same positions.
    positions = torch.arange(layer.stored)
    used = rotate(layer.keys, positions.expand(1, 1, -1), reader.specs[0].inv_freq)
    cos, sin = model.model.rotary_emb(layer.keys, positions[None])
    _, expected = apply_rotary_pos_emb(fresh, fresh, cos, sin)
    assert torch.equal(used, expected)
    exact = rotate(fresh.double(), positions.expand(1, 1, -1), reader.specs[0].inv_freq.double())
    assert torch.allclose(used.double(), exact, rtol=2 ** -7, atol=2 ** -7)
