"""PNG plots of an evaluation folder (matplotlib, no display needed).

``heatmap_<task>_k<budget>_c<chunk>.png``
    Accuracy per (depth, document length), one panel per method: green = found, red = lost.
``accuracy_vs_budget_c<chunk>.png``
    A panel per task: accuracy against the budget, one line per method, each line over the same
    documents at every budget (:func:`budget_curves`); the full cache (no budget) is a dashed
    horizontal line over the lengths it can read.
``perplexity.png``
    Perplexity of each window of tokens against the number of tokens read, log-scaled x.
``memory.png``
    Peak KV-cache size (states summed over layers, or MiB when the model is known) against the
    document length, per method, budget and chunk size.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from .runner import RETRIEVAL_METHODS, load_cells, longest_runs, method_rank, retrieval_groups, sort_key


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on the machines this runs on
    import matplotlib.pyplot as plt

    return plt


def _order(methods) -> list[str]:
    return sorted(methods, key=lambda m: (method_rank(m), m))


def _color(method: str) -> str:
    # One colour per method in every panel and figure.
    return f"C{method_rank(method) % 10}" if method in RETRIEVAL_METHODS else "grey"


def _label(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def plot_heatmaps(records: Sequence[dict], out_dir) -> list[Path]:
    """One figure per (task, budget, chunk size): accuracy over depth × length, a panel per method.

    The full cache, which has no budget, appears in every budget's figure.

    Returns
    -------
    list of Path
        The files written.
    """
    plt = _pyplot()
    import numpy as np

    groups = retrieval_groups(records, ("task", "method", "budget", "chunk_size", "length", "depth"))
    cmap = plt.get_cmap("RdYlGn").with_extremes(bad="lightgrey")  # grey: not run (full beyond the window)
    files = []
    configs = sorted({(g["task"], g["budget"], g["chunk_size"]) for g in groups if g["budget"] is not None})
    for task, budget, chunk in configs:
        rows = [g for g in groups if g["task"] == task
                and ((g["budget"] == budget and g["chunk_size"] == chunk) or g["method"] == "full")]
        methods = _order({g["method"] for g in rows})
        lengths = sorted({g["length"] for g in rows})
        depths = sorted({g["depth"] for g in rows})
        fig, axes = plt.subplots(1, len(methods), figsize=(1.2 + 0.55 * len(lengths) * len(methods),
                                                          1.4 + 0.35 * len(depths)),
                                 squeeze=False, sharey=True)
        for ax, method in zip(axes[0], methods):
            grid = np.full((len(depths), len(lengths)), np.nan)
            for g in rows:
                if g["method"] == method:
                    grid[depths.index(g["depth"]), lengths.index(g["length"])] = g["containment"]
            image = ax.imshow(grid, cmap=cmap, vmin=0, vmax=1, aspect="auto")
            for (i, j), v in np.ndenumerate(grid):
                if not np.isnan(v):
                    ax.text(j, i, f"{v:.2f}".rstrip("0").rstrip("."), ha="center", va="center", fontsize=7)
            ax.set_title(method, fontsize=9)
            ax.set_xticks(range(len(lengths)), [_label(n) for n in lengths], fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
            ax.set_xlabel("document tokens", fontsize=8)
        axes[0][0].set_ylabel("needle depth", fontsize=8)
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
        # Above the figure's top edge: at this height the default position overlaps the panel titles.
        fig.suptitle(f"{task}: accuracy, budget k={budget}, chunk {chunk} (grey: not run)", fontsize=10,
                     y=1.0, va="bottom")
        files.append(_save(fig, plt, Path(out_dir) / f"heatmap_{task}_k{budget}_c{chunk}.png"))
    return files


def budget_curves(records: Sequence[dict], task: str, chunk: int) -> dict[str, list[tuple]]:
    """Accuracy against the budget for one task and chunk size, per method, on matched cells.

    A method's points average the same documents at every budget: the (length, depth, sample)
    coordinates it was run at with each of its budgets. So a slope is the budget's effect, not a
    change of cells (a grid run with more lengths at one budget would otherwise show one).

    Returns
    -------
    dict
        method -> sorted list of ``(budget, accuracy, cells per point)``; ``full`` (no budget) ->
        ``[(None, accuracy, cells)]`` over all its cells of the task.
    """
    scores: dict = {}
    for r in records:
        c = r["cell"]
        if c["task"] != task or (c["budget"] is not None and c["chunk_size"] != chunk):
            continue
        scores.setdefault(c["method"], {}).setdefault(c["budget"], {})[
            (c["length"], c["depth"], c["sample"])] = r["scores"]["containment"]
    curves = {}
    for method, by_budget in scores.items():
        common = set.intersection(*(set(cells) for cells in by_budget.values()))
        if common:
            curves[method] = sorted(((b, sum(cells[x] for x in common) / len(common), len(common))
                                     for b, cells in by_budget.items()), key=lambda p: sort_key(p[0]))
    return curves


def plot_accuracy_vs_budget(records: Sequence[dict], out_dir) -> list[Path]:
    """One figure per chunk size, a panel per task: accuracy against the budget on matched cells."""
    plt = _pyplot()
    files = []
    cells = [r["cell"] for r in records]
    for chunk in sorted({c["chunk_size"] for c in cells if c["budget"] is not None}):
        tasks = sorted({c["task"] for c in cells if c["budget"] is not None and c["chunk_size"] == chunk})
        fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.8), squeeze=False, sharey=True)
        for ax, task in zip(axes[0], tasks):
            curves = budget_curves(records, task, chunk)
            for method in _order(curves):
                points = curves[method]
                if method == "full":
                    ax.axhline(points[0][1], color="black", linestyle="--",
                               label=f"full ({points[0][2]} cells, lengths that fit)")
                    continue
                budgets, accuracy, n = zip(*points)
                ax.plot(budgets, accuracy, marker="o", color=_color(method),
                        label=f"{method} ({n[0]} cells a point)")
            ax.set(xlabel="budget k (old states kept per layer)", ylim=(-0.03, 1.03), title=task)
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
        axes[0][0].set_ylabel("accuracy")
        fig.suptitle(f"Retrieval accuracy against budget, chunk {chunk} "
                     "(each line: the same documents at every budget)", fontsize=10)
        files.append(_save(fig, plt, Path(out_dir) / f"accuracy_vs_budget_c{chunk}.png"))
    return files


def plot_perplexity(records: Sequence[dict], out_dir) -> list[Path]:
    """Perplexity of each window against tokens read, one line per (method, budget, chunk)."""
    if not records:
        return []
    records = longest_runs(records)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in sorted(records, key=lambda r: (_order([r["cell"]["method"]]), str(r["cell"]["budget"]))):
        cell = r["cell"]
        label = cell["method"] if cell["budget"] is None else \
            f"{cell['method']} k={cell['budget']} c={cell['chunk_size']}"
        ax.plot([w["end"] for w in r["windows"]], [w["ppl"] for w in r["windows"]], label=label,
                linestyle="--" if cell["method"] == "full" else "-", linewidth=1.2)
    window = records[0].get("info", {}).get("window")
    if window:
        ax.axvline(window, color="grey", linewidth=0.8)
        ax.text(window, ax.get_ylim()[0], " model window", va="bottom", fontsize=8, color="grey")
    ax.set(xlabel="tokens read", ylabel=f"perplexity (windows of {records[0]['window_tokens']} tokens)",
           title="Long-range perplexity")
    _length_axis(ax, [w["end"] for r in records for w in r["windows"]])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return [_save(fig, plt, Path(out_dir) / "perplexity.png")]


def plot_memory(records: Sequence[dict], out_dir) -> list[Path]:
    """Peak KV cache against document length, per (method, budget, chunk size); MiB when bytes are known.

    Colour says the method, line style the budget, marker the chunk size; ``full`` is black."""
    groups = [g for g in retrieval_groups(records, ("method", "budget", "chunk_size", "length"))
              if g["peak_states"] is not None]
    if not groups:
        return []
    plt = _pyplot()
    in_bytes = all(g["peak_kv_bytes"] is not None for g in groups)
    budgets = sorted({g["budget"] for g in groups if g["budget"] is not None})
    chunks = sorted({g["chunk_size"] for g in groups})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, budget, chunk in sorted({(g["method"], g["budget"], g["chunk_size"]) for g in groups},
                                        key=lambda t: (method_rank(t[0]), sort_key(t[1]), t[2])):
        points = sorted((g["length"], g["peak_kv_bytes"] / 2 ** 20 if in_bytes else g["peak_states"])
                        for g in groups if (g["method"], g["budget"], g["chunk_size"]) == (method, budget, chunk))
        full = budget is None
        ax.plot(*zip(*points), color="black" if full else _color(method),
                linestyle=":" if full else ["-", "--", "-.", ":"][budgets.index(budget) % 4],
                marker="os^vD"[chunks.index(chunk) % 5],
                label=method if full else f"{method} k={budget} c={chunk}")
    ax.set(xlabel="document tokens",
           ylabel="peak KV cache (MiB)" if in_bytes else "peak KV states per layer",
           title="Peak KV cache against document length")
    _length_axis(ax, [g["length"] for g in groups])
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1))
    return [_save(fig, plt, Path(out_dir) / "memory.png")]


def _length_axis(ax, lengths) -> None:
    """Log-2 x axis labelled with the lengths themselves (2k, 4k, ...)."""
    ax.set_xscale("log", base=2)
    ticks = sorted(set(lengths))
    if len(ticks) > 12:  # a perplexity curve: label the powers of two it spans
        ticks = [2 ** i for i in range(math.ceil(math.log2(ticks[0])), math.floor(math.log2(ticks[-1])) + 1)]
    ax.set_xticks(ticks, [_label(t) for t in ticks])
    ax.minorticks_off()


def _save(fig, plt, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_all(out_dir, plot_dir=None) -> list[Path]:
    """Every plot of an evaluation folder, written to ``plot_dir`` (default ``<out>/plots``)."""
    plot_dir = Path(plot_dir) if plot_dir is not None else Path(out_dir) / "plots"
    retrieval = load_cells(out_dir, "retrieval")
    return (plot_heatmaps(retrieval, plot_dir) + plot_accuracy_vs_budget(retrieval, plot_dir)
            + plot_memory(retrieval, plot_dir) + plot_perplexity(load_cells(out_dir, "perplexity"), plot_dir))
