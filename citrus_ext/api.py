"""The public entry point: ``citrus_ext.answer(model, tokenizer, document, instruction, ...)``.

Example::

    import citrus_ext
    out = citrus_ext.answer(model, tokenizer, long_text, "What is the passcode?",
                            method="citrus_shared", budget=768, chunk_size=256, pool=7)
    print(out.text, out.stats["peak_states_per_layer"][0], out.stats["score_s"])
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch

from . import compat
from .policies import make_policy
from .reader import ChunkedReader

TextOrBatch = Union[str, list[str]]


@dataclass
class Answer:
    """What :func:`answer` returns.

    Attributes
    ----------
    text : str, or a list of str for a batch.
    token_ids : list[int] (the generated tokens, eos included when reached), or one list per row.
    stats : dict: ``tokens_read`` (document tokens), ``instruction_tokens``, ``chunks``,
        ``peak_states_per_layer`` (the most states a layer held, during a forward included),
        ``stored_states_per_layer``, ``max_position``, ``time_s`` (all model forwards),
        ``forward_s``, ``score_s``, ``topk_s``, ``compact_s``, ``wall_s``. Rows of a batch are
        read together, so times and peaks are the batch's; ``tokens_read`` and
        ``instruction_tokens`` are then per-row lists, and ``rows`` holds one dict per row.
    """

    text: Union[str, list[str]]
    token_ids: Union[list[int], list[list[int]]]
    stats: dict = field(default_factory=dict)


# How the instruction follows the document for a model without a chat template.
COMPLETION_PROMPT = "\n\nQuestion: {instruction}\nAnswer:"


def split_prompt(tokenizer, document: str, instruction: str) -> tuple[list[int], list[int]]:
    """Token ids of the document part and of the instruction part of the prompt.

    With a chat template the user turn holds the document, a blank line and the instruction, and
    the assistant-turn header is added; the *document part* is everything up to the end of the
    document text, the *instruction part* is the rest (the question and the assistant header).
    The two parts are tokenized separately, so the split is exact. Without a chat template (a
    base model) the document is tokenized with the tokenizer's special tokens and the instruction
    follows in completion style, ``"\n\nQuestion: {instruction}\nAnswer:"``: a base model given
    the bare question tends to continue the document instead of answering it.
    """
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{document}\n\n{instruction}"}], tokenize=False, add_generation_prompt=True
        )
        body = document if document in prompt else document.strip()  # some templates strip the content
        if body not in prompt:
            raise ValueError("citrus: the chat template rewrote `document`; cannot split the prompt")
        cut = prompt.index(body) + len(body)
        head, tail = prompt[:cut], prompt[cut:]
        return tokenizer(head, add_special_tokens=False).input_ids, tokenizer(tail, add_special_tokens=False).input_ids
    return tokenizer(document).input_ids, tokenizer(COMPLETION_PROMPT.format(instruction=instruction),
                                                    add_special_tokens=False).input_ids


def _as_batch(value, name: str) -> list[str]:
    rows = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if rows is None or not rows or not all(isinstance(r, str) for r in rows):
        raise ValueError(f"citrus: `{name}` must be a non-empty string or a non-empty list of strings")
    for row in rows:
        if not row.strip():
            raise ValueError(f"citrus: `{name}` must not be empty")
    return rows


def answer(
    model,
    tokenizer,
    document: TextOrBatch,
    instruction: TextOrBatch,
    *,
    method: str = "citrus_shared",
    budget: int = 768,
    chunk_size: int = 256,
    max_new_tokens: int = 64,
    positions: str = "relative",
    progress: Optional[Union[bool, Callable[[int, int], None]]] = None,
    **options,
) -> Answer:
    """Read ``document`` chunk by chunk with eviction policy ``method``, then answer ``instruction``.

    Parameters
    ----------
    model : a supported transformers causal LM (Llama, Mistral, Qwen2, Qwen3, Gemma3 text).
    tokenizer : its tokenizer (its chat template is applied when it has one, see :func:`split_prompt`).
    document, instruction : str, or equal-length lists of str (a batch, read together: every row
        has its own instruction and gets the answer it would get alone).
    method : ``"citrus_shared"``, ``"citrus_individual"``, ``"cse"``, ``"full"``, ``"streaming_llm"``,
        ``"h2o"``, ``"tova"`` or ``"snapkv"``.
    budget : int, ``k``: old states kept per layer after each eviction.
    chunk_size : int, ``l_s``: tokens per chunk.
    max_new_tokens : int, greedy decoding stops there or at an eos token (tokenizer's and
        generation config's).
    positions : ``"relative"`` (default) or ``"original"``.
    progress : ``True`` for a tqdm bar, or a callable ``progress(done_chunks, total_chunks)``.
    **options : policy options (``granularity``, ``head_reduce``, ``query_reduce``, ``pool``,
        ``sinks``, and per-policy ones such as ``window`` for snapkv or ``recent`` for h2o).

    Returns
    -------
    Answer
    """
    documents, instructions = _as_batch(document, "document"), _as_batch(instruction, "instruction")
    if len(documents) != len(instructions):
        raise ValueError(
            f"citrus: `document` has {len(documents)} rows but `instruction` has {len(instructions)}"
        )
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"citrus: `max_new_tokens` must be an integer >= 1, got {max_new_tokens!r}")
    start = time.perf_counter()
    reader = ChunkedReader(model, make_policy(method, budget, **options), chunk_size, positions)
    eos = compat.eos_token_ids(model, tokenizer)
    prompts = [split_prompt(tokenizer, d, i) for d, i in zip(documents, instructions)]
    doc_rows = [torch.tensor(d, dtype=torch.long) for d, _ in prompts]
    instr_rows = [torch.tensor(i, dtype=torch.long) for _, i in prompts]
    with compat.citrus_attention_enabled(model):
        reader.read(doc_rows, instr_rows, _progress_callback(progress, max(len(d) for d in doc_rows), chunk_size))
        tokens = reader.generate(instr_rows, max_new_tokens, eos)
    wall = time.perf_counter() - start
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
    rows = [dict(reader.stats(b), instruction_tokens=len(instr_rows[b]), wall_s=wall) for b in range(len(prompts))]
    if isinstance(document, str):
        return Answer(texts[0], tokens[0], rows[0])
    return Answer(texts, tokens, dict(rows[0], tokens_read=[r["tokens_read"] for r in rows],
                                      instruction_tokens=[r["instruction_tokens"] for r in rows], rows=rows))


def _progress_callback(progress, length: int, chunk_size: int) -> Optional[Callable[[int, int], None]]:
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=-(-length // chunk_size), unit="chunk", desc="reading")

        def update(done: int, total: int) -> None:
            bar.update(done - bar.n)
            if done == total:
                bar.close()

        return update
    return progress or None
