"""Full cache: nothing is evicted (the upper bound while the document fits the model)."""
from dataclasses import dataclass

from .base import Policy


@dataclass
class Full(Policy):
    """Keeps every state; ``budget`` is ignored."""

    name = "full"
    evicts = False
