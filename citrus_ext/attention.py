"""The CItruS attention function: RoPE at current positions, attention + lse, then eviction.

A reader attaches a :class:`Step` to a forward (keyword ``citrus_step``, which transformers passes
through to the attention function). For every layer the step

1. rotates the un-rotated queries and keys (the model's own RoPE was made the identity) at
   their current positions, so a key that survived any number of evictions is rotated afresh;
2. computes the attention output and each query's log-sum-exp with one SDPA-style kernel
   without repeating KV heads: on CUDA, for rows without padding, the flash kernel with
   lower-right causal masking (varlen, one sequence per segment); otherwise a KV group's query
   heads stacked as rows under the block mask;
3. lets the policy score the cache from that lse (``citrus_ext.ops.chunk_scores``), keeps the
   top states (``segmented_topk``) and compacts them with the new states it keeps
   (``compact_kv``), right after the layer's attention.
"""
from __future__ import annotations

import functools
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import compat, ops
from .compat import CitrusCache, CitrusLayer, LayerSpec


# Set by benchmarks: synchronise the device around each timed eviction step, so that the
# score/top-k/compact split counts device time rather than launch time.
SYNC_TIMINGS = False


# Set by the tests: settle_layer checks the kept counts its callers derive on the host.
CHECK_COUNTS = False


def _clock(device: torch.device) -> float:
    if SYNC_TIMINGS and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[..., L, D]`` of RoPE at integer ``positions [..., L]``.

    Computed in float32 from the integer positions and cast to ``dtype``, as the transformers
    models do, so a fresh rotation matches the model's own bit for bit.
    """
    freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq.to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE (rotate-half convention) of ``x`` with tables from :func:`rope_tables`."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Apply RoPE to ``x [B, H, L, D]`` at ``positions [B, 1 or H, L]``."""
    return apply_rope(x, *rope_tables(positions, inv_freq, x.dtype))


def attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output ``[B, Hq, Lq, Dv]`` and log-sum-exp ``[B, Hq, Lq]`` (float32).

    ``mask`` is additive, ``[B, 1, G * Lq, L]`` in the query dtype: the ``G = Hq / Hkv`` query heads
    of a KV group are stacked as ``G * Lq`` rows against the group's keys, so the mask of one
    head is tiled ``G`` times (:meth:`Layout.mask`). On
    CPU this is the flash kernel; elsewhere the memory-efficient kernel (whose lse is padded, and
    which the CPU-only tests of this branch do not exercise).
    """
    b, hq, lq, d = query.shape
    hkv = key.shape[1]
    g = hq // hkv
    stacked = query.reshape(b, hkv, g * lq, d)
    if query.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            stacked, key, value, 0.0, False, attn_mask=mask, scale=scale
        )
    else:
        # The memory-efficient kernel wants each bias row 16-element aligned (SDPA's own wrapper
        # arranges this too): pad the key axis and slice it back, keeping the padded stride.
        length = mask.shape[-1]
        if length % 16:
            mask = torch.nn.functional.pad(mask, (0, -length % 16))[..., :length]
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            stacked, key, value, mask.expand(b, hkv, g * lq, length), True, scale=scale
        )[:2]
        lse = lse[..., : g * lq]
    return out.reshape(b, hq, lq, -1), lse.reshape(b, hq, lq)


@functools.lru_cache(maxsize=None)
def _flash_capable(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 8


def flash_usable(query: torch.Tensor) -> bool:
    """Whether the flash kernel takes these queries: CUDA (sm80+), fp16/bf16, head dim a multiple
    of 8 up to 256, and flash SDPA not switched off by the user."""
    d = query.shape[-1]
    return (query.device.type == "cuda" and query.dtype in (torch.float16, torch.bfloat16) and d % 8 == 0
            and d <= 256 and torch.backends.cuda.flash_sdp_enabled() and _flash_capable(query.device.index or 0))


def flash_packing(batch: int, cache_len: int, segments: list[tuple[int, int]], device) -> tuple:
    """Varlen layout for :func:`flash_attention_with_lse`: one sequence per (row, segment) whose
    keys are the row's cache then the segment's own states. Returns the key gather indices (row,
    position), cumulative query and key lengths (int32) and the longest of each."""
    n = sum(width for _, width in segments)
    rows, positions, cu_q, cu_k = [], [], [0], [0]
    for b in range(batch):
        for start, width in segments:
            keys = torch.cat([torch.arange(cache_len), cache_len + start + torch.arange(width)])
            rows.append(torch.full_like(keys, b))
            positions.append(keys)
            cu_q.append(cu_q[-1] + width)
            cu_k.append(cu_k[-1] + cache_len + width)
    assert cu_q[-1] == batch * n
    as_device = lambda x, dtype: torch.tensor(x, dtype=dtype).to(device)  # noqa: E731
    return (torch.cat(rows).to(device), torch.cat(positions).to(device), as_device(cu_q, torch.int32),
            as_device(cu_k, torch.int32), max(w for _, w in segments), cache_len + max(w for _, w in segments))


def flash_attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, packing: Optional[tuple] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention where every row's queries see its whole cache and, causally, their own segment,
    with the flash kernel: output ``[B, n, Hq, Dv]`` and natural-log lse ``[B, Hq, n]`` (float32).

    ``query [B, Hq, n, D]``, ``key``/``value [B, Hkv, c + n, D]``, every row holding ``c`` valid
    cache states and ``n`` real new ones. Without ``packing`` the new states are one segment
    (causal, aligned to the last key: lower-right); with it (:func:`flash_packing`) each segment
    is one varlen sequence over the cache and its own states. GQA is native: no repeated heads.
    """
    b, hq, n, _ = query.shape
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    flash = torch.ops.aten._flash_attention_forward
    if packing is None:
        out, lse = flash(q, k, v, None, None, n, k.shape[1], 0.0, True, False, scale=scale)[:2]
        return out, lse
    rows, positions, cu_q, cu_k, max_q, max_k = packing
    out, lse = flash(q.reshape(b * n, hq, -1), k[rows, positions], v[rows, positions], cu_q, cu_k, max_q, max_k,
                     0.0, True, False, scale=scale)[:2]
    # Varlen lse is laid out [Hq, total queries].
    return out.view(b, n, hq, -1), lse.view(hq, b, n).permute(1, 0, 2)


