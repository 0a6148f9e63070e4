"""Quantization and cache levers: each does what it says, on the real tiny models, and a
lever a model or device cannot take stops the server with a message naming it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from server_testlib import Gate, assert_same_arithmetic, count_calls, tiny_settings

from imagegen_server.denoiser_cache import DenoiserCacheError
from imagegen_server.quantization import QuantizationError


def psnr(a, b) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    mse = ((a - b) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def test_int8_weight_only_quantizes_the_denoisers_linear_layers_and_stays_close(make_runtime):
    plain = make_runtime("sd15")
    quantized = make_runtime("sd15", quantization="Int8WeightOnly")
    assert quantized.report.quantization == "Int8WeightOnly"
    linears = [m for m in quantized.steps.pipeline.unet.modules()
               if isinstance(m, torch.nn.Linear)]
    assert linears and all("Int8" in type(m.weight).__name__ for m in linears)
    # The text encoder keeps its weights as they were.
    encoder = quantized.steps.pipeline.text_encoder
    assert all(type(p) is torch.nn.Parameter for p in encoder.parameters())
    params = plain.params("a lighthouse", seed=3)
    (want,) = plain.engine.generate(params, timeout_s=60)
    (got,) = quantized.engine.generate(params, timeout_s=60)
    assert 30 < psnr(got, want) < float("inf")


def test_fp8_on_a_device_without_fp8_tensor_cores_stops_the_server_naming_it(tiny_models):
    from imagegen_server.runtime import ModelRuntime

    with pytest.raises(QuantizationError, match="quantization Float8 needs a GPU with FP8"):
        ModelRuntime(tiny_settings(tiny_models["sd15"], quantization="Float8")).load()


def test_quantization_with_loras_is_refused_by_the_settings(tiny_models):
    with pytest.raises(ValidationError, match="loras and quantization"):
        tiny_settings(tiny_models["sd15"], quantization="Int8WeightOnly",
                      loras=[{"name": "ink", "uri": "/x.safetensors"}])


def test_first_block_cache_equals_diffusers_with_the_same_cache_and_skips_blocks(
    make_runtime, tiny_models
):
    from diffusers import DiffusionPipeline
    from diffusers.hooks import FirstBlockCacheConfig

    # A high threshold, so the random tiny transformer skips steps at all.
    size = {"default_steps": 6, "default_width": 64, "default_height": 64}
    cached = make_runtime("flux", cache="FirstBlockCache", cache_threshold=0.3, **size)
    plain = make_runtime("flux", **size)
    assert cached.report.cache == "FirstBlockCache"
    # The cache replaces a skipped block's forward, so count a layer inside it.
    last_block = count_calls(
        cached.steps.pipeline.transformer.single_transformer_blocks[-1].proj_out
    )
    params = cached.params("a lighthouse", seed=3)
    (got,) = cached.engine.generate(params, timeout_s=60)
    # The last block ran on fewer steps than there are: the rest were taken from the cache.
    assert 0 < last_block() < 6
    reference = DiffusionPipeline.from_pretrained(tiny_models["flux"], dtype=torch.float32)
    reference.set_progress_bar_config(disable=True)
    reference.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.3))
    (want,) = reference(**cached.steps.reference_kwargs(params)).images
    assert_same_arithmetic(np.asarray(got, int), np.asarray(want, int))
    # Each batch starts from a reset cache: other row counts, then the same image again
    # (the last step's residuals of 2 rows cannot be compared with 3 rows' first).
    for n in (2, 3):
        assert len(cached.engine.generate(cached.params("rows", seed=4, n=n), timeout_s=60)) == n
    (again,) = cached.engine.generate(params, timeout_s=60)
    assert np.array_equal(np.asarray(again), np.asarray(got))
    (uncached,) = plain.engine.generate(params, timeout_s=60)
    assert psnr(got, uncached) < float("inf")


def test_mag_cache_equals_diffusers_with_the_same_cache_at_each_step_count(
    make_runtime, tiny_models
):
    from diffusers import DiffusionPipeline
    from diffusers.hooks import MagCacheConfig
    from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

    # The skips follow Flux's published magnitude ratios, not the weights, so the random tiny
    # transformer skips as FLUX.1 would; a high threshold makes it skip within few steps.
    size = {"default_steps": 6, "default_width": 64, "default_height": 64}
    cached = make_runtime("flux", cache="MagCache", cache_threshold=0.3, **size)
    assert cached.report.cache == "MagCache"
    last_block = count_calls(
        cached.steps.pipeline.transformer.single_transformer_blocks[-1].proj_out
    )
    reference = DiffusionPipeline.from_pretrained(tiny_models["flux"], dtype=torch.float32)
    reference.set_progress_bar_config(disable=True)
    reference_block = count_calls(reference.transformer.single_transformer_blocks[-1].proj_out)
    # A batch of another step count spreads the schedule over its own steps, then back.
    for steps in (6, 9, 6):
        params = cached.params("a lighthouse", seed=3, steps=steps)
        before, reference_before = last_block(), reference_block()
        (got,) = cached.engine.generate(params, timeout_s=60)
        computed = last_block() - before
        assert 0 < computed < steps  # some steps reused the cached residual
        reference.transformer.enable_cache(MagCacheConfig(
            threshold=0.3, num_inference_steps=steps, mag_ratios=FLUX_MAG_RATIOS
        ))
        (want,) = reference(**cached.steps.reference_kwargs(params)).images
        reference.transformer.disable_cache()
        # The same steps skipped as diffusers' pipeline skips, and the same pixels.
        assert computed == reference_block() - reference_before, steps
        assert_same_arithmetic(np.asarray(got, int), np.asarray(want, int))


def test_mag_cache_keeps_a_requests_schedule_when_a_batch_mate_leaves(make_runtime):

    from diffusers.hooks.mag_cache import _MAG_CACHE_LEADER_BLOCK_HOOK

    runtime = make_runtime("flux", cache="MagCache", cache_threshold=0.3, max_batch_size=2,
                           batch_window_ms=300, default_width=64, default_height=64,
                           warmup=False)
    transformer = runtime.steps.pipeline.transformer
    head = next(block for block in transformer.modules()
                if (registry := getattr(block, "_diffusers_hook", None)) is not None
                and registry.get_hook(_MAG_CACHE_LEADER_BLOCK_HOOK) is not None)
    hook = head._diffusers_hook.get_hook(_MAG_CACHE_LEADER_BLOCK_HOOK)
    seen, rows = [], []  # the step of MagCache's schedule each call is at, its rows

    def look(_module, args, kwargs):
        seen.append(hook.state_manager.get_state().step_index)
        rows.append(len((args or [kwargs.get("hidden_states")])[0]))

    head.register_forward_pre_hook(look, with_kwargs=True)
    steps = 40
    gate = Gate(runtime, at=3)  # held at the third step, so the cancel lands mid-batch
    try:
        kept = runtime.engine.submit(runtime.params("keep", steps=steps, seed=5), 60)
        dropped = runtime.engine.submit(runtime.params("drop", steps=steps, seed=6), 60)
        assert gate.entered.wait(60)
        dropped.future.cancel()
    finally:
        gate.close()
    kept.future.result(60)
    assert dropped.released
    # One schedule of 40 steps, walked once: the batch that lost a row went on where it
    # stood, not at the start of a schedule squeezed into the steps left.
    assert rows[0] == 2 and rows[-1] == 1
    assert seen == list(range(steps))
    assert transformer._cache_config.num_inference_steps == steps


def _reference_cache_config(method: str, reference):
    """What a diffusers user writes for the cache at interval 3, the way diffusers' docs do."""
    from diffusers.hooks import (
        FasterCacheConfig,
        PyramidAttentionBroadcastConfig,
        TaylorSeerCacheConfig,
    )

    def now():
        return reference.current_timestep

    return {
        "TaylorSeerCache": lambda: TaylorSeerCacheConfig(
            cache_interval=3, taylor_factors_dtype=torch.float32
        ),
        "PyramidAttentionBroadcast": lambda: PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=3, current_timestep_callback=now
        ),
        "FasterCache": lambda: FasterCacheConfig(
            spatial_attention_block_skip_range=3, current_timestep_callback=now,
            attention_weight_callback=lambda _: 0.5, is_guidance_distilled=True,
        ),
    }[method]()


