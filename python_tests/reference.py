"""Plain-PyTorch reference of the citrus ops, written for clarity: it materialises attention.

This is the oracle every fast path (C++ CPU, CUDA) is tested against; it follows SPEC.md's
formulas literally and is deliberately slow.
"""
from __future__ import annotations

from typing import Optional

import torch


def ref_probabilities(query, key, scale, cache_lens=None):
    """Attention probabilities ``[B, Hq, Lq, L]`` in fp32 (fp64 for fp64 inputs), causal over the
    queries' own keys."""
    b, hq, lq, _ = query.shape
    hkv, length = key.shape[1], key.shape[2]
    lc = length - lq
    dtype = torch.promote_types(query.dtype, torch.float32)
    k = key.to(dtype).repeat_interleave(hq // hkv, dim=1)  # each query head sees its KV head
    logits = torch.einsum("bhtd,bhjd->bhtj", query.to(dtype), k) * scale
    t = torch.arange(lq).unsqueeze(1)
    j = torch.arange(length).unsqueeze(0)
    visible = (j < lc) | (j - lc <= t)  # [Lq, L]
    visible = visible.expand(b, lq, length).clone()
    if cache_lens is not None:
        for row, n in enumerate(cache_lens.tolist()):
            visible[row, :, n:lc] = False
    logits = logits.masked_fill(~visible[:, None].to(logits.device), float("-inf"))
    return torch.softmax(logits, dim=-1)


def ref_chunk_scores(query, key, scale, granularity="layer", cache_lens=None):
    """SPEC score: mean over heads and queries of the probabilities, on the cache columns."""
    b, hq, lq, _ = query.shape
    hkv, lc = key.shape[1], key.shape[2] - query.shape[2]
    probs = ref_probabilities(query, key, scale, cache_lens)[..., :lc]  # [B, Hq, Lq, Lc]
    per_query_head = probs.mean(dim=2)  # [B, Hq, Lc]
    if granularity == "layer":
        return per_query_head.mean(dim=1, keepdim=True)
    return per_query_head.view(b, hkv, hq // hkv, lc).mean(dim=2)


def ref_segmented_topk(scores, k, lengths: Optional[torch.Tensor] = None):
    """Top-k per row: order by (NaN last, larger score, lower index), keep ``k``, sort by index."""
    s_count, length = scores.shape
    kmax = min(k, length)
    out = torch.full((s_count, kmax), -1, dtype=torch.long)
    for s in range(s_count):
        n = length if lengths is None else int(lengths[s])
        row = scores[s, :n].float().cpu()
        is_nan = torch.isnan(row)
        filled = torch.where(is_nan, torch.full_like(row, float("-inf")), row)
        filled = torch.where(filled == 0, torch.zeros_like(filled), filled)  # -0.0 == +0.0
        # Two stable sorts give the lexicographic order (NaN flag, -score, index).
        order = torch.sort(filled, descending=True, stable=True).indices
        order = order[torch.sort(is_nan[order].long(), stable=True).indices]
        chosen = torch.sort(order[: min(kmax, n)]).values
        out[s, : chosen.numel()] = chosen
    return out


def ref_compact_kv(key, value, kept, key_new=None, value_new=None):
    """Gather rows at ``kept`` (-1 -> zeros) per (batch, head), then append the new states."""
    b, h = key.shape[:2]
    idx = kept.long().to(key.device).expand(b, h, kept.shape[2])

    def gather(x):
        rows = torch.gather(x, 2, idx.clamp(min=0).unsqueeze(-1).expand(-1, -1, -1, x.shape[3]))
        return rows.masked_fill((idx < 0).unsqueeze(-1), 0)

    k_out, v_out = gather(key), gather(value)
    if key_new is not None:
        k_out = torch.cat([k_out, key_new], dim=2)
        v_out = torch.cat([v_out, value_new], dim=2)
    return k_out, v_out


def ref_evict(query, key, value, keep, scale, granularity="layer", keep_own=True):
    """Score with the materialised reference, keep the top ``min(keep, Lc)`` in order."""
    b, lq = query.shape[0], query.shape[2]
    lc = key.shape[2] - lq
    scores = ref_chunk_scores(query, key, scale, granularity)
    rows = scores.shape[1]
    kept = ref_segmented_topk(scores.reshape(b * rows, lc), min(keep, lc)).view(b, rows, -1)
    own_k = key[:, :, lc:] if keep_own else None
    own_v = value[:, :, lc:] if keep_own else None
    k_out, v_out = ref_compact_kv(key, value, kept, own_k, own_v)
    return k_out, v_out, kept
