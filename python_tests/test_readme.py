"""Every command and code block in README.md is run: here, by another named test, or by CI.

The Python blocks are executed as written. Each shell command must match an entry of ``COVERED``,
which names the file that runs it and a string that file must contain; so a README command nobody
runs, or a runner that stops running it, fails this test.
"""
import json
import re
import subprocess
from pathlib import Path

import pytest

from procs import ROOT, run_python

README = (ROOT / "README.md").read_text(encoding="utf-8")
COMMAND_START = ("bash ", "python ", "citrus ", "pip ", "cmake ", ".venv/")

# README command prefix -> (file that runs it, text that file must contain)
COVERED = {
    "bash scripts/demo.sh": (".ci/run", "bash scripts/demo.sh"),
    "bash scripts/test.sh": (".ci/run", "bash scripts/test.sh"),
    "citrus ask ": ("python_tests/test_readme.py", '"ask", "--document", "report.txt"'),
    "citrus demo": ("scripts/demo.sh", ".venv/bin/citrus demo"),
    "citrus eval ": ("python_tests/test_eval_runner.py", 'cli.main(["report"'),
    "pip install --no-build-isolation": ("scripts/setup.sh", "pip install -q --no-build-isolation -e ."),
    "pip wheel --no-build-isolation --no-deps -w dist .": (
        "scripts/check_builds.sh", "pip wheel -q --no-build-isolation --no-deps -w"),
    "cmake -S . -B build": ("scripts/check_builds.sh", "-S . -B"),
    "cmake --build build -j": ("scripts/check_builds.sh", 'cmake" --build'),
    "python -c \"import torch; torch.ops.load_library": ("scripts/check_builds.sh", "torch.ops.load_library"),
    "python benchmarks/bench_ops.py": ("python_tests/test_benchmarks.py", '"benchmarks/bench_ops.py"'),
    "python benchmarks/bench_reading.py": ("python_tests/test_benchmarks.py", '"benchmarks/bench_reading.py"'),
    # GPU only: run by benchmarks/run_gpu_suite.sh on the lent GPU; without one this file checks
    # that they refuse with a clear message (test_gpu_commands_refuse_without_a_gpu).
    "python benchmarks/bench_cuda_ops.py": ("benchmarks/run_gpu_suite.sh", "benchmarks/bench_cuda_ops.py"),
    "python benchmarks/bench_reading_gpu.py": ("benchmarks/run_gpu_suite.sh", "benchmarks/bench_reading_gpu.py"),
    "bash benchmarks/run_gpu_suite.sh": ("python_tests/test_readme.py", '"benchmarks/run_gpu_suite.sh"'),
}


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def shell_commands():
    """Indented command lines and inline `pip ...` commands, outside the Python blocks."""
    text = re.sub(r"```.*?```", "", README, flags=re.S)
    commands = [line.strip() for line in text.splitlines()
                if line.startswith("    ") and line.strip().startswith(COMMAND_START)]
    commands += re.findall(r"`(pip [^`]+)`", text)
    return commands


def test_readme_lists_commands():
    found = shell_commands()
    assert any(c.startswith("bash scripts/demo.sh") for c in found), found
    assert any(c.startswith("pip wheel") for c in found), found
    assert len(python_blocks()) == 2


@pytest.mark.parametrize("command", shell_commands())
def test_every_readme_command_is_run_somewhere(command):
    matches = [prefix for prefix in COVERED if command.startswith(prefix)]
    assert matches, f"README command not run by any test or by CI: {command!r}; add it to COVERED"
    path, needle = COVERED[max(matches, key=len)]
    assert needle in (ROOT / path).read_text(encoding="utf-8"), f"{path} no longer runs {command!r}"


def test_ops_block_runs_as_written():
    block = next(b for b in python_blocks() if "torch.ops.citrus.evict" in b)
    scope = {}
    exec(compile(block, "README.md (ops block)", "exec"), scope)
    k2, v2, kept = scope["k2"], scope["v2"], scope["kept"]
    # The block's comment promises these shapes.
    assert k2.shape == v2.shape == (1, 8, 768 + 256, 128)
    assert kept.shape == (1, 1, 768)
    assert bool((kept[..., 1:] > kept[..., :-1]).all()) and int(kept.min()) >= 0 and int(kept.max()) < 1024


REPORT_FACT = "Northwind Metals missed the March deadline for the copper order."


def write_report(path: Path):
    """A report of ~2.5k tokens (past the block's budget of 768) with one supplier fact in the middle."""
    filler = [f"Week {i}: the warehouse team counted stock, checked invoices and filed the usual "
              f"logistics summary for the quarter without notable events." for i in range(1, 91)]
    filler.insert(45, REPORT_FACT)
    path.write_text("Quarterly supplier report.\n\n" + "\n".join(filler) + "\n", encoding="utf-8")


def test_api_block_runs_as_written(tmp_path, monkeypatch, capsys):
    block = next(b for b in python_blocks() if "citrus_ext.answer" in b)
    write_report(tmp_path / "report.txt")
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(block, "README.md (API block)", "exec"), scope)
    ans = scope["ans"]
    assert isinstance(ans.text, str) and ans.text.strip()
    stats = ans.stats
    for key in ("tokens_read", "chunks", "peak_states_per_layer", "forward_s", "score_s", "topk_s",
                "compact_s", "wall_s"):
        assert key in stats, key
    assert stats["tokens_read"] > 2000 and stats["chunks"] >= 8
    # Budget 768, chunks of 256: the cache stays bounded although the report is longer.
    assert max(stats["peak_states_per_layer"]) < stats["tokens_read"]
    printed = capsys.readouterr().out
    assert ans.text in printed and "tokens_read" in printed


def test_cli_ask_line_runs_as_written(tmp_path):
    write_report(tmp_path / "report.txt")
    line = next(c for c in shell_commands() if c.startswith("citrus ask "))
    question = re.search(r'--question "([^"]+)"', line).group(1)
    done = run_python("-m", "citrus_ext", "ask", "--document", "report.txt", "--question", question,
                      "--json", cwd=tmp_path, timeout=1800)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(done.stdout)
    assert record["document_tokens"] > 2000 and isinstance(record["answer"], str)


def test_gpu_commands_refuse_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: benchmarks/run_gpu_suite.sh runs these for real")
    for script in ("benchmarks/bench_cuda_ops.py", "benchmarks/bench_reading_gpu.py"):
        done = run_python(script, cwd=ROOT, timeout=600)
        assert done.returncode != 0 and "needs a CUDA GPU" in done.stderr, (script, done.stderr[-500:])
    syntax = subprocess.run(["bash", "-n", "benchmarks/run_gpu_suite.sh"], cwd=ROOT, capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
