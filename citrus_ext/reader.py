"""The chunked reader: reads documents chunk by chunk in bounded memory, then answers.

:class:`ChunkedReader` is the lower-level API: custom code may call :meth:`ChunkedReader.read_chunk`
itself, inspect ``reader.cache`` (one :class:`~citrus_ext.compat.CitrusLayer` per layer, keys
stored before RoPE), or score a layer itself (:meth:`ChunkedReader.rotated_keys`, e.g. with
``torch.ops.citrus.evict``) and apply the selection (:meth:`ChunkedReader.keep`).

A reader holds a batch of rows read together: documents of different lengths, each with its own
instruction. Rows are left-padded per segment inside a forward, caches are padded to the longest
row, and a row that has finished reading is left untouched by later chunks, so every row ends
as it would alone.
"""
from __future__ import annotations

import time
from collections import defaultdict
from typing import Callable, Optional, Sequence, Union

import torch

from . import attention, compat
from .attention import Layout, Step, rotate, settle_layer
from .compat import CitrusCache
from .graphs import ForwardGraphs, signature
from .policies import Policy

POSITIONS = ("relative", "original")
Rows = Union[torch.Tensor, Sequence[torch.Tensor]]


def as_rows(tokens: Rows) -> list[torch.Tensor]:
    """Token ids as one 1-D tensor per row (from ``[B, n]``, ``[n]`` or a list of 1-D tensors)."""
    if isinstance(tokens, torch.Tensor):
        return [tokens] if tokens.dim() == 1 else list(tokens)
    return [torch.as_tensor(row, dtype=torch.long) for row in tokens]


