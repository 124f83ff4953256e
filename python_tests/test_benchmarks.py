"""The README's benchmark commands run and write well-formed results (small settings)."""
import json

from procs import ROOT, run_python


def run_script(*argv):
    done = run_python(*argv, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_bench_ops_quick(tmp_path):
    out = tmp_path / "ops.json"
    table = run_script("benchmarks/bench_ops.py", "--quick", "--out", out)
    result = json.loads(out.read_text())
    assert {"date", "device", "torch", "cpu", "commit"} <= set(result["environment"])
    ops = {(r["heads"], r["op"]) for r in result["results"]}
    assert ops == {(h, op) for h in ("smollm2", "llama3_8b")
                   for op in ("chunk_scores", "segmented_topk", "compact_kv", "evict")}
    for row in result["results"]:
        assert row["citrus_ms"] > 0 and row["reference_ms"] > 0 and row["citrus_peak_mb"] >= 0
    assert "speedup" in table.splitlines()[1]


def test_bench_reading_small(tmp_path):
    out = tmp_path / "reading.json"
    run_script("benchmarks/bench_reading.py", "--lengths", 600, "--methods", "cse", "full", "--budget", 128,
               "--chunk-size", 128, "--new-tokens", 2, "--instruction-tokens", 8, "--out", out)
    result = json.loads(out.read_text())
    assert {"date", "device", "torch", "transformers", "cpu", "commit"} <= set(result["environment"])
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"cse", "full"}
    assert rows["cse"]["peak_states"] < rows["full"]["peak_states"]
    assert rows["cse"]["tokens"] == 600 and rows["cse"]["tokens_per_s"] > 0
