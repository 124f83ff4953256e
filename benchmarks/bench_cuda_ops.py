"""CUDA benchmark of the citrus ops against plain PyTorch and torch.compile of it (issue 7).

One command on a GPU machine::

    python benchmarks/bench_cuda_ops.py [--out PATH.json] [--quick]

For each op (chunk_scores with and without lse, segmented_topk, compact_kv, evict) and each
shape of issue 7 it times our kernel, an eager PyTorch baseline written the way Python KV-cache
libraries do it (materialised attention with a float32 softmax, ``torch.topk`` then ``sort``,
``gather`` with an expanded index then ``cat``), and ``torch.compile`` of that baseline. The
ceilings are measured in the same run: a large device-to-device copy (bytes read + written) and
a large bf16 matrix product. Each row reports achieved GB/s and TFLOP/s, the floor
max(bytes / copy bandwidth, flops / matrix rate) and time over floor. Times are medians of CUDA
event measurements after warm-up; inputs are random normal (never zeros). Writes JSON (device,
torch, CUDA, date) and a PNG of time against size; prints a short table last.
``--plot-only PATH.json`` redraws the PNG from a result file (e.g. on a machine with matplotlib).
The method is CItruS (Bai et al., EMNLP 2024, arXiv 2406.12018).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import citrus_ext  # noqa: E402,F401  (registers torch.ops.citrus)

ops = torch.ops.citrus


# ------------------------------------------------------------------------------------------------
# Eager baselines (what a pure-PyTorch library does), also fed to torch.compile.

def eager_chunk_scores(query, key, scale, lse=None, granularity="layer"):
    b, hq, lq, d = query.shape
    hkv, length = key.shape[1], key.shape[2]
    g, lc = hq // hkv, length - lq
    logits = torch.matmul(query.reshape(b, hkv, g * lq, d), key.transpose(-1, -2)).float() * scale
    if lse is None:
        own = torch.ones(lq, lq, dtype=torch.bool, device=query.device).triu(1).repeat(g, 1)
        logits[..., lc:] = logits[..., lc:].masked_fill(own, float("-inf"))
        probs = torch.softmax(logits, dim=-1)[..., :lc]
    else:
        probs = torch.exp(logits[..., :lc] - lse.float().reshape(b, hkv, g * lq, 1))
    per_head = probs.sum(dim=2)
    if granularity == "layer":
        return per_head.sum(dim=1, keepdim=True) / (hq * lq)
    return per_head / (g * lq)


def eager_topk(scores, k):
    return torch.topk(scores, k, dim=1, sorted=False).indices.sort(dim=1).values


def eager_compact(key, value, kept, key_new=None, value_new=None):
    b, h = key.shape[:2]
    idx = kept.expand(b, h, kept.shape[2])
    k = key.gather(2, idx[..., None].expand(-1, -1, -1, key.shape[3]))
    v = value.gather(2, idx[..., None].expand(-1, -1, -1, value.shape[3]))
    if key_new is not None:
        k, v = torch.cat([k, key_new], dim=2), torch.cat([v, value_new], dim=2)
    return k, v


def eager_evict(query, key, value, keep, scale, granularity="layer"):
    b, hkv, length = key.shape[:3]
    lq = query.shape[2]
    lc = length - lq
    scores = eager_chunk_scores(query, key, scale, None, granularity)
    kept = eager_topk(scores.reshape(-1, lc), min(keep, lc)).reshape(b, scores.shape[1], -1)
    k, v = eager_compact(key, value, kept, key[:, :, lc:], value[:, :, lc:])
    return k, v, kept


# ------------------------------------------------------------------------------------------------
# Timing

def time_us(fn, min_rep_ms: float = 2.0, reps: int = 15, max_seconds: float = 3.0) -> float:
    """Median microseconds per call: each repetition times a batch of calls between CUDA events
    (the batch sized to last >= min_rep_ms, so event overhead vanishes)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    once = max(time.perf_counter() - t0, 1e-6)
    inner = max(1, min(200, int(min_rep_ms / 1e3 / once)))
    reps = max(3, min(reps, int(max_seconds / (once * inner))))
    for _ in range(2):  # warm-up at full batch
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / inner)
    return statistics.median(times)


