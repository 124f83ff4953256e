"""A plain-PyTorch reference of SPEC for Llama-style models, written for clarity, not speed.

It runs the decoder one layer at a time with materialised attention probabilities and keeps
its own per-layer cache of un-rotated keys, values and token indices. It implements CSE, CItruS
shared and CItruS individual (layer-level selection, relative positions) and the final stage, and
records which token indices every layer keeps after every step, so the fast path can be compared
with it state by state.
"""
from __future__ import annotations

import torch


def rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """RoPE of ``x [H, L, D]`` at integer ``positions [L]`` (rotate-half convention)."""
    angles = positions.float()[:, None] * inv_freq[None, :]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


class LayerCache:
    """One layer's states: un-rotated keys ``[Hkv, L, D]``, values, and token indices ``[L]``."""

    def __init__(self, hkv: int, d: int) -> None:
        self.keys = torch.zeros(hkv, 0, d)
        self.values = torch.zeros(hkv, 0, d)
        self.index = torch.zeros(0, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.index)

    def keep(self, positions: torch.Tensor) -> None:
        self.keys, self.values, self.index = self.keys[:, positions], self.values[:, positions], self.index[positions]

    def append(self, keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor) -> None:
        self.keys = torch.cat([self.keys, keys], 1)
        self.values = torch.cat([self.values, values], 1)
        self.index = torch.cat([self.index, index])


