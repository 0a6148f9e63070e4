"""No recompiles in service: warm-up compiles every shape a compiled service admits."""

from __future__ import annotations

import os
import random

import pytest
from server_testlib import count_calls

from imagegen_server.engine import InvalidRequest

SIZES = ["64x64", "96x64", "64x96"]


def compiled(make_runtime, cache_dir, family="sd15", **overrides):
    return make_runtime(
        family, compile_enabled=True, compile_mode="default", compile_regional=True,
        compile_cache_dir=cache_dir, channels_last=False, **overrides,
    )


@pytest.mark.slow
@pytest.mark.parametrize(("family", "batching"),
                         [("sd15", "Request"), ("sdxl", "Request"), ("sd15", "Step")])
def test_a_mixed_workload_at_concurrency_1_to_8_compiles_nothing_after_ready(
    make_runtime, compile_cache, family, batching
):
    # With step-level batching, rows also come and go between steps, at mixed timesteps.
    runtime = compiled(make_runtime, compile_cache, family, allowed_sizes=SIZES,
                       max_batch_size=4, max_images_per_request=2, batch_window_ms=30,
                       batching=batching)
    # Every admitted size at rows 2, 3 and 1 (warmup.py says why those three).
    assert runtime.warmup.batches == [
        (int(w), int(h), rows) for w, h in (s.split("x") for s in SIZES) for rows in (2, 3, 1)
    ]
    rng = random.Random(0)
    seen_rows = set()
    for concurrency in range(1, 9):
        asked = []
        for i in range(concurrency):
            width, height = (int(side) for side in rng.choice(SIZES).split("x"))
            asked.append(runtime.params(
                f"mixed {concurrency}.{i}", seed=i, width=width, height=height,
                n=rng.choice([1, 2]), steps=rng.choice([1, 2]),
                guidance_scale=rng.choice([0.0, 1.0, 5.0]),
            ))
            rows = asked[-1].n * (2 if asked[-1].guidance_scale > 1 else 1)
            seen_rows.add(rows)
        jobs = [runtime.engine.submit(params, timeout_s=300) for params in asked]
        for job, params in zip(jobs, asked, strict=True):
            assert len(job.future.result(300)) == params.n
    assert runtime.metrics.recompiles.since_ready == 0
    # The workload did batch several requests together, into row counts warm-up never ran.
    registry, stage = runtime.metrics.registry, {"stage": "denoise"}
    requests = registry.get_sample_value("imagegen_stage_batch_size_sum", stage)
    assert requests > registry.get_sample_value("imagegen_stage_batch_size_count", stage)
    assert seen_rows >= {1, 2, 4}


@pytest.mark.slow
def test_first_block_cache_on_a_compiled_denoiser_compiles_nothing_after_ready(
    make_runtime, compile_cache
):
    # Dynamo specializes on whether a step reuses the cache: warm-up takes both branches,
    # even where the default is a single step (which alone would never reuse it).
    runtime = compiled(make_runtime, compile_cache, "flux", cache="FirstBlockCache",
                       cache_threshold=0.3, default_steps=1, default_width=64, default_height=64)
    last_block = count_calls(
        runtime.steps.pipeline.transformer.single_transformer_blocks[-1].proj_out
    )
    for seed, steps in enumerate((6, 8, 3)):
        runtime.engine.generate(runtime.params("cached", seed=seed, steps=steps), timeout_s=300)
    assert last_block() < 6 + 8 + 3  # some steps did reuse the cache after ready
    assert runtime.metrics.recompiles.since_ready == 0


def test_a_compiled_service_without_a_size_list_admits_its_default_size_only(make_runtime,
                                                                            compile_cache):
    runtime = compiled(make_runtime, compile_cache, warmup=False)
    with pytest.raises(InvalidRequest) as refused:
        runtime.engine.submit(runtime.params("other size", seed=1, width=96, height=64))
    assert refused.value.field == "size"
    assert "compiled for the default size only" in str(refused.value)
    assert "spec.pipeline.limits.sizes" in str(refused.value)


@pytest.mark.slow
def test_a_whole_compiled_denoiser_takes_its_largest_batch_without_a_recompile(
        make_runtime, compile_cache):
    # Not block by block: the whole UNet's graph splits its rows range (CPU convolutions at
    # 16 rows), which warm-up covers at each power of two up to the most a batch holds.
    # A cache of its own: what this whole UNet's shapes teach dynamo stays out of the others'.
    runtime = make_runtime(
        "sd15", compile_enabled=True, compile_mode="default", compile_regional=False,
        compile_cache_dir=os.path.join(compile_cache, "whole-module"), channels_last=False,
        max_batch_size=8, max_images_per_request=2, batch_window_ms=500)
    assert [rows for _, _, rows in runtime.warmup.batches] == [2, 3, 1, 4, 8, 16]
    asked = [runtime.params(f"full {i}", seed=i, n=2, steps=1, guidance_scale=5.0)
             for i in range(4)]
    jobs = [runtime.engine.submit(params, timeout_s=300) for params in asked]
    for job in jobs:
        assert len(job.future.result(300)) == 2
    registry = runtime.metrics.registry
    # One batch of the four requests' 8 images: 16 rows (each with its negative), the
    # largest shape warm-up compiled.
    assert registry.get_sample_value(
        "imagegen_stage_batch_size_count", {"stage": "denoise"}) == 1
    assert registry.get_sample_value(
        "imagegen_stage_batch_size_sum", {"stage": "denoise"}) == 4
    assert runtime.metrics.recompiles.since_ready == 0
