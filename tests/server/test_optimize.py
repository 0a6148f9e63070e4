"""Speed levers: the SDPA backend really used, and torch.compile with a persistent cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from server_testlib import mean_abs_diff
from torch._C._profiler import _ExperimentalConfig
from torch.nn.attention import SDPBackend
from torch.profiler import ProfilerActivity, profile

from imagegen_server.optimize import probe_backend
from imagegen_server.request import Job

# The ATen kernel each backend dispatches to on CPU.
CPU_KERNELS = {
    "Math": "aten::_scaled_dot_product_attention_math",
    "Flash": "aten::_scaled_dot_product_flash_attention_for_cpu",
}


def attention_kernels(runtime) -> set[str]:
    # profile_all_threads: the work runs on the stage threads, not on this one.
    config = _ExperimentalConfig(profile_all_threads=True)
    with profile(activities=[ProfilerActivity.CPU], experimental_config=config) as prof:
        runtime.engine.generate(runtime.params("profiled", seed=1), timeout_s=60)
    return {e.key for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product")}


@pytest.mark.parametrize("backend", ["Math", "Flash"])
def test_requested_attention_backend_is_the_one_that_runs(make_runtime, backend):
    runtime = make_runtime("sd15", attention=backend)
    assert runtime.report.attention_active == backend
    kernels = attention_kernels(runtime)
    assert kernels == {CPU_KERNELS[backend]}, kernels


def test_unavailable_backend_falls_back_and_says_why(make_runtime):
    runtime = make_runtime("sd15", attention="Efficient")
    if probe_backend(SDPBackend.EFFICIENT_ATTENTION, torch.device("cpu"), torch.float32) is None:
        pytest.skip("this PyTorch build has a CPU memory-efficient kernel")
    assert runtime.report.attention_requested == "Efficient"
    assert runtime.report.attention_active == "Auto"
    assert "Efficient unavailable on cpu" in runtime.report.attention_note
    assert runtime.engine.generate(runtime.params("still works", seed=1), timeout_s=60)


@pytest.mark.slow
def test_regional_compile_on_cpu_with_cache_dir(
    make_runtime, reference_pipeline, compile_cache
):
    runtime = make_runtime(
        "sd15",
        compile_enabled=True,
        compile_mode="default",
        compile_regional=True,
        compile_cache_dir=compile_cache,
        channels_last=False,
    )
    report = runtime.report
    # One inductor cache per attention backend: its keys leave the backend out.
    cache_dir = Path(compile_cache) / f"inductor-{report.attention_active.lower()}"
    assert report.compile_regional is True
    assert "BasicTransformerBlock" in report.compiled[0]
    assert report.compile_cache_dir == str(cache_dir)
    # Inductor's own answer to where its cache is (the folder may be there from a run before).
    from torch._inductor.runtime.cache_dir_utils import cache_dir as inductors_cache_dir

    assert inductors_cache_dir() == str(cache_dir)
    assert (cache_dir / "fxgraph").is_dir(), "inductor did not use the cache dir"
    # Triton's kernels (on a GPU) beside inductor's, not under a read-only HOME.
    assert os.environ["TRITON_CACHE_DIR"] == str(cache_dir / "triton")
    params = runtime.params("compiled", seed=5)
    images = runtime.engine.generate(params, timeout_s=300)
    expected = reference_pipeline("sd15")(**runtime.steps.reference_kwargs(params)).images
    assert mean_abs_diff(images[0], expected[0]) < 1.0
    # The shape warm-up compiled for: nothing new. A size it never saw (which the engine
    # refuses: run through the steps directly): a recompile, counted.
    recompiles = runtime.metrics.recompiles
    assert recompiles.since_ready == 0
    jobs = [Job(runtime.params("new size", seed=6, width=128, height=64))]
    with torch.inference_mode():
        runtime.steps.encode(jobs)
        runtime.steps.denoise(jobs)
    assert recompiles.since_ready > 0
    from prometheus_client import generate_latest

    text = generate_latest(runtime.metrics.registry).decode()
    assert f"imagegen_recompiles_total {float(recompiles.since_ready)}" in text


def test_an_attention_selection_made_while_loading_ends_in_the_thread_that_shuts_down():
    """The model loads in a background thread; shutdown runs on the event loop's. Leaving
    the selection there once failed with "Token ... was created in a different Context"."""
    import threading

    from imagegen_server.config import Attention
    from imagegen_server.optimize import AttentionSelection

    selection = AttentionSelection(Attention.MATH, torch.device("cpu"), torch.float32)
    loader = threading.Thread(target=selection.activate)
    loader.start()
    loader.join()
    assert not torch.backends.cuda.flash_sdp_enabled()  # process-wide: math only
    selection.deactivate()
    assert torch.backends.cuda.flash_sdp_enabled()  # restored