class ChunkedReader:
    """Reads a batch of documents with a policy; answers with the final stage of SPEC.

    Parameters
    ----------
    model : a supported causal LM (see :func:`compat.check_supported`).
    policy : the eviction policy (:func:`citrus_ext.policies.make_policy`).
    chunk_size : int, ``l_s``, tokens per chunk.
    positions : ``"relative"`` (SPEC default: positions relative to the cache) or ``"original"``.
    cuda_graphs : bool, on a CUDA model in relative positions, capture a forward whose shapes were
        seen before in a CUDA graph and replay it (:mod:`citrus_ext.graphs`): once the cache is
        full every chunk is one replay instead of thousands of launches. Costs the memory of one
        forward's activations per kept graph (two at most).
    """

    def __init__(self, model, policy: Policy, chunk_size: int, positions: str = "relative",
                 cuda_graphs: bool = True) -> None:
        compat.check_supported(model)
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"citrus: `chunk_size` must be an integer >= 1, got {chunk_size!r}")
        if positions not in POSITIONS:
            raise ValueError(f"citrus: `positions` must be one of {POSITIONS}, got {positions!r}")
        self.model, self.policy, self.chunk_size, self.positions = model, policy, chunk_size, positions
        self.specs = compat.layer_specs(model)
        self.device = next(model.parameters()).device
        self.cache = CitrusCache(len(self.specs))
        self.instruction_cache = CitrusCache(len(self.specs)) if policy.instruction_cache else None
        self.tokens_read: Optional[torch.Tensor] = None  # document tokens read, per row
        self.next_index: Optional[torch.Tensor] = None  # true index of each row's next token
        self.chunks = 0
        self.max_position = 0
        self.timings: dict[str, float] = defaultdict(float)
        on_cuda = self.device.type == "cuda" and positions == "relative"
        self.graphs: Optional[ForwardGraphs] = ForwardGraphs() if cuda_graphs and on_cuda else None

    @property
    def answer_cache(self) -> CitrusCache:
        """The cache the answer is read from (the instruction cache in CItruS individual)."""
        return self.instruction_cache if self.instruction_cache is not None else self.cache

    def _start(self, rows: int) -> None:
        if self.next_index is None:
            self.next_index = torch.zeros(rows, dtype=torch.long)
            self.tokens_read = torch.zeros(rows, dtype=torch.long)
        elif len(self.next_index) != rows:
            raise ValueError(f"citrus: this reader holds {len(self.next_index)} rows, got {rows}")

    def forward(
        self,
        cache: CitrusCache,
        parts: list[tuple[str, list[torch.Tensor]]],
        *,
        evict: bool,
        keep: tuple[str, ...],
        scorer: str = "chunk",
        mirror: Optional[CitrusCache] = None,
    ) -> torch.Tensor:
        """One model forward over named segments of new tokens (one 1-D tensor per row each).

        Each segment is left-padded to its longest row. Returns the logits ``[B, V]`` at the last
        position (a real token of the last segment in every row that has one).
        """
        rows = len(parts[0][1])
        self._start(rows)
        lengths = torch.tensor([[len(part[b]) for _, part in parts] for b in range(rows)], dtype=torch.long)
        widths = lengths.amax(0).tolist()
        ids = torch.cat(
            [
                torch.stack([torch.cat([r.new_zeros(width - len(r)), r]) for r in part])
                for (_, part), width in zip(parts, widths)
            ],
            dim=1,
        )
        # Pinned and asynchronous: a copy from pageable memory would wait for the device.
        if ids.device.type == "cpu" and self.device.type == "cuda":
            ids = ids.pin_memory()
        ids = ids.to(self.device, non_blocking=True)
        layout = Layout([(name, width) for (name, _), width in zip(parts, widths)], lengths)
        step = Step(cache, self.specs, layout, self.next_index, self.policy if evict else None, scorer, keep,
                    self.positions, mirror, self.timings)
        static = {"ids": ids, **step.device_inputs(self.device)}

        def run(static: dict) -> tuple[torch.Tensor, int]:
            step.use_device_inputs(static)
            with torch.no_grad(), compat.citrus_attention_enabled(self.model):
                out = self.model(
                    input_ids=static["ids"],
                    position_ids=compat.identity_position_ids(ids.shape[0], ids.shape[1], ids.device),
                    past_key_values=cache,
                    use_cache=True,
                    logits_to_keep=1,
                    citrus_step=step,
                )
            return out.logits[:, -1], step.max_position

        t0 = time.perf_counter()
        # Graphs are off while a benchmark synchronises inside steps or a test checks counts on the host.
        if self.graphs is not None and not attention.SYNC_TIMINGS and not attention.CHECK_COUNTS:
            caches = [cache] + ([mirror] if mirror is not None else [])
            key = signature(caches, (tuple(layout.segments), tuple(map(tuple, lengths.tolist())), evict, keep,
                                     scorer, mirror is not None))
            logits, max_position = self.graphs.run(key, caches, static, run, keepalive=step)
        else:
            logits, max_position = run(static)
        self.timings["model"] += time.perf_counter() - t0
        self.max_position = max(self.max_position, max_position)
        return logits

    def read_chunk(self, chunk: Rows, instruction: Rows) -> None:
        """Read one chunk per row (a row with an empty chunk is left as it is)."""
        chunks, instructions = as_rows(chunk), as_rows(instruction)
        # A row that is not reading does not encode its instruction either.
        instructions = [i if len(c) else i[:0] for c, i in zip(chunks, instructions)]
        policy = self.policy
        if policy.instruction_cache:
            if self.chunks:
                self.forward(self.instruction_cache, [("instruction", instructions)], evict=True, keep=(),
                             scorer="instruction")
            self.forward(self.cache, [("chunk", chunks)], evict=True, keep=("chunk",), mirror=self.instruction_cache)
        elif policy.instruction_each_chunk:
            self.forward(self.cache, [("chunk", chunks), ("instruction", instructions)], evict=True, keep=("chunk",),
                         scorer="instruction")
        else:
            self.forward(self.cache, [("chunk", chunks)], evict=policy.evicts, keep=("chunk",))
        read = torch.tensor([len(c) for c in chunks], dtype=torch.long)
        self.tokens_read += read
        self.next_index += read
        self.chunks += 1

    def read(self, document: Rows, instruction: Rows, progress: Optional[Callable[[int, int], None]] = None) -> None:
        """Read every row's document chunk by chunk; ``progress(done, total)`` is called after each chunk."""
        documents = as_rows(document)
        total = max(-(-len(d) // self.chunk_size) for d in documents)
        for i in range(total):
            start = i * self.chunk_size
            self.read_chunk([d[start : start + self.chunk_size] for d in documents], instruction)
            if progress is not None:
                progress(i + 1, total)

    def prune(self, instruction: Rows) -> None:
        """SPEC's final stage, first half: encode the instruction over the answer cache, keep the
        top ``budget`` states by its scores and drop its states."""
        if self.policy.evicts:
            self.forward(self.answer_cache, [("instruction", as_rows(instruction))], evict=True, keep=(),
                         scorer="instruction")

    def encode_instruction(self, instruction: Rows) -> torch.Tensor:
        """Encode the instruction over the (pruned) answer cache, keeping its states; returns the
        logits ``[B, V]`` at its last position."""
        rows = as_rows(instruction)
        logits = self.forward(self.answer_cache, [("instruction", rows)], evict=False, keep=("instruction",))
        self.next_index += torch.tensor([len(r) for r in rows], dtype=torch.long)
        return logits

    def decode(self, logits: torch.Tensor, max_new_tokens: int, eos: Sequence[int]) -> list[list[int]]:
        """Greedy decoding from ``logits [B, V]`` (no eviction) until eos or ``max_new_tokens`` per row."""
        tokens: list[list[int]] = [[] for _ in range(len(logits))]
        done = [False] * len(logits)
        while True:
            step = []
            for b, token in enumerate(logits.argmax(-1).tolist()):
                if done[b]:
                    step.append(torch.zeros(0, dtype=torch.long))
                    continue
                tokens[b].append(token)
                done[b] = token in eos or len(tokens[b]) == max_new_tokens
                step.append(torch.zeros(0, dtype=torch.long) if done[b] else torch.tensor([token]))
            if all(done):
                return tokens
            logits = self.forward(self.answer_cache, [("token", step)], evict=False, keep=("token",))
            self.next_index += torch.tensor([len(s) for s in step], dtype=torch.long)

    def generate(self, instruction: Rows, max_new_tokens: int, eos: Sequence[int]) -> list[list[int]]:
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
            positions = layer.origin.clamp(min=0)
        return rotate(layer.keys, positions, self.specs[layer_idx].inv_freq)

    def keep(self, layer_idx: int, kept: torch.Tensor, cache: Optional[CitrusCache] = None) -> None:
        """Keep only the states ``kept [B, 1 or Hkv, K]`` (ascending, ``-1`` = none) of a layer,
        e.g. the indices ``torch.ops.citrus.evict`` returned."""
        layer = (cache or self.cache).layers[layer_idx]
        b, c = layer.keys.shape[0], layer.stored
        none = torch.zeros(b, 0, dtype=torch.bool, device=layer.keys.device)
        settle_layer(layer, c, kept, none, none.long(), {}, self.specs[layer_idx].window)

    def retention(self, token_indices: Sequence[int], row: int = 0,
                  cache: Optional[CitrusCache] = None) -> list[torch.Tensor]:
        """Share of the given token indices (e.g. a needle's) of ``row`` still cached, per layer and
        KV head: one float tensor per layer, ``[1]`` for a layer-level selection or ``[Hkv]``."""
        wanted = torch.tensor(list(token_indices))
        return [
            torch.stack([torch.isin(wanted, kept).float().mean() for kept in layer.origin[row].cpu()])
            for layer in (cache or self.answer_cache).layers
        ]

    def stats(self, row: int = 0) -> dict:
        """Counters of the read so far for ``row`` (tokens, chunks, peak states per layer, time split)."""
        caches = [self.cache] + ([self.instruction_cache] if self.instruction_cache is not None else [])
        t = dict(self.timings)
        evict = t.get("score", 0.0) + t.get("topk", 0.0) + t.get("compact", 0.0)
        return {
            "tokens_read": int(self.tokens_read[row]),
            "chunks": self.chunks,
            "peak_states_per_layer": [sum(p) for p in zip(*(c.peak_states() for c in caches))],
            "stored_states_per_layer": [sum(int(layer.lens[row]) for layer in layers) for layers in
                                        zip(*(c.layers for c in caches))],
            "max_position": self.max_position,
            "time_s": t.get("model", 0.0),
            "forward_s": t.get("model", 0.0) - evict,
            "score_s": t.get("score", 0.0),
            "topk_s": t.get("topk", 0.0),
            "compact_s": t.get("compact", 0.0),
        }