@dataclass
class Layout:
    """Where the new tokens of a forward sit, for a batch of ragged rows.

    The new tokens form named segments (e.g. the chunk, then the instruction), each padded to the
    longest row on the *left*, so the last rows of a segment are real tokens in every row.

    Attributes
    ----------
    segments : ``[(name, width), ...]``, padded widths in input order.
    lengths : Tensor ``[B, S]`` int64, real tokens of each segment per row.
    offsets : Tensor ``[B, n]`` int64, position of a new token inside its segment (pads < 0).
    segment_id : Tensor ``[n]`` int64.
    """

    segments: list[tuple[str, int]]
    lengths: torch.Tensor

    def __post_init__(self) -> None:
        offsets, ids = [], []
        for s, (_, width) in enumerate(self.segments):
            pad = width - self.lengths[:, s : s + 1]
            offsets.append(torch.arange(width)[None, :] - pad)
            ids.append(torch.full((width,), s))
        self.offsets = torch.cat(offsets, dim=1)
        self.segment_id = torch.cat(ids)
        self.real = self.offsets >= 0
        self.rows = {}
        start = 0
        for name, width in self.segments:
            self.rows[name] = slice(start, start + width)
            start += width

    def count(self, name: str) -> torch.Tensor:
        """Real tokens of segment ``name`` per row, ``[B]``."""
        return self.lengths[:, [n for n, _ in self.segments].index(name)]

    def mask(self, cache_lens: torch.Tensor, cache_width: int, window: Optional[int], group: int, dtype,
             device) -> torch.Tensor:
        """Additive mask ``[B, 1, group * n, cache_width + n]`` (tiled for ``group`` stacked heads).

        A real token sees its row's valid cache and, causally, the real tokens of its own segment
        (so the instruction never sees the chunk beside it); every segment starts right after the
        cache. With a ``window`` a query sees keys fewer than ``window`` positions behind it. A pad
        query sees only itself (its output is unused; this keeps its softmax finite).
        """
        off, real = self.offsets.to(device), self.real.to(device)
        lens = cache_lens.to(device)[:, None]
        same = self.segment_id.to(device)
        own = (same[:, None] == same[None, :]) & (off[:, None, :] <= off[:, :, None])
        own &= real[:, None, :] & real[:, :, None]
        cache = (torch.arange(cache_width, device=device)[None, None, :] < lens[:, :, None]) & real[:, :, None]
        visible = torch.cat([cache.expand(-1, off.shape[1], -1), own], dim=2)
        if window is not None:
            query_pos = lens + off
            key_pos = torch.cat([torch.arange(cache_width, device=device).expand(len(lens), -1), lens + off], dim=1)
            visible &= (query_pos[:, :, None] - key_pos[:, None, :]) < window
        n = off.shape[1]
        visible[:, torch.arange(n), cache_width + torch.arange(n)] |= ~real
        mask = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))
        return mask[:, None].repeat(1, 1, group, 1)


