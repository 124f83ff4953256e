"""Which kept states make one evaluation cell's answer: answer again from edited answer caches.

Rebuilds a retrieval cell's document (as ``inspect_cell.py`` does), reads it once with the cell's
method, budget and chunk size, runs the final pruning, then answers from copies of the answer
cache with chosen states removed: the whole needle, each copy of the answer inside the needle
(e.g. the two copies of a pass key), each copy in one layer at a time, each copy in the layers
that keep it only in part, the document outside the needle, and the chat template's head before
the document, whole and in the pieces its special tokens separate. Used to find out why the CItruS
modes miss one 32k passkey document, and where their variable-tracking answers recite the filler
(benchmarks/README.md).

    python benchmarks/ablate_cell.py --out benchmarks/results/eval_retrieval_pool7 \\
        --cell passkey__L32768__d0.75__s1__citrus_shared__b256__c256
"""
from __future__ import annotations

import argparse
import copy
import sys
from typing import Callable

import torch

from inspect_cell import load_cell

# drop(layer index, origin of one KV head's kept states [L]) -> mask [L] of the states to remove
Drop = Callable[[int, torch.Tensor], torch.Tensor]


def drop_states(reader, cache, drop: Drop) -> None:
    """Remove from every layer of ``cache`` (row 0) the states ``drop`` marks, per KV head."""
    for index, layer in enumerate(cache.layers):
        origin = layer.origin[0]
        rows = [torch.nonzero(~drop(index, head)).flatten() for head in origin]
        width = max(len(r) for r in rows)
        if width == origin.shape[-1] and all(len(r) == width for r in rows):
            continue  # nothing dropped in this layer
        kept = torch.full((1, len(rows), width), -1, dtype=torch.long, device=origin.device)
        for head, r in enumerate(rows):
            kept[0, head, : len(r)] = r
        reader.keep(index, kept, cache)


class Replay:
    """A read and pruned reader whose answer can be taken again from edited copies of its cache."""

    def __init__(self, reader, instruction: torch.Tensor, eos, max_new_tokens: int):
        self.reader, self.instruction, self.eos, self.max_new_tokens = reader, instruction, eos, max_new_tokens
        self.saved = copy.deepcopy(reader.answer_cache)
        self.next_index = reader.next_index.clone()

    def answer(self, drop: Drop | None = None) -> list[int]:
        """Greedy answer tokens from a copy of the saved answer cache without the ``drop`` states."""
        reader, cache = self.reader, copy.deepcopy(self.saved)
        if reader.instruction_cache is not None:
            reader.instruction_cache = cache
        else:
            reader.cache = cache
        reader.next_index = self.next_index.clone()
        if drop is not None:
            drop_states(reader, cache, drop)
        (tokens,) = reader.decode(reader.encode_instruction(self.instruction), self.max_new_tokens, self.eos)
        return tokens


def digit_runs(pieces: list[str]) -> list[list[int]]:
    """Positions of the maximal runs of all-digit pieces (a number split into digit tokens)."""
    runs: list[list[int]] = []
    for i, piece in enumerate(pieces):
        if piece.strip().isdigit():
            if runs and runs[-1][-1] == i - 1:
                runs[-1].append(i)
            else:
                runs.append([i])
    return runs


