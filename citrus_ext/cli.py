"""The ``citrus`` command: answer questions about documents far longer than the model's window.

``citrus ask``
    Read a document (a file or stdin) chunk by chunk with bounded KV memory, then answer a question.
``citrus demo``
    Hide a fact in the middle of a ~20k-token document and ask for it with CItruS and with
    StreamingLLM, side by side.

Errors a user can fix (bad arguments, unreadable or empty documents, a missing model folder) print
one line on stderr and exit with status 2; other failures print one line and exit with 1
(set ``CITRUS_DEBUG=1`` to see the traceback).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import __version__
from .eval.cli import add_eval_subparser
from .models import DEFAULT_MODEL_NAME, DTYPES

# The methods of citrus_ext.answer, CItruS first, then the baselines.
METHODS = ("citrus_shared", "citrus_individual", "cse", "full", "streaming_llm", "h2o", "tova",
           "snapkv")
DEMO_METHODS = ("citrus_shared", "streaming_llm")


class UsageError(Exception):
    """A mistake in the command line or its inputs: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, not the usage block plus a message."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _odd_positive_int(text: str) -> int:
    value = _positive_int(text)
    if value % 2 == 0:
        raise argparse.ArgumentTypeError(f"must be odd (a window centred on each state), got {value}")
    return value


def _depth(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of the ``citrus`` command (sub-commands ``ask``, ``demo`` and ``eval``)."""
    parser = _Parser(prog="citrus", description="Answer questions about documents far longer than "
                     "the model's context window, with CItruS KV-cache eviction.")
    parser.add_argument("--version", action="version", version=f"citrus_ext {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="{ask,demo,eval}", parser_class=_Parser)

    def common(sub: argparse.ArgumentParser, budget_help: str):
        sub.add_argument("--budget", type=_positive_int, default=768, metavar="K", help=budget_help)
        sub.add_argument("--chunk-size", type=_positive_int, default=256, metavar="S",
                         help="tokens read per chunk (default: 256)")
        sub.add_argument("--model", metavar="DIR", help="a local Hugging Face model folder, or "
                         "gemma-3-270m (default: SmolLM2-135M-Instruct; packaged models are converted "
                         "once into the user cache)")
        sub.add_argument("--max-new-tokens", type=_positive_int, default=64, metavar="N",
                         help="longest answer, in tokens (default: 64)")
        sub.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                         help="model weight dtype (default: float32)")
        sub.add_argument("--device", default="cpu",
                         help="cpu, cuda, cuda:N or auto (default: cpu)")
        sub.add_argument("--quiet", action="store_true", help="no progress bar or status messages")

    ask = commands.add_parser("ask", help="answer a question about a document",
                              description="Read a document chunk by chunk with a bounded KV cache "
                              "and answer a question about it.")
    ask.add_argument("--document", required=True, metavar="PATH",
                     help="UTF-8 text or Markdown file, or - for stdin")
    ask.add_argument("--question", required=True, metavar="TEXT", help="what to ask")
    ask.add_argument("--method", choices=METHODS, default="citrus_shared", metavar="M",
                     help=f"eviction method: {', '.join(METHODS)} (default: citrus_shared)")
    common(ask, "KV states kept per layer between chunks (default: 768)")
    ask.add_argument("--pool", type=_odd_positive_int, default=1, metavar="P",
                     help="also keep the neighbours of high-scoring states: max-pool the scores over "
                     "P positions (odd; default: 1, the paper's behaviour)")
    ask.add_argument("--json", action="store_true",
                     help="print one JSON object with the answer and its statistics")
    ask.set_defaults(handler=command_ask)

    demo = commands.add_parser(
        "demo", help="find a fact hidden in a long document, CItruS vs StreamingLLM",
        description="Hide a fact in the middle of a document far longer than the model's window "
        f"and ask for it with {' and '.join(DEMO_METHODS)}.")
    demo.add_argument("--tokens", type=_positive_int, default=20000, metavar="N",
                      help="document length in tokens (default: 20000)")
    demo.add_argument("--depth", type=_depth, default=0.5,
                      help="where the fact is hidden, 0 = start, 1 = end (default: 0.5)")
    demo.add_argument("--source", choices=("essays", "kjv"), default="essays",
                      help="filler: Paul Graham essays or the King James Bible (default: essays)")
    common(demo, "KV states kept per layer between chunks (default: 768)")
    demo.add_argument("--pool", type=_odd_positive_int, default=7, metavar="P",
                      help="citrus_shared also keeps the neighbours of high-scoring states, max-pooling "
                      "the scores over P positions (default: 7; 1 is the paper's behaviour, which "
                      "loses the fact's details on this small model)")
    demo.set_defaults(handler=command_demo)
    add_eval_subparser(commands)
    return parser


def read_document(path: str, stdin=None) -> str:
    """Read a UTF-8 document from ``path``, or from ``stdin`` when ``path`` is ``"-"``.

    Parameters
    ----------
    path : str
        A plain-text or Markdown file, or ``"-"``.
    stdin : binary file, optional
        Where ``"-"`` reads from; defaults to ``sys.stdin.buffer``.

    Returns
    -------
    str
        The text, without a UTF-8 byte-order mark.

    Raises
    ------
    UsageError
        If the file cannot be read, is not a text document, is not UTF-8, or is empty.
    """
    if path == "-":
        name = "stdin"
        data = (stdin or sys.stdin.buffer).read()
    else:
        name = path
        try:
            data = Path(path).read_bytes()
        except OSError as err:
            raise UsageError(f"cannot read document {path}: {err.strerror or err}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UsageError(f"{name} is not UTF-8 text (byte {err.start}: {err.reason}); "
                         "citrus reads plain-text and Markdown documents") from None
    if "\x00" in text:
        raise UsageError(f"{name} contains NUL bytes: not a plain-text or Markdown document")
    if not text.strip():
        raise UsageError(f"{name} is empty")
    return text


class ChunkProgress:
    """A ``progress`` callback for :func:`citrus_ext.answer`: a tqdm bar over chunks, on stderr.

    Parameters
    ----------
    label : str
        Shown left of the bar.
    enabled : bool
        False makes every call a no-op (``--quiet``, or stderr is not a terminal).
    """

    def __init__(self, label: str, enabled: bool):
        self.label = label
        self.enabled = enabled
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        """Record that ``done`` of ``total`` chunks have been read."""
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.label, unit="chunk", file=sys.stderr,
                            leave=False, dynamic_ncols=True)
        self.bar.total = total
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        """Remove the bar."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run_answer(model, tokenizer, document: str, question: str, *, method: str, budget: int,
               chunk_size: int, max_new_tokens: int, progress, **options) -> tuple[str, dict]:
    """Call :func:`citrus_ext.answer`; the one place that knows its signature.

    Returns
    -------
    tuple of (str, dict)
        The answer text and its statistics, see :func:`cli_stats`.
    """
    from citrus_ext import answer

    result = answer(model, tokenizer, document, question, method=method, budget=budget,
                    chunk_size=chunk_size, max_new_tokens=max_new_tokens, progress=progress,
                    **options)
    return result.text.strip(), cli_stats(result.stats)