def graph_time_us(fn) -> float:
    """Median microseconds of one replay of ``fn`` captured in a CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_us(graph.replay)


def guarded_check(op, ours, eager, cargs) -> str:
    try:
        return check(op, ours, eager, cargs)
    except Exception as exc:  # noqa: BLE001 - e.g. the baseline runs out of memory
        torch.cuda.empty_cache()
        return f"unchecked ({type(exc).__name__})"


def guarded(fn):
    """Time ``fn`` or report why it could not run (e.g. the baseline runs out of memory)."""
    try:
        return time_us(fn), None
    except Exception as exc:  # noqa: BLE001 - a failing baseline must not stop the suite
        torch.cuda.empty_cache()
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"


# ------------------------------------------------------------------------------------------------
# Agreement with the baseline at the benchmark's (large) shapes, so a fast wrong kernel shows.

def check(op: str, ours, eager, cargs) -> str:
    """'ok' or what disagrees. The baseline's logits are bf16-rounded (as in a model's eager
    attention), so scores agree to ~1e-3; top-k ties may break differently, so the kept score
    multisets are compared; copies must match exactly."""
    got, want = ours(), eager(*cargs)
    if op.startswith("chunk_scores"):
        err = float((got - want).norm() / want.norm())
        return "ok" if err < 1e-2 else f"scores differ: rel err {err:.2e}"
    if op == "segmented_topk":
        x = cargs[0]
        same = torch.equal(torch.gather(x, 1, got).sort(1).values, torch.gather(x, 1, want).sort(1).values)
        ordered = bool((got[:, 1:] > got[:, :-1]).all())
        return "ok" if same and ordered else f"top-k differs (same values {same}, ascending {ordered})"
    if op == "compact_kv":
        return "ok" if all(torch.equal(a, b) for a, b in zip(got, want)) else "compaction differs"
    q, k, v, keep, scale = cargs
    lc = k.shape[2] - q.shape[2]
    kept = got[2]
    copies = eager_compact(k, v, kept, k[:, :, lc:], v[:, :, lc:])
    ordered = bool((kept[..., 1:] > kept[..., :-1]).all())
    ok = ordered and torch.equal(got[0], copies[0]) and torch.equal(got[1], copies[1])
    return "ok" if ok else f"evict inconsistent (ascending {ordered})"


# ------------------------------------------------------------------------------------------------
# Ceilings

def measure_ceilings() -> dict:
    n = 1 << 30  # 1 GiB each way: far beyond L2
    src = torch.randn(n // 4, device="cuda")
    dst = torch.empty_like(src)
    copy_us = time_us(lambda: dst.copy_(src))
    del src, dst
    torch.cuda.empty_cache()
    return {
        "copy_GBps": 2 * n / (copy_us * 1e-6) / 1e9,
        "bf16_mm_TFLOPs": bf16_matmul_tflops(),
        "copy_bytes": 2 * n,
        "mm_shape": [MM_SIZE] * 3,
    }


MM_SIZE = 8192


def bf16_matmul_tflops() -> float:
    """The matrix-unit ceiling: a random MM_SIZE³ bf16 product, median TFLOP/s."""
    a = torch.randn(MM_SIZE, MM_SIZE, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(MM_SIZE, MM_SIZE, device="cuda", dtype=torch.bfloat16)
    mm_us = time_us(lambda: a @ b)
    del a, b
    torch.cuda.empty_cache()
    return 2 * MM_SIZE**3 / (mm_us * 1e-6) / 1e12


# ------------------------------------------------------------------------------------------------
# Cases: (op, label, size for the plot, builder) where builder returns (ours, eager, args-for-
# compiled, bytes, flops).

LLAMA = dict(hq=32, hkv=8, d=128)


def qkv(b, lq, length, dtype=torch.bfloat16):
    q = torch.randn(b, LLAMA["hq"], lq, LLAMA["d"], device="cuda", dtype=dtype)
    k = torch.randn(b, LLAMA["hkv"], length, LLAMA["d"], device="cuda", dtype=dtype)
    v = torch.randn(b, LLAMA["hkv"], length, LLAMA["d"], device="cuda", dtype=dtype)
    return q, k, v


def score_case(b, lq, length, with_lse):
    q, k, _ = qkv(b, lq, length)
    scale = LLAMA["d"] ** -0.5
    lc = length - lq
    lse = None
    if with_lse:  # any finite lse serves for timing; computed cheaply from the cache part only
        lse = torch.randn(b, LLAMA["hq"], lq, device="cuda") + math.log(length)
    es = q.element_size()
    bytes_ = es * (q.numel() + k.numel()) + 4 * b * lc + (4 * lse.numel() if with_lse else 0)
    flops = 2 * b * LLAMA["hq"] * lq * LLAMA["d"] * (lc if with_lse else length)
    ours = lambda: ops.chunk_scores(q, k, scale, lse, "layer", None)  # noqa: E731
    args = (q, k, scale, lse, "layer")
    return ours, eager_chunk_scores, args, bytes_, flops


def topk_case(s, length, k):
    x = torch.rand(s, length, device="cuda") + 1e-3
    ours = lambda: ops.segmented_topk(x, k, None)  # noqa: E731
    return ours, eager_topk, (x, k), 4 * s * length + 8 * s * k, 0


def compact_case(length, kept_n, ln=256, b=1, h=8, d=128):
    key = torch.randn(b, h, length, d, device="cuda", dtype=torch.bfloat16)
    value = torch.randn_like(key)
    key_new = torch.randn(b, h, ln, d, device="cuda", dtype=torch.bfloat16)
    value_new = torch.randn_like(key_new)
    kept = torch.sort(torch.randperm(length, device="cuda")[:kept_n]).values.view(1, 1, -1).expand(b, 1, -1)
    kept = kept.contiguous()
    ours = lambda: ops.compact_kv(key, value, kept, key_new, value_new)  # noqa: E731
    row = d * key.element_size()
    bytes_ = 2 * b * h * row * (2 * kept_n + 2 * ln) + 8 * kept.numel()
    return ours, eager_compact, (key, value, kept, key_new, value_new), bytes_, 0


def evict_case(b, lq, length, keep):
    q, k, v = qkv(b, lq, length)
    scale = LLAMA["d"] ** -0.5
    lc = length - lq
    kk = min(keep, lc)
    ours = lambda: ops.evict(q, k, v, keep, scale, None, "layer", True)  # noqa: E731
    es = q.element_size()
    row = LLAMA["d"] * es * LLAMA["hkv"] * b
    bytes_ = es * (q.numel() + k.numel()) + row * 4 * (kk + lq) + 4 * b * lc  # K, V rows in and out
    flops = 2 * b * LLAMA["hq"] * lq * LLAMA["d"] * length
    return ours, eager_evict, (q, k, v, keep, scale), bytes_, flops


def cases(quick: bool):
    out = []
    for b in (1, 8):
        out.append(("evict", f"chunk B{b} Lq256 L1280 keep768", 1280 * b, lambda b=b: evict_case(b, 256, 1280, 768)))
    for lse in (True, False):
        name = "chunk_scores" if lse else "chunk_scores_nolse"
        for b in (1, 8):
            out.append((name, f"chunk B{b} Lq256 L1280", 1280 * b, lambda b=b, lse=lse: score_case(b, 256, 1280, lse)))
        for length in ((32768,) if quick else (32768, 131072)):
            out.append((name, f"one-shot Lq64 L{length // 1024}k", length, lambda n=length, lse=lse: score_case(1, 64, n, lse)))
    topk_shapes = [(1, 1024), (4096, 1024), (8, 32768), (256, 32768), (8, 131072), (64, 131072)]
    if not quick:
        topk_shapes += [(4096, 8192), (4096, 32768), (1024, 131072)]
    for s, length in topk_shapes:
        for k in sorted({length // 2, min(768, length)}):
            out.append(("segmented_topk", f"S{s} L{length // 1024}k k{k}", s * length,
                        lambda s=s, n=length, k=k: topk_case(s, n, k)))
    for length in ((4096, 32768) if quick else (4096, 32768, 131072)):
        out.append(("compact_kv", f"L{length // 1024}k keep L/2 +256, 8x128 bf16", length,
                    lambda n=length: compact_case(n, n // 2)))
    for length in ((32768,) if quick else (32768, 131072)):
        out.append(("evict", f"one-shot Lq64 L{length // 1024}k keep4096", length, lambda n=length: evict_case(1, 64, n, 4096)))
    return out


def series(op: str, label: str) -> str:
    """Plot line of a row: top-k splits by budget kind, the rest by op."""
    if op == "segmented_topk":
        return "segmented_topk k=768" if label.endswith("k768") else "segmented_topk k=L/2"
    return op


# ------------------------------------------------------------------------------------------------

def run(args, save) -> dict:
    """Runs every case; ``save(result)`` is called after each row so a cut-short run keeps its rows."""
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    ceil = measure_ceilings()
    print(f"# {props.name}: copy {ceil['copy_GBps']:.0f} GB/s, bf16 mm {ceil['bf16_mm_TFLOPs']:.0f} TFLOP/s", flush=True)
    compiled = {
        "chunk_scores": torch.compile(eager_chunk_scores, dynamic=True),
        "segmented_topk": torch.compile(eager_topk, dynamic=True),
        "compact_kv": torch.compile(eager_compact, dynamic=True),
        "evict": torch.compile(eager_evict, dynamic=True),
    }
    compiled["chunk_scores_nolse"] = compiled["chunk_scores"]
    rows = []
    res = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": props.name,
        "sm_count": props.multi_processor_count,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "ceilings": ceil,
        "rows": rows,
    }
    began = time.perf_counter()
    for op, label, size, build in cases(args.quick):
        if time.perf_counter() - began > args.max_seconds:
            rows.append({"op": op, "shape": label, "size": size, "skipped": "time budget"})
            continue
        ours, eager, cargs, nbytes, flops = build()
        row = {"op": op, "shape": label, "size": size, "bytes": nbytes, "flops": flops, "series": series(op, label)}
        row["check"] = guarded_check(op, ours, eager, cargs)
        row["ours_us"] = time_us(ours)
        if op == "evict":
            row["ours_graph_us"] = graph_time_us(ours)
        row["eager_us"], row["eager_error"] = guarded(lambda: eager(*cargs))
        row["compiled_us"], row["compiled_error"] = guarded(lambda: compiled[op](*cargs))
        floor_us = max(nbytes / (ceil["copy_GBps"] * 1e9), flops / (ceil["bf16_mm_TFLOPs"] * 1e12)) * 1e6
        row["floor_us"] = floor_us
        row["GBps"] = nbytes / (row["ours_us"] * 1e-6) / 1e9
        row["TFLOPs"] = flops / (row["ours_us"] * 1e-6) / 1e12
        rows.append(row)
        print(json.dumps(row), flush=True)
        save(res)
        del ours, cargs
        torch.cuda.empty_cache()
    return res


def verdicts(res: dict) -> list[str]:
    """Issue 7's targets, each measured against its number."""
    rows = [r for r in res["rows"] if "ours_us" in r]
    out = []
    comp = [r for r in rows if r["op"] == "compact_kv"]
    if comp:
        r = max(comp, key=lambda r: r["size"])
        frac = r["GBps"] / res["ceilings"]["copy_GBps"]
        out.append(f"compact_kv {r['shape']}: {100 * frac:.0f}% of copy bandwidth (target >= 80%) "
                   f"{'PASS' if frac >= 0.8 else 'MISS'}")
    for r in rows:
        if r["op"] in ("chunk_scores", "chunk_scores_nolse") and r["shape"].startswith("one-shot"):
            sp = r["eager_us"] / r["ours_us"] if r["eager_us"] else float("nan")
            xf = r["ours_us"] / r["floor_us"]
            ok = sp >= 5 and xf <= 2
            out.append(f"{r['op']} {r['shape']}: {sp:.1f}x eager (>= 5x), {xf:.1f}x floor (<= 2x) "
                       f"{'PASS' if ok else 'MISS'}")
    topk = [r for r in rows if r["op"] == "segmented_topk"]
    if topk:
        worst = min(topk, key=lambda r: (r["eager_us"] or float("inf")) / r["ours_us"])
        sp = (worst["eager_us"] or float("nan")) / worst["ours_us"]
        out.append(f"segmented_topk worst {worst['shape']}: {sp:.1f}x topk+sort (>= 3x everywhere) "
                   f"{'PASS' if sp >= 3 else 'MISS'}")
    for r in rows:
        if r["op"] == "evict" and r["shape"].startswith("chunk B1"):
            best = min(r["ours_us"], r.get("ours_graph_us", float("inf")))
            out.append(f"evict {r['shape']}: {r['ours_us']:.1f} us eager launch, "
                       f"{r.get('ours_graph_us', float('nan')):.1f} us graph replay (<= 30 us) "
                       f"{'PASS' if best <= 30 else 'MISS'}")
    return out


