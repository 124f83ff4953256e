"""Everything that depends on the transformers version (written against 5.17).

The rest of the package talks to transformers only through this module: the cache-layer class,
the registered attention and mask functions, and the per-layer model facts (RoPE frequencies,
sliding windows, which architectures are supported).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

ATTENTION_NAME = "citrus"
"""Name under which the CItruS attention and mask functions are registered."""

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
_UNSUPPORTED_ROPE = ("dynamic", "longrope")  # their frequencies depend on the sequence length


@dataclass(frozen=True)
class LayerSpec:
    """What the reader must know about one decoder layer.

    Attributes
    ----------
    inv_freq : Tensor ``[D/2]`` float32, the RoPE inverse frequencies of this layer.
    window : int or None, the sliding window of the layer (keys within ``window - 1`` positions).
    plain_window : bool, the layer is a sliding layer of a hybrid model: it keeps a plain window
        and is never score-evicted.
    """

    inv_freq: torch.Tensor
    window: Optional[int]
    plain_window: bool


def _text_model(model: torch.nn.Module) -> torch.nn.Module:
    return model.model if hasattr(model, "model") else model


def check_supported(model: torch.nn.Module) -> None:
    """Raise ``ValueError`` (naming ``model``) when the model cannot be read by CItruS.

    Parameters
    ----------
    model : a causal LM from transformers.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"citrus: `model` of type {model_type!r} is not supported; "
            f"supported types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if not model._can_set_attn_implementation():
        raise ValueError(
            f"citrus: `model` ({type(model).__name__}) does not route attention through AttentionInterface"
        )
    if getattr(config, "attn_logit_softcapping", None):
        raise ValueError("citrus: `model` uses attention logit soft-capping, which the lse-based scores do not model")
    rope = getattr(config, "rope_parameters", None) or {}
    for params in rope.values() if "rope_type" not in rope else [rope]:
        if isinstance(params, dict) and params.get("rope_type") in _UNSUPPORTED_ROPE:
            raise ValueError(f"citrus: `model` uses rope_type {params['rope_type']!r}, which is not supported")


def layer_specs(model: torch.nn.Module) -> list[LayerSpec]:
    """Per-layer RoPE frequencies and windows of a supported model."""
    config = model.config
    rotary = _text_model(model).rotary_emb
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    hybrid = len(set(layer_types)) > 1
    specs = []
    for layer_type in layer_types:
        # Gemma3 keeps one set of frequencies per layer type; the others have one for all layers.
        inv_freq = getattr(rotary, f"{layer_type}_inv_freq", None)
        if inv_freq is None:
            inv_freq = rotary.inv_freq
        sliding = layer_type == "sliding_attention" or (not hybrid and getattr(config, "sliding_window", None))
        window = config.sliding_window if sliding else None
        specs.append(LayerSpec(inv_freq.float(), window, hybrid and layer_type == "sliding_attention"))
    return specs


def identity_position_ids(batch: int, length: int, device: torch.device) -> torch.Tensor:
    """Position ids that make the model's own RoPE the identity (cos = scaling, sin = 0).

    The model then hands the attention function un-rotated queries and keys; CItruS rotates them
    itself at their current positions (SPEC "Positions"). RoPE types whose ``attention_scaling`` is
    not 1 still multiply both by that factor, which is the scaling the model wants anyway.
    """
    return torch.zeros(batch, length, dtype=torch.long, device=device)


class CitrusLayer(CacheLayerMixin):
    """One layer's cache: un-rotated keys, values, and each state's true token index.

    Attributes
    ----------
    keys, values : Tensor ``[B, Hkv, L, D]``; keys are stored before RoPE.
    origin : Tensor ``[B, 1 or Hkv, L]`` int64, the token index each state came from (the row
        count is ``Hkv`` once a head-level selection made heads differ).
    aux : dict of Tensor ``[B, R, L]`` float32, per-state values a policy carries along (H2O's
        accumulated attention), compacted with the states.
    lens : Tensor ``[B]`` int64, valid states per row: rows of a ragged batch hold their states
        first and padding (origin ``-1``) after, up to the width ``L``.
    lens_host : the same on the CPU, so the reader plans each layer without waiting for the device.
    peak : int, the most states this layer ever held (including a forward's new states).
    """

    is_compileable = False
    is_sliding = False

    def __init__(self) -> None:
        super().__init__()
        self.origin: Optional[torch.Tensor] = None
        self.aux: dict[str, torch.Tensor] = {}
        self.lens: Optional[torch.Tensor] = None
        self.lens_host: Optional[torch.Tensor] = None
        self.peak = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_empty((b, h, 0, d))
        self.values = value_states.new_empty((b, h, 0, value_states.shape[-1]))
        self.origin = torch.empty((b, 1, 0), dtype=torch.long, device=self.device)
        self.lens = torch.zeros(b, dtype=torch.long, device=self.device)
        self.lens_host = torch.zeros(b, dtype=torch.long)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append new states (the attention function settles their fate right after attention)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.peak = max(self.peak, self.keys.shape[-2])
        return self.keys, self.values

    @property
    def stored(self) -> int:
        """Width of the settled states (those with an origin), excluding a forward's pending ones."""
        return 0 if self.origin is None else self.origin.shape[-1]

    def get_seq_length(self) -> int:
        return self.stored

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.stored + query_length, 0

    def get_max_length(self) -> int:
        return -1


class CitrusCache(Cache):
    """A cache of :class:`CitrusLayer`, one per decoder layer, plus the reader's bookkeeping.

    Parameters
    ----------
    num_layers : int, number of decoder layers.
    """

    def __init__(self, num_layers: int) -> None:
        super().__init__(layers=[CitrusLayer() for _ in range(num_layers)])

    def peak_states(self) -> list[int]:
        """Most states each layer held at any time (the attention span during a forward)."""
        return [layer.peak for layer in self.layers]

    def stored_states(self) -> list[int]:
        """States each layer holds now."""
        return [layer.stored for layer in self.layers]


def _plain_mask(*args, **kwargs):
    # Outside a CItruS read the function behaves as SDPA; a boolean mask keeps padding honoured.
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def register_attention(attention: Callable) -> None:
    """Register ``attention`` and its mask function under :data:`ATTENTION_NAME`."""
    AttentionInterface.register(ATTENTION_NAME, attention)
    AttentionMaskInterface.register(ATTENTION_NAME, _plain_mask)


def plain_attention(*args, **kwargs):
    """SDPA attention of transformers, used when no CItruS step is attached to a forward."""
    return sdpa_attention_forward(*args, **kwargs)


@contextlib.contextmanager
def citrus_attention_enabled(model: torch.nn.Module) -> Iterator[None]:
    """Switch ``model`` to the CItruS attention function for the duration of the block (re-entrant)."""
    previous = model.config._attn_implementation
    if previous == ATTENTION_NAME:
        yield
        return
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def eos_token_ids(model: torch.nn.Module, tokenizer) -> set[int]:
    """End-of-sequence ids from the tokenizer and the model's generation config."""
    ids: set[int] = set()
    for source in (getattr(tokenizer, "eos_token_id", None), getattr(model.generation_config, "eos_token_id", None)):
        if source is None:
            continue
        ids.update(source if isinstance(source, (list, tuple)) else [source])
    return ids
