"""CUDA graphs of a reader's forwards: one launch for a whole chunk (model, RoPE, attention, eviction).

Reading is a loop of identical forwards: once the cache is full, every chunk sees a cache of the
same width and leaves one of the same width. Launched op by op, such a forward is bound by the
host (thousands of kernel launches per chunk, each a few microseconds of Python and driver time),
not by the GPU. A forward whose *signature* (the shapes and host-known lengths of every cache
layer it touches, and the new tokens' layout) has been seen before is captured once and replayed
afterwards.

This works because a forward never writes into the tensors it reads: every cache update assigns
new tensors (``torch.cat``, ``compact_kv``, gathers). So the state before a forward is a set of
references that a capture keeps as its inputs; the state after it is the set of tensors the graph
writes. A replay copies the current state into the captured inputs, replays, and points the cache
at the outputs. The few host values a forward changes (``lens_host``, ``peak``) are recorded at
capture; they depend only on the signature.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .compat import CitrusCache, CitrusLayer

_STATE = ("keys", "values", "origin", "lens")  # device tensors of a layer
_HOST = ("lens_host", "peak")  # host values a forward changes


def _layer_state(layer: CitrusLayer) -> dict:
    state = {name: getattr(layer, name) for name in _STATE + _HOST}
    state["aux"] = dict(layer.aux)
    return state


def _set_layer_state(layer: CitrusLayer, state: dict) -> None:
    for name in _STATE + _HOST:
        setattr(layer, name, state[name])
    layer.aux = dict(state["aux"])


def _device_tensors(state: dict) -> list[torch.Tensor]:
    return [state[name] for name in _STATE] + [state["aux"][k] for k in sorted(state["aux"])]


_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _side_stream(device: int) -> torch.cuda.Stream:
    # One warm-up stream per device for every reader: libraries keep per-stream workspaces
    # (cuBLAS: 32 MiB), so a fresh stream per capture would leave one more behind each time.
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


def signature(caches: list[CitrusCache], layout_key: tuple) -> Optional[tuple]:
    """What a forward's captured work depends on, or ``None`` if some layer is still empty."""
    parts = [layout_key]
    for cache in caches:
        for layer in cache.layers:
            if not layer.is_initialized or layer.origin is None:
                return None
            parts.append((tuple(layer.keys.shape), tuple(layer.values.shape), tuple(layer.origin.shape),
                          tuple(layer.lens_host.tolist()), layer.keys.dtype,
                          tuple((k, tuple(v.shape)) for k, v in sorted(layer.aux.items()))))
    return tuple(parts)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: list[dict]  # per layer (over all caches): the state the capture read
    outputs: list[dict]  # per layer: the state the graph writes (host values as after the capture)
    static: dict  # name -> device tensor the forward reads that a replay refreshes (ids, ...)
    result: torch.Tensor
    info: object  # the forward's host-side result at capture (depends only on the signature)
    keepalive: object  # what holds tensors the replays read besides the state (RoPE tables, masks, ...)


class ForwardGraphs:
    """Captures and replays a reader's forwards on CUDA (see the module docstring).

    Parameters
    ----------
    max_graphs : int, graphs kept at once (least recently used dropped); each holds its own
        memory pool of one forward's activations.
    max_seen : int, signatures remembered while waiting for their second sighting (least recently
        seen dropped). Decoding meets a new signature per token; without a bound the counts would
        grow for the reader's whole life.
    """

    def __init__(self, max_graphs: int = 2, max_seen: int = 64) -> None:
        self.max_graphs = max_graphs
        self.max_seen = max_seen
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.seen: OrderedDict[tuple, None] = OrderedDict()  # an ordered set: oldest first
        self.failed: set = set()
        self.warned = False
        self.replays = 0
        self.captures = 0

    def run(self, key: Optional[tuple], caches: list[CitrusCache], static: dict[str, torch.Tensor],
            forward: Callable[[dict], tuple], keepalive: object = None) -> tuple:
        """Run ``forward(static)`` eagerly, or through a graph when ``key`` has been seen before.

        ``forward`` reads its per-forward device inputs from ``static`` (a replay copies the new
        values into the captured ones), updates ``caches`` and returns ``(tensor, info)``: a device
        result (a replay returns a copy of it) and a host-side result (recorded at capture).
        ``keepalive`` stays with a captured graph: the object holding the other tensors the forward
        reads. It must not refer back to the owner of these graphs, or their memory lives until the
        garbage collector finds the cycle.
        """
        if key is None:
            return forward(static)
        layers = [layer for cache in caches for layer in cache.layers]
        entry = self.graphs.get(key)
        if entry is not None:
            self.graphs.move_to_end(key)
            return self._replay(entry, layers, static)
        if key not in self.seen:  # first sighting: run eagerly; a shape seen once is not worth a graph
            self.seen[key] = None
            while len(self.seen) > self.max_seen:
                self.seen.popitem(last=False)
            return forward(static)
        self.seen.move_to_end(key)
        if key in self.failed:
            return forward(static)
        try:
            entry = self._capture(layers, static, forward, keepalive)
        except Exception as e:  # a forward that cannot be captured still runs, eagerly
            self.failed.add(key)
            if not self.warned:
                warnings.warn(f"citrus: a forward could not be captured in a CUDA graph and runs eagerly "
                              f"({type(e).__name__}: {str(e)[:200]})")
                self.warned = True
            return forward(static)
        self.graphs[key] = entry
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        return self._replay(entry, layers, static)

    def _capture(self, layers: list[CitrusLayer], static: dict, forward: Callable, keepalive: object) -> _Graph:
        before = [_layer_state(layer) for layer in layers]
        # Warm-up on a side stream (as torch.cuda.graphs asks): lazy initialisations and the
        # forward's host-to-device copies happen here, outside the capture. Then the cache is
        # put back: nothing was written into its tensors.
        side = _side_stream(torch.cuda.current_device())
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            forward(static)
        torch.cuda.current_stream().wait_stream(side)
        for layer, state in zip(layers, before):
            _set_layer_state(layer, state)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                result, info = forward(static)
            outputs = [_layer_state(layer) for layer in layers]
        finally:
            for layer, state in zip(layers, before):
                _set_layer_state(layer, state)
        self.captures += 1
        return _Graph(graph, before, outputs, static, result, info, keepalive)

    def _replay(self, entry: _Graph, layers: list[CitrusLayer], static: dict) -> torch.Tensor:
        targets, sources = [], []
        for name, tensor in static.items():
            if entry.static[name] is not tensor:
                targets.append(entry.static[name])
                sources.append(tensor)
        for layer, captured in zip(layers, entry.inputs):
            for target, source in zip(_device_tensors(captured), _device_tensors(_layer_state(layer))):
                if target is not source:
                    targets.append(target)
                    sources.append(source)
        if targets:
            torch._foreach_copy_(targets, sources)
        entry.graph.replay()
        for layer, state in zip(layers, entry.outputs):
            _set_layer_state(layer, state)
        self.replays += 1
        return entry.result.clone(), entry.info
