"""Shared benchmark plumbing: timing, peak memory, environment record, result files."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import torch

from citrus_ext.environment import environment  # noqa: F401 (re-exported for the benchmarks)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# Model shapes the reading benchmarks build randomly initialised Llama models from (weights do
# not change the cost): the real configs' sizes.
LLAMA_SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
                      tie_word_embeddings=False, rope_theta=500000.0),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
                         tie_word_embeddings=True, rope_theta=100000.0),
}


def llama_config(shape: str):
    """A ``transformers.LlamaConfig`` of one of :data:`LLAMA_SHAPES`."""
    import transformers

    sizes = dict(LLAMA_SHAPES[shape])
    theta = sizes.pop("rope_theta")
    return transformers.LlamaConfig(**sizes, rope_parameters={"rope_type": "default", "rope_theta": theta},
                                    rms_norm_eps=1e-5)


def median_time(fn, device: str, warmup: int = 2, iters: int = 5) -> float:
    """Median seconds of ``fn()`` after ``warmup`` calls (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_extra_bytes(fn, device: str) -> int:
    """Peak memory ``fn()`` needs beyond what is allocated before it.

    CUDA: the caching allocator's peak counter. CPU: the process's resident-set high-water mark
    (reset through /proc/self/clear_refs) above the resident set before the call; run it in a
    fresh process so memory freed by earlier work cannot hide an allocation.
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    base = _status_kb("VmRSS")
    fn()
    return max(0, _status_kb("VmHWM") - base) * 1024


def run_isolated(argv: list[str]) -> dict:
    """Runs ``python argv...`` and parses the JSON object it prints last."""
    # A fixed mmap threshold makes glibc map every large block afresh and unmap it on free: with
    # its default (a threshold that grows after each free), the warm-up call's freed blocks stay
    # resident and the measured call's allocations would not raise the high-water mark.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run([sys.executable, *argv], check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_result(name: str, payload: dict, out: str | None = None) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = out or os.path.join(RESULTS, name)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    return path


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A plain text table of ``rows`` with (key, header) columns."""
    cells = [[h for _, h in columns]] + [[str(r.get(k, "")) for k, _ in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c[i].rjust(widths[i]) for i in range(len(columns))) for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
