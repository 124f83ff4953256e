"""Resumable evaluation grids: retrieval accuracy and long-range perplexity.

A grid is a list of *cells*; each cell is one model run and is written to
``<out>/cells/<cell id>.json`` as soon as it finishes. A rerun skips cells whose file exists, so
an interrupted grid resumes where it stopped, and ``force`` recomputes chosen cells. The
summary (``summary.json`` + ``summary.md``) is always rebuilt from every cell file in the folder.

The model is reached only through two injected callables, so the runner runs without one:

``answer(document, instruction, *, method, budget, chunk_size, max_new_tokens, needle_spans, **options)``
    returns an object with ``text`` and ``stats`` (``citrus_ext.answer``'s steps bound to a model,
    see :func:`citrus_ext.eval.backend.answer_fn`); ``needle_spans`` are the needles' token spans
    in the document, for the needle-retention diagnostic.
``read(token_ids, *, method, budget, chunk_size, instruction_ids, progress, **options)``
    returns ``(nll per predicted token, stats)`` (see :func:`citrus_ext.eval.backend.read_logprobs`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from . import metrics
from .tasks import TASKS, make_sample, sample_seed

RETRIEVAL_METHODS = ("full", "streaming_llm", "h2o", "tova", "snapkv", "cse", "citrus_shared",
                     "citrus_individual")
PERPLEXITY_METHODS = ("full", "streaming_llm", "cse", "citrus_shared", "citrus_individual")
# Instruction-aware caches need an instruction even when only reading; this one asks for nothing
# in particular, so it measures what instruction-aware eviction costs language modelling.
GENERIC_INSTRUCTION = "Continue the text above."
# Tokens a retrieval prompt adds to the document (chat template, instruction, answer): `full` runs
# only where document + margin fits the model's window.
PROMPT_MARGIN = 128


@dataclass(frozen=True)
class Settings:
    """What every cell of an output folder shares; a folder holds one setting only.

    Attributes
    ----------
    seed : int
        Base seed; each sample's seed derives from it and the sample's coordinates.
    max_new_tokens : int
        Longest answer; a task whose answer lists several items may ask for more
        (:attr:`citrus_ext.eval.tasks.Sample.min_new_tokens`, recorded per cell).
    options : dict
        Policy options passed to every method (e.g. ``{"granularity": "kv_head"}``).
    model : str
        The model's name, as recorded.
    instruction : str
        The generic instruction of a perplexity folder (empty for retrieval).
    """

    seed: int = 0
    max_new_tokens: int = 32
    options: dict = field(default_factory=dict)
    model: str = ""
    instruction: str = ""


@dataclass(frozen=True)
class Cell:
    """One retrieval run. ``budget`` is None for ``full`` (no eviction)."""

    task: str
    method: str
    budget: Optional[int]
    chunk_size: int
    length: int
    depth: float
    sample: int

    @property
    def id(self) -> str:
        """File-name-safe identifier, parsed back by :func:`parse_cell_id`."""
        budget = "full" if self.budget is None else self.budget
        return (f"{self.task}__L{self.length}__d{self.depth:g}__s{self.sample}__{self.method}"
                f"__b{budget}__c{self.chunk_size}")


@dataclass(frozen=True)
class PerplexityCell:
    """One long read scored token by token. ``budget`` is None for ``full``."""

    method: str
    budget: Optional[int]
    chunk_size: int
    length: int

    @property
    def id(self) -> str:
        """File-name-safe identifier, parsed back by :func:`parse_cell_id`."""
        budget = "full" if self.budget is None else self.budget
        return f"ppl__{self.method}__b{budget}__c{self.chunk_size}__L{self.length}"


def parse_cell_id(cell_id: str):
    """Turn a cell id (a file name without ``.json``) back into its :class:`Cell` or
    :class:`PerplexityCell`.

    Raises
    ------
    ValueError
        If ``cell_id`` is not an id this module writes.
    """
    parts = cell_id.split("__")
    try:
        if parts[0] == "ppl" and len(parts) == 5:
            _, method, budget, chunk, length = parts
            return PerplexityCell(method, _budget(budget), int(chunk[1:]), int(length[1:]))
        task, length, depth, sample, method, budget, chunk = parts
        if task not in TASKS:
            raise ValueError(task)
        return Cell(task, method, _budget(budget), int(chunk[1:]), int(length[1:]),
                    float(depth[1:]), int(sample[1:]))
    except ValueError:
        raise ValueError(f"not a cell id: {cell_id!r} (expected e.g. "
                         "passkey__L4096__d0.5__s0__cse__b512__c256 or "
                         "ppl__cse__b512__c256__L262144)") from None


def _budget(text: str) -> Optional[int]:
    if not text.startswith("b"):
        raise ValueError(text)
    return None if text == "bfull" else int(text[1:])


def retrieval_cells(tasks: Sequence[str], methods: Sequence[str], budgets: Sequence[int],
                    chunk_sizes: Sequence[int], lengths: Sequence[int], depths: Sequence[float],
                    samples: int, window: Optional[int] = None) -> list[Cell]:
    """The cells of a retrieval grid, ordered so that one document serves all its methods.

    ``full`` gets one cell per (task, length, depth, sample), read with the largest chunk size,
    and only where ``length + PROMPT_MARGIN <= window`` (all lengths if ``window`` is None).

    Returns
    -------
    list of Cell
    """
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    cells = []
    for task in tasks:
        for length in lengths:
            for depth in depths:
                for sample in range(samples):
                    for method in methods:
                        if method == "full":
                            if window is None or length + PROMPT_MARGIN <= window:
                                cells.append(Cell(task, method, None, max(chunk_sizes), length,
                                                  depth, sample))
                            continue
                        cells += [Cell(task, method, budget, chunk, length, depth, sample)
                                  for budget in budgets for chunk in chunk_sizes]
    return cells


def perplexity_cells(methods: Sequence[str], budgets: Sequence[int], chunk_sizes: Sequence[int],
                     length: int, window: Optional[int] = None) -> list[PerplexityCell]:
    """The cells of a perplexity grid; ``full`` reads at most ``window`` tokens, once."""
    cells = []
    for method in methods:
        if method == "full":
            cells.append(PerplexityCell(method, None, max(chunk_sizes),
                                        length if window is None else min(length, window)))
            continue
        cells += [PerplexityCell(method, budget, chunk, length)
                  for budget in budgets for chunk in chunk_sizes]
    return cells


def cell_path(out_dir, cell) -> Path:
    """Where ``cell``'s result lives."""
    return Path(out_dir) / "cells" / f"{cell.id}.json"