@dataclass
class ScoreView:
    """What a policy sees of one layer's forward when it scores the cache.

    Attributes
    ----------
    query : Tensor ``[B, Hq, n, D]``, the new tokens' rotated queries.
    key : Tensor ``[B, Hkv, c + n, D]``, rotated keys (cache, padded to width ``c``, then new).
    lse : Tensor ``[B, Hq, n]`` float32, each query's log-sum-exp.
    scale : float, the attention scale.
    cache_len : int, ``c``, the cache width (rows may hold fewer valid states).
    cache_lens : Tensor ``[B]``, valid cache states per row.
    segments : dict mapping a segment name to its slice of the new rows.
    layer : the layer's cache (for state a policy carries, e.g. H2O's accumulator).
    ragged : bool, whether some row holds fewer than ``c`` valid states (from the host copy of
        the lengths, so asking costs no device synchronisation).
    carry : per-state float tensors ``[B, R, c + n]`` a policy wants compacted with the states.
    """

    query: torch.Tensor
    key: torch.Tensor
    lse: torch.Tensor
    scale: float
    cache_len: int
    cache_lens: torch.Tensor
    segments: dict[str, slice]
    layer: CitrusLayer
    ragged: bool
    carry: dict[str, torch.Tensor] = field(default_factory=dict)

    def attention(self, rows: slice, granularity: str, head_reduce: str = "mean", query_reduce: str = "mean"):
        """SPEC's score of the cache for the query ``rows``: ``[B, 1 or Hkv, c]`` float32.

        Pad queries carry an infinite lse, so they add nothing: a row with padding gets its scores
        scaled by a constant, which leaves its ranking unchanged. ``head_reduce="max"`` (layer
        granularity) takes the max over KV heads of each head's group mean; ``query_reduce="max"``
        the max over queries instead of the mean.
        """
        per_head = granularity if head_reduce == "mean" else "kv_head"
        c = self.cache_len
        lens = self.cache_lens if self.ragged else None
        if query_reduce == "max":
            scores = torch.stack(
                [
                    ops.chunk_scores(self.query[:, :, t : t + 1], self.key[:, :, : c + 1], self.scale,
                                     self.lse[:, :, t : t + 1], per_head, lens)
                    for t in range(rows.start, rows.stop)
                ]
            ).amax(0)
        else:
            n = rows.stop - rows.start
            # With lse given only the first c key columns are read, so any n columns may follow them.
            scores = ops.chunk_scores(self.query[:, :, rows], self.key[:, :, : c + n], self.scale,
                                      self.lse[:, :, rows], per_head, lens)
        if granularity == "layer" and per_head == "kv_head":
            scores = scores.amax(1, keepdim=True)
        return scores


