"""Time to read a document and answer, per method, on a SmolLM2-135M-shaped random model.

Weights do not change the cost, so the model is randomly initialised from SmolLM2-135M's shape
(30 layers, 9 query / 3 KV heads, head_dim 64, hidden 576, vocab 49152). For every method and
length it reports the wall time of reading + answering, the time inside model forwards, and the
share spent in eviction work (scoring, top-k, compaction), then writes JSON under
``benchmarks/results/``.

Quick run::

    python benchmarks/bench_reading.py --lengths 4096 --methods cse citrus_shared
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from citrus_ext import ChunkedReader, make_policy  # noqa: E402
from common import environment, llama_config  # noqa: E402

METHODS = ["cse", "citrus_shared", "citrus_individual", "full", "streaming_llm", "h2o", "tova", "snapkv"]


def smollm2_shaped_model(dtype: torch.dtype) -> torch.nn.Module:
    """A randomly initialised LlamaForCausalLM with SmolLM2-135M's configuration."""
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(llama_config("smollm2-135m")).to(dtype).eval()


def run_one(model, method: str, length: int, args) -> dict:
    """Read ``length`` random tokens with ``method`` and answer; returns the measured figures."""
    g = torch.Generator().manual_seed(length)
    document = torch.randint(100, model.config.vocab_size, (1, length), generator=g)
    instruction = torch.randint(100, model.config.vocab_size, (1, args.instruction_tokens), generator=g)
    reader = ChunkedReader(model, make_policy(method, args.budget), args.chunk_size)
    start = time.perf_counter()
    reader.read(document, instruction)
    read_s = time.perf_counter() - start
    tokens = reader.generate(instruction, args.new_tokens, eos=())[0]
    wall = time.perf_counter() - start
    stats = reader.stats()
    evict = stats["score_s"] + stats["topk_s"] + stats["compact_s"]
    return {
        "method": method,
        "tokens": length,
        "read_s": read_s,
        "answer_s": wall - read_s,
        "wall_s": wall,
        "tokens_per_s": length / read_s,
        "forward_s": stats["forward_s"],
        "score_s": stats["score_s"],
        "topk_s": stats["topk_s"],
        "compact_s": stats["compact_s"],
        "eviction_share": evict / wall,
        "peak_states": max(stats["peak_states_per_layer"]),
        "max_position": stats["max_position"],
        "generated": len(tokens),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--budget", type=int, default=768)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--instruction-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--full-max", type=int, default=16384, help="longest document read with the full cache")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/...)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = smollm2_shaped_model(getattr(torch, args.dtype))

    now = datetime.datetime.now(datetime.timezone.utc)
    out = args.out or Path(__file__).parent / "results" / f"bench_reading_{now:%Y%m%d_%H%M}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "bench_reading",
        "environment": environment("cpu"),
        "model": "SmolLM2-135M-shaped random LlamaForCausalLM",
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": [],
    }
    header = (f"{'method':<18}{'tokens':>7}{'wall s':>9}{'read tok/s':>11}{'score %':>9}{'topk %':>8}"
              f"{'compact %':>10}{'evict %':>9}{'peak':>6}")
    print(header, flush=True)
    for length in args.lengths:
        for method in args.methods:
            if method == "full" and length > args.full_max:
                continue
            r = run_one(model, method, length, args)
            share = {k: 100 * r[f"{k}_s"] / r["wall_s"] for k in ("score", "topk", "compact")}
            print(f"{method:<18}{length:>7}{r['wall_s']:>9.1f}{r['tokens_per_s']:>11.0f}{share['score']:>9.2f}"
                  f"{share['topk']:>8.2f}{share['compact']:>10.2f}{100 * r['eviction_share']:>9.2f}"
                  f"{r['peak_states']:>6}",
                  flush=True)
            # Written after every run, so a long sweep that is cut short keeps what it measured.
            result["rows"].append(r)
            out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
