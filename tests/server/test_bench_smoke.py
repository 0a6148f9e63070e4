"""The benchmark scripts run end to end on small inputs: shapes of results, never speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_bench(script: str, *args: str, out_dir: Path, timeout: float = 300) -> None:
    command = [sys.executable, str(ROOT / "bench" / script), *args, "--out-dir", str(out_dir)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.slow
def test_gpu_benchmark_smoke_runs_on_the_cpu(tmp_path):
    run_bench("gpu.py", "--smoke", out_dir=tmp_path)
    result = json.loads((tmp_path / "gpu_smoke.json").read_text())
    assert result["command"].startswith(".venv/bin/python bench/gpu.py --smoke")
    for name in ("sd15", "sdxl"):
        model = result["models"][name]
        assert (
            model["flops"]["unet_step"] > 0 and model["flops"]["image"] > model["flops"]["decode"]
        )
        measured = {v: r for v, r in model["variants"].items() if "seconds_per_image" in r}
        assert set(measured) == {"eager", "bf16+flash"}
        assert model["variants"]["bf16+flash+compile"] == {
            "skipped": "--smoke without --smoke-compile"
        }
        modes = {(row["mode"], row["concurrency"]) for row in model["concurrency"]}
        assert modes == {(m, c) for m in ("Stacked", "Pipelined", "Pipelined+batch4",
                                          "Pipelined+batch4+Step") for c in (1, 4)}
        assert model["recompiles_after_warmup"] == 0
        curve = model["step_rows"]
        assert sorted(curve["seconds_by_rows"]) == ["2", "32", "8"]  # JSON keys
        assert all(seconds > 0 for seconds in curve["seconds_by_rows"].values())
        # Quantized again from a fresh pipeline: int8 runs on the CPU, FP8 says why not.
        int8 = model["quantized"]["Int8WeightOnly"]
        assert int8["quantization"] == "Int8WeightOnly" and int8["seconds_per_image"] > 0
        assert int8["psnr_db"] > 0 and int8["speedup"] > 0
        assert model["quantized"]["Float8"]["skipped"].startswith("no FP8 tensor cores")
    # Every cache setting ran on the Flux pipeline, its hooks taken off before the next one.
    flux = result["models"]["flux"]["settings"]
    assert [row["cache"] for row in flux.values()] == [
        "None", "FirstBlockCache", "MagCache", "TaylorSeerCache", "PyramidAttentionBroadcast",
        "FasterCache",
    ]
    assert all(row["speedup"] > 0 and row["psnr_db"] > 0 for row in list(flux.values())[1:])
    # A smoke run measures nothing: every bar says so instead of claiming met or not met.
    assert result["bars"] and all(b["met"] is None for b in result["bars"])


@pytest.mark.slow
def test_step_batching_bench_runs_both_batchings_on_every_load(tmp_path):
    run_bench(
        "step_batching.py", "--requests", "12", "--requests-at-bar", "12", "--request-ms", "10",
        "--curves", "1.6", "--cpu-requests", "2",
        "--cpu-repeats", "1", "--cpu-steps", "2", "--cpu-concurrency", "2", out_dir=tmp_path,
    )  # fmt: skip
    result = json.loads((tmp_path / "step_batching.json").read_text())
    for name in ("sd15", "sdxl"):
        model = result["modelled"][name]
        # The roofline from the FLOP profile: a shared weight read makes the step sub-linear.
        assert model["gpu_step_ms"]["fixed"] > 0 and model["gpu_step_ms"]["per_row"] > 0
        for workload in model["workloads"].values():
            assert {(r["load"], r["batching"]) for r in workload["rows"]} == {
                (load, b) for load in (0.3, 0.7, 0.9) for b in ("Request", "Step")
            }
            assert all(r["count"] == 12 for r in workload["rows"])
    # The sensitivity run: SD 1.5 at 70% only, both workloads, on the curve asked for.
    [run] = result["curve_sensitivity"]
    assert run["full_batch_ratio"] == 1.6
    for workload in run["workloads"].values():
        assert {(r["load"], r["batching"]) for r in workload["rows"]} == {
            (0.7, "Request"), (0.7, "Step")
        }
    assert set(result["cpu"]["mean_throughput_per_s"]) == {"Request", "Step"}
    # One bar per model and workload at 70% (the other loads in its text), one per workload on
    # the sensitivity curve, one for the CPU.
    bars = result["bars"]
    assert len(bars) == 7 and all("30%" in b["measured"] for b in bars[:4])
    # Each modelled comparison carries its simulated yardstick, an ideal server's p95 ratio.
    assert all("an ideal server's p95" in b["measured"] for b in bars[:6])
    for model in result["modelled"].values():
        for workload in model["workloads"].values():
            assert [m["load"] for m in workload["simulated"]] == [0.3, 0.7, 0.9]
            assert all(0 < m["ideal_ratio"] <= 1 for m in workload["simulated"])
    assert all("1.6x one" in b["item"] for b in bars[4:6])


def test_a_step_curve_made_more_sub_linear_keeps_the_cost_of_one_request():
    sys.path.insert(0, str(ROOT / "bench"))
    from step_batching import Cost, full_batch_ratio, with_full_batch_ratio

    roofline = Cost(0.5, 1.6)
    for ratio in (2.9, 1.6):
        step = with_full_batch_ratio(roofline, ratio, full=4)
        assert step(2) == pytest.approx(roofline(2))
        assert full_batch_ratio(step, 4) == pytest.approx(ratio)
        assert step.fixed_s > roofline.fixed_s and step.per_row_s < roofline.per_row_s


def test_the_simulated_request_level_stage_waits_out_its_window_and_runs_one_batch_per_step_count():
    sys.path.insert(0, str(ROOT / "bench"))
    from step_batching import Cost, simulated_request_level

    step = Cost(0.0, 1.0)  # a second per row: a request (two rows) costs 2 s a step
    # Two arrivals inside the window share a batch, which starts when the window ends; the third
    # comes while the batch runs and waits for it.
    latencies = simulated_request_level([0.0, 0.001, 10.0], [3, 3, 3], step, full=4,
                                        window_s=0.01)
    assert latencies == pytest.approx([12.01, 12.009, 8.02])
    # A full batch starts at once; two step counts in one window run one after the other.
    assert simulated_request_level([0.0, 0.0], [3, 3], step, full=2, window_s=5.0) == (
        pytest.approx([12.0, 12.0]))
    assert simulated_request_level([0.0, 0.0], [2, 3], step, full=4, window_s=0.5) == (
        pytest.approx([4.5, 10.5]))


def test_the_ideal_server_runs_at_full_batch_cost_but_no_request_faster_than_alone():
    sys.path.insert(0, str(ROOT / "bench"))
    from step_batching import Cost, ideal_server

    step = Cost(1.0, 1.0)  # one request a step: 3 s; two in one step: 5 s, 2.5 s each
    # The first would be done after 3 steps at 2.5 s each, but alone it takes 3 x 3 s.
    assert ideal_server([0.0, 0.0], [3, 3], step, full=2) == pytest.approx([9.0, 15.0])
    # Arriving to an idle server, a request waits for nothing before it.
    assert ideal_server([0.0, 100.0], [2, 2], step, full=2) == pytest.approx([6.0, 6.0])


def test_stage_machinery_runs_the_real_engines_with_a_given_profile(tmp_path):
    run_bench(
        "stage_machinery.py", "--profile", "1", "8", "1", "--total-ms", "5", "--requests", "12",
        "--concurrency", "1", "4", "--overhead-requests", "40", out_dir=tmp_path,
    )  # fmt: skip
    result = json.loads((tmp_path / "stage_machinery.json").read_text())
    assert result["real_profile_share"]["denoise"] == pytest.approx(0.8)
    for profile in ("measured", "balanced"):
        rows = result["profiles"][profile]["rows"]
        assert {(r["mode"], r["concurrency"]) for r in rows} == {
            (m, c) for m in ("Stacked", "Pipelined") for c in (1, 4)
        }
        assert all(r["requests"] == 12 for r in rows)
    assert {b["item"] for b in result["bars"]} >= {"stage machinery overhead"}


def test_cold_start_writes_sd15s_architecture_that_the_server_loads(tmp_path, monkeypatch):
    """--size sd15 (here its toy-width twin) is saved in float16 and loaded like a real model."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import cold_start
    import common
    model = cold_start.write_model(tmp_path / "model", "sd15", smoke=True)
    assert (model / "model_index.json").exists()
    runtime = common.runtime_for(model, compile_enabled=False, default_steps=2)
    try:
        assert runtime.model.family == "SD15"
        images = runtime.engine.generate(runtime.params("a red fox", seed=1), timeout_s=60)
        assert len(images) == 1 and images[0].size == runtime.default_size
    finally:
        runtime.close()


