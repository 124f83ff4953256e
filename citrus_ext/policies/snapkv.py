"""SnapKV: the last ``window`` queries score the cache per KV head, pooled along positions."""
from dataclasses import dataclass

from .base import Policy


@dataclass
class SnapKV(Policy):
    """Observation window of the last ``window`` queries of the scoring segment, per KV head,
    max-pooled with kernel ``pool``; applied at every chunk (and to the instruction at the end).

    Parameters
    ----------
    window : int, number of most recent queries that score the cache.
    """

    name = "snapkv"
    window: int = 32
    granularity: str = "kv_head"
    pool: int = 7

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 1:
            raise ValueError(f"citrus: `window` must be >= 1, got {self.window!r}")

    def scoring_rows(self, view, segment: str) -> slice:
        rows = view.segments[segment]
        return slice(max(rows.start, rows.stop - self.window), rows.stop)
