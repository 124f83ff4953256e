"""CItruS with a shared cache: the instruction, encoded beside every chunk, scores the cache."""
from dataclasses import dataclass

from .base import Policy


@dataclass
class CitrusShared(Policy):
    """At every chunk the instruction is encoded against the pre-eviction cache (in the same forward
    as the chunk, under a block mask) and its queries score the cache; its states are dropped."""

    name = "citrus_shared"
    instruction_each_chunk = True
