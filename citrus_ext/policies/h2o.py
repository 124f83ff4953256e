"""H2O: per KV head, the attention a state accumulated since it entered the cache, plus a recent window."""
from dataclasses import dataclass
from typing import Optional

import torch

from .base import Policy


@dataclass
class H2O(Policy):
    """Heavy hitters: each state's attention summed over every query that has seen it (per KV
    head), with the ``recent`` newest cache states protected (default: half the budget, as in
    the paper's 50/50 split); the newest chunk is always kept.

    Parameters
    ----------
    recent : int or None, newest cache states always kept (``None``: ``budget // 2``).
    """

    name = "h2o"
    granularity: str = "kv_head"
    recent: Optional[int] = None

    def score(self, view, segment: str) -> torch.Tensor:
        rows = self.scoring_rows(view, segment)
        n = rows.stop - rows.start
        b, hq = view.query.shape[:2]
        hkv, c = view.key.shape[1], view.cache_len
        group = hq // hkv
        # chunk_scores returns a mean over the group's queries; H2O accumulates sums.
        on_cache = view.attention(rows, "kv_head") * (group * n)
        on_new = self._own_attention(view, rows)
        layer = view.layer
        acc = layer.aux.get(self.name)
        previous = acc if acc is not None else on_cache.new_zeros((b, hkv, c))
        total = torch.cat([previous + on_cache, on_new], dim=-1)
        view.carry[self.name] = total
        scores = total[..., :c]
        recent = self.budget // 2 if self.recent is None else self.recent
        if recent:
            index = torch.arange(c, device=scores.device)
            newest = index[None, :] >= (view.cache_lens.to(scores.device)[:, None] - recent)
            scores = scores.masked_fill(newest[:, None, :], float("inf"))
        return scores if self.granularity == "kv_head" else scores.mean(1, keepdim=True)

    @staticmethod
    def _own_attention(view, rows: slice) -> torch.Tensor:
        """Attention the new states receive from the scoring queries (causal), summed: ``[B, Hkv, n_all]``."""
        c = view.cache_len
        q = view.query[:, :, rows].float()
        k = view.key[:, :, c:].float()
        b, hq, n, d = q.shape
        hkv, n_all = k.shape[1], k.shape[2]
        logits = q.reshape(b, hkv, -1, d) @ k.transpose(-1, -2) * view.scale
        probs = (logits - view.lse[:, :, rows].reshape(b, hkv, -1, 1)).exp()
        query_idx = torch.arange(rows.start, rows.stop, device=q.device).repeat(hq // hkv)
        visible = torch.arange(n_all, device=q.device)[None, :] <= query_idx[:, None]
        return (probs * visible).sum(2)
