"""The CItruS attention function: RoPE at current positions, attention + lse, then eviction.

A reader attaches a :class:`Step` to a forward (keyword ``citrus_step``, which transformers passes
through to the attention function). For every layer the step

1. rotates the un-rotated queries and keys (the model's own RoPE was made the identity) at
   their current positions, so a key that survived any number of evictions is rotated afresh;
2. computes the attention output and each query's log-sum-exp with one SDPA-style kernel,
   stacking a KV group's query heads as rows (no repeated KV heads);
3. lets the policy score the cache from that lse (``citrus_ext.ops.chunk_scores``), keeps the
   top states (``segmented_topk``) and compacts them with the new states it keeps
   (``compact_kv``), right after the layer's attention.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import compat, ops
from .compat import CitrusCache, CitrusLayer, LayerSpec


def rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Apply RoPE (rotate-half convention) to ``x [B, H, L, D]`` at ``positions [B, 1 or H, L]``.

    cos/sin are computed in float32 from the integer positions and cast to ``x``'s dtype, as the
    transformers models do, so a fresh rotation matches the model's own bit for bit.
    """
    freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq.to(x.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output ``[B, Hq, Lq, Dv]`` and log-sum-exp ``[B, Hq, Lq]`` (float32).

    ``mask`` is additive, ``[1, 1, Lq, L]`` in the query dtype. The ``G = Hq / Hkv`` query heads of
    a KV group are stacked as ``G * Lq`` rows against the group's keys, with the mask tiled.
    """
    b, hq, lq, d = query.shape
    hkv = key.shape[1]
    g = hq // hkv
    stacked = query.reshape(b, hkv, g * lq, d)
    tiled = mask.repeat(1, 1, g, 1) if g > 1 else mask
    if query.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            stacked, key, value, 0.0, False, attn_mask=tiled, scale=scale
        )
    else:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            stacked, key, value, tiled.expand(b, hkv, g * lq, -1), True, scale=scale
        )[:2]
    return out.reshape(b, hq, lq, -1), lse.reshape(b, hq, lq)


def block_mask(
    cache_len: int, segments: list[tuple[str, int]], window: Optional[int], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Additive mask ``[1, 1, n, cache_len + n]`` of a forward whose new tokens form ``segments``.

    Every new token sees the whole cache and, causally, the tokens of its own segment only (so the
    instruction never sees the chunk it is encoded beside). Each segment starts right after the
    cache; with a ``window`` a query sees keys fewer than ``window`` positions behind it.
    """
    offsets = torch.cat([torch.arange(n, device=device) for _, n in segments])
    segment_id = torch.cat([torch.full((n,), i, device=device) for i, (_, n) in enumerate(segments)])
    own = (segment_id[:, None] == segment_id[None, :]) & (offsets[None, :] <= offsets[:, None])
    visible = torch.cat([own.new_ones((len(offsets), cache_len)), own], dim=1)
    if window is not None:
        query_pos = cache_len + offsets
        key_pos = torch.cat([torch.arange(cache_len, device=device), cache_len + offsets])
        visible &= (query_pos[:, None] - key_pos[None, :]) < window
    mask = torch.zeros(visible.shape, dtype=dtype, device=device)
    return mask.masked_fill_(~visible, float("-inf"))[None, None]


@dataclass
class ScoreView:
    """What a policy sees of one layer's forward when it scores the cache.

    Attributes
    ----------
    query : Tensor ``[B, Hq, n, D]``, the new tokens' rotated queries.
    key : Tensor ``[B, Hkv, c + n, D]``, rotated keys (cache then new).
    lse : Tensor ``[B, Hq, n]`` float32, each query's log-sum-exp.
    scale : float, the attention scale.
    cache_len : int, ``c``.
    segments : dict mapping a segment name to its slice of the new rows.
    layer : the layer's cache (for state a policy carries, e.g. H2O's accumulator).
    carry : per-state float tensors ``[B, R, c + n]`` a policy wants compacted with the states.
    """

    query: torch.Tensor
    key: torch.Tensor
    lse: torch.Tensor
    scale: float
    cache_len: int
    segments: dict[str, slice]
    layer: CitrusLayer
    carry: dict[str, torch.Tensor] = field(default_factory=dict)

    def attention(self, rows: slice, granularity: str, head_reduce: str = "mean", query_reduce: str = "mean"):
        """SPEC's score of the cache for the query ``rows``: ``[B, 1 or Hkv, c]`` float32.

        ``head_reduce="max"`` (layer granularity) takes the max over KV heads of each head's
        group mean; ``query_reduce="max"`` takes the max over queries instead of the mean.
        """
        per_head = granularity if head_reduce == "mean" else "kv_head"
        c = self.cache_len
        if query_reduce == "max":
            scores = torch.stack(
                [
                    ops.chunk_scores(self.query[:, :, t : t + 1], self.key[:, :, : c + 1], self.scale,
                                     self.lse[:, :, t : t + 1], per_head)
                    for t in range(rows.start, rows.stop)
                ]
            ).amax(0)
        else:
            n = rows.stop - rows.start
            # With lse given only the first c key columns are read, so any n columns may follow them.
            scores = ops.chunk_scores(self.query[:, :, rows], self.key[:, :, : c + n], self.scale,
                                      self.lse[:, :, rows], per_head)
        if granularity == "layer" and per_head == "kv_head":
            scores = scores.amax(1, keepdim=True)
        return scores


class Step:
    """One forward of a reader: the new tokens' layout and what happens after each layer's attention.

    Parameters
    ----------
    cache : the cache the forward reads and updates.
    specs : per-layer model facts (:func:`compat.layer_specs`).
    segments : ``[(name, length), ...]`` of the new tokens, in input order.
    first_index : token index of each segment's first token (true positions, for ``origin``).
    policy : the eviction policy, or ``None`` for no eviction in this forward.
    scorer : name of the segment whose queries score the cache.
    keep : names of the segments whose states stay in the cache (the others are dropped).
    positions : ``"relative"`` (cache states at ``0 .. c-1``, new ones from ``c``) or ``"original"``.
    mirror : optional second cache that also receives the kept new states (CItruS individual).
    timings : dict accumulating seconds of ``score``, ``topk`` and ``compact``.
    """

    def __init__(
        self,
        cache: CitrusCache,
        specs: list[LayerSpec],
        segments: list[tuple[str, int]],
        first_index: int,
        policy=None,
        scorer: str = "chunk",
        keep: tuple[str, ...] = (),
        positions: str = "relative",
        mirror: Optional[CitrusCache] = None,
        timings: Optional[dict[str, float]] = None,
    ) -> None:
        self.cache, self.specs, self.segments = cache, specs, segments
        self.policy, self.scorer, self.keep, self.positions, self.mirror = policy, scorer, keep, positions, mirror
        self.timings = timings if timings is not None else defaultdict(float)
        self.rows: dict[str, slice] = {}
        start = 0
        for name, n in segments:
            self.rows[name] = slice(start, start + n)
            start += n
        self.offsets = torch.cat([torch.arange(n) for _, n in segments])
        self.new_origin = first_index + self.offsets
        self.max_position = 0
        self._masks: dict[tuple, torch.Tensor] = {}

    def attend(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float):
        """Attention of one layer (``key``/``value`` already hold the new states); returns ``[B, n, Hq, Dv]``."""
        layer, spec = self.cache.layers[layer_idx], self.specs[layer_idx]
        c, b, device = layer.stored, key.shape[0], key.device
        if self.positions == "relative":
            cache_pos = torch.arange(c, device=device).expand(b, 1, c)
            new_pos = (c + self.offsets).to(device)
        else:
            cache_pos = layer.origin
            new_pos = self.new_origin.to(device)
        key_pos = torch.cat([cache_pos, new_pos.expand(b, cache_pos.shape[1], -1)], dim=-1)
        self.max_position = max(self.max_position, int(key_pos.max()))
        q = rotate(query, new_pos.expand(b, 1, -1), spec.inv_freq)
        k = rotate(key, key_pos, spec.inv_freq)
        mask_key = (c, spec.window, query.dtype)
        if mask_key not in self._masks:
            self._masks[mask_key] = block_mask(c, self.segments, spec.window, query.dtype, device)
        out, lse = attention_with_lse(q, k, value, self._masks[mask_key], scale)
        self._settle(layer_idx, spec, ScoreView(q, k, lse, scale, c, self.rows, layer))
        return out.transpose(1, 2).contiguous()

    def _kept_rows(self) -> slice:
        # The kept segments are contiguous in every layout the readers build (the chunk comes first).
        kept = [self.rows[name] for name, _ in self.segments if name in self.keep]
        return slice(kept[0].start, kept[-1].stop) if kept else slice(0, 0)

    def _settle(self, layer_idx: int, spec: LayerSpec, view: ScoreView) -> None:
        layer, c = view.layer, view.cache_len
        kept = None
        if self.policy is not None and not spec.plain_window and c > 0:
            t0 = time.perf_counter()
            scores = self.policy.score(view, self.scorer)
            t1 = time.perf_counter()
            kept = self.policy.select(scores, min(self.policy.budget, c))
            self.timings["score"] += t1 - t0
            self.timings["topk"] += time.perf_counter() - t1
        t0 = time.perf_counter()
        rows = self._kept_rows()
        new = slice(c + rows.start, c + rows.stop)
        origin_new = self.new_origin[rows].to(layer.origin.device)
        if self.mirror is not None:
            mirrored = (layer.keys[:, :, new], layer.values[:, :, new], origin_new)
        compact_layer(layer, c, kept, new, origin_new, view.carry, spec.window)
        if self.mirror is not None:
            append_states(self.mirror.layers[layer_idx], *mirrored, spec.window)
        self.timings["compact"] += time.perf_counter() - t0


def _gather(per_state: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    # per_state [B, R0, c], kept [B, R, K] -> [B, max(R0, R), K]
    rows = max(per_state.shape[1], kept.shape[1])
    return per_state.expand(-1, rows, -1).gather(-1, kept.expand(-1, rows, -1))


def compact_layer(
    layer: CitrusLayer,
    cache_len: int,
    kept: Optional[torch.Tensor],
    new: slice,
    origin_new: torch.Tensor,
    carry: dict[str, torch.Tensor],
    window: Optional[int],
) -> None:
    """Keep ``kept`` of the layer's first ``cache_len`` states (all if ``None``), then the ``new`` ones.

    ``layer.keys``/``values`` hold ``cache_len`` settled states followed by a forward's new states,
    of which the slice ``new`` stays. ``carry`` holds per-state values over all of them
    (``[B, R, L]``) that are kept, like the states, in ``layer.aux``.
    """
    b, total = layer.keys.shape[0], layer.keys.shape[2]
    n_new = new.stop - new.start
    if kept is None:
        kept = torch.arange(cache_len, device=layer.keys.device).expand(b, 1, cache_len)
    kept = kept.to(layer.keys.device)
    if kept.shape[1] == 1 and kept.shape[-1] == cache_len and new == slice(cache_len, total):
        # Nothing leaves: the keys already hold the cache and the new states in order.
        keys, values = layer.keys, layer.values
    else:
        key_new = layer.keys[:, :, new] if n_new else None
        value_new = layer.values[:, :, new] if n_new else None
        keys, values = ops.compact_kv(layer.keys, layer.values, kept, key_new, value_new)
    rows = max(layer.origin.shape[1], kept.shape[1])
    origin = torch.cat([_gather(layer.origin, kept), origin_new.view(1, 1, -1).expand(b, rows, -1)], dim=-1)
    aux = {}
    for name in set(layer.aux) | set(carry):
        if name in carry:
            full = carry[name]
        else:  # states the policy did not score this time start from zero
            old = layer.aux[name]
            full = torch.cat([old, old.new_zeros((*old.shape[:2], total - cache_len))], dim=-1)
        aux[name] = torch.cat([_gather(full[..., :cache_len], kept), full[..., new]], dim=-1)
    layer.keys, layer.values, layer.origin, layer.aux = keys, values, origin, aux
    if window is not None:
        trim_to_window(layer, window)


def append_states(layer: CitrusLayer, key: torch.Tensor, value: torch.Tensor, origin: torch.Tensor,
                  window: Optional[int]) -> None:
    """Append settled states to ``layer`` (no eviction), then trim a windowed layer."""
    if not layer.is_initialized:
        layer.lazy_initialization(key, value)
    layer.keys = torch.cat([layer.keys, key], dim=-2)
    layer.values = torch.cat([layer.values, value], dim=-2)
    layer.origin = torch.cat([layer.origin, origin.view(1, 1, -1).expand(layer.origin.shape[0], layer.origin.shape[1], -1)], -1)
    layer.peak = max(layer.peak, layer.keys.shape[-2])
    if window is not None:
        trim_to_window(layer, window)


def trim_to_window(layer: CitrusLayer, window: int) -> None:
    """Keep the newest ``window - 1`` states: all that the next token can see."""
    extra = layer.keys.shape[-2] - (window - 1)
    if extra > 0:
        layer.keys, layer.values = layer.keys[:, :, extra:], layer.values[:, :, extra:]
        layer.origin = layer.origin[..., extra:]
        layer.aux = {name: t[..., extra:] for name, t in layer.aux.items()}


def citrus_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    citrus_step: Optional[Step] = None,
    **kwargs,
):
    """Attention function registered with transformers under ``"citrus"``.

    Without a ``citrus_step`` it is transformers' SDPA attention; with one, the step handles RoPE,
    attention with lse, scoring and eviction (``attention_mask`` is then unused: the step builds
    the CItruS block mask itself).
    """
    if citrus_step is None:
        return compat.plain_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return citrus_step.attend(module.layer_idx, query, key, value, scale), None


compat.register_attention(citrus_attention)
