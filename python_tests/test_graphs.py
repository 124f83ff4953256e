"""ForwardGraphs' bookkeeping, which runs on any device: which forwards it runs eagerly, how many
signatures it remembers, and what it does when a capture fails. Capture and replay themselves
need a GPU and are checked in test_hf_cuda.py."""
import warnings

import pytest
import torch

from citrus_ext.graphs import ForwardGraphs


def _forward(calls):
    def forward(static):
        calls.append(static["x"].clone())
        return static["x"] * 2, "info"
    return forward


def test_first_sightings_run_eagerly_and_the_memory_of_them_is_bounded():
    graphs = ForwardGraphs(max_seen=8)
    calls = []
    for i in range(100):  # decoding: a new signature per token
        out, info = graphs.run(("decode", i), [], {"x": torch.tensor([float(i)])}, _forward(calls))
        assert out.item() == 2 * i and info == "info"
    assert len(calls) == 100
    assert len(graphs.seen) == 8
    assert list(graphs.seen) == [("decode", i) for i in range(92, 100)]
    assert graphs.captures == 0 and not graphs.graphs and not graphs.failed


def test_no_signature_runs_eagerly_and_is_not_remembered():
    graphs = ForwardGraphs()
    calls = []
    out, _ = graphs.run(None, [], {"x": torch.ones(2)}, _forward(calls))
    assert torch.equal(out, torch.full((2,), 2.0)) and len(calls) == 1 and not graphs.seen


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where a capture cannot start")
def test_a_failed_capture_runs_eagerly_with_one_warning_and_is_not_retried():
    graphs = ForwardGraphs()
    calls = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(5):  # one signature, seen five times: capture tried on the second only
            out, _ = graphs.run(("chunk",), [], {"x": torch.tensor([float(step)])}, _forward(calls))
            assert out.item() == 2 * step
    assert len(calls) == 5
    assert graphs.failed == {("chunk",)} and graphs.captures == 0 and graphs.replays == 0
    messages = [str(w.message) for w in caught if "could not be captured" in str(w.message)]
    assert len(messages) == 1