def table(res: dict) -> str:
    fmt = lambda v: "-" if v is None else f"{v:,.1f}"  # noqa: E731
    lines = [f"{'op':<19} {'shape':<34} {'ours us':>9} {'eager':>9} {'compiled':>9} {'x eager':>7} "
             f"{'GB/s':>7} {'TFLOP/s':>7} {'x floor':>7}  check"]
    for r in res["rows"]:
        if "ours_us" not in r:
            lines.append(f"{r['op']:<19} {r['shape']:<34} skipped ({r['skipped']})")
            continue
        sp = r["eager_us"] / r["ours_us"] if r["eager_us"] else None
        lines.append(f"{r['op']:<19} {r['shape']:<34} {fmt(r['ours_us']):>9} {fmt(r['eager_us']):>9} "
                     f"{fmt(r['compiled_us']):>9} {fmt(sp):>7} {r['GBps']:>7.0f} {r['TFLOPs']:>7.1f} "
                     f"{r['ours_us'] / r['floor_us']:>7.1f}  {r.get('check', '-')}")
    c = res["ceilings"]
    lines.append(f"ceilings on {res['device']}: copy {c['copy_GBps']:.0f} GB/s, bf16 mm {c['bf16_mm_TFLOPs']:.0f} TFLOP/s")
    bad = [r for r in res["rows"] if r.get("check", "ok") != "ok"]
    lines.append(f"agreement with the baseline: {len(bad)} of {len(res['rows'])} rows not ok")
    return "\n".join(lines + verdicts(res))


