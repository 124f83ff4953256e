"""TOVA: the attention of the most recent query, averaged over heads, scores the cache."""
from dataclasses import dataclass

from .base import Policy


@dataclass
class TOVA(Policy):
    """Scores the cache with the last query of the scoring segment only."""

    name = "tova"

    def scoring_rows(self, view, segment: str) -> slice:
        rows = view.segments[segment]
        return slice(rows.stop - 1, rows.stop)
