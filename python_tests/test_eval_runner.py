"""The grid runner resumes, reruns one cell, summarises and plots, with fake model callables."""
import json
import math
from types import SimpleNamespace

import pytest
from eval_fakes import FakeAnswer, WordTokenizer

from citrus_ext.eval import cli, runner
from citrus_ext.eval.plots import plot_all

GRID = dict(tasks=["passkey"], methods=["full", "cse", "citrus_shared"], budgets=[64, 128],
            chunk_sizes=[32], lengths=[256, 600], depths=[0.0, 0.5, 1.0], samples=2)


def _run(out, answer, cells=None, **kwargs):
    cells = cells if cells is not None else runner.retrieval_cells(**GRID, window=512)
    return runner.run_retrieval(cells, out, WordTokenizer(), answer, progress=False,
                                info={"window": 512, "kv_bytes_per_state": 8}, **kwargs)


def test_full_runs_only_where_the_prompt_fits():
    cells = runner.retrieval_cells(**GRID, window=512)
    full = {c.length for c in cells if c.method == "full"}
    assert full == {256}  # 600 + PROMPT_MARGIN > 512
    assert all(c.budget is None for c in cells if c.method == "full")
    assert len(cells) == 1 * 2 * 3 * 2 * (2 * 2 + 1) - 3 * 2  # the 600-token full cells are dropped


def test_grid_writes_cells_and_summary_and_resumes(tmp_path):
    answer = FakeAnswer()
    summary = _run(tmp_path, answer)
    cells = runner.retrieval_cells(**GRID, window=512)
    assert len(answer.calls) == len(cells) == summary["cells"]
    assert len(list((tmp_path / "cells").glob("*.json"))) == len(cells)
    by_method = {(g["method"], g["length"], g["budget"]): g["containment"] for g in summary["retrieval_all_tasks"]}
    assert by_method[("citrus_shared", 600, 64)] == 1.0 and by_method[("cse", 600, 64)] == 0.0
    # Tables: all tasks (accuracy, cells, needle kept), passkey (accuracy, ROUGE-L, needle kept, cells).
    text = (tmp_path / "summary.md").read_text()
    assert text.count("| citrus_shared | 32 |") == 7
    assert text.count("| citrus_shared | 32 | 6 | 6 | 6 | 6 |") == 2  # 3 depths x 2 samples per entry

    # Nothing is recomputed on a rerun.
    again = FakeAnswer()
    _run(tmp_path, again)
    assert again.calls == []

    # A lost cell file is the only one recomputed.
    lost = cells[4]
    runner.cell_path(tmp_path, lost).unlink()
    _run(tmp_path, again)
    assert again.calls == [(lost.method, lost.budget if lost.budget else lost.length, lost.chunk_size)]


def test_cell_json_records_sample_scores_and_stats(tmp_path):
    _run(tmp_path, FakeAnswer())
    cell = runner.Cell("passkey", "citrus_shared", 64, 32, 600, 0.5, 1)
    record = json.loads(runner.cell_path(tmp_path, cell).read_text())
    assert record["id"] == cell.id and record["cell"]["budget"] == 64
    assert record["sample"]["answers"][0] in record["prediction"]
    assert record["scores"]["containment"] == 1.0 and record["scores"]["rouge1"] > 0
    assert record["stats"]["peak_states"] == 96 and record["stats"]["peak_kv_bytes"] == 2 * 96 * 8
    assert record["stats"]["needle_kept_read"] == 0.75
    assert 594 <= record["sample"]["n_tokens"] <= 600
    assert "Needle tokens kept" in (tmp_path / "summary.md").read_text()


def test_answer_gets_the_needle_spans(tmp_path):
    answer = FakeAnswer()
    cells = runner.retrieval_cells(["multikey"], ["cse"], [64], [32], [400], [0.5], 1)
    _run(tmp_path, answer, cells=cells)
    record = json.loads(runner.cell_path(tmp_path, cells[0]).read_text())
    assert [list(span) for span in answer.needle_spans] == record["sample"]["needle_spans"]
    assert len(answer.needle_spans) == 4


def test_a_listed_answer_gets_the_sample_s_answer_length(tmp_path):
    answer = FakeAnswer()
    cells = runner.retrieval_cells(["multivalue"], ["cse"], [64], [32], [400], [0.5], 1)
    settings = runner.Settings(max_new_tokens=8)
    _run(tmp_path, answer, cells=cells, settings=settings)
    record = json.loads(runner.cell_path(tmp_path, cells[0]).read_text())
    # 4 numbers, 1 word token each with the word tokenizer: 16 + 4 * (1 + 10)
    assert answer.max_new_tokens == record["max_new_tokens"] == 60
    cells = runner.retrieval_cells(["passkey"], ["cse"], [64], [32], [400], [0.5], 1)
    _run(tmp_path, answer, cells=cells, settings=settings)
    assert answer.max_new_tokens == 8


