"""CItruS with individual caches: a second cache selected by the instruction answers."""
from dataclasses import dataclass

from .base import Policy


@dataclass
class CitrusIndividual(Policy):
    """The context cache runs CSE; the instruction cache is scored by the instruction encoded
    against it, keeps its top ``budget`` states and receives each chunk's states as computed
    against the context cache. Answers read the instruction cache (about 2x KV memory)."""

    name = "citrus_individual"
    instruction_cache = True
