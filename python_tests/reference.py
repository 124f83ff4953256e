"""Plain-PyTorch references for the citrus ops, written for clarity: they materialise attention.

Every fast path (CPU and CUDA kernels) is checked against these. Scores are computed in float64
from the inputs' own values, so the reference is exact to well below fp32 rounding. The method is
CItruS (Bai et al., EMNLP 2024, arXiv 2406.12018); see SPEC.md "Importance score".
"""
from __future__ import annotations

from typing import Optional

import torch


def ref_chunk_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    scale: float,
    granularity: str = "layer",
    cache_lens: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Mean attention probability of every cache column, ``[B, 1 or Hkv, L - Lq]`` float32."""
    b, hq, lq, d = query.shape
    hkv, length = key.shape[1], key.shape[2]
    g, lc = hq // hkv, length - lq
    q = query.double().reshape(b, hkv, g * lq, d)  # query head h·G + i is row block i of KV head h
    logits = q @ key.double().transpose(-1, -2) * scale  # [B, Hkv, G·Lq, L]
    t = torch.arange(lq, device=query.device).repeat(g)  # query index of each row
    col = torch.arange(length, device=query.device)
    seen = (col[None, :] < lc) | (col[None, :] - lc <= t[:, None])  # cache + own causal keys
    seen = seen[None].expand(b, -1, -1).clone()
    if cache_lens is not None:
        pad = (col[None, :] >= cache_lens.to(query.device).long()[:, None]) & (col[None, :] < lc)
        seen &= ~pad[:, None, :]
    logits = logits.masked_fill(~seen[:, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1)[..., :lc]  # normaliser over all seen keys, read on cache
    per_head = probs.sum(dim=2)  # [B, Hkv, Lc]
    if granularity == "layer":
        return (per_head.sum(dim=1, keepdim=True) / (hq * lq)).float()
    if granularity == "kv_head":
        return (per_head / (g * lq)).float()
    raise ValueError(f"granularity must be 'layer' or 'kv_head', got {granularity!r}")


def _rank_values(row: torch.Tensor) -> torch.Tensor:
    """float64 values ordered like sortable.h: NaN below -inf, -0.0 equal to +0.0."""
    v = row.double()
    v = torch.where(torch.isneginf(v), torch.full_like(v, -1e300), v)
    return torch.where(torch.isnan(v), torch.full_like(v, float("-inf")), v)


def ref_segmented_topk(scores: torch.Tensor, k: int, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Indices of the ``k`` largest of each row's valid prefix, ascending, ties to the lower index."""
    s, length = scores.shape
    kmax = min(k, length)
    out = torch.full((s, kmax), -1, dtype=torch.long)
    for i in range(s):
        n = length if lengths is None else int(lengths[i])
        kk = min(kmax, n)
        if kk == 0:
            continue
        order = torch.sort(_rank_values(scores[i, :n].cpu()), descending=True, stable=True).indices
        out[i, :kk] = torch.sort(order[:kk]).values
    return out.to(scores.device)


def ref_compact_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    kept: torch.Tensor,
    key_new: Optional[torch.Tensor] = None,
    value_new: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``key``/``value`` at ``kept`` (``-1`` gives a zero row), then the new states."""
    b, h = key.shape[:2]
    idx = kept.long().expand(b, h, kept.shape[2])
    outs = []
    for src, new in ((key, key_new), (value, value_new)):
        gathered = torch.gather(src, 2, idx.clamp(min=0)[..., None].expand(-1, -1, -1, src.shape[3]))
        gathered = gathered.masked_fill((idx < 0)[..., None], 0)
        outs.append(torch.cat([gathered, new], dim=2) if new is not None else gathered.contiguous())
    return outs[0], outs[1]


def ref_evict(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    keep: int,
    scale: float,
    granularity: str = "layer",
    keep_own: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score, keep the top ``min(keep, L - Lq)`` cache states in order, append the own states."""
    b, hkv, length = key.shape[:3]
    lq = query.shape[2]
    lc = length - lq
    kk = min(keep, lc)
    scores = ref_chunk_scores(query, key, scale, granularity)
    rows = scores.shape[1]
    if kk == lc:
        kept = torch.arange(lc, device=key.device).expand(b, rows, lc).contiguous()
    else:
        kept = ref_segmented_topk(scores.reshape(b * rows, lc), kk).reshape(b, rows, kk)
    key_new = key[:, :, lc:] if keep_own else None
    value_new = value[:, :, lc:] if keep_own else None
    key_out, value_out = ref_compact_kv(key, value, kept, key_new, value_new)
    return key_out, value_out, kept
