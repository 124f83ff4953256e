"""Evaluation harness: retrieval tasks, metrics, resumable grids, plots, and ``citrus eval``.

``tasks``
    Deterministic generators of (document, instruction, expected answer) at a token length and
    depth: passkey, needle in a haystack, RULER-style multi-key/-value/-query and variable tracking.
``metrics``
    Containment, ROUGE-1/L F1, windowed NLL.
``runner``
    Resumable grids (one JSON file per cell), summary JSON and markdown.
``plots``
    Heat-maps, accuracy against budget, perplexity against tokens read, memory against length.
``backend``
    The one module that calls the library (answer, chunked reader, model and text loading).
``cli``
    ``citrus eval`` (:func:`add_eval_subparser`, :func:`run_eval`) and ``python -m citrus_ext.eval``.
"""
from .cli import add_eval_subparser, run_eval
from .metrics import containment, rouge1, rouge_l, score_answer, windowed_nll
from .runner import (Cell, PerplexityCell, Settings, parse_cell_id, perplexity_cells, retrieval_cells,
                     run_perplexity, run_retrieval, summarize)
from .tasks import TASKS, Sample, make_sample

__all__ = [
    "add_eval_subparser", "run_eval", "containment", "rouge1", "rouge_l", "score_answer", "windowed_nll",
    "Cell", "PerplexityCell", "Settings", "parse_cell_id", "perplexity_cells", "retrieval_cells",
    "run_perplexity", "run_retrieval", "summarize", "TASKS", "Sample", "make_sample",
]