class ReferenceReader:
    """SPEC's chunked reading, one layer at a time.

    Parameters
    ----------
    model : a Llama-family ``*ForCausalLM`` (Llama, Mistral, Qwen2, Qwen3), float32.
    method : ``"cse"``, ``"citrus_shared"`` or ``"citrus_individual"``.
    budget, chunk_size : ``k`` and ``l_s``.
    """

    def __init__(self, model, method: str, budget: int, chunk_size: int) -> None:
        self.model, self.method, self.budget, self.chunk_size = model, method, budget, chunk_size
        cfg = model.config
        self.hq, self.hkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.inv_freq = model.model.rotary_emb.inv_freq.float()
        layers = cfg.num_hidden_layers
        self.cache = [LayerCache(self.hkv, self.d) for _ in range(layers)]
        self.instruction_cache = [LayerCache(self.hkv, self.d) for _ in range(layers)]
        self.next_index = 0
        self.history: list[list[torch.Tensor]] = []  # token indices kept per layer, after each step

    # --- one layer -------------------------------------------------------------------------

    def project(self, layer, x: torch.Tensor):
        """Un-rotated q ``[Hq, n, D]``, k and v ``[Hkv, n, D]`` of hidden states ``x [n, hidden]``."""
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = attn.q_proj(h).view(-1, self.hq, self.d).transpose(0, 1)
        k = attn.k_proj(h).view(-1, self.hkv, self.d).transpose(0, 1)
        v = attn.v_proj(h).view(-1, self.hkv, self.d).transpose(0, 1)
        if hasattr(attn, "q_norm"):  # Qwen3 normalises q and k per head before RoPE
            q, k = attn.q_norm(q), attn.k_norm(k)
        return q, k, v

    def attend(self, layer, x, q, k, v, cache: LayerCache):
        """Attention of the new tokens over ``cache`` and themselves (causal).

        Returns the layer output ``[n, hidden]`` and the probabilities ``[Hq, n, c + n]``.
        """
        c, n = len(cache), x.shape[0]
        positions = torch.arange(c + n)
        keys = rope(torch.cat([cache.keys, k], 1), positions, self.inv_freq)
        values = torch.cat([cache.values, v], 1)
        queries = rope(q, positions[c:], self.inv_freq)
        group = self.hq // self.hkv
        keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
        logits = queries @ keys.transpose(1, 2) * layer.self_attn.scaling
        visible = torch.ones(n, c + n, dtype=torch.bool)
        visible[:, c:] = torch.ones(n, n, dtype=torch.bool).tril()
        probs = logits.masked_fill(~visible, float("-inf")).softmax(-1)
        out = (probs @ values).transpose(0, 1).reshape(n, -1)
        h = x + layer.self_attn.o_proj(out)
        return h + layer.mlp(layer.post_attention_layernorm(h)), probs

    def evict(self, cache: LayerCache, probs: torch.Tensor) -> None:
        """Keep the top-``budget`` cache states by mean attention (ties to the lower index), in order."""
        c = len(cache)
        if c <= self.budget:
            return
        score = probs[:, :, :c].mean(dim=(0, 1))
        order = sorted(range(c), key=lambda j: (-float(score[j]), j))
        cache.keep(torch.tensor(sorted(order[: self.budget])))

    # --- steps --------------------------------------------------------------------------------

    def encode(self, ids: torch.Tensor, caches: list[LayerCache], *, evict: bool, append: bool,
               also: list[LayerCache] | None = None) -> torch.Tensor:
        """Run ``ids`` through every layer over ``caches``; optionally evict by their own queries,
        then append their states (also to ``also``). Returns the final hidden states."""
        x = self.model.model.embed_tokens(ids)
        index = torch.arange(len(ids)) + self.next_index
        for l, layer in enumerate(self.model.model.layers):
            q, k, v = self.project(layer, x)
            x, probs = self.attend(layer, x, q, k, v, caches[l])
            if evict:
                self.evict(caches[l], probs)
            if append:
                caches[l].append(k, v, index)
                if also is not None:
                    also[l].append(k, v, index)
        return self.model.model.norm(x)

    def read_chunk_shared(self, chunk: torch.Tensor, instruction: torch.Tensor) -> None:
        """CItruS shared: chunk and instruction both see the pre-eviction cache; I scores it."""
        x = self.model.model.embed_tokens(chunk)
        y = self.model.model.embed_tokens(instruction)
        index = torch.arange(len(chunk)) + self.next_index
        for l, layer in enumerate(self.model.model.layers):
            q, k, v = self.project(layer, x)
            qi, ki, vi = self.project(layer, y)
            x, _ = self.attend(layer, x, q, k, v, self.cache[l])
            y, probs = self.attend(layer, y, qi, ki, vi, self.cache[l])
            self.evict(self.cache[l], probs)
            self.cache[l].append(k, v, index)

    def read(self, document: torch.Tensor, instruction: torch.Tensor) -> None:
        """Read ``document [N]`` chunk by chunk."""
        with torch.no_grad():
            for start in range(0, len(document), self.chunk_size):
                chunk = document[start : start + self.chunk_size]
                if self.method == "cse":
                    self.encode(chunk, self.cache, evict=True, append=True)
                elif self.method == "citrus_shared":
                    self.read_chunk_shared(chunk, instruction)
                else:
                    if len(self.instruction_cache[0]):
                        self.encode(instruction, self.instruction_cache, evict=True, append=False)
                    self.encode(chunk, self.cache, evict=True, append=True, also=self.instruction_cache)
                self.next_index += len(chunk)
                self.history.append(self.snapshot())

    def snapshot(self) -> list[torch.Tensor]:
        """Token indices held per layer: the context cache, then (individual) the instruction cache."""
        caches = self.cache + (self.instruction_cache if self.method == "citrus_individual" else [])
        return [c.index.clone() for c in caches]

    @property
    def answer_cache(self) -> list[LayerCache]:
        return self.instruction_cache if self.method == "citrus_individual" else self.cache

    def generate(self, instruction: torch.Tensor, max_new_tokens: int, eos: set[int]) -> list[int]:
        """Final stage (prune by I, encode I again) and greedy decoding."""
        with torch.no_grad():
            self.encode(instruction, self.answer_cache, evict=True, append=False)
            self.history.append(self.snapshot())
            h = self.encode(instruction, self.answer_cache, evict=False, append=True)
            self.next_index += len(instruction)
            tokens = []
            for _ in range(max_new_tokens):
                token = int(self.model.lm_head(h[-1]).argmax())
                tokens.append(token)
                if token in eos:
                    break
                h = self.encode(torch.tensor([token]), self.answer_cache, evict=False, append=True)
                self.next_index += 1
            return tokens
