"""The benchmark helpers and the summary that ``make bench`` writes (no timing asserted)."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import run_all  # noqa: E402


@pytest.mark.parametrize(
    "values",
    [[1.0], [3.0, 1.0, 2.0], [0.5, 9.0, 1.5, 2.5, 7.0], list(np.linspace(0, 1, 37))],
)
@pytest.mark.parametrize("q", [0, 50, 95, 100])
def test_percentile_matches_numpy(values, q):
    assert common.percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_percentile_of_nothing_is_nan():
    assert np.isnan(common.percentile([], 50))


@pytest.mark.parametrize(("concurrency", "requests"), [(1, 3), (4, 10), (8, 8)])
def test_closed_loop_runs_each_request_once_with_bounded_concurrency(concurrency, requests):
    seen: list[int] = []
    in_flight = 0
    most = 0
    lock = threading.Lock()

    def call(i: int) -> None:
        nonlocal in_flight, most
        with lock:
            in_flight += 1
            most = max(most, in_flight)
            seen.append(i)
        time.sleep(0.002)
        with lock:
            in_flight -= 1

    result = common.closed_loop(call, concurrency, requests)
    assert sorted(seen) == list(range(requests))
    assert most <= concurrency
    assert len(result.latencies_s) == requests
    assert result.as_dict()["requests"] == requests


def test_closed_loop_reraises_a_failed_request():
    def call(i: int) -> None:
        if i == 2:
            raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        common.closed_loop(call, 2, 5)


def _result(name: str, bars: list[dict]) -> dict:
    return {
        "benchmark": name,
        "command": f".venv/bin/python bench/{name}.py",
        "finished_at": "2026-01-01T00:00:00Z",
        "machine": {"cpus": 2, "load_average_1m_at_start": 0.5, "torch": "x"},
        "bars": bars,
    }


def test_summary_has_a_row_per_bar_with_met_and_command(tmp_path):
    results = {
        "stage_machinery": _result(
            "stage_machinery",
            [
                common.bar("stage machinery", ">= 90%", "97%", True),
                common.bar("stage machinery overhead", "< 1 ms", "2 ms", False, "a note"),
            ],
        ),
        "cold_start": _result("cold_start", [common.bar("cold start", "< 20%", "n/a", None)]),
    }
    runs = [
        {"name": "stage_machinery", "seconds": 60.0, "error": None},
        {"name": "operator_scale", "seconds": 5.0, "error": "exit status 1"},
    ]
    path = tmp_path / "SUMMARY.md"
    run_all.write_summary(results, runs, path)
    text = path.read_text()
    assert (
        "| stage machinery | >= 90% | 97% | met | `.venv/bin/python bench/stage_machinery.py` |"
        in text
    )
    assert "| stage machinery overhead (a note) | < 1 ms | 2 ms | **not met** |" in text
    assert "| cold start | < 20% | n/a | not measured |" in text
    # Without a GPU result the GPU bars are listed as not run, with the command to run them.
    assert "not run: no GPU" in text and "bench/gpu.py" in text
    assert "operator_scale: exit status 1" in text
    assert "Each benchmark's last run took: stage_machinery 60 s, operator_scale 5 s; 1.1 min" in text


def test_a_run_of_some_benchmarks_keeps_the_others_last_timings():
    last = [{"name": "step_batching", "seconds": 300.0, "error": None},
            {"name": "stage_pipeline", "seconds": 190.0, "error": None}]
    fresh = [{"name": "step_batching", "seconds": 480.0, "error": None}]
    runs = run_all.merged_runs(last, fresh)
    # The fresh timing wins; the order is the benchmarks' own, not the order they were run.
    assert [(r["name"], r["seconds"]) for r in runs] == [
        ("stage_pipeline", 190.0), ("step_batching", 480.0)
    ]


def test_chart_is_written_even_when_results_are_missing(tmp_path):
    path = tmp_path / "chart.png"
    run_all.draw_chart({}, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
