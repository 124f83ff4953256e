"""The policy contract: which queries score the cache, how scores combine; top-k lives here once."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .. import ops
from ..attention import valid_prefix

GRANULARITIES = ("layer", "kv_head")
REDUCTIONS = ("mean", "max")


@dataclass
class Policy:
    """Base of every eviction policy (one subclass per file, registered by ``name``).

    A reader asks the policy, after each layer's attention, for scores of the ``c`` cached states
    (:meth:`score`) and keeps the top ``min(budget, c)`` of them (:meth:`select`). Subclasses
    change only *which queries score* (:meth:`scoring_rows`) or, for baselines without attention
    scores, :meth:`score` itself.

    Parameters
    ----------
    budget : int, ``k``, the old states kept per layer after an eviction.
    granularity : ``"layer"`` (one selection per layer, the paper's default) or ``"kv_head"``.
    head_reduce : ``"mean"`` or ``"max"`` across KV heads for a layer-level selection.
    query_reduce : ``"mean"`` or ``"max"`` across the scoring queries.
    pool : int, odd kernel of a max-pooling of the scores along positions, so the neighbours
        of a high-scoring state are kept too (1 = off).
    sinks : int, number of first cache states always kept (attention sinks).
    """

    budget: int = 768
    granularity: str = "layer"
    head_reduce: str = "mean"
    query_reduce: str = "mean"
    pool: int = 1
    sinks: int = 0

    name: ClassVar[str] = ""
    evicts: ClassVar[bool] = True
    """False for a policy that never evicts (the full cache)."""
    instruction_each_chunk: ClassVar[bool] = False
    """True when the instruction is encoded beside every chunk and its queries score the cache."""
    instruction_cache: ClassVar[bool] = False
    """True when a second cache is kept for the instruction (CItruS individual)."""

    def __post_init__(self) -> None:
        if not isinstance(self.budget, int) or self.budget < 1:
            raise ValueError(f"citrus: `budget` must be an integer >= 1, got {self.budget!r}")
        for arg, value, allowed in (
            ("granularity", self.granularity, GRANULARITIES),
            ("head_reduce", self.head_reduce, REDUCTIONS),
            ("query_reduce", self.query_reduce, REDUCTIONS),
        ):
            if value not in allowed:
                raise ValueError(f"citrus: `{arg}` must be one of {allowed}, got {value!r}")
        if self.pool < 1 or self.pool % 2 == 0:
            raise ValueError(f"citrus: `pool` must be an odd integer >= 1, got {self.pool!r}")
        if self.sinks < 0:
            raise ValueError(f"citrus: `sinks` must be >= 0, got {self.sinks!r}")

    @property
    def scorer(self) -> str:
        """Segment whose queries score the cache while a chunk is read."""
        return "instruction" if self.instruction_each_chunk else "chunk"

    def scoring_rows(self, view, segment: str) -> slice:
        """Rows of the new queries that score the cache: all of ``segment`` by default."""
        return view.segments[segment]

    def score(self, view, segment: str) -> torch.Tensor:
        """Scores ``[B, 1 or Hkv, c]`` of the cache (SPEC's mean attention of the scoring queries)."""
        return view.attention(self.scoring_rows(view, segment), self.granularity, self.head_reduce, self.query_reduce)

    def select(self, scores: torch.Tensor, keep: int, lengths: torch.Tensor) -> torch.Tensor:
        """Indices ``[B, R, keep]`` (ascending) of the states to keep, from ``scores [B, R, c]`` of
        which row ``b`` has ``lengths[b]`` valid ones; ``-1`` fills the slots of shorter rows."""
        b, r, c = scores.shape
        if keep >= c:
            return valid_prefix(lengths, c)[:, None]
        if self.pool > 1:
            pooled = F.max_pool1d(scores.reshape(b * r, 1, c), self.pool, stride=1, padding=self.pool // 2)
            scores = pooled.view(b, r, c)
        if self.sinks:
            scores = scores.clone()
            scores[..., : self.sinks] = float("inf")
        return ops.segmented_topk(scores.reshape(b * r, c), keep, lengths.repeat_interleave(r)).view(b, r, keep)
