"""Where a chunk's reading time goes on the GPU: host overhead against device work (issue 6).

Reads a random document with ``ChunkedReader`` on a randomly initialised bf16 model (the shapes
of ``bench_reading_gpu.py``), then:

1. times chunks with nothing synchronised inside (ms per chunk), beside a plain transformers
   SDPA forward of the same chunk over a cache of the same span (the model's own cost);
2. profiles a few chunks with ``torch.profiler``: device busy time per chunk (sum of kernel
   times), kernel launches per chunk, the ops that cost most device time and most host time;
3. times the reader's two attention paths at the layer's shape: the memory-efficient kernel under
   the block mask (ragged rows; every row before 6a927ab) against flash with lower-right causal
   masking (rows without padding).

    python benchmarks/profile_reading_gpu.py --shape llama3-8b --method cse --chunk 1024 --budget 768

Prints text only (the numbers go in benchmarks/README.md by hand).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import transformers

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from citrus_ext import ChunkedReader, make_policy  # noqa: E402
from citrus_ext.attention import Layout, attention_with_lse, flash_attention_with_lse  # noqa: E402
from bench_cuda_ops import time_us  # noqa: E402
from bench_reading_gpu import build_model  # noqa: E402


def chunk_times(step, n: int) -> list[float]:
    out = []
    for i in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(i)
        torch.cuda.synchronize()
        out.append(1e3 * (time.perf_counter() - t0))
    return out


def profile(step, n: int, rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile as prof

    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        t0 = time.perf_counter()
        for i in range(n):
            step(i)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    events = p.key_averages()
    kernels = [e for e in p.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.device_time for e in kernels) / 1e3 / n
    print(f"  wall {1e3 * wall / n:.2f} ms/chunk, device busy {busy:.2f} ms/chunk "
          f"({100 * busy / (1e3 * wall / n):.0f}%), {len(kernels) / n:.0f} kernels/chunk", flush=True)
    print("  top device time (ms/chunk):")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:rows]:
        if e.self_device_time_total <= 0:
            break
        print(f"    {e.self_device_time_total / 1e3 / n:8.3f}  x{e.count // n:<5} {e.key[:90]}")
    print("  top host self time (ms/chunk):")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:rows]:
        print(f"    {e.self_cpu_time_total / 1e3 / n:8.3f}  x{e.count // n:<5} {e.key[:90]}")


def attention_kernels(config, chunk: int, span: int) -> None:
    """The reader's two attention paths at one layer's shape (B 1): the masked memory-efficient
    kernel (``attention_with_lse``) against flash with lower-right causal masking."""
    hq, hkv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    c = span - chunk
    q = torch.randn(1, hq, chunk, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, hkv, span, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    scale = d ** -0.5
    layout = Layout([("chunk", chunk)], torch.tensor([[chunk]]))
    mask = layout.mask(torch.tensor([c]), c, None, hq // hkv, torch.bfloat16, "cuda")

    def masked():
        out, lse = attention_with_lse(q, k, v, mask, scale)
        return out.transpose(1, 2), lse

    def flash():
        return flash_attention_with_lse(q, k, v, scale)

    (o1, l1), (o2, l2) = masked(), flash()
    print(f"  flash vs masked: max |out| diff {(o1 - o2).abs().max().item():.2e}, "
          f"max |lse| diff {(l1 - l2).abs().max().item():.2e}")
    flops = 4 * hq * d * (chunk * c + chunk * (chunk + 1) / 2)
    for name, fn in (("masked efficient", masked), ("flash lower-right", flash)):
        t = time_us(fn)
        print(f"  {name:<18} {t:8.1f} us/layer  {flops / t / 1e6:6.0f} TFLOP/s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--method", default="cse")
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--budget", type=int, default=768)
    p.add_argument("--chunks", type=int, default=6, help="timed chunks")
    p.add_argument("--profiled", type=int, default=2)
    p.add_argument("--rows", type=int, default=18)
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="the reader replays CUDA graphs of repeated forwards (its default)")
    args = p.parse_args()
    model = build_model(args.shape)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    n_chunks = 5 + args.chunks + args.profiled
    doc = torch.randint(100, vocab, (n_chunks * args.chunk,), generator=g).cuda()
    instruction = torch.randint(100, vocab, (32,), generator=g).cuda()
    reader = ChunkedReader(model, make_policy(args.method, args.budget), args.chunk, cuda_graphs=args.cuda_graphs)
    pos = [0]

    def read(_i):
        reader.read_chunk([doc[pos[0]:pos[0] + args.chunk]], [instruction])
        pos[0] += args.chunk

    for _ in range(5):  # warm-up: the cache reaches its steady width (and its graph is captured)
        read(0)
    span = args.budget + 2 * args.chunk  # steady state: budget + previous chunk + this chunk
    print(f"{args.shape} {args.method} chunk {args.chunk} budget {args.budget} graphs {args.cuda_graphs} "
          f"({torch.cuda.get_device_name()}, torch {torch.__version__})", flush=True)
    ts = chunk_times(read, args.chunks)
    print(f"reader: {statistics.median(ts):.2f} ms/chunk median ({', '.join(f'{t:.1f}' for t in ts)}), "
          f"{args.chunk / statistics.median(ts) * 1e3:.0f} tok/s", flush=True)

    # The model alone: a plain SDPA forward of one chunk over a cache of the same span.
    cache = transformers.DynamicCache(config=model.config)
    ids = doc[None, : span - args.chunk]
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)

    def plain(_i):
        with torch.no_grad():
            model(input_ids=doc[None, :args.chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache.crop(span - args.chunk)

    plain(0)
    ts = chunk_times(plain, args.chunks)
    print(f"plain SDPA forward, same span: {statistics.median(ts):.2f} ms/chunk median, "
          f"{args.chunk / statistics.median(ts) * 1e3:.0f} tok/s", flush=True)
    print("profile, reader:", flush=True)
    profile(read, args.profiled, args.rows)
    print("profile, plain forward:", flush=True)
    profile(plain, args.profiled, 8)
    print(f"attention kernels at one layer (Lq {args.chunk}, span {span}):", flush=True)
    attention_kernels(model.config, args.chunk, span)


if __name__ == "__main__":
    main()
