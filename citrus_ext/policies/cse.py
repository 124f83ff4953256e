"""Standard chunked state eviction (SPEC "CSE"): the chunk's own queries score the cache."""
from dataclasses import dataclass

from .base import Policy


@dataclass
class CSE(Policy):
    """Each chunk's queries score the cache; the top ``budget`` states stay, then the chunk."""

    name = "cse"
