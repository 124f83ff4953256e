"""``citrus eval``: the evaluation grids from the command line.

``citrus eval retrieval``
    Retrieval accuracy over tasks × methods × budgets × chunk sizes × lengths × depths × samples.
``citrus eval perplexity``
    Perplexity of the KJV Bible read at growing lengths, per method, budget and chunk size.
``citrus eval report``
    Rebuild the summary and the plots of a results folder.

The main ``citrus`` command hooks this in with :func:`add_eval_subparser` and dispatches to
:func:`run_eval`; ``python -m citrus_ext.eval`` runs it alone.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import runner
from .tasks import TASKS

RESULTS = "benchmarks/results"


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"values must be >= 1, got {text!r}")
    return values


def _positive(text: str) -> int:
    (value,) = _ints(text)
    return value


def _depths(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"depths must be in [0, 1], got {text!r}")
    return values


def _names(choices):
    def parse(text: str) -> list[str]:
        values = text.split(",")
        unknown = [v for v in values if v not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}; choose from {', '.join(choices)}")
        return values
    return parse


def parse_option(text: str) -> tuple[str, object]:
    """``key=value`` with the value read as int, float, bool or str."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    for cast in (int, float):
        try:
            return key, cast(raw)
        except ValueError:
            pass
    return key, {"true": True, "false": False}.get(raw.lower(), raw)