class Step:
    """One forward of a reader: the new tokens' layout and what happens after each layer's attention.

    Parameters
    ----------
    cache : the cache the forward reads and updates.
    specs : per-layer model facts (:func:`compat.layer_specs`).
    layout : :class:`Layout` of the new tokens.
    first_index : Tensor ``[B]``, true token index of each segment's first real token per row.
    policy : the eviction policy, or ``None`` for no eviction in this forward.
    scorer : name of the segment whose queries score the cache (a row with none keeps all).
    keep : names of the segments whose states stay in the cache (the others are dropped).
    positions : ``"relative"`` (cache states at ``0 .. c-1``, new ones from ``c``) or ``"original"``.
    mirror : optional second cache that also receives the kept new states (CItruS individual).
    timings : dict accumulating seconds of ``score``, ``topk`` and ``compact``.
    """

    def __init__(
        self,
        cache: CitrusCache,
        specs: list[LayerSpec],
        layout: Layout,
        first_index: torch.Tensor,
        policy=None,
        scorer: str = "chunk",
        keep: tuple[str, ...] = (),
        positions: str = "relative",
        mirror: Optional[CitrusCache] = None,
        timings: Optional[dict[str, float]] = None,
    ) -> None:
        self.cache, self.specs, self.layout = cache, specs, layout
        self.policy, self.scorer, self.keep, self.positions, self.mirror = policy, scorer, keep, positions, mirror
        self.timings = timings if timings is not None else defaultdict(float)
        self.new_origin = torch.where(layout.real, first_index[:, None] + layout.offsets, -1)
        keep_segment = torch.tensor([name in keep for name, _ in layout.segments])
        self.new_keep = layout.real & keep_segment[layout.segment_id][None, :]
        self.new_counts = self.new_keep.sum(1)  # new states each row keeps, on the host
        # Rows without scoring queries in this forward (not reading) keep everything.
        self.idle = layout.count(scorer) == 0 if policy is not None else None
        self.max_position = 0
        self._masks: dict[tuple, torch.Tensor] = {}
        self._rope: dict[tuple, tuple] = {}
        self._packings: dict[tuple, tuple] = {}
        self._device_copies: dict[str, torch.Tensor] = {}

    def device_inputs(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The per-forward host tensors the layers read, copied to ``device`` now (pinned,
        asynchronously), so no layer waits for a copy; a CUDA-graph replay refreshes them."""
        host = {"offsets": self.layout.offsets, "real": self.layout.real, "new_keep": self.new_keep,
                "new_origin": self.new_origin}
        if self.idle is not None:
            host["idle"] = self.idle
        if device.type == "cuda":
            host = {name: t.pin_memory() for name, t in host.items()}
        return {name: t.to(device, non_blocking=True) for name, t in host.items()}

    def use_device_inputs(self, tensors: dict[str, torch.Tensor]) -> None:
        """Read the per-forward inputs from ``tensors`` (see :meth:`device_inputs`)."""
        self._device_copies.update(tensors)

    def _on(self, name: str, device: torch.device) -> torch.Tensor:
        """The per-forward tensor ``name`` (of the step or its layout) on ``device``, copied once."""
        if name not in self._device_copies:
            self.use_device_inputs(self.device_inputs(device))
        return self._device_copies[name]

    def _positions(self, layer: CitrusLayer, c: int, b: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Current positions of the new states ``[B, n]`` and of all keys ``[B, 1 or H, c + n]``."""
        offsets = self._on("offsets", device).clamp(min=0)
        if self.positions == "relative":
            cache_pos = torch.arange(c, device=device).expand(b, 1, c)
            new_pos = layer.lens[:, None] + offsets
        else:
            cache_pos = layer.origin.clamp(min=0)
            new_pos = self._on("new_origin", device).clamp(min=0)
        return new_pos, torch.cat([cache_pos, new_pos[:, None].expand(b, cache_pos.shape[1], -1)], dim=-1)

    def attend(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float):
        """Attention of one layer (``key``/``value`` already hold the new states); returns ``[B, n, Hq, Dv]``."""
        layer, spec = self.cache.layers[layer_idx], self.specs[layer_idx]
        c, b, device = layer.stored, key.shape[0], key.device
        lens, lens_host = layer.lens, layer.lens_host
        real = self.layout.real
        ragged = bool((lens_host < c).any())
        lens_key = tuple(lens_host.tolist())
        if self.positions == "relative":
            # Positions actually used (pads excluded), reported so tests can check they stay in
            # range; from host copies, so no device synchronisation.
            newest = torch.where(real, self.layout.offsets, -1).amax(1)
            used = int((lens_host + newest).max())
            # Relative positions depend only on the cache's lengths: layers that share them (and
            # their RoPE frequencies) share one set of cos/sin tables per forward.
            rope_key = (id(spec.inv_freq), c, lens_key, query.dtype)
            if rope_key not in self._rope:
                new_pos, key_pos = self._positions(layer, c, b, device)
                self._rope[rope_key] = (rope_tables(new_pos[:, None], spec.inv_freq, query.dtype),
                                        rope_tables(key_pos, spec.inv_freq, key.dtype))
            q_tables, k_tables = self._rope[rope_key]
        else:
            new_pos, key_pos = self._positions(layer, c, b, device)
            used = int(torch.cat([new_pos[self._on("real", device)],
                                  key_pos[..., :c][torch.arange(c, device=device)[None, None] < lens[:, None, None]]]).max())
            q_tables = rope_tables(new_pos[:, None], spec.inv_freq, query.dtype)
            k_tables = rope_tables(key_pos, spec.inv_freq, key.dtype)
        self.max_position = max(self.max_position, used)
        q, k = apply_rope(query, *q_tables), apply_rope(key, *k_tables)
        if spec.window is None and not ragged and bool(real.all()) and flash_usable(query):
            # Every row sees its whole cache and, causally, its own segment: the flash kernel with
            # lower-right causal masking does that without a bias tensor.
            segments = [(s.start, s.stop - s.start) for s in self.layout.rows.values() if s.stop > s.start]
            packing = None
            if len(segments) > 1:
                if c not in self._packings:
                    self._packings[c] = flash_packing(b, c, segments, device)
                packing = self._packings[c]
            out, lse = flash_attention_with_lse(q, k, value, scale, packing)
        else:
            group = query.shape[1] // key.shape[1]
            mask_key = (c, lens_key, spec.window, group, query.dtype)
            if mask_key not in self._masks:
                self._masks[mask_key] = self.layout.mask(lens, c, spec.window, group, query.dtype, device)
            out, lse = attention_with_lse(q, k, value, self._masks[mask_key], scale)
            out = out.transpose(1, 2).contiguous()
            if not bool(real.all()):
                # An infinite lse gives a pad query zero probability everywhere, so it scores nothing.
                lse = lse.masked_fill(~self._on("real", device)[:, None, :], float("inf"))
        self._settle(layer_idx, spec, ScoreView(q, k, lse, scale, c, lens, self.layout.rows, layer, ragged))
        return out

    def _settle(self, layer_idx: int, spec: LayerSpec, view: ScoreView) -> None:
        layer, c = view.layer, view.cache_len
        kept = None
        device = layer.keys.device
        # Cache states each row keeps, known on the host: top-k keeps min(keep, valid) per row.
        kept_counts = layer.lens_host
        if self.policy is not None and not spec.plain_window and c > 0:
            t0 = _clock(device)
            scores = self.policy.score(view, self.scorer)
            t1 = _clock(device)
            kept = self.policy.select(scores, min(self.policy.budget, c), layer.lens)
            # A row without scoring queries in this forward (it is not reading) keeps everything.
            idle = self.idle
            if bool(idle.any()):
                kept = torch.nn.functional.pad(kept, (0, c - kept.shape[-1]), value=-1)
                kept = torch.where(self._on("idle", device)[:, None, None], valid_prefix(layer.lens, c)[:, None], kept)
            kept_counts = torch.where(idle, layer.lens_host, layer.lens_host.clamp(max=min(self.policy.budget, c)))
            self.timings["score"] += t1 - t0
            self.timings["topk"] += _clock(device) - t1
        t0 = _clock(device)
        new_keep, new_origin = self._on("new_keep", device), self._on("new_origin", device)
        if self.mirror is not None:
            new_states = (layer.keys[:, :, c:], layer.values[:, :, c:], new_origin)
        settle_layer(layer, c, kept, new_keep, new_origin, view.carry, spec.window, kept_counts + self.new_counts)
        if self.mirror is not None:
            mirror = self.mirror.layers[layer_idx]
            cache_len = mirror.stored
            mirror.update(new_states[0], new_states[1])
            settle_layer(mirror, cache_len, None, new_keep, new_states[2], {}, spec.window,
                         mirror.lens_host + self.new_counts)
        self.timings["compact"] += _clock(device) - t0


def valid_prefix(lens: torch.Tensor, width: int) -> torch.Tensor:
    """``[B, width]`` indices ``0 .. lens[b]-1`` then ``-1``."""
    idx = torch.arange(width, device=lens.device).expand(len(lens), -1)
    return torch.where(idx < lens[:, None], idx, -1)


def _gather(per_state: torch.Tensor, idx: torch.Tensor, fill) -> torch.Tensor:
    # per_state [B, R0, L], idx [B, R, K] (-1 = empty) -> [B, max(R0, R), K]
    rows = max(per_state.shape[1], idx.shape[1])
    out = per_state.expand(-1, rows, -1).gather(-1, idx.clamp(min=0).expand(-1, rows, -1))
    return out.masked_fill(idx.expand(-1, rows, -1) < 0, fill)


def settle_layer(
    layer: CitrusLayer,
    cache_len: int,
    kept: Optional[torch.Tensor],
    new_keep: torch.Tensor,
    new_origin: torch.Tensor,
    carry: dict[str, torch.Tensor],
    window: Optional[int],
    host_counts: Optional[torch.Tensor] = None,
) -> None:
    """Settle a layer after a forward: keep ``kept`` of its cache, then the new states ``new_keep``.

    ``layer.keys``/``values`` hold the cache (width ``cache_len``, row ``b`` valid up to
    ``layer.lens[b]``) followed by the forward's ``n`` new states. ``kept [B, R, K]`` lists the
    cache states to keep in order (``-1`` = empty; ``None`` keeps every valid one);
    ``new_keep [B, n]`` marks the new states to keep and ``new_origin [B, n]`` their token
    indices. ``carry`` holds per-state values over cache and new states (``[B, R, cache_len + n]``),
    kept in ``layer.aux``. A ``window`` keeps only the newest ``window - 1`` states of each row.
    ``host_counts [B]`` (CPU), when given, is how many states each row keeps before the window: it
    spares a device-to-host copy (``CHECK_COUNTS`` verifies it).
    Rows end up left-aligned again (valid states first), padded to the longest row.
    """
    device = layer.keys.device
    total = layer.keys.shape[2]
    n = total - cache_len
    if kept is None:
        kept = valid_prefix(layer.lens, cache_len)[:, None]
    kept = kept.to(device)
    new_idx = torch.where(new_keep, cache_len + torch.arange(n, device=device), -1)[:, None]
    rows = kept.shape[1]
    idx = torch.cat([kept, new_idx.expand(-1, rows, -1)], dim=-1)
    # Move the empty slots (-1) behind the kept states of each row, preserving order.
    idx = idx.gather(-1, torch.sort((idx < 0).to(torch.int8), dim=-1, stable=True).indices)
    counts = (idx >= 0).sum(-1)
    if window is not None:
        start = (counts - (window - 1)).clamp(min=0)
        take = start[..., None] + torch.arange(window - 1, device=device)
        idx = torch.where(take < counts[..., None], idx.gather(-1, take.clamp(max=idx.shape[-1] - 1)), -1)
        counts = (idx >= 0).sum(-1)
    # The states each row keeps, on the host: from the caller's ``host_counts`` when it knows them
    # (no device synchronisation), else one device-to-host copy.
    if host_counts is None:
        counts_host = counts.cpu()
    else:
        counts_host = host_counts if window is None else host_counts.clamp(max=window - 1)
        counts_host = counts_host[:, None].expand(-1, rows)
        if CHECK_COUNTS:
            assert torch.equal(counts_host, counts.cpu()), (counts_host, counts.cpu())
    width = int(counts_host.max()) if counts_host.numel() else 0
    idx = idx[..., :width]
    lens = counts.amax(1)
    # Kept indices are distinct and ascending, so a row that keeps all `total` is the identity.
    identity = rows == 1 and bool((counts_host == total).all())
    if identity:
        keys, values = layer.keys, layer.values
    else:
        keys, values = ops.compact_kv(layer.keys, layer.values, idx)
    new_origin = new_origin.view(len(new_origin), 1, -1).expand(-1, layer.origin.shape[1], -1)
    origin_all = torch.cat([layer.origin, new_origin], dim=-1)
    aux = {}
    for name in set(layer.aux) | set(carry):
        if name in carry:
            values_all = carry[name]
        else:  # states the policy did not score this time start from zero
            old = layer.aux[name]
            values_all = torch.cat([old, old.new_zeros((*old.shape[:2], n))], dim=-1)
        aux[name] = _gather(values_all, idx, 0.0)
    layer.keys, layer.values = keys, values
    layer.origin, layer.aux, layer.lens = _gather(origin_all, idx, -1), aux, lens
    layer.lens_host = counts_host.amax(1)


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
        return compat.plain_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return citrus_step.attend(module.layer_idx, query, key, value, scale), None


compat.register_attention(citrus_attention)
