"""What one evaluation cell's answer cache holds, layer by layer, and the answer it leads to.

Rebuilds a retrieval cell's document from its folder's settings (the same seed, so the same text),
reads it with the cell's method, budget and chunk size (or overrides), and prints, per layer, the
states kept from the chat template's head, from the needles (the needle map: ``#`` kept) and from
the rest of the document, with the share of those in runs of at least 5 consecutive tokens (whole
sentences rather than scattered tokens), then the answer. Used to find out why a method fails where
its cache holds the needles (benchmarks/README.md, variable tracking).

    python benchmarks/inspect_cell.py --out benchmarks/results/eval_retrieval_pool7 \\
        --cell vartrack__L2048__d1__s0__citrus_shared__b256__c256 [--option pool=1] [--budget 512]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from citrus_ext.eval import backend, runner
from citrus_ext.eval.cli import parse_option
from citrus_ext.eval.tasks import make_sample, sample_seed

RUN = 5  # consecutive tokens that count as a run (about a filler sentence)


def layer_contents(origin: torch.Tensor, offset: int, n_doc: int, needle: set) -> dict:
    """Kept states of one layer (its ``origin``, token indices), split by where they came from."""
    kept = sorted(set(origin.flatten().tolist()))
    rest = [i for i in kept if offset <= i < n_doc and i not in needle]
    in_runs, run = 0, 1
    for a, b in zip(rest, rest[1:] + [None]):
        if b == a + 1:
            run += 1
            continue
        in_runs += run if run >= RUN else 0
        run = 1
    return {"head": sum(i < offset for i in kept), "needle": sum(i in needle for i in kept),
            "rest": len(rest), "rest_in_runs": in_runs / len(rest) if rest else 0.0, "rest_ids": rest}


def load_cell(parser, out: str, cell_id: str, model_path=None, budget=None, options=()) -> SimpleNamespace:
    """The model, the cell and its sample rebuilt from the folder's settings (the same seed, so the
    same text), the budget (``budget`` overrides the cell's) and policy options (``options``,
    ``(name, value)`` pairs, override the folder's), and the cell's answer length."""
    settings = runner.load_settings(out)
    cell = runner.parse_cell_id(cell_id)
    if not isinstance(cell, runner.Cell):
        parser.error(f"--cell: {cell_id} is not a retrieval cell")
    model, tokenizer = backend.load_model(model_path)
    sample = make_sample(cell.task, tokenizer, cell.length, cell.depth,
                         sample_seed(settings.seed, cell.task, cell.length, cell.depth, cell.sample))
    return SimpleNamespace(model=model, tokenizer=tokenizer, cell=cell, sample=sample,
                           budget=budget or cell.budget or cell.length,
                           options={**settings.options, **dict(options)},
                           max_new_tokens=max(settings.max_new_tokens, sample.min_new_tokens))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="results folder of the cell (its settings.json)")
    parser.add_argument("--cell", required=True, help="retrieval cell id, e.g. passkey__L2048__d0.5__s0__cse__b256__c256")
    parser.add_argument("--model", default=None, help="local HF folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--budget", type=int, default=None, help="override the cell's budget")
    parser.add_argument("--option", action="append", type=parse_option, default=[],
                        help="override a policy option of the folder, e.g. pool=1 (repeatable)")
    parser.add_argument("--show-layers", default="15,24", help="layers whose last kept text is printed")
    parser.add_argument("--json", default=None, help="also write the per-layer numbers here")
    args = parser.parse_args(argv)

    loaded = load_cell(parser, args.out, args.cell, args.model, args.budget, args.option)
    model, tokenizer, cell, sample = loaded.model, loaded.tokenizer, loaded.cell, loaded.sample
    budget, options = loaded.budget, loaded.options
    layers: list[dict] = []
    texts: dict = {}
    show = {int(x) for x in args.show_layers.split(",") if x}

    def inspect(cache, doc_ids, offset, needle):
        needle_set = set(needle.tolist())
        for index, layer in enumerate(cache.layers):
            row = layer_contents(layer.origin[0], offset, len(doc_ids), needle_set)
            if index in show:
                texts[index] = tokenizer.decode([doc_ids[i] for i in row["rest_ids"][-60:]])
            del row["rest_ids"]
            layers.append(row)

    answer = backend.answer_fn(model, tokenizer)(
        sample.document, sample.instruction, method=cell.method, budget=budget, chunk_size=cell.chunk_size,
        max_new_tokens=loaded.max_new_tokens, needle_spans=sample.needle_spans,
        inspect=inspect, **options)
    found = sum(a.lower() in answer.text.lower() for a in sample.answers)
    print(f"{cell.method} k={budget} chunk={cell.chunk_size} options={options}: "
          f"{found}/{len(sample.answers)} answers found")
    print(f"answer: {answer.text!r}")
    print("layer  head  needle  rest  rest-in-runs  needle map")
    for index, (row, needle_map) in enumerate(zip(layers, answer.stats["needle_map"])):
        print(f"{index:5d} {row['head']:5d} {row['needle']:7d} {row['rest']:5d} {row['rest_in_runs']:13.2f}  {needle_map}")
    n = len(layers)
    print(f"mean  {sum(r['head'] for r in layers) / n:5.1f} {sum(r['needle'] for r in layers) / n:7.1f} "
          f"{sum(r['rest'] for r in layers) / n:5.1f} {sum(r['rest_in_runs'] for r in layers) / n:13.2f}")
    for index, text in sorted(texts.items()):
        print(f"layer {index}, last kept text besides the needles: {text[-240:]!r}")
    if args.json:
        Path(args.json).write_text(json.dumps({"cell": args.cell, "budget": budget, "options": options,
                                               "answer": answer.text, "found": found, "layers": layers}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
