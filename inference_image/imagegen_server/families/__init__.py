"""Per-family stage steps: encode, denoise and decode over a batch of requests."""

from __future__ import annotations

from ..config import Family
from .base import FamilySteps


def steps_for(family: Family, pipeline, device) -> FamilySteps:
    """The stage steps for a loaded pipeline of ``family``."""
    if family == Family.SD15:
        from .stable_diffusion import StableDiffusionSteps

        return StableDiffusionSteps(pipeline, device)
    if family == Family.SDXL:
        from .stable_diffusion import StableDiffusionXLSteps

        return StableDiffusionXLSteps(pipeline, device)
    if family == Family.SD3:
        from .sd3 import StableDiffusion3Steps

        return StableDiffusion3Steps(pipeline, device)
    if family == Family.FLUX:
        from .flux import FluxSteps

        return FluxSteps(pipeline, device)
    raise NotImplementedError(f"no stage steps for the {family.value} family")


__all__ = ["FamilySteps", "steps_for"]