def head_parts(head_ids: list[int], special_ids: set[int]) -> list[range]:
    """Split the template's head (the prompt before the document) at its special tokens, past the
    first state: for ChatML, the system turn's text, its end marker, and the user turn's opening."""
    cuts = [i for i in range(1, len(head_ids)) if head_ids[i] in special_ids]
    bounds = [1, *cuts, len(head_ids)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def ablations(needle: torch.Tensor, copies: list[torch.Tensor], layers: int, document: range,
              per_layer: bool = True, parts: dict[str, range] | None = None,
              others: torch.Tensor | None = None) -> dict[str, Drop]:
    """The named edits: each maps a layer and a head's origin row to the states to remove
    (``per_layer=False`` leaves out the one-layer edits, two answers per layer and copy;
    ``parts`` names pieces of the template's head to remove one at a time; ``others``, the
    tokens of the needles that hold no answer, e.g. multi-key's distractors, removed together)."""
    def where(index: torch.Tensor, layer_ok=lambda layer, row: True) -> Drop:
        return lambda layer, row: torch.isin(row, index.to(row.device)) & layer_ok(layer, row)

    out: dict[str, Drop] = {"as read": lambda layer, row: torch.zeros_like(row, dtype=torch.bool),
                            "without the needle": where(needle)}
    for c, index in enumerate(copies, 1):
        out[f"without copy {c}"] = where(index)
    for c, index in enumerate(copies if per_layer else [], 1):
        for l in range(layers):
            out[f"without copy {c} in layer {l}"] = where(index, lambda layer, row, l=l: layer == l)
    if copies:
        def broken(layer, row):  # the copies this head keeps some but not all of
            mask = torch.zeros_like(row, dtype=torch.bool)
            for index in copies:
                held = torch.isin(row, index.to(row.device))
                if held.sum() < len(index):
                    mask |= held
            return mask
        out["without each copy where its layer keeps it only in part"] = broken
    if others is not None and others.numel():
        out["without the needles that hold no answer"] = where(others)
    doc = torch.arange(document.start, document.stop)
    out["without the document outside the needle"] = lambda layer, row: (
        torch.isin(row, doc.to(row.device)) & ~torch.isin(row, needle.to(row.device)))
    # The template's first state stays: it is the attention sink every method keeps.
    out["without the chat template's head but its first state"] = lambda layer, row: (row >= 1) & (
        row < document.start)
    for name, span in (parts or {}).items():
        out[f"without {name}"] = lambda layer, row, span=span: (row >= span.start) & (row < span.stop)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="results folder of the cell (its settings.json)")
    parser.add_argument("--cell", required=True, help="retrieval cell id, e.g. passkey__L2048__d0.5__s0__cse__b256__c256")
    parser.add_argument("--model", default=None, help="local HF folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--all-layers", action="store_true",
                        help="print every one-layer edit, not only those that change the answer")
    parser.add_argument("--no-layer-edits", action="store_true",
                        help="skip the one-layer edits (the slow part: an answer per layer and copy)")
    args = parser.parse_args(argv)

    from citrus_ext import ChunkedReader, compat, make_policy
    from citrus_ext.eval.backend import prompt_ids

    loaded = load_cell(parser, args.out, args.cell, args.model)
    model, tokenizer, cell, sample = loaded.model, loaded.tokenizer, loaded.cell, loaded.sample
    doc_ids, instr_ids, offset, needle = prompt_ids(tokenizer, sample.document, sample.instruction,
                                                    sample.needle_spans)
    pieces = [tokenizer.decode([doc_ids[i]]) for i in needle.tolist()]
    copies = [needle[run] for run in digit_runs(pieces)]
    others = [torch.arange(offset + a, offset + b) for a, b in sample.needle_spans
              if not any(ans in tokenizer.decode(doc_ids[offset + a:offset + b]) for ans in sample.answers)]

    reader = ChunkedReader(model, make_policy(cell.method, loaded.budget, **loaded.options), cell.chunk_size)
    instruction = torch.tensor([instr_ids])
    reader.read(torch.tensor([doc_ids]), instruction)
    reader.prune(instruction)
    replay = Replay(reader, instruction, compat.eos_token_ids(model, tokenizer), loaded.max_new_tokens)

    print(f"{cell.method} k={loaded.budget} chunk={cell.chunk_size} options={loaded.options}")
    print("needle:", "|".join(pieces))
    for c, index in enumerate(copies, 1):
        print(f"copy {c}: tokens {index.tolist()}")
    if others:
        print("needles that hold no answer: tokens", ", ".join(f"{int(o[0])}-{int(o[-1])}" for o in others))
    parts = {f"head states {span.start}-{span.stop - 1} {tokenizer.decode(doc_ids[span.start:span.stop])!r}": span
             for span in head_parts(doc_ids[:offset], set(tokenizer.all_special_ids))}
    edits = ablations(needle, copies, len(replay.saved.layers), range(offset, len(doc_ids)),
                      per_layer=not args.no_layer_edits, parts=parts,
                      others=torch.cat(others) if others else None)
    first = None
    for name, drop in edits.items():
        text = tokenizer.decode(replay.answer(drop), skip_special_tokens=True)
        first = text if first is None else first
        if " in layer " in name and text == first and not args.all_layers:
            continue
        print(f"{name}: {text!r}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