def cli_stats(stats: dict) -> dict:
    """Add the CLI's summary fields to the statistics of :func:`citrus_ext.answer`.

    ``document_tokens``, ``peak_cache_states`` (states held by the fullest layer, at any moment)
    and ``seconds`` are read from the library's own names (``tokens_read``,
    ``peak_states_per_layer``, one value per layer, and ``wall_s``) unless it already reports
    them under the CLI's names; ``chunks`` is passed through.
    """
    def pick(cli_name: str, library_name: str):
        return stats[cli_name] if cli_name in stats else stats[library_name]

    peak = pick("peak_cache_states", "peak_states_per_layer")
    return {**stats, "document_tokens": pick("document_tokens", "tokens_read"),
            "peak_cache_states": max(peak) if isinstance(peak, (list, tuple)) else peak,
            "seconds": pick("seconds", "wall_s"), "chunks": stats["chunks"]}


def _load(args):
    from .models import ModelLoadError, load_model

    try:
        return load_model(args.model, dtype=args.dtype, device=args.device, progress=not args.quiet)
    except (ModelLoadError, ValueError) as err:
        raise UsageError(str(err)) from None


def _show_progress(args) -> bool:
    return not args.quiet and sys.stderr.isatty()


def _answer_with_bar(args, model, tokenizer, document: str, question: str, method: str, **options):
    bar = ChunkProgress(f"{method} reading", _show_progress(args))
    try:
        return run_answer(model, tokenizer, document, question, method=method, budget=args.budget,
                          chunk_size=args.chunk_size, max_new_tokens=args.max_new_tokens,
                          progress=bar, **options)
    except ValueError as err:
        # answer() validates its knobs (and their combination) with ValueError.
        raise UsageError(str(err)) from None
    finally:
        bar.close()


