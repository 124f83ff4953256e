"""The chunked reader: reads a document chunk by chunk in bounded memory, then answers.

:class:`ChunkedReader` is the lower-level API: custom code may call :meth:`ChunkedReader.read_chunk`
itself, inspect ``reader.cache`` (one :class:`~citrus_ext.compat.CitrusLayer` per layer, keys
stored before RoPE), or evict with ``torch.ops.citrus.evict`` between chunks.
"""
from __future__ import annotations

import time
from collections import defaultdict
from typing import Callable, Optional, Sequence

import torch

from . import compat
from .attention import Step, compact_layer, rotate
from .compat import CitrusCache
from .policies import Policy

POSITIONS = ("relative", "original")


class ChunkedReader:
    """Reads one document (batch of one row) with a policy; answers with the final stage of SPEC.

    Parameters
    ----------
    model : a supported causal LM (see :func:`compat.check_supported`).
    policy : the eviction policy (:func:`citrus_ext.policies.make_policy`).
    chunk_size : int, ``l_s``, tokens per chunk.
    positions : ``"relative"`` (SPEC default: positions relative to the cache) or ``"original"``.
    """

    def __init__(self, model, policy: Policy, chunk_size: int, positions: str = "relative") -> None:
        compat.check_supported(model)
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"citrus: `chunk_size` must be an integer >= 1, got {chunk_size!r}")
        if positions not in POSITIONS:
            raise ValueError(f"citrus: `positions` must be one of {POSITIONS}, got {positions!r}")
        self.model, self.policy, self.chunk_size, self.positions = model, policy, chunk_size, positions
        self.specs = compat.layer_specs(model)
        self.cache = CitrusCache(len(self.specs))
        self.instruction_cache = CitrusCache(len(self.specs)) if policy.instruction_cache else None
        self.tokens_read = 0  # document tokens read
        self.next_index = 0  # true token index of the next token (document, instruction, answer)
        self.chunks = 0
        self.max_position = 0
        self.timings: dict[str, float] = defaultdict(float)

    @property
    def answer_cache(self) -> CitrusCache:
        """The cache the answer is read from (the instruction cache in CItruS individual)."""
        return self.instruction_cache if self.instruction_cache is not None else self.cache

    def forward(
        self,
        cache: CitrusCache,
        ids: torch.Tensor,
        segments: list[tuple[str, int]],
        *,
        evict: bool,
        keep: tuple[str, ...],
        scorer: str = "chunk",
        mirror: Optional[CitrusCache] = None,
    ) -> torch.Tensor:
        """One model forward over ``ids [1, n]`` laid out as ``segments``; returns the last logits ``[1, V]``."""
        step = Step(cache, self.specs, segments, self.next_index, self.policy if evict else None, scorer, keep,
                    self.positions, mirror, self.timings)
        t0 = time.perf_counter()
        with torch.no_grad(), compat.citrus_attention_enabled(self.model):
            out = self.model(
                input_ids=ids,
                position_ids=compat.identity_position_ids(ids.shape[0], ids.shape[1], ids.device),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
                citrus_step=step,
            )
        self.timings["model"] += time.perf_counter() - t0
        self.max_position = max(self.max_position, step.max_position)
        return out.logits[:, -1]

    def read_chunk(self, chunk: torch.Tensor, instruction: torch.Tensor) -> None:
        """Read one chunk ``[1, n]``; ``instruction [1, l_I]`` is used by the instruction-aware policies."""
        n, li = chunk.shape[1], instruction.shape[1]
        policy = self.policy
        if policy.instruction_cache:
            if self.instruction_cache.layers[0].stored:
                self.forward(self.instruction_cache, instruction, [("instruction", li)], evict=True, keep=(),
                             scorer="instruction")
            self.forward(self.cache, chunk, [("chunk", n)], evict=True, keep=("chunk",), mirror=self.instruction_cache)
        elif policy.instruction_each_chunk:
            self.forward(self.cache, torch.cat([chunk, instruction], dim=1), [("chunk", n), ("instruction", li)],
                         evict=True, keep=("chunk",), scorer="instruction")
        else:
            self.forward(self.cache, chunk, [("chunk", n)], evict=policy.evicts, keep=("chunk",))
        self.tokens_read += n
        self.next_index += n
        self.chunks += 1

    def read(self, document: torch.Tensor, instruction: torch.Tensor,
             progress: Optional[Callable[[int, int], None]] = None) -> None:
        """Read ``document [1, N]`` chunk by chunk; ``progress(done, total)`` is called after each chunk."""
        total = -(-document.shape[1] // self.chunk_size)
        for i, start in enumerate(range(0, document.shape[1], self.chunk_size)):
            self.read_chunk(document[:, start : start + self.chunk_size], instruction)
            if progress is not None:
                progress(i + 1, total)

    def prune(self, instruction: torch.Tensor) -> None:
        """SPEC's final stage, first half: encode ``instruction [1, l_I]`` over the answer cache,
        keep the top ``budget`` states by its scores and drop its states."""
        if self.policy.evicts:
            self.forward(self.answer_cache, instruction, [("instruction", instruction.shape[1])], evict=True, keep=(),
                         scorer="instruction")

    def encode_instruction(self, instruction: torch.Tensor) -> torch.Tensor:
        """Encode ``instruction`` over the (pruned) answer cache, keeping its states; returns the
        logits ``[1, V]`` at its last position."""
        logits = self.forward(self.answer_cache, instruction, [("instruction", instruction.shape[1])], evict=False,
                              keep=("instruction",))
        self.next_index += instruction.shape[1]
        return logits

    def decode(self, logits: torch.Tensor, max_new_tokens: int, eos: Sequence[int]) -> list[int]:
        """Greedy decoding from ``logits`` (no eviction) until an eos token or ``max_new_tokens``."""
        tokens: list[int] = []
        for _ in range(max_new_tokens):
            token = int(logits.argmax(-1))
            tokens.append(token)
            if token in eos or len(tokens) == max_new_tokens:
                break
            ids = torch.tensor([[token]], device=logits.device)
            logits = self.forward(self.answer_cache, ids, [("token", 1)], evict=False, keep=("token",))
            self.next_index += 1
        return tokens

    def generate(self, instruction: torch.Tensor, max_new_tokens: int, eos: Sequence[int]) -> list[int]:
        """The final stage (:meth:`prune`, :meth:`encode_instruction`) and greedy decoding."""
        self.prune(instruction)
        return self.decode(self.encode_instruction(instruction), max_new_tokens, eos)

    def rotated_keys(self, layer_idx: int, cache: Optional[CitrusCache] = None) -> torch.Tensor:
        """The keys of a layer as attention sees them now (RoPE at their current positions), so
        custom code can score the cache itself (e.g. with ``torch.ops.citrus.evict``)."""
        layer = (cache or self.cache).layers[layer_idx]
        if self.positions == "relative":
            positions = torch.arange(layer.stored, device=layer.keys.device).expand(layer.keys.shape[0], 1, -1)
        else:
            positions = layer.origin
        return rotate(layer.keys, positions, self.specs[layer_idx].inv_freq)

    def keep(self, layer_idx: int, kept: torch.Tensor, cache: Optional[CitrusCache] = None) -> None:
        """Keep only the states ``kept [B, 1 or Hkv, K]`` (ascending indices) of a layer, e.g. the
        indices ``torch.ops.citrus.evict`` returned."""
        layer = (cache or self.cache).layers[layer_idx]
        c = layer.stored
        compact_layer(layer, c, kept, slice(c, c), layer.origin.new_empty(0), {}, None)

    def retention(self, token_indices: Sequence[int], cache: Optional[CitrusCache] = None) -> list[torch.Tensor]:
        """Share of the given token indices (e.g. a needle's) still cached, per layer and KV head.

        Returns one float tensor per layer, ``[1]`` for a layer-level selection or ``[Hkv]``.
        """
        wanted = torch.tensor(list(token_indices))
        return [
            torch.stack([torch.isin(wanted, row).float().mean() for row in layer.origin[0].cpu()])
            for layer in (cache or self.answer_cache).layers
        ]

    def stats(self) -> dict:
        """Counters of the read so far (tokens, chunks, peak states per layer, time split)."""
        caches = [self.cache] + ([self.instruction_cache] if self.instruction_cache is not None else [])
        t = dict(self.timings)
        evict = t.get("score", 0.0) + t.get("topk", 0.0) + t.get("compact", 0.0)
        return {
            "tokens_read": self.tokens_read,
            "chunks": self.chunks,
            "peak_states_per_layer": [sum(p) for p in zip(*(c.peak_states() for c in caches))],
            "stored_states_per_layer": [sum(s) for s in zip(*(c.stored_states() for c in caches))],
            "max_position": self.max_position,
            "time_s": t.get("model", 0.0),
            "forward_s": t.get("model", 0.0) - evict,
            "score_s": t.get("score", 0.0),
            "topk_s": t.get("topk", 0.0),
            "compact_s": t.get("compact", 0.0),
        }