def test_samples_are_shared_across_methods(tmp_path):
    _run(tmp_path, FakeAnswer())
    shas = {json.loads(p.read_text())["sample"]["document_sha1"]
            for p in (tmp_path / "cells").glob("passkey__L256__d0.5__s0__*.json")}
    assert len(shas) == 1


def test_force_recomputes_one_cell(tmp_path):
    _run(tmp_path, FakeAnswer())
    answer = FakeAnswer()
    cell = runner.parse_cell_id("passkey__L256__d0__s1__cse__b128__c32")
    _run(tmp_path, answer, cells=[cell], force=True)
    assert answer.calls == [("cse", 128, 32)]


def test_settings_of_a_folder_are_fixed(tmp_path):
    _run(tmp_path, FakeAnswer(), settings=runner.Settings(seed=1))
    with pytest.raises(ValueError, match="another --out"):
        _run(tmp_path, FakeAnswer(), settings=runner.Settings(seed=2))
    assert runner.load_settings(tmp_path).seed == 1


def test_cell_ids_round_trip():
    for cell in runner.retrieval_cells(**GRID) + runner.perplexity_cells(["full", "cse"], [64], [32, 64], 1000, 512):
        assert runner.parse_cell_id(cell.id) == cell
    for bad in ["", "passkey__L1", "nope__L256__d0__s0__cse__b64__c32", "ppl__cse__x64__c32__L9"]:
        with pytest.raises(ValueError, match="not a cell id"):
            runner.parse_cell_id(bad)


def _fake_read(calls):
    def read(token_ids, *, method, budget, chunk_size, instruction_ids, progress=None, **options):
        calls.append((method, budget, chunk_size, len(token_ids)))
        # Perplexity rises after the budget for the baseline, stays flat for citrus: easy to check.
        nll = [1.0 if method == "full" or i < budget else 2.0 for i in range(1, len(token_ids))]
        if progress:
            progress(1, 1)
        return nll, {"peak_states_per_layer": [min(len(token_ids), budget + chunk_size)] * 2}
    return read


def test_perplexity_grid(tmp_path):
    calls = []
    cells = runner.perplexity_cells(["full", "cse"], [64, 128], [32], 1000, window=512)
    assert [c.length for c in cells] == [512, 1000, 1000]
    summary = runner.run_perplexity(cells, tmp_path, list(range(1000)), [1, 2], _fake_read(calls),
                                    window_tokens=100, progress=False, info={"window": 512})
    assert calls == [("full", 512, 32, 512), ("cse", 64, 32, 1000), ("cse", 128, 32, 1000)]
    rows = {(r["method"], r["budget"]): r for r in summary["perplexity"]}
    assert rows[("full", None)]["ppl"] == pytest.approx(2.718281828)
    assert rows[("cse", 64)]["windows"][0]["nll"] == pytest.approx((63 * 1 + 37 * 2) / 100)
    assert rows[("cse", 64)]["tokens"] == 999
    assert "Perplexity against tokens read" in (tmp_path / "summary.md").read_text()
    assert "| cse | 64 | 32 | " in (tmp_path / "summary.md").read_text().split("each twice as long")[1]
    runner.run_perplexity(cells, tmp_path, list(range(1000)), [1, 2], _fake_read(calls), progress=False)
    assert len(calls) == 3  # resumed


def test_perplexity_ranges_double_and_weight_windows_by_tokens():
    windows = [{"end": e, "tokens": t, "nll": nll} for e, t, nll in
               [(100, 100, 1.0), (200, 100, 2.0), (300, 100, 3.0), (400, 50, 1.0), (500, 100, 4.0)]]
    row = {"method": "cse", "budget": 64, "chunk_size": 32, "ppl": 9.0, "windows": windows}
    shorter = {**row, "length": 200, "windows": windows[:2]}  # a prefix of the same run: not repeated
    row["length"] = 500
    table = runner.perplexity_ranges([shorter, row], first=200).splitlines()
    assert len(table) == 3
    assert table[0] == "| method | k | chunk | 0–200 | 200–400 | 400–800 | overall |"
    expected = [math.exp(1.5), math.exp((300 + 50) / 150), math.exp(4.0)]
    assert table[2] == "| cse | 64 | 32 | " + " | ".join(f"{v:.2f}" for v in expected) + " | 9.00 |"


def _record(task, method, budget, length, depth, accuracy, chunk=32):
    return {"cell": dict(task=task, method=method, budget=budget, chunk_size=chunk, length=length,
                         depth=depth, sample=0), "scores": {"containment": accuracy}}