@pytest.mark.parametrize("method", ["TaylorSeerCache", "PyramidAttentionBroadcast", "FasterCache"])
def test_an_attention_cache_equals_diffusers_with_the_same_cache_and_skips_attention(
    make_runtime, tiny_models, method
):
    from diffusers import DiffusionPipeline

    size = {"default_steps": 10, "default_width": 64, "default_height": 64}
    cached = make_runtime("flux", cache=method, cache_interval=3, **size)
    plain = make_runtime("flux", **size)
    assert cached.report.cache == method
    attention = count_calls(
        cached.steps.pipeline.transformer.single_transformer_blocks[-1].attn.to_q
    )
    params = cached.params("a lighthouse", seed=3)
    (got,) = cached.engine.generate(params, timeout_s=60)
    computed = attention()
    assert 0 < computed < 10  # attention was reused or extrapolated on some steps
    reference = DiffusionPipeline.from_pretrained(tiny_models["flux"], dtype=torch.float32)
    reference.set_progress_bar_config(disable=True)
    reference_attention = count_calls(reference.transformer.single_transformer_blocks[-1].attn.to_q)
    reference.transformer.enable_cache(_reference_cache_config(method, reference))
    (want,) = reference(**cached.steps.reference_kwargs(params)).images
    # The same steps skipped as in diffusers' pipeline, and the same pixels.
    assert computed == reference_attention()
    assert_same_arithmetic(np.asarray(got, int), np.asarray(want, int))
    # Each batch starts from reset hooks: other rows between, then the same image again.
    assert len(cached.engine.generate(cached.params("rows", seed=4, n=2), timeout_s=60)) == 2
    (again,) = cached.engine.generate(params, timeout_s=60)
    assert np.array_equal(np.asarray(again), np.asarray(got))
    (uncached,) = plain.engine.generate(params, timeout_s=60)
    assert psnr(got, uncached) < float("inf")


