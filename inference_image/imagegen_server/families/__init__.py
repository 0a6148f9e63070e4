"""Per-family stage steps: encode, denoise and decode over a batch of requests."""

from __future__ import annotations

import importlib

from ..config import FAMILIES, Family
from .base import FamilySteps


def steps_for(family: Family, pipeline, device) -> FamilySteps:
    """The stage steps for a loaded pipeline of ``family`` (config.FAMILIES says which)."""
    entry = FAMILIES.get(family)
    if entry is None:
        raise NotImplementedError(f"no stage steps for the {family.value} family")
    module = importlib.import_module(f"{__package__}.{entry.module}")
    return getattr(module, entry.steps)(pipeline, device)


__all__ = ["FamilySteps", "steps_for"]
