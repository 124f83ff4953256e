"""Each citrus op and `evict` against the plain-PyTorch reference, side by side in one run.

    python benchmarks/bench_ops.py [--device cpu|cuda] [--dtype float32|bfloat16|float16] [--quick]

Shapes: chunk mode (Lq 256, L 1280: a 256-token chunk over a 1024-state cache) and one-shot
(Lq 64, L 32768: SnapKV-style compression of a long prompt), for SmolLM2-135M heads (9/3, D 64)
and Llama-3-8B heads (32/8, D 128), batch 1. Reports median time after warm-up and the peak
memory each call needs beyond its inputs (each measured in a fresh process), writes JSON under
benchmarks/results/ with machine, versions and date, and prints a table last.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "python_tests"))

import citrus_ext  # noqa: E402,F401
from common import environment, median_time, peak_extra_bytes, run_isolated, table, write_result  # noqa: E402
from reference import ref_chunk_scores, ref_compact_kv  # noqa: E402

HEADS = {"smollm2": (9, 3, 64), "llama3_8b": (32, 8, 128)}
MODES = {"chunk": (256, 1280, 768), "oneshot": (64, 32768, 2048)}  # (Lq, L, keep)
OPS = ["chunk_scores", "segmented_topk", "compact_kv", "evict"]


def eager_topk(scores, k):
    """What pure-PyTorch eviction code does: topk, then sort back into original order."""
    return scores.topk(k, dim=-1).indices.sort(dim=-1).values


def eager_evict(q, k, v, keep, scale):
    lc = k.shape[2] - q.shape[2]
    scores = ref_chunk_scores(q, k, scale)
    kept = eager_topk(scores.view(-1, lc), keep).view(q.shape[0], 1, keep)
    return ref_compact_kv(k, v, kept, k[:, :, lc:], v[:, :, lc:])


def make_call(op: str, impl: str, heads: str, mode: str, device: str, dtype: torch.dtype):
    """Builds the inputs of one cell and returns a zero-argument function that runs it."""
    hq, hkv, d = HEADS[heads]
    lq, length, keep = MODES[mode]
    lc = length - lq
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, hq, lq, d, generator=gen).to(device, dtype)
    k = torch.randn(1, hkv, length, d, generator=gen).to(device, dtype)
    v = torch.randn(1, hkv, length, d, generator=gen).to(device, dtype)
    scale = d**-0.5
    ours = impl == "citrus"
    if op == "chunk_scores":
        return (lambda: torch.ops.citrus.chunk_scores(q, k, scale)) if ours else (lambda: ref_chunk_scores(q, k, scale))
    if op == "segmented_topk":
        scores = torch.rand(hkv, lc, generator=gen).to(device)  # one segment per KV head
        return (lambda: torch.ops.citrus.segmented_topk(scores, keep)) if ours else (lambda: eager_topk(scores, keep))
    if op == "compact_kv":
        kept = torch.randperm(lc, generator=gen)[:keep].sort().values.view(1, 1, keep).to(device)
        kn, vn = k[:, :, lc:], v[:, :, lc:]
        if ours:
            return lambda: torch.ops.citrus.compact_kv(k, v, kept, kn, vn)
        return lambda: ref_compact_kv(k, v, kept, kn, vn)
    if op == "evict":
        return (lambda: torch.ops.citrus.evict(q, k, v, keep, scale)) if ours else (lambda: eager_evict(q, k, v, keep, scale))
    raise ValueError(op)


def worker(spec: dict) -> None:
    """Fresh-process peak-memory measurement of one cell (prints one JSON line)."""
    torch.set_num_threads(spec["threads"])
    fn = make_call(spec["op"], spec["impl"], spec["heads"], spec["mode"], spec["device"], getattr(torch, spec["dtype"]))
    fn()  # first call pays one-off costs (thread pools, lazy init) that are not the op's memory
    print(json.dumps({"peak_bytes": peak_extra_bytes(fn, spec["device"])}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quick", action="store_true", help="chunk mode only, fewer repeats")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/ops_<device>.json)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))

    dtype = getattr(torch, args.dtype)
    rows = []
    modes = ["chunk"] if args.quick else list(MODES)
    for heads in HEADS:
        for mode in modes:
            for op in OPS:
                row = {"op": op, "heads": heads, "mode": mode, "Lq": MODES[mode][0], "L": MODES[mode][1],
                       "keep": MODES[mode][2]}
                for impl in ("citrus", "reference"):
                    fn = make_call(op, impl, heads, mode, args.device, dtype)
                    row[f"{impl}_ms"] = round(1e3 * median_time(fn, args.device, iters=3 if args.quick else 7), 3)
                    del fn
                    spec = dict(op=op, impl=impl, heads=heads, mode=mode, device=args.device, dtype=args.dtype,
                                threads=torch.get_num_threads())
                    if args.device.startswith("cuda"):
                        fn = make_call(op, impl, heads, mode, args.device, dtype)
                        peak = peak_extra_bytes(fn, args.device)
                        del fn
                    else:
                        peak = run_isolated([os.path.abspath(__file__), "--worker", json.dumps(spec)])["peak_bytes"]
                    row[f"{impl}_peak_mb"] = round(peak / 2**20, 2)
                row["speedup"] = round(row["reference_ms"] / row["citrus_ms"], 2)
                # Below 0.01 MB (a page or two) the RSS reading is noise: no ratio rather than a huge one.
                if row["citrus_peak_mb"] >= 0.01:
                    row["memory_ratio"] = round(row["reference_peak_mb"] / row["citrus_peak_mb"], 1)
                rows.append(row)
                print(f"{heads:10s} {mode:8s} {op:15s} citrus {row['citrus_ms']:9.3f} ms  reference "
                      f"{row['reference_ms']:9.3f} ms  x{row['speedup']}", file=sys.stderr, flush=True)

    env = environment(args.device)
    env["dtype"] = args.dtype
    name = f"ops_{args.device.split(':')[0]}.json"
    path = write_result(name, {"environment": env, "results": rows}, args.out)
    print(f"# {env['date']}  {env['device']} ({env.get('gpu', env['cpu'])}), torch {env['torch']}, "
          f"{env['threads']} threads, {args.dtype}; written to {path}")
    print(table(rows, [("heads", "heads"), ("mode", "mode"), ("op", "op"), ("citrus_ms", "citrus ms"),
                       ("reference_ms", "reference ms"), ("speedup", "speedup"),
                       ("citrus_peak_mb", "citrus MB"), ("reference_peak_mb", "reference MB"),
                       ("memory_ratio", "mem ratio")]))


if __name__ == "__main__":
    main()
