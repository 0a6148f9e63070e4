"""diffusers' own cache hooks on the denoiser: steps whose first block barely changed reuse
the rest of the last step's output (First Block Cache).

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


def enable(module: torch.nn.Module, method: DenoiserCache, threshold: float) -> None:
    if method == DenoiserCache.NONE:
        return
    from diffusers.hooks import FirstBlockCacheConfig

    if not hasattr(module, "enable_cache"):
        raise DenoiserCacheError(
            f"pipeline cache {method.value} needs a denoiser with diffusers' cache hooks "
            f"(Flux's transformer); this model's is {type(module).__name__}: set cache None"
        )
    module.enable_cache(FirstBlockCacheConfig(threshold=threshold))


def is_enabled(module: torch.nn.Module) -> bool:
    return bool(getattr(module, "is_cache_enabled", False))


def reset(module: torch.nn.Module) -> None:
    """Forget the previous calls: a new batch, or rows that changed."""
    if is_enabled(module):
        module._reset_stateful_cache()


def context(module: torch.nn.Module, name: str = "cond"):
    """The cache context of one denoiser call (what diffusers' pipelines enter)."""
    if is_enabled(module):
        return module.cache_context(name)
    return contextlib.nullcontext()
