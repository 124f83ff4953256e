"""StreamingLLM: keep the first tokens (attention sinks) and the most recent ones."""
from dataclasses import dataclass

import torch

from .base import Policy


@dataclass
class StreamingLLM(Policy):
    """Keeps the first ``sinks`` states and the most recent ones; no attention is read."""

    name = "streaming_llm"
    sinks: int = 4

    def score(self, view, segment: str) -> torch.Tensor:
        # Later states score higher, so the top-k is the recent window (sinks are added in select).
        c = view.cache_len
        return torch.arange(c, dtype=torch.float32, device=view.key.device).expand(view.key.shape[0], 1, c)