def command_ask(args) -> int:
    """Run ``citrus ask``: print the answer, or one JSON object with ``--json``."""
    document = read_document(args.document)
    if not args.question.strip():
        raise UsageError("the question is empty")
    model, tokenizer = _load(args)
    text, stats = _answer_with_bar(args, model, tokenizer, document, args.question, args.method,
                                   pool=args.pool)
    if args.json:
        record = {**stats, "answer": text, "method": args.method, "budget": args.budget,
                  "chunk_size": args.chunk_size, "model": args.model or DEFAULT_MODEL_NAME}
        print(json.dumps(record, ensure_ascii=False))
    else:
        print(text)
    return 0


def command_demo(args) -> int:
    """Run ``citrus demo``: the same hidden fact asked for with CItruS and with StreamingLLM."""
    from .texts import (DEFAULT_FACT_TERMS, DEFAULT_NEEDLE, DEFAULT_QUESTION, TextSourceError,
                        build_haystack)

    model, tokenizer = _load(args)
    try:
        haystack = build_haystack(tokenizer, args.tokens, DEFAULT_NEEDLE, args.depth,
                                  source=args.source)
    except (TextSourceError, ValueError) as err:
        raise UsageError(str(err)) from None
    window = getattr(model.config, "max_position_embeddings", None)
    source = {"essays": "Paul Graham essays", "kjv": "the King James Bible"}[args.source]
    print(f"Document: {haystack.n_tokens:,} tokens of {source}"
          + (f" (the model's window is {window:,})" if window else ""))
    print(f"Hidden at {haystack.depth:.0%} depth: {haystack.needle}")
    print(f"Question: {DEFAULT_QUESTION}")
    # Flushed: each reading takes minutes on a CPU, and stdout may be a pipe.
    print(f"Budget: {args.budget} states per layer, chunks of {args.chunk_size} tokens", flush=True)
    for method in DEMO_METHODS:
        # Pooling belongs to score-based selection; StreamingLLM keeps positions, not scores.
        options = {"pool": args.pool} if method == "citrus_shared" else {}
        text, stats = _answer_with_bar(args, model, tokenizer, haystack.text, DEFAULT_QUESTION,
                                       method, **options)
        # One line per answer keeps the two side by side even when the model rambles.
        label = f"{method} (pool {args.pool})" if options else method
        print(f"\n{label}: {' '.join(text.split())}")
        print(f"  {_recall_verdict(text, DEFAULT_FACT_TERMS)}; peak cache "
              f"{stats['peak_cache_states']:,} states per layer; {stats['seconds']:.1f} s",
              flush=True)
    return 0


def _recall_verdict(text: str, terms) -> str:
    """How much of the hidden fact an answer recalls, by its key terms (all, some, none)."""
    found = [term for term in terms if term in text.lower()]
    if len(found) == len(terms):
        return "recalled the fact (" + ", ".join(found) + ")"
    if found:
        missing = [term for term in terms if term not in found]
        return f"recalled part of the fact ({', '.join(found)}; not {', '.join(missing)})"
    return "missed the fact"


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    # The library prefixes its messages with "citrus: "; the CLI's own prefix already says it.
    return lines[0].removeprefix("citrus: ") if lines else ""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``citrus`` console script and of ``python -m citrus_ext``.

    Returns
    -------
    int
        0 on success, 2 for a usage error, 1 for any other failure, 130 on Ctrl-C.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --version, or a usage error already printed
        return stop.code
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.handler(args)
    except UsageError as err:
        print(f"citrus {args.command}: error: {_first_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("citrus: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the CLI's contract is one line, not a traceback
        if os.environ.get("CITRUS_DEBUG"):
            raise
        print(f"citrus {args.command}: {type(err).__name__}: {_first_line(err)} "
              "(set CITRUS_DEBUG=1 for details)", file=sys.stderr)
        return 1