STEP_COUNTING = ["MagCache", "TaylorSeerCache", "PyramidAttentionBroadcast", "FasterCache"]


@pytest.mark.parametrize("method", STEP_COUNTING)
def test_a_cache_that_follows_the_steps_with_step_batching_is_refused_by_the_settings(
    tiny_models, method
):
    with pytest.raises(ValidationError, match=f"cache {method} needs batching Request"):
        tiny_settings(tiny_models["flux"], cache=method, batching="Step")


@pytest.mark.parametrize(
    ("method", "message"),
    [
        # Its hooks are compiler-disabled: a compiled server would compile no graph.
        ("MagCache", "cache MagCache runs every transformer block outside"),
        ("TaylorSeerCache", "cache TaylorSeerCache with compile: its hooks decide"),
        ("PyramidAttentionBroadcast", "cache PyramidAttentionBroadcast with compile"),
        ("FasterCache", "cache FasterCache with compile"),
    ],
)
def test_a_cache_with_compile_other_than_first_block_cache_is_refused_by_the_settings(
    tiny_models, method, message
):
    with pytest.raises(ValidationError, match=message):
        tiny_settings(tiny_models["flux"], cache=method, compile_enabled=True)
    tiny_settings(tiny_models["flux"], cache="FirstBlockCache", compile_enabled=True)


def test_a_cache_on_a_denoiser_without_cache_hooks_stops_the_server_naming_it(tiny_models):
    from imagegen_server.runtime import ModelRuntime

    with pytest.raises(DenoiserCacheError, match="pipeline cache FirstBlockCache needs"):
        ModelRuntime(tiny_settings(tiny_models["sd15"], cache="FirstBlockCache")).load()
