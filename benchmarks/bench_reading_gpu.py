"""End-to-end reading speed and memory on the GPU, per method (issue 6).

Randomly initialised bf16 models built from real configs (weights do not change the cost):
Llama-3-8B-shaped (32 layers, 32/8 heads, head_dim 128) and SmolLM2-135M-shaped. A random
document is read chunk by chunk with ``ChunkedReader``; each row reports tokens read per second,
peak GPU memory (total and above the weights), the share of reading time spent scoring, in top-k
and compacting, and model FLOP
utilisation: 2 × (matmul parameters) × tokens ÷ time ÷ the bf16 matrix rate measured in the
same run. Matmul parameters exclude the input embedding and the LM head (only the last
position's logits are computed).

Two baselines run in the same process:

* ``eager_output_attentions``: the way the paper's and kvpress-style code works, the same chunk
  loop with transformers' eager attention and ``output_attentions=True`` (materialised
  probabilities), CSE-style layer scores, ``torch.topk`` and a gather of the DynamicCache.
* ``full_sdpa_prefill``: one SDPA forward over the whole document with a full cache.

``snapkv`` is one-shot: the whole document in one forward, then one eviction.

Rows run in priority order and stop starting once ``--max-seconds`` would be exceeded (the
estimate scales the last similar row), so a cut-short run keeps its most important rows. JSON
is rewritten after every row. Times: median of ``--repeats`` timed reads after one warm-up read
(one timed read for documents over ``--repeat-max`` tokens), with no synchronisation inside the
read. The time split comes from one more read with the device synchronised around each step
(``--split-read``; it slows the read, so its shares are of that read's own time).

    python benchmarks/bench_reading_gpu.py --out /tmp/reading_gpu.json

The method is CItruS (Bai et al., EMNLP 2024, arXiv 2406.12018).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import transformers

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from citrus_ext import ChunkedReader, attention, make_policy  # noqa: E402
from bench_cuda_ops import bf16_matmul_tflops  # noqa: E402
from common import LLAMA_SHAPES as SHAPES, environment, llama_config  # noqa: E402

READER_METHODS = ["cse", "citrus_shared", "citrus_individual", "streaming_llm", "full", "snapkv"]
K = 1024
CUDA_GRAPHS = True  # --no-cuda-graphs: the reader launches op by op (the split read always does)


def build_model(shape: str) -> torch.nn.Module:
    config = llama_config(shape)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def matmul_params(model) -> int:
    skip = {id(model.get_input_embeddings().weight), id(model.lm_head.weight)}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip and p.dim() == 2)


# ------------------------------------------------------------------------------------------------
# The ways to read a document. Each returns (stats dict) after reading `doc [1, n]` on the GPU.

def read_citrus(model, method, doc, instruction, chunk, budget):
    size = doc.shape[1] if method == "snapkv" else chunk  # SnapKV is one-shot
    reader = ChunkedReader(model, make_policy(method, budget), size, cuda_graphs=CUDA_GRAPHS)
    reader.read(doc[0], instruction[0])
    stats = reader.stats()
    return {"score_s": stats["score_s"], "topk_s": stats["topk_s"], "compact_s": stats["compact_s"],
            "peak_states": max(stats["peak_states_per_layer"])}


def read_eager(model, method, doc, instruction, chunk, budget):
    """CSE the way Python KV-cache code does it: eager attention, materialised probabilities."""
    cache = transformers.DynamicCache(config=model.config)
    timings = {"score_s": 0.0, "topk_s": 0.0, "compact_s": 0.0}
    peak = 0
    model.set_attn_implementation("eager")
    try:
        for start in range(0, doc.shape[1], chunk):
            ids = doc[:, start:start + chunk]
            c = cache.get_seq_length()
            with torch.no_grad():
                out = model(input_ids=ids, past_key_values=cache, use_cache=True, output_attentions=True,
                            logits_to_keep=1)
            peak = max(peak, c + ids.shape[1])
            if c <= budget:
                continue
            for layer, probs in zip(cache.layers, out.attentions):
                t0 = attention._clock(doc.device)
                scores = probs[..., :c].float().sum(dim=(1, 2))  # [B, c]
                t1 = attention._clock(doc.device)
                kept = torch.topk(scores, budget, dim=-1).indices.sort(dim=-1).values
                t2 = attention._clock(doc.device)
                idx = kept[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
                layer.keys = torch.cat([layer.keys.gather(2, idx), layer.keys[:, :, c:]], dim=2)
                layer.values = torch.cat([layer.values.gather(2, idx), layer.values[:, :, c:]], dim=2)
                t3 = attention._clock(doc.device)
                timings["score_s"] += t1 - t0
                timings["topk_s"] += t2 - t1
                timings["compact_s"] += t3 - t2
            del out
    finally:
        model.set_attn_implementation("sdpa")
    return {**timings, "peak_states": peak}


def read_full_prefill(model, method, doc, instruction, chunk, budget):
    with torch.no_grad():
        model(input_ids=doc, use_cache=True, logits_to_keep=1)
    return {"score_s": 0.0, "topk_s": 0.0, "compact_s": 0.0, "peak_states": doc.shape[1]}


def run_row(model, shape, method, length, chunk, budget, args, rate, params, weights_bytes):
    g = torch.Generator().manual_seed(length)
    vocab = model.config.vocab_size
    doc = torch.randint(100, vocab, (1, length), generator=g).cuda()
    instruction = torch.randint(100, vocab, (1, 32), generator=g).cuda()
    fn = {"eager_output_attentions": read_eager, "full_sdpa_prefill": read_full_prefill}.get(method, read_citrus)
    warm = doc[:, : min(length, 2 * chunk if method not in ("snapkv", "full_sdpa_prefill") else min(length, 4096))]
    fn(model, method, warm, instruction, chunk, budget)  # warm-up: kernels loaded, allocator primed
    repeats = args.repeats if length <= args.repeat_max else 1

    def timed(sync: bool):
        attention.SYNC_TIMINGS = sync
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        stats = fn(model, method, doc, instruction, chunk, budget)
        torch.cuda.synchronize()
        return time.perf_counter() - t0, stats

    plain = [timed(False) for _ in range(repeats)]
    times = [t for t, _ in plain]
    read_s = statistics.median(times)
    peak = torch.cuda.max_memory_allocated()
    if args.split_read:
        split_s, stats = timed(True)
        attention.SYNC_TIMINGS = False
    else:  # unsynchronised step times are launch times: no split
        split_s, stats = read_s, {**plain[-1][1], "score_s": float("nan"), "topk_s": float("nan"),
                                  "compact_s": float("nan")}
    evict = stats["score_s"] + stats["topk_s"] + stats["compact_s"]
    return {
        "shape": shape, "method": method, "tokens": length, "chunk_size": chunk, "budget": budget,
        "read_s": read_s, "read_s_all": times, "tokens_per_s": length / read_s,
        "peak_gib": peak / 2**30, "peak_above_weights_gib": (peak - weights_bytes) / 2**30,
        "split_read_s": split_s,
        "score_share": stats["score_s"] / split_s, "topk_share": stats["topk_s"] / split_s,
        "compact_share": stats["compact_s"] / split_s, "eviction_share": evict / split_s,
        "mfu": 2 * params * length / read_s / rate, "peak_states": stats["peak_states"],
    }


def plan(args) -> list[tuple]:
    """Rows (shape, method, tokens, chunk, budget) in priority order."""
    rows = []
    main = [m for m in READER_METHODS if m not in ("full", "snapkv")]
    for shape in args.shapes:
        big = shape == "llama3-8b"
        first = 32 * K
        # 1. every method and both baselines at one length, chunk 1024, budget 768
        for m in main + ["full", "snapkv", "eager_output_attentions", "full_sdpa_prefill"]:
            rows.append((shape, m, first, 1024, 768))
        # 2. memory flat in length: the eviction methods from 8k to 512k
        for length in (8 * K, 128 * K, 512 * K):
            for m in (["cse", "citrus_shared"] if big else main):
                rows.append((shape, m, length, 1024, 768))
        # 3. the other chunk size and budget
        for chunk, budget in ((256, 768), (1024, 4096), (256, 4096)):
            for m in ["cse", "citrus_shared", "eager_output_attentions"]:
                rows.append((shape, m, first, chunk, budget))
        if big:
            for length in (8 * K, 128 * K):
                rows.append((shape, "full_sdpa_prefill", length, 1024, 768))
            for length in (128 * K, 512 * K):
                for m in ("citrus_individual", "streaming_llm"):
                    rows.append((shape, m, length, 1024, 768))
    return [r for r in rows if r[2] in args.lengths and r[1] in args.methods]


def fits(method, shape, length, args) -> bool:
    limit = {"full": args.full_max, "snapkv": args.full_max, "eager_output_attentions": args.eager_max,
             "full_sdpa_prefill": args.prefill_max}.get(method)
    return limit is None or length <= limit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--methods", nargs="+",
                   default=READER_METHODS + ["eager_output_attentions", "full_sdpa_prefill"])
    p.add_argument("--lengths", type=int, nargs="+", default=[8 * K, 32 * K, 128 * K, 512 * K])
    p.add_argument("--full-max", type=int, default=32 * K, help="longest document for full and one-shot snapkv")
    p.add_argument("--eager-max", type=int, default=32 * K)
    p.add_argument("--prefill-max", type=int, default=128 * K)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--repeat-max", type=int, default=32 * K, help="longer documents are timed once")
    p.add_argument("--split-read", action=argparse.BooleanOptionalAction, default=True,
                   help="one more read, synchronised around each eviction step, for the time split")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="the reader replays CUDA graphs of repeated forwards (its default)")
    p.add_argument("--max-seconds", type=float, default=300.0)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    global CUDA_GRAPHS
    CUDA_GRAPHS = args.cuda_graphs
    if not torch.cuda.is_available():
        sys.exit("bench_reading_gpu.py: needs a CUDA GPU")
    started = time.perf_counter()
    rate = bf16_matmul_tflops() * 1e12
    out = args.out or os.path.join(HERE, "results", "reading_gpu.json")
    result = {"benchmark": "bench_reading_gpu", "environment": environment("cuda"),
              "bf16_mm_TFLOPs": rate / 1e12, "settings": vars(args), "rows": [], "skipped": []}
    print(f"bf16 matrix rate {rate / 1e12:.0f} TFLOP/s on {torch.cuda.get_device_name()}", flush=True)
    print(f"{'shape':<13}{'method':<24}{'tokens':>7}{'chunk':>6}{'k':>5}{'tok/s':>9}{'peak GiB':>9}"
          f"{'+weights':>9}{'score%':>7}{'topk%':>6}{'cmpct%':>7}{'MFU%':>6}", flush=True)
    model, model_shape, cost = None, None, {}
    for row in plan(args):
        shape, method, length, chunk, budget = row
        if not fits(method, shape, length, args):
            continue
        elapsed = time.perf_counter() - started
        # Estimated from the last row of this shape and method, scaled by length.
        guess = cost.get((shape, method), 0.0) * length
        if elapsed + guess > args.max_seconds:
            result["skipped"].append({"row": row, "why": f"time: {elapsed:.0f}s spent, ~{guess:.0f}s more"})
            continue
        if shape != model_shape:
            model = None
            torch.cuda.empty_cache()
            model, model_shape = build_model(shape), shape
            params, weights = matmul_params(model), torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        try:
            r = run_row(model, shape, method, length, chunk, budget, args, rate, params, weights)
        except torch.OutOfMemoryError as e:
            result["skipped"].append({"row": row, "why": f"out of memory: {str(e)[:120]}"})
            torch.cuda.empty_cache()
            continue
        except Exception as e:  # a failing method must not cost the other rows; it is reported
            result.setdefault("errors", []).append({"row": row, "error": f"{type(e).__name__}: {e}"[:400]})
            print(f"{shape:<13}{method:<24}{length:>7} ERROR {type(e).__name__}: {str(e)[:200]}", flush=True)
            torch.cuda.empty_cache()
            continue
        cost[(shape, method)] = (time.perf_counter() - t0) / length
        result["rows"].append(r)
        print(f"{shape:<13}{method:<24}{length:>7}{chunk:>6}{budget:>5}{r['tokens_per_s']:>9.0f}"
              f"{r['peak_gib']:>9.2f}{r['peak_above_weights_gib']:>9.2f}{100 * r['score_share']:>7.2f}"
              f"{100 * r['topk_share']:>6.2f}{100 * r['compact_share']:>7.2f}{100 * r['mfu']:>6.1f}", flush=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out} ({len(result['rows'])} rows, {len(result['skipped'])} skipped)")


if __name__ == "__main__":
    main()
