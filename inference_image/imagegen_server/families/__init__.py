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
    if family == Family.FLUX:
        from .flux import FluxSteps

        return FluxSteps(pipeline, device)
    raise NotImplementedError(f"the {family.value} family is detected but not served yet")


__all__ = ["FamilySteps", "steps_for"]