def _common(parser: argparse.ArgumentParser, methods, out: str) -> None:
    parser.add_argument("--methods", type=_names(runner.RETRIEVAL_METHODS), default=list(methods),
                        help=f"comma-separated (default: {','.join(methods)})")
    parser.add_argument("--budgets", type=_ints, default=[256, 512], help="budgets k (default: 256,512)")
    parser.add_argument("--chunk-sizes", type=_ints, default=[128, 256],
                        help="chunk sizes (default: 128,256)")
    parser.add_argument("--option", type=parse_option, action="append", default=[], metavar="KEY=VALUE",
                        help="policy option for every method, repeatable (e.g. granularity=kv_head)")
    parser.add_argument("--seed", type=int, default=0, help="base seed (default: 0)")
    parser.add_argument("--out", default=out, help=f"results folder (default: {out})")
    parser.add_argument("--cell", metavar="ID", help="recompute exactly this cell (an id from --list or "
                        "a file name under OUT/cells without .json), with OUT's recorded settings")
    parser.add_argument("--force", action="store_true", help="recompute cells that are already done")
    parser.add_argument("--list", action="store_true", help="list the grid's cells and whether each is "
                        "done, without loading a model")
    parser.add_argument("--no-plots", action="store_true", help="skip the plots after the run")
    parser.add_argument("--model", metavar="DIR", help="a local Hugging Face model folder, or "
                        "gemma-3-270m (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: cpu)")
    parser.add_argument("--window", type=int, metavar="N", help="the model's context window for "
                        "--list (default: read from the model when it is loaded)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_commands(parser: argparse.ArgumentParser) -> None:
    """Add the ``retrieval``, ``perplexity`` and ``report`` sub-commands to ``parser``."""
    commands = parser.add_subparsers(dest="eval_command", metavar="{retrieval,perplexity,report}")
    commands.required = True
    retrieval = commands.add_parser("retrieval", help="retrieval accuracy grid",
                                    description="Retrieval accuracy over a grid; resumable.")
    retrieval.add_argument("--tasks", type=_names(tuple(TASKS)), default=list(TASKS),
                           help=f"comma-separated (default: {','.join(TASKS)})")
    retrieval.add_argument("--lengths", type=_ints, default=[2048, 4096, 8192, 16384, 32768],
                           help="document lengths in tokens (default: 2048,...,32768)")
    retrieval.add_argument("--depths", type=_depths, default=[0.0, 0.25, 0.5, 0.75, 1.0],
                           help="needle depths in [0, 1] (default: 0,0.25,0.5,0.75,1)")
    retrieval.add_argument("--samples", type=_positive, default=4, help="samples per cell (default: 4)")
    retrieval.add_argument("--max-new-tokens", type=_positive, default=32, help="longest answer (default: 32)")
    _common(retrieval, runner.RETRIEVAL_METHODS, f"{RESULTS}/eval_retrieval")
    perplexity = commands.add_parser("perplexity", help="long-range perplexity of the KJV Bible",
                                     description="Perplexity of the KJV text against tokens read; resumable.")
    perplexity.add_argument("--length", type=_positive, default=262144,
                            help="tokens to read (default: 262144); `full` stops at the window")
    perplexity.add_argument("--window-tokens", type=_positive, default=1024,
                            help="tokens per perplexity window (default: 1024)")
    perplexity.add_argument("--instruction", default=runner.GENERIC_INSTRUCTION,
                            help=f"instruction of the CItruS modes (default: {runner.GENERIC_INSTRUCTION!r})")
    _common(perplexity, runner.PERPLEXITY_METHODS, f"{RESULTS}/eval_perplexity")
    report = commands.add_parser("report", help="rebuild the summary and plots of a results folder")
    report.add_argument("--out", required=True, help="results folder")


def add_eval_subparser(subparsers) -> argparse.ArgumentParser:
    """Add ``eval`` to the ``citrus`` command's sub-commands; its handler is :func:`run_eval`.

    Parameters
    ----------
    subparsers : the object ``ArgumentParser.add_subparsers`` returned.

    Returns
    -------
    argparse.ArgumentParser
        The ``eval`` parser.
    """
    parser = subparsers.add_parser("eval", help="evaluation grids: retrieval accuracy, perplexity",
                                   description=__doc__.split("\n\n")[1])
    _add_commands(parser)
    parser.set_defaults(handler=run_eval)
    return parser


def _cells(args, window):
    if args.eval_command == "retrieval":
        return runner.retrieval_cells(args.tasks, args.methods, args.budgets, args.chunk_sizes,
                                      args.lengths, args.depths, args.samples, window)
    return runner.perplexity_cells(args.methods, args.budgets, args.chunk_sizes, args.length, window)


def run_eval(args) -> int:
    """Run ``citrus eval`` with parsed ``args``; returns the exit status."""
    out = Path(args.out)
    if args.eval_command == "report":
        summary = runner.summarize(out)
        from .plots import plot_all

        files = plot_all(out)
        print(f"{summary['cells']} cells; wrote {out / 'summary.md'} and {len(files)} plots under {out / 'plots'}")
        return 0
    if args.list:
        for cell in _cells(args, args.window):
            print(("done " if runner.cell_path(out, cell).exists() else "todo ") + cell.id)
        return 0
    if args.cell:
        cell = runner.parse_cell_id(args.cell)
        if isinstance(cell, runner.Cell) != (args.eval_command == "retrieval"):
            print(f"citrus eval: {args.cell} is not a {args.eval_command} cell", file=sys.stderr)
            return 2
    from citrus_ext.environment import environment

    from . import backend

    model, tokenizer = backend.load_model(args.model, dtype=args.dtype, device=args.device)
    # Written into every cell: CPU answers can change with the thread count (rounding), and the
    # cell should say so.
    info = {**backend.model_info(model), "environment": environment(args.device)}
    if args.cell:
        settings, cells, force = runner.load_settings(out), [cell], True
    else:
        settings = runner.Settings(seed=args.seed, options=dict(args.option), model=info["model"],
                                   max_new_tokens=getattr(args, "max_new_tokens", 0),
                                   instruction=getattr(args, "instruction", ""))
        cells, force = _cells(args, info["window"]), args.force
    retrieval = [c for c in cells if isinstance(c, runner.Cell)]
    if retrieval:
        runner.run_retrieval(retrieval, out, tokenizer, backend.answer_fn(model, tokenizer), settings=settings,
                             info=info, force=force, progress=not args.quiet)
    else:
        # Tokens of the longest read, and the instruction as it follows the text when read plainly.
        tokens = backend.kjv_text(tokenizer, max(c.length for c in cells))
        instruction = tokenizer("\n\n" + settings.instruction, add_special_tokens=False).input_ids
        read = _bind(backend.read_logprobs, model)
        runner.run_perplexity(cells, out, tokens, instruction, read, settings=settings, info=info,
                              window_tokens=args.window_tokens, force=force, progress=not args.quiet)
    if not args.no_plots:
        from .plots import plot_all

        plot_all(out)
    print(f"results: {out / 'summary.md'}", file=sys.stderr)
    return 0


def _bind(read_logprobs, model):
    """``read_logprobs`` with the model bound and keyword arguments, as the runner calls it."""
    def read(token_ids, *, method, budget, chunk_size, instruction_ids, progress=None, **options):
        return read_logprobs(model, token_ids, method, budget, chunk_size, instruction_ids, progress, **options)
    return read


def main(argv=None) -> int:
    """``python -m citrus_ext.eval``."""
    parser = argparse.ArgumentParser(prog="python -m citrus_ext.eval", description=__doc__.split("\n\n")[1])
    _add_commands(parser)
    return run_eval(parser.parse_args(argv))