@pytest.mark.slow
def test_large_request_benchmark_runs_every_case(tmp_path):
    run_bench("large_request.py", "--size", "128", "--large-steps", "2", "--small", "2",
              out_dir=tmp_path)
    result = json.loads((tmp_path / "large_request.json").read_text())
    outcomes = {case: r["large"] for case, r in result["cases"].items()}
    assert outcomes["no large request"] == "none"
    assert outcomes["refused by max_pixels"] == "refused (400)"
    assert outcomes["admitted, runs to the end"] == "finished"
    assert set(result["p95_ratio_to_no_large_request"]) == set(outcomes)


@pytest.mark.slow
def test_streaming_benchmark_reads_every_preview(tmp_path):
    run_bench("streaming.py", "--size", "tiny", "--requests", "2", "--rounds", "1",
              "--concurrency", "2", out_dir=tmp_path)
    result = json.loads((tmp_path / "streaming.json").read_text())
    assert result["previews_per_stream"] == [3, 3]  # 8 steps: previews after steps 1, 3, 5
    assert result["ratio_stream_to_plain"] > 0 and len(result["bars"]) == 1


def test_levers_benchmark_measures_every_setting_against_plain(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import levers

    run_bench("levers.py", "--size", "tiny", "--images", "1", "--rounds", "1", "--steps", "3",
              out_dir=tmp_path)
    result = json.loads((tmp_path / "levers.json").read_text())
    for family, rows in result["families"].items():
        assert set(rows) == set(levers.SETTINGS[family])
        assert rows["plain"]["speedup"] == 1.0 and rows["plain"]["psnr_db_min"] == float("inf")
        assert all(row["seconds_per_image"] > 0 for row in rows.values())
    # int8 weights change the image, a little: finite PSNR.
    assert result["families"]["sd15"]["int8 weight-only"]["psnr_db_min"] < float("inf")
    assert len(result["bars"]) == sum(len(rows) - 1 for rows in result["families"].values())