def _write_json(path: Path, data) -> None:
    """Write atomically, so an interrupted run never leaves a half-written cell behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def check_settings(out_dir, settings: Settings) -> None:
    """Record ``settings`` in ``<out>/settings.json``, or check they match what is recorded.

    Raises
    ------
    ValueError
        If the folder was made with other settings (its cells would not be comparable).
    """
    path = Path(out_dir) / "settings.json"
    wanted = asdict(settings)
    if path.exists():
        recorded = json.loads(path.read_text())
        if recorded != wanted:
            raise ValueError(f"{out_dir} holds results made with {recorded}, not {wanted}; "
                             "use another --out folder")
        return
    _write_json(path, wanted)


def load_settings(out_dir) -> Settings:
    """The settings recorded in ``<out>/settings.json``."""
    path = Path(out_dir) / "settings.json"
    if not path.exists():
        raise ValueError(f"{out_dir} has no settings.json: run the grid there first")
    return Settings(**json.loads(path.read_text()))


def _digest(stats: dict, kv_bytes_per_state: Optional[int]) -> dict:
    """The headline numbers of the library's statistics: peak cache (states per layer, bytes over
    layers) and, where recorded, the share of needle tokens kept (mean over layers)."""
    per_layer = stats.get("peak_states_per_layer") or []
    out = {"peak_states": max(per_layer) if per_layer else None,
           "peak_states_total": sum(per_layer) if per_layer else None}
    if kv_bytes_per_state and per_layer:
        out["peak_kv_bytes"] = sum(per_layer) * kv_bytes_per_state
    for name in ("needle_kept_read", "needle_kept_final"):
        if stats.get(name):
            out[name] = _mean(stats[name])
    return out


def _bar(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="cell", dynamic_ncols=True)


def run_retrieval(cells: Iterable[Cell], out_dir, tokenizer, answer: Callable, *,
                  settings: Settings = Settings(), info: Optional[dict] = None,
                  force: bool = False, progress: bool = True, task_options: Optional[dict] = None) -> dict:
    """Run the retrieval cells not yet done, then rebuild the summary.

    Parameters
    ----------
    cells : iterable of Cell
    out_dir : path-like
        Results folder (``cells/``, ``settings.json``, ``summary.json``, ``summary.md``).
    tokenizer : transformers tokenizer
        Used to build documents of the cells' lengths.
    answer : callable
        See the module docstring.
    settings : Settings
        Checked against (or recorded in) the folder.
    info : dict, optional
        Model facts recorded in every cell (``window``, ``kv_bytes_per_state``, ...).
    force : bool
        Recompute cells that are already done.
    progress : bool
        Show a tqdm bar over cells.
    task_options : dict, optional
        Per-task keyword arguments for the generators, e.g. ``{"multikey": {"n_keys": 8}}``.

    Returns
    -------
    dict
        The summary (see :func:`summarize`).
    """
    cells = list(cells)
    check_settings(out_dir, settings)
    info = info or {}
    task_options = task_options or {}
    samples: dict = {}
    with _bar(len(cells), progress, "retrieval") as bar:
        for cell in cells:
            path = cell_path(out_dir, cell)
            if path.exists() and not force:
                bar.update(1)
                continue
            key = (cell.task, cell.length, cell.depth, cell.sample)
            if key not in samples:
                samples.clear()  # cells come grouped by document: keep only the current one
                samples[key] = make_sample(cell.task, tokenizer, cell.length, cell.depth,
                                           sample_seed(settings.seed, *key),
                                           **task_options.get(cell.task, {}))
            sample = samples[key]
            max_new_tokens = max(settings.max_new_tokens, sample.min_new_tokens)
            start = time.perf_counter()
            result = answer(sample.document, sample.instruction, method=cell.method,
                            budget=cell.budget if cell.budget is not None else cell.length,
                            chunk_size=cell.chunk_size, max_new_tokens=max_new_tokens,
                            needle_spans=sample.needle_spans, **settings.options)
            seconds = time.perf_counter() - start
            scores = metrics.score_answer(result.text, sample.answers, sample.reference)
            _write_json(path, {
                "id": cell.id, "kind": "retrieval", "cell": asdict(cell), "settings": asdict(settings),
                "info": info, "seconds": seconds, "prediction": result.text, "scores": scores,
                "max_new_tokens": max_new_tokens,
                "sample": {"seed": sample.seed, "n_tokens": sample.n_tokens, "depth": sample.depth,
                           "needle_spans": sample.needle_spans, "answers": sample.answers,
                           "reference": sample.reference, "instruction": sample.instruction,
                           "document_sha1": hashlib.sha1(sample.document.encode()).hexdigest()},
                "stats": {**_digest(result.stats, info.get("kv_bytes_per_state")),
                          "raw": result.stats},
                "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            })
            bar.set_postfix_str(f"{cell.method} L{cell.length} acc={scores['containment']:.2f}")
            bar.update(1)
    return summarize(out_dir)


def run_perplexity(cells: Iterable[PerplexityCell], out_dir, token_ids: Sequence[int],
                   instruction_ids: Sequence[int], read: Callable, *,
                   settings: Settings = Settings(), info: Optional[dict] = None,
                   window_tokens: int = 1024, force: bool = False, progress: bool = True) -> dict:
    """Run the perplexity cells not yet done, then rebuild the summary.

    Parameters
    ----------
    cells : iterable of PerplexityCell
    out_dir : path-like
    token_ids : sequence of int
        The text (at least as long as the longest cell).
    instruction_ids : sequence of int
        The generic instruction's tokens (scores the cache in the CItruS modes).
    read : callable
        See the module docstring.
    settings, info, force, progress
        As for :func:`run_retrieval`.
    window_tokens : int
        Tokens per perplexity window.

    Returns
    -------
    dict
        The summary (see :func:`summarize`).
    """
    cells = list(cells)
    check_settings(out_dir, settings)
    info = info or {}
    with _bar(len(cells), progress, "perplexity") as bar:
        for cell in cells:
            path = cell_path(out_dir, cell)
            if path.exists() and not force:
                bar.update(1)
                continue
            if cell.length > len(token_ids):
                raise ValueError(f"cell {cell.id} needs {cell.length} tokens, the text has {len(token_ids)}")
            bar.set_postfix_str(cell.id)
            chunks = _chunk_bar(progress, cell)
            start = time.perf_counter()
            nll, stats = read(list(token_ids[:cell.length]), method=cell.method,
                              budget=cell.budget if cell.budget is not None else cell.length,
                              chunk_size=cell.chunk_size, instruction_ids=list(instruction_ids),
                              progress=chunks, **settings.options)
            seconds = time.perf_counter() - start
            mean = math.fsum(nll) / len(nll)
            _write_json(path, {
                "id": cell.id, "kind": "perplexity", "cell": asdict(cell), "settings": asdict(settings),
                "info": info, "seconds": seconds, "window_tokens": window_tokens,
                "windows": metrics.windowed_nll(nll, window_tokens),
                "nll": mean, "ppl": math.exp(mean), "tokens": len(nll),
                "stats": {**_digest(stats, info.get("kv_bytes_per_state")), "raw": stats},
                "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            })
            bar.update(1)
    return summarize(out_dir)


def _chunk_bar(enabled: bool, cell: PerplexityCell) -> Optional[Callable[[int, int], None]]:
    """A nested bar over a long read's chunks, as a ``progress(done, total)`` callback."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    bar = tqdm(total=-(-cell.length // cell.chunk_size), desc="  chunks", unit="chunk", leave=False,
               dynamic_ncols=True)

    def update(done: int, total: int) -> None:
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    return update


