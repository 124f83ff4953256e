"""Python faces of the ``torch.ops.citrus`` ops, with their fake (meta) kernels.

Layouts follow the Hugging Face cache: ``query [B, Hq, Lq, D]``, ``key``/``value
[B, Hkv, L, D]``, where the first ``L - Lq`` keys are the cache and the last ``Lq`` are the
queries' own states (causal among themselves). ``Hq`` must be a multiple of ``Hkv`` (GQA).
Inputs may be float32, float16 or bfloat16; scores are always accumulated and returned in
float32. The method is CItruS (Bai et al., EMNLP 2024, arXiv 2406.12018).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _C  # noqa: F401  (loads the library that registers torch.ops.citrus)

__all__ = ["chunk_scores", "segmented_topk", "compact_kv", "evict"]


def chunk_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    scale: float,
    lse: Optional[torch.Tensor] = None,
    granularity: str = "layer",
    cache_lens: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Importance of every cache state for a set of queries (SPEC's score).

    ``score[j] = mean_h mean_t softmax(q[h,t]·k·scale)[j]`` for the ``L - Lq`` cache columns,
    where each query's softmax spans the cache and its own causal keys.

    Parameters
    ----------
    query : Tensor ``[B, Hq, Lq, D]``
    key : Tensor ``[B, Hkv, L, D]``; cache first, then the queries' own ``Lq`` states.
    scale : float, the attention scale (usually ``D ** -0.5``).
    lse : optional Tensor ``[B, Hq, Lq]``, each query's log-sum-exp of its scaled logits (as
        flash/efficient attention return it). Without it the normaliser is computed here.
    granularity : ``"layer"`` (average all query heads) or ``"kv_head"`` (average each KV
        head's query group).
    cache_lens : optional Tensor ``[B]``: row ``b`` holds only ``cache_lens[b]`` valid cache
        states, the rest (up to ``L - Lq``) are padding, seen by no query and scored 0.

    Returns
    -------
    Tensor ``[B, 1 or Hkv, L - Lq]``, float32.
    """
    return torch.ops.citrus.chunk_scores(query, key, scale, lse, granularity, cache_lens)


def segmented_topk(scores: torch.Tensor, k: int, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Indices of the ``k`` largest scores of each row, in ascending (original) order.

    Ties go to the lower index; NaN ranks below every number; the result is deterministic.

    Parameters
    ----------
    scores : Tensor ``[S, L]`` (float32/16, bfloat16).
    k : int >= 0.
    lengths : optional Tensor ``[S]``: row ``s`` considers only its first ``lengths[s]`` scores.

    Returns
    -------
    Tensor ``[S, min(k, L)]`` int64. A row with fewer than ``k`` valid scores keeps all of them
    and fills its remaining slots with ``-1``.
    """
    return torch.ops.citrus.segmented_topk(scores, k, lengths)


def compact_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    kept: torch.Tensor,
    key_new: Optional[torch.Tensor] = None,
    value_new: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather kept states into contiguous tensors, optionally followed by new states.

    Parameters
    ----------
    key : Tensor ``[B, H, L, D]``; value : Tensor ``[B, H, L, Dv]`` (same dtype).
    kept : int Tensor ``[B, 1 or H, K]`` of row indices into ``L`` (``1`` = the same rows for
        every head). ``-1`` marks an empty slot and yields a zero row.
    key_new, value_new : optional Tensors ``[B, H, Ln, D]`` / ``[B, H, Ln, Dv]`` appended after
        the kept rows.

    Returns
    -------
    ``(key_out [B, H, K + Ln, D], value_out [B, H, K + Ln, Dv])``, contiguous.
    """
    return torch.ops.citrus.compact_kv(key, value, kept, key_new, value_new)


def evict(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    keep: int,
    scale: float,
    lse: Optional[torch.Tensor] = None,
    granularity: str = "layer",
    keep_own: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score the cache with ``query``, keep the top ``min(keep, L - Lq)`` states in order.

    ``chunk_scores`` -> ``segmented_topk`` -> ``compact_kv`` in one call. With
    ``keep_own=True`` the queries' own ``Lq`` states are appended after the kept cache states.

    Returns
    -------
    ``(key_out, value_out, kept)``: ``key_out [B, Hkv, K (+ Lq), D]``, ``value_out`` likewise,
    ``kept`` int64 ``[B, 1 or Hkv, K]`` ascending, ``K = min(keep, L - Lq)``. With
    ``granularity="layer"`` every KV head keeps the same positions.
    """
    return torch.ops.citrus.evict(query, key, value, keep, scale, lse, granularity, keep_own)


# Fake kernels: output shapes only, so every op traces under torch.compile and export.


def _same_device(op: str, ref_name: str, ref: torch.Tensor, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise ValueError(
                f"citrus.{op}: `{name}` is on {t.device} but `{ref_name}` is on {ref.device}; "
                "all tensors must be on one device"
            )


def _rows(granularity: str, hkv) -> int:
    if granularity not in ("layer", "kv_head"):
        raise ValueError(f'citrus: `granularity` must be "layer" or "kv_head", got "{granularity}"')
    return 1 if granularity == "layer" else hkv


@torch.library.register_fake("citrus::chunk_scores")
def _chunk_scores_fake(query, key, scale, lse=None, granularity="layer", cache_lens=None):
    torch._check(query.dim() == 4 and key.dim() == 4, lambda: "citrus.chunk_scores: 4-D inputs")
    _same_device("chunk_scores", "query", query, key=key, lse=lse, cache_lens=cache_lens)
    b, hkv, length = key.shape[0], key.shape[1], key.shape[2]
    return query.new_empty((b, _rows(granularity, hkv), length - query.shape[2]), dtype=torch.float32)


@torch.library.register_fake("citrus::segmented_topk")
def _segmented_topk_fake(scores, k, lengths=None):
    torch._check(scores.dim() == 2, lambda: "citrus.segmented_topk: `scores` must be 2-D")
    _same_device("segmented_topk", "scores", scores, lengths=lengths)
    torch._check(k >= 0, lambda: "citrus.segmented_topk: `k` must be >= 0")
    return scores.new_empty((scores.shape[0], torch.sym_min(k, scores.shape[1])), dtype=torch.long)


@torch.library.register_fake("citrus::compact_kv")
def _compact_kv_fake(key, value, kept, key_new=None, value_new=None):
    _same_device("compact_kv", "key", key, value=value, kept=kept, key_new=key_new, value_new=value_new)
    n = kept.shape[2] + (key_new.shape[2] if key_new is not None else 0)
    b, h = key.shape[0], key.shape[1]
    return key.new_empty((b, h, n, key.shape[3])), value.new_empty((b, h, n, value.shape[3]))


@torch.library.register_fake("citrus::evict")
def _evict_fake(query, key, value, keep, scale, lse=None, granularity="layer", keep_own=True):
    torch._check(keep >= 0, lambda: "citrus.evict: `keep` must be >= 0")
    _same_device("evict", "query", query, key=key, value=value, lse=lse)
    b, hkv, length = key.shape[0], key.shape[1], key.shape[2]
    lq = query.shape[2]
    kk = torch.sym_min(keep, length - lq)
    n = kk + lq if keep_own else kk
    return (
        key.new_empty((b, hkv, n, key.shape[3])),
        value.new_empty((b, hkv, n, value.shape[3])),
        key.new_empty((b, _rows(granularity, hkv), kk), dtype=torch.long),
    )
