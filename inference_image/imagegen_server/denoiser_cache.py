"""diffusers' own cache hooks on the denoiser: steps that would change little reuse what an
earlier step computed.

- First Block Cache: a step whose first block's output changed less than the threshold reuses
  the rest of the last step's output.
- MagCache: a step reuses the last computed residual of the blocks while the error estimated
  from the model's magnitude ratios (diffusers ships Flux's) stays under the threshold, at
  most 3 steps in a row and none in the first 20%. Its schedule is spread over the steps a
  batch runs, so a batch holds one step count (request-level batching only).
- TaylorSeer: attention outputs are computed every ``interval`` steps and extrapolated by a
  Taylor series in between.
- Pyramid Attention Broadcast: in the middle of the schedule (timesteps 100 to 800, diffusers'
  default range) attention runs every ``interval`` steps and its last output is reused between.
- FasterCache: the same over timesteps below 681, the reused output corrected by the trend
  of the last two computed ones (Flux is guidance-distilled: no unconditional batch to skip).

All but First Block Cache follow one batch's steps (a step counter, the batch's timestep), so
they need request-level batching, where a batch's rows share their steps.

The hooks keep state between the denoiser's calls, so the denoise loop (families/) resets it
at the start of every batch and whenever the batch loses a request, and names each call's
context as diffusers' pipelines do. One decision covers a whole batch: a request batched with
others may skip a block where it would not have alone. With the cache off, requests stay
independent of their batch-mates.
"""

from __future__ import annotations

import contextlib

import torch

from .config import DenoiserCache


class DenoiserCacheError(ValueError):
    """A cache this denoiser cannot take."""


class CurrentTimestep:
    """The batch's timestep (0 to 1000), for the hooks that ask for it; diffusers' pipelines
    hand them ``lambda: pipe.current_timestep``. ``context`` sets it before each call."""

    def __init__(self) -> None:
        self.value: torch.Tensor | float = 1000.0

    def __call__(self) -> torch.Tensor | float:
        return self.value


def enable(
    module: torch.nn.Module, method: DenoiserCache, threshold: float, interval: int, steps: int
) -> None:
    """Put ``method``'s hooks on ``module``; ``steps``: the step count a batch runs first."""
    if method == DenoiserCache.NONE:
        return
    if not hasattr(module, "enable_cache"):
        raise DenoiserCacheError(
            f"pipeline cache {method.value} needs a denoiser with diffusers' cache hooks "
            f"(Flux's transformer); this model's is {type(module).__name__}: set cache None"
        )
    timestep = CurrentTimestep()
    module._imagegen_timestep = timestep
    module.enable_cache(_config(method, threshold, interval, steps, module.dtype, timestep))


def _config(method, threshold, interval, steps, dtype, timestep):
    """diffusers' config for ``method``: its own defaults but for the one knob the spec sets."""
    from diffusers.hooks import (
        FasterCacheConfig,
        FirstBlockCacheConfig,
        MagCacheConfig,
        PyramidAttentionBroadcastConfig,
        TaylorSeerCacheConfig,
    )
    from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

    match method:
        case DenoiserCache.FIRST_BLOCK_CACHE:
            return FirstBlockCacheConfig(threshold=threshold)
        case DenoiserCache.MAG_CACHE:
            # The magnitude ratios are the model's own; diffusers ships Flux's (FLUX.1-dev).
            return MagCacheConfig(
                threshold=threshold, num_inference_steps=steps, mag_ratios=FLUX_MAG_RATIOS
            )
        case DenoiserCache.TAYLOR_SEER_CACHE:
            # Its factors in the denoiser's dtype: diffusers' default, bfloat16, would round a
            # float32 model's outputs on every extrapolated step.
            return TaylorSeerCacheConfig(cache_interval=interval, taylor_factors_dtype=dtype)
        case DenoiserCache.PYRAMID_ATTENTION_BROADCAST:
            return PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=interval, current_timestep_callback=timestep
            )
        case DenoiserCache.FASTER_CACHE:
            return FasterCacheConfig(
                spatial_attention_block_skip_range=interval,
                current_timestep_callback=timestep,
                # diffusers' own default weight, given so it does not warn about it.
                attention_weight_callback=lambda _module: 0.5,
                is_guidance_distilled=True,
            )
    raise AssertionError(method)


def is_enabled(module: torch.nn.Module) -> bool:
    return bool(getattr(module, "is_cache_enabled", False))


def reset(module: torch.nn.Module, steps: int, done: int = 0) -> None:
    """Forget the previous calls: a new batch, or rows that changed. ``steps``: the denoiser
    calls of the batch's whole schedule, ``done`` of them already made (a batch that lost a
    request part way): MagCache spreads its schedule over ``steps`` and goes on at ``done``,
    so a request keeps the skips of its own schedule when a batch mate leaves."""
    if not is_enabled(module):
        return
    from diffusers.hooks import MagCacheConfig
    from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS, nearest_interp

    config = module._cache_config
    if isinstance(config, MagCacheConfig) and config.num_inference_steps != steps:
        # Every MagCache hook reads this one config: changed in place, no hook is put on
        # again (which a compiled denoiser would see as a new function to trace).
        config.num_inference_steps = steps
        config.mag_ratios = nearest_interp(FLUX_MAG_RATIOS, steps)
    module._reset_stateful_cache()
    if isinstance(config, MagCacheConfig) and done:
        _go_on_at(module, done)


def _go_on_at(module: torch.nn.Module, step: int) -> None:
    """Set MagCache's step count (diffusers keeps it in the hooks' state and offers no
    setter) for the one call a step makes: guidance-distilled Flux's "cond"."""
    from diffusers.hooks.mag_cache import _MAG_CACHE_LEADER_BLOCK_HOOK

    with module.cache_context("cond"):
        for block in module.modules():
            registry = getattr(block, "_diffusers_hook", None)
            head = registry.get_hook(_MAG_CACHE_LEADER_BLOCK_HOOK) if registry else None
            if head is not None:
                head.state_manager.get_state().step_index = step


@contextlib.contextmanager
def every_branch(module: torch.nn.Module):
    """For warm-up: First Block Cache skips every step it can (all but a batch's first), so
    both of its branches, the one that runs the remaining blocks and the one that reuses the
    cache, are compiled before ready; dynamo specializes on which one a step takes. The
    threshold is read outside the compiled code, so changing it compiles nothing."""
    from diffusers.hooks.first_block_cache import _FBC_LEADER_BLOCK_HOOK

    heads = [
        hook
        for block in module.modules()
        if (registry := getattr(block, "_diffusers_hook", None)) is not None
        and (hook := registry.get_hook(_FBC_LEADER_BLOCK_HOOK)) is not None
    ]
    thresholds = [hook.threshold for hook in heads]
    for hook in heads:
        hook.threshold = float("inf")
    try:
        yield
    finally:
        for hook, threshold in zip(heads, thresholds, strict=True):
            hook.threshold = threshold


def context(module: torch.nn.Module, timestep: torch.Tensor | float, name: str = "cond"):
    """The cache context of one denoiser call (what diffusers' pipelines enter), at the
    batch's ``timestep`` (0 to 1000; under request-level batching its rows share it)."""
    if not is_enabled(module):
        return contextlib.nullcontext()
    module._imagegen_timestep.value = timestep
    return module.cache_context(name)
