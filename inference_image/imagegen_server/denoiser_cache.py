"""diffusers' own cache hooks on the denoiser: steps that would change little reuse what an
earlier step computed.

- First Block Cache: a step whose first block's output changed less than the threshold reuses
  the rest of the last step's output.
- MagCache: a step reuses the last computed residual of the blocks while the error estimated
  from the model's magnitude ratios (diffusers ships Flux's) stays under the threshold, at
  most 3 steps in a row and none in the first 20%. Its schedule is spread over the steps a
  batch runs, so a batch holds one step count (request-level batching only).

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


def enable(module: torch.nn.Module, method: DenoiserCache, threshold: float, steps: int) -> None:
    """Put ``method``'s hooks on ``module``; ``steps``: the step count a batch runs first."""
    if method == DenoiserCache.NONE:
        return
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig
    from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

    if not hasattr(module, "enable_cache"):
        raise DenoiserCacheError(
            f"pipeline cache {method.value} needs a denoiser with diffusers' cache hooks "
            f"(Flux's transformer); this model's is {type(module).__name__}: set cache None"
        )
    if method == DenoiserCache.FIRST_BLOCK_CACHE:
        module.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    else:
        # The magnitude ratios are the model's own; diffusers ships Flux's (FLUX.1-dev).
        module.enable_cache(MagCacheConfig(
            threshold=threshold, num_inference_steps=steps, mag_ratios=FLUX_MAG_RATIOS
        ))


def is_enabled(module: torch.nn.Module) -> bool:
    return bool(getattr(module, "is_cache_enabled", False))


def reset(module: torch.nn.Module, steps: int) -> None:
    """Forget the previous calls: a new batch, or rows that changed. ``steps``: the denoiser
    calls the batch makes from here, over which MagCache spreads its schedule again."""
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


def context(module: torch.nn.Module, name: str = "cond"):
    """The cache context of one denoiser call (what diffusers' pipelines enter)."""
    if is_enabled(module):
        return module.cache_context(name)
    return contextlib.nullcontext()
