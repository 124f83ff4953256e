"""The only place the harness touches the library and the texts: everything else is injected.

The runner takes an *answer function* and a *log-prob reader* as parameters; this module builds
the real ones from a model (``citrus_ext.answer`` and the chunked reader) and loads the model and
the KJV text. Imports are lazy so that the harness and its tests run without a model.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Optional

import torch


def load_model(path: Optional[str] = None, *, dtype: str = "float32", device: str = "cpu"):
    """Load ``(model, tokenizer)``: the default SmolLM2-135M-Instruct, or a local HF folder.

    See ``citrus_ext.models.load_model``.
    """
    from citrus_ext.models import load_model as load

    return load(path, dtype=dtype, device=device)


def answer_fn(model, tokenizer) -> Callable:
    """The runner's answer function for ``model``: ``citrus_ext.answer``'s read, final stage and
    greedy decoding, plus how much of the needles the cache kept.

    It follows :func:`citrus_ext.answer` step by step through the public
    ``citrus_ext.ChunkedReader`` API (a test checks both give the same tokens) and, between the
    steps, reads each layer's ``origin`` (the token index of every kept state).

    Returns
    -------
    callable
        ``fn(document, instruction, *, method, budget, chunk_size, max_new_tokens, needle_spans,
        **options) -> Answer``; ``needle_spans`` are token spans in the document. The answer's
        stats add ``needle_kept_read`` (after the document is read) and ``needle_kept_final``
        (after the instruction's final pruning): per layer, the share of needle tokens whose
        states are in the answer cache (averaged over KV heads for a head-level selection); and
        ``needle_map``, which of the needle's tokens each layer kept at the end (:func:`needle_map`).
        ``inspect(cache, doc_ids, offset, needle)``, when given, sees the answer cache after the
        final pruning (``offset``: the chat template's tokens before the document), as
        ``benchmarks/inspect_cell.py`` does.
    """
    from citrus_ext import Answer, ChunkedReader, compat, make_policy

    def run(document, instruction, *, method, budget, chunk_size, max_new_tokens, needle_spans=(),
            inspect: Optional[Callable] = None, **options):
        start = time.perf_counter()
        compat.check_supported(model)
        doc_ids, instr_ids, offset, needle = prompt_ids(tokenizer, document, instruction, needle_spans)
        reader = ChunkedReader(model, make_policy(method, budget, **options), chunk_size)
        device = next(model.parameters()).device
        instr = torch.tensor([instr_ids], device=device)
        reader.read(torch.tensor([doc_ids], device=device), instr)
        kept_read = needle_kept(reader.answer_cache, needle)
        reader.prune(instr)
        kept_final = needle_kept(reader.answer_cache, needle)
        kept_map = needle_map(reader.answer_cache, needle)
        if inspect is not None:
            inspect(reader.answer_cache, doc_ids, offset, needle)
        (tokens,) = reader.decode(reader.encode_instruction(instr), max_new_tokens,
                                  compat.eos_token_ids(model, tokenizer))  # one row
        stats = reader.stats()
        stats.update(instruction_tokens=len(instr_ids), wall_s=time.perf_counter() - start,
                     needle_kept_read=kept_read, needle_kept_final=kept_final, needle_map=kept_map)
        return Answer(tokenizer.decode(tokens, skip_special_tokens=True), tokens, stats)

    return run


def prompt_ids(tokenizer, document: str, instruction: str, needle_spans=()):
    """The prompt as the reader reads it, and where the needles are in it.

    Returns
    -------
    doc_ids, instr_ids : list of int
        :func:`citrus_ext.split_prompt`: the chat template's head and the document, then the
        instruction and the template's tail.
    offset : int
        Tokens of the template's head before the document.
    needle : Tensor of int64
        The token indices of ``needle_spans`` (spans in the document's own tokens) in the reader's
        numbering.
    """
    from citrus_ext import split_prompt
    from citrus_ext.texts import count_tokens

    doc_ids, instr_ids = split_prompt(tokenizer, document, instruction)
    offset = len(doc_ids) - count_tokens(tokenizer, document)
    needle = torch.tensor([offset + i for a, b in needle_spans for i in range(a, b)], dtype=torch.long)
    return doc_ids, instr_ids, offset, needle


def needle_kept(cache, needle: torch.Tensor) -> list[float]:
    """Per layer, the share of ``needle`` token indices among the states ``cache`` holds.

    Parameters
    ----------
    cache : citrus_ext.compat.CitrusCache
        Its layers' ``origin [1, 1 or Hkv, L]`` give the token index of every state.
    needle : Tensor of int64
        Token indices (in the reader's numbering) of the needles.

    Returns
    -------
    list of float
        One share per layer, averaged over KV heads when their selections differ; empty when
        ``needle`` is.
    """
    if needle.numel() == 0:
        return []
    return [float(_head_hits(layer, needle).float().mean()) for layer in cache.layers]


def needle_map(cache, needle: torch.Tensor) -> list[str]:
    """Per layer, one character per ``needle`` token: ``#`` kept (by every KV head), ``+`` kept by
    some heads only, ``.`` dropped. It shows *which* part of a needle survived, which the shares of
    :func:`needle_kept` cannot (e.g. a question's words kept and the answer after them dropped)."""
    out = []
    for layer in cache.layers:
        hits = _head_hits(layer, needle)
        n = hits.shape[0]
        out.append("".join("#" if h == n else "+" if h else "." for h in hits.sum(0).tolist()))
    return out


def _head_hits(layer, needle: torch.Tensor) -> torch.Tensor:
    """``[heads, len(needle)]``: whether each KV head's selection of ``layer`` holds each needle token
    (one row for a layer-level selection)."""
    return torch.stack([torch.isin(needle.to(row.device), row) for row in layer.origin[0]])


def model_info(model) -> dict:
    """Name, context window and KV bytes per state (one token, one layer) of ``model``."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    element = next(model.parameters()).element_size()
    # The folder's name, not its path: results compare across machines.
    return {"model": Path(getattr(config, "_name_or_path", "")).name or type(model).__name__,
            "window": int(config.max_position_embeddings),
            "layers": int(config.num_hidden_layers),
            "kv_bytes_per_state": int(2 * kv_heads * head_dim * element)}


def kjv_text(tokenizer, n_tokens: int) -> list[int]:
    """The first ``n_tokens`` tokens of the King James Bible (Genesis on), as token ids.

    Uses ``citrus_ext.texts.kjv_chapters``; chapters are joined by blank lines.
    """
    from citrus_ext.texts import kjv_chapters

    ids: list[int] = []
    for _, _, text in kjv_chapters():
        ids += tokenizer(text + "\n\n", add_special_tokens=False).input_ids
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
    raise ValueError(f"the KJV text holds only {len(ids)} tokens, fewer than {n_tokens}")


def read_logprobs(model, token_ids: list[int], method: str, budget: int, chunk_size: int,
                  instruction_ids: list[int], progress: Optional[Callable[[int, int], None]] = None,
                  **options) -> tuple[list[float], dict]:
    """Read ``token_ids`` chunk by chunk with eviction policy ``method``; NLL of every next token.

    This is the interface the perplexity mode expects from the library. It drives
    ``citrus_ext.ChunkedReader`` and recovers the chunk's logits from the final norm's output
    (the reader asks the model for the last position's logits only). If the library grows its own
    log-prob reader, this function becomes a call to it.

    Parameters
    ----------
    model : a causal LM supported by ``citrus_ext``.
    token_ids : list of int
        The text, without special tokens.
    method, budget, chunk_size, **options
        As for ``citrus_ext.answer``.
    instruction_ids : list of int
        The (generic) instruction that instruction-aware policies score the cache with.
    progress : callable, optional
        ``progress(done_chunks, total_chunks)``.

    Returns
    -------
    nll : list of float
        ``-log p(token_ids[i] | what the reader kept of token_ids[:i])`` for ``i >= 1``.
    stats : dict
        The reader's statistics (tokens read, peak states per layer, times).
    """
    from citrus_ext import ChunkedReader, make_policy

    reader = ChunkedReader(model, make_policy(method, budget, **options), chunk_size)
    head = model.get_output_embeddings()
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    hidden: list[torch.Tensor] = []
    handle = model.get_decoder().norm.register_forward_hook(lambda _m, _i, out: hidden.append(out))
    device = next(model.parameters()).device
    instruction = torch.tensor([instruction_ids], device=device)
    ids = torch.tensor([token_ids], device=device)
    nll: list[float] = []
    previous = None  # log-probs at the last position of the previous chunk
    total = -(-len(token_ids) // chunk_size)
    try:
        for i, start in enumerate(range(0, len(token_ids), chunk_size)):
            chunk = ids[:, start:start + chunk_size]
            hidden.clear()
            reader.read_chunk(chunk, instruction)
            with torch.no_grad():
                # The chunk's forward is the last of read_chunk in every mode; its first
                # positions are the chunk's (an instruction may follow it in the same forward).
                logits = head(hidden[-1][0, :chunk.shape[1]]).float()
                if cap:
                    logits = torch.tanh(logits / cap) * cap
                logp = torch.log_softmax(logits, dim=-1)
            targets = chunk[0]
            if previous is not None:
                nll.append(-float(previous[targets[0]]))
            nll += (-logp[:-1].gather(1, targets[1:, None])[:, 0]).tolist()
            previous = logp[-1]
            if progress is not None:
                progress(i + 1, total)
    finally:
        handle.remove()
    if not all(math.isfinite(x) for x in nll):
        raise FloatingPointError("non-finite log-probabilities while reading")
    return nll, reader.stats()