def test_budget_curves_compare_the_same_documents_at_every_budget():
    from citrus_ext.eval.plots import budget_curves

    records = [_record("passkey", "cse", 64, 256, 0.5, 0.0), _record("passkey", "cse", 64, 512, 0.5, 1.0),
               _record("passkey", "cse", 128, 256, 0.5, 1.0),  # k=128 ran at 256 tokens only
               _record("passkey", "cse", 64, 256, 0.5, 0.0, chunk=16),  # another chunk size
               _record("niah", "cse", 128, 256, 0.5, 0.0),  # another task
               _record("passkey", "h2o", 64, 256, 0.0, 1.0), _record("passkey", "h2o", 64, 256, 1.0, 0.0),
               _record("passkey", "full", None, 256, 0.5, 1.0), _record("passkey", "full", None, 512, 0.5, 0.0)]
    curves = budget_curves(records, "passkey", 32)
    # Unmatched, cse would read 0.5 -> 1.0 and seem to gain from the budget; matched it is 0 -> 1 on
    # the one document both budgets read.
    assert curves["cse"] == [(64, 0.0, 1), (128, 1.0, 1)]
    assert curves["h2o"] == [(64, 0.5, 2)]
    assert curves["full"] == [(None, 0.5, 2)]
    assert set(curves) == {"cse", "h2o", "full"}


def test_plots_are_written(tmp_path):
    _run(tmp_path, FakeAnswer())
    cells = runner.perplexity_cells(["full", "cse"], [64], [32], 1000, window=512)
    runner.run_perplexity(cells, tmp_path, list(range(1000)), [1], _fake_read([]), window_tokens=100,
                          progress=False, info={"window": 512})
    files = plot_all(tmp_path)
    names = sorted(f.name for f in files)
    assert names == ["accuracy_vs_budget_c32.png", "heatmap_passkey_k128_c32.png", "heatmap_passkey_k64_c32.png",
                     "memory.png", "perplexity.png"]
    assert all(f.stat().st_size > 5000 and f.read_bytes()[:4] == b"\x89PNG" for f in files)


def test_perplexity_plot_draws_one_line_per_setting(tmp_path):
    # A 16k and a 64k run of the same setting: the plot keeps the 64k one, not both.
    cells = runner.perplexity_cells(["full", "cse"], [64], [32], 600, window=512) + \
        runner.perplexity_cells(["cse"], [64, 128], [32], 1000, window=512)
    runner.run_perplexity(cells, tmp_path, list(range(1000)), [1], _fake_read([]), window_tokens=100,
                          progress=False, info={"window": 512})
    kept = runner.longest_runs(runner.load_cells(tmp_path, "perplexity"))
    assert sorted((r["cell"]["method"], r["cell"]["budget"], r["cell"]["length"]) for r in kept) == [
        ("cse", 64, 1000), ("cse", 128, 1000), ("full", None, 512)]


def test_cli_lists_cells_without_a_model(tmp_path, capsys):
    args = ["retrieval", "--tasks", "passkey", "--methods", "full,cse", "--budgets", "64", "--chunk-sizes", "32",
            "--lengths", "256,1024", "--depths", "0.5", "--samples", "1", "--window", "512", "--out", str(tmp_path),
            "--list"]
    assert cli.main(args) == 0
    lines = capsys.readouterr().out.split()
    assert lines == ["todo", "passkey__L256__d0.5__s0__full__bfull__c32",
                     "todo", "passkey__L256__d0.5__s0__cse__b64__c32",
                     "todo", "passkey__L1024__d0.5__s0__cse__b64__c32"]


def test_cli_report_and_subparser(tmp_path, capsys):
    _run(tmp_path, FakeAnswer())
    assert cli.main(["report", "--out", str(tmp_path)]) == 0
    assert "cells" in capsys.readouterr().out and (tmp_path / "plots" / "memory.png").exists()
    import argparse

    parser = argparse.ArgumentParser(prog="citrus")
    cli.add_eval_subparser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "perplexity", "--methods", "cse", "--length", "4096", "--list",
                              "--out", str(tmp_path / "ppl")])
    assert args.handler is cli.run_eval and args.eval_command == "perplexity"
    assert args.handler(args) == 0
    assert capsys.readouterr().out.split()[1::2] == ["ppl__cse__b256__c128__L4096", "ppl__cse__b256__c256__L4096",
                                                     "ppl__cse__b512__c128__L4096", "ppl__cse__b512__c256__L4096"]


def test_cli_rejects_bad_values(capsys):
    with pytest.raises(SystemExit):
        cli.main(["retrieval", "--methods", "cse,bogus", "--list"])
    with pytest.raises(SystemExit):
        cli.main(["retrieval", "--depths", "0.5,2", "--list"])
    assert "unknown bogus" in capsys.readouterr().err


def test_answer_objects_only_need_text_and_stats(tmp_path):
    def answer(document, instruction, **kwargs):
        return SimpleNamespace(text="nothing", stats={})

    cells = runner.retrieval_cells(["multivalue"], ["cse"], [64], [32], [300], [0.5], 1)
    summary = runner.run_retrieval(cells, tmp_path, WordTokenizer(), answer, progress=False)
    assert summary["retrieval"][0]["containment"] == 0.0 and summary["retrieval"][0]["peak_states"] is None


def test_cli_cell_of_the_other_kind_is_refused(tmp_path, capsys):
    assert cli.main(["retrieval", "--cell", "ppl__cse__b64__c32__L1000", "--out", str(tmp_path)]) == 2
    assert "not a retrieval cell" in capsys.readouterr().err