def load_cells(out_dir, kind: Optional[str] = None) -> list[dict]:
    """Every cell result in ``<out>/cells``, optionally only one ``kind``
    (``"retrieval"`` or ``"perplexity"``), sorted by id."""
    folder = Path(out_dir) / "cells"
    records = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []
    return [r for r in records if kind is None or r["kind"] == kind]


def _mean(values: Sequence[float]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return math.fsum(values) / len(values) if values else None


def retrieval_groups(records: Sequence[dict], by: Sequence[str]) -> list[dict]:
    """Mean scores of retrieval records grouped by cell fields ``by`` (e.g. method, length).

    Returns
    -------
    list of dict
        One per group: the ``by`` fields, ``n``, the mean of each score, mean ``seconds`` and mean
        ``peak_states`` / ``peak_kv_bytes`` where recorded.
    """
    groups = defaultdict(list)
    for r in records:
        groups[tuple(r["cell"][k] for k in by)].append(r)
    out = []
    for key, rs in groups.items():
        row = dict(zip(by, key), n=len(rs))
        for name in rs[0]["scores"]:
            row[name] = _mean([r["scores"][name] for r in rs])
        row["seconds"] = _mean([r["seconds"] for r in rs])
        for name in ("peak_states", "peak_kv_bytes", "needle_kept_read", "needle_kept_final"):
            row[name] = _mean([r["stats"].get(name) for r in rs])
        out.append(row)
    return sorted(out, key=lambda row: tuple(sort_key(row[k]) for k in by))


def method_rank(method: str) -> int:
    """Where ``method`` sorts in tables and plots: the order of :data:`RETRIEVAL_METHODS`, others last."""
    return RETRIEVAL_METHODS.index(method) if method in RETRIEVAL_METHODS else len(RETRIEVAL_METHODS)


def sort_key(value):
    # None (the full cache's budget) sorts after every number.
    return (value is None, value if value is not None else 0)


def summarize(out_dir) -> dict:
    """Rebuild ``summary.json`` and ``summary.md`` from every cell in ``out_dir``.

    Returns
    -------
    dict
        ``retrieval``: mean scores per (task, method, budget, chunk_size, length);
        ``retrieval_all_tasks``: the same averaged over tasks; ``perplexity``: per cell, the
        overall perplexity and the windows; ``cells`` and ``seconds``: how many cells are done
        and the model time they took.
    """
    retrieval = load_cells(out_dir, "retrieval")
    perplexity = load_cells(out_dir, "perplexity")
    summary = {
        "cells": len(retrieval) + len(perplexity),
        "seconds": math.fsum(r["seconds"] for r in retrieval + perplexity),
        "retrieval": retrieval_groups(retrieval, ("task", "method", "budget", "chunk_size", "length")),
        "retrieval_all_tasks": retrieval_groups(retrieval, ("method", "budget", "chunk_size", "length")),
        "perplexity": [{**r["cell"], "ppl": r["ppl"], "tokens": r["tokens"], "seconds": r["seconds"],
                        "peak_states": r["stats"].get("peak_states"), "windows": r["windows"]}
                       for r in perplexity],
    }
    _write_json(Path(out_dir) / "summary.json", summary)
    (Path(out_dir) / "summary.md").write_text(markdown_summary(summary))
    return summary


def _fmt(value) -> str:
    if value is None:
        return "—"
    return str(value) if isinstance(value, int) else f"{value:.2f}"


def _tokens(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def accuracy_table(groups: Sequence[dict], metric: str = "containment") -> str:
    """A markdown table of ``metric``: one row per (method, chunk size), one column per
    (budget, length). The full cache has no budget: its row repeats under every budget."""
    budgets = sorted({g["budget"] for g in groups if g["budget"] is not None})
    lengths = sorted({g["length"] for g in groups})
    rows = sorted({(g["method"], g["chunk_size"]) for g in groups},
                  key=lambda mc: (method_rank(mc[0]), mc))
    value = {(g["method"], g["chunk_size"], g["budget"], g["length"]): g[metric] for g in groups}
    columns = [(b, n) for b in (budgets or [None]) for n in lengths]
    lines = ["| method | chunk | " + " | ".join(f"k={b} {_tokens(n)}" if b is not None else _tokens(n)
                                               for b, n in columns) + " |",
             "|---|---:|" + "---:|" * len(columns)]
    for method, chunk in rows:
        cells = [value.get((method, chunk, None if method == "full" else b, n)) for b, n in columns]
        lines.append(f"| {method} | {chunk} | " + " | ".join(_fmt(c) for c in cells) + " |")
    return "\n".join(lines)


def perplexity_table(rows: Sequence[dict]) -> str:
    """A markdown table of perplexity per window, at windows ending near powers of two."""
    if not rows:
        return ""
    ends = sorted({w["end"] for r in rows for w in r["windows"]})
    marks = [e for e in ends if e & (e - 1) == 0 or e == ends[-1]] if ends else []

    def at_marks(r):
        at = {w["end"]: w["ppl"] for w in r["windows"]}
        return [at.get(e) for e in marks]

    return _perplexity_markdown(rows, [f"ppl @{_tokens(e)}" for e in marks], at_marks)


def _perplexity_markdown(rows: Sequence[dict], headers: Sequence[str], values) -> str:
    """One row per run (method, k, chunk), sorted: ``values(run)`` under ``headers``, then the
    run's overall perplexity."""
    lines = ["| method | k | chunk | " + " | ".join(headers) + " | overall |",
             "|---|---:|---:|" + "---:|" * (len(headers) + 1)]
    for r in sorted(rows, key=lambda r: (r["method"], sort_key(r["budget"]), r["chunk_size"])):
        budget = "—" if r["budget"] is None else r["budget"]
        lines.append(f"| {r['method']} | {budget} | {r['chunk_size']} | "
                     + " | ".join(_fmt(v) for v in values(r)) + f" | {_fmt(r['ppl'])} |")
    return "\n".join(lines)


def longest_runs(records: Sequence[dict]) -> list[dict]:
    """The longest perplexity run of each (method, budget, chunk size): a shorter run reads a
    prefix of the same text, so its windows repeat the longer run's and would only double a line."""
    best: dict = {}
    for r in records:
        cell = r.get("cell", r)  # a cell record, or a summary row (the cell's fields flattened)
        key = (cell["method"], cell["budget"], cell["chunk_size"])
        if key not in best or cell["length"] > best[key].get("cell", best[key])["length"]:
            best[key] = r
    return list(best.values())


def perplexity_ranges(rows: Sequence[dict], first: int = 8192) -> str:
    """A markdown table of perplexity over ranges of the text that double in length (0–8k, 8–16k,
    16–32k, ...): per-window numbers are noisy, and a doubling range keeps a long run readable."""
    if not rows:
        return ""
    rows = longest_runs(rows)
    last = max(w["end"] for r in rows for w in r["windows"])
    bounds = [0, first]
    while bounds[-1] < last:
        bounds.append(2 * bounds[-1])
    spans = list(zip(bounds, bounds[1:]))

    def per_span(r):
        cells = []
        for a, b in spans:
            ws = [w for w in r["windows"] if a < w["end"] <= b]
            n = sum(w["tokens"] for w in ws)
            cells.append(math.exp(math.fsum(w["nll"] * w["tokens"] for w in ws) / n) if n else None)
        return cells

    return _perplexity_markdown(rows, [f"{_tokens(a) if a else 0}–{_tokens(b)}" for a, b in spans], per_span)


def markdown_summary(summary: dict) -> str:
    """The human-readable summary: accuracy tables (all tasks, then each task), perplexity."""
    parts = [f"# Evaluation summary\n\n{summary['cells']} cells, {summary['seconds'] / 60:.1f} min of "
             "model time. k = budget (old states kept per layer); `full` keeps everything and runs "
             "only where the text fits the model's window."]
    if summary["retrieval_all_tasks"]:
        parts.append("Retrieval accuracy = share of the expected strings found in the answer "
                     "(containment), averaged over depths and samples.")
        parts.append("## Retrieval accuracy, all tasks\n\n" + accuracy_table(summary["retrieval_all_tasks"]))
        # An entry averages whatever tasks were run there, so two entries can hold different tasks.
        parts.append("Cells per entry above. Entries average the cells run there, whatever their task: "
                     "compare two entries only where they hold the same cells, or use the per-task "
                     "tables below.\n\n" + accuracy_table(summary["retrieval_all_tasks"], "n"))
        if any(g["needle_kept_read"] is not None for g in summary["retrieval_all_tasks"]):
            parts.append("## Needle tokens kept in the answer cache after reading (mean over layers), "
                         "all tasks\n\n" + accuracy_table(summary["retrieval_all_tasks"], "needle_kept_read"))
        for task in sorted({g["task"] for g in summary["retrieval"]}):
            groups = [g for g in summary["retrieval"] if g["task"] == task]
            section = [f"## {task}: accuracy\n\n" + accuracy_table(groups),
                       f"{task}: ROUGE-L F1\n\n" + accuracy_table(groups, "rougeL")]
            if any(g["needle_kept_read"] is not None for g in groups):
                section.append(f"{task}: needle tokens kept after reading\n\n"
                               + accuracy_table(groups, "needle_kept_read"))
            # Entries average different numbers of cells once a slice adds samples: say how many.
            section.append(f"{task}: cells per entry (depths × samples)\n\n" + accuracy_table(groups, "n"))
            parts.append("\n\n".join(section))
    if summary["perplexity"]:
        parts.append("## Perplexity against tokens read\n\nPerplexity of each window of tokens read "
                     "(the column says where the window ends).\n\n" + perplexity_table(summary["perplexity"])
                     + "\n\nPerplexity over ranges of the text, each twice as long as the one before.\n\n"
                     + perplexity_ranges(summary["perplexity"]))
    return "\n\n".join(parts) + "\n"