def plot(res: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"# matplotlib missing: no plot (rerun with --plot-only {path[:-4]}.json elsewhere)")
        return
    done = [r for r in res["rows"] if "ours_us" in r]
    names = sorted({series(r["op"], r["shape"]) for r in done})
    ncol = 3
    nrow = (len(names) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.6 * ncol, 3.6 * nrow), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        rs = sorted((r for r in done if series(r["op"], r["shape"]) == name), key=lambda r: r["size"])
        for key, style in (("ours_us", "o-"), ("eager_us", "s--"), ("compiled_us", "^:")):
            pts = [(r["size"], r[key]) for r in rs if r.get(key)]
            if pts:
                ax.plot(*zip(*pts), style, label=key[:-3])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("size (states or segments x length)", fontsize=8)
        ax.set_ylabel("time (us)", fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle(f"citrus CUDA ops on {res['device']} (torch {res['torch']}, {res['date'][:10]})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"# plot: {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="JSON path (default benchmarks/results/cuda_ops_<device>_<date>.json)")
    p.add_argument("--quick", action="store_true", help="fewer, smaller shapes")
    p.add_argument("--max-seconds", type=float, default=300.0, help="skip remaining shapes after this")
    p.add_argument("--plot-only", metavar="JSON", help="redraw the plot of an existing result file")
    args = p.parse_args()
    if args.plot_only:
        with open(args.plot_only) as f:
            res = json.load(f)
        plot(res, args.plot_only[:-5] + ".png")
        print(table(res))
        return
    if not torch.cuda.is_available():
        sys.exit("bench_cuda_ops.py needs a CUDA GPU")
    out = args.out
    if out is None:
        dev = torch.cuda.get_device_name().replace(" ", "_").replace("/", "_")
        out = os.path.join(HERE, "results", f"cuda_ops_{dev}_{dt.date.today().isoformat()}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)

    def save(res):
        with open(out, "w") as f:
            json.dump(res, f, indent=1)

    res = run(args, save)
    save(res)
    print(f"# results: {out}")
    plot(res, out[:-5] + ".png" if out.endswith(".json") else out + ".png")
    print(table(res))
    wrong = [r for r in res["rows"] if not r.get("check", "ok").startswith(("ok", "unchecked"))]
    sys.exit(1 if wrong else 0)


if __name__ == "__main__":
    main()
