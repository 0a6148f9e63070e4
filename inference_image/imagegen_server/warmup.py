"""Warm-up: every shape a service admits runs once before /readyz turns ready.

torch.compile traces the denoiser per input shape, and a request that meets a new shape waits
for the compiler: tens of seconds on a GPU (diffusers#11360, pytorch#150702). Two things vary
between denoise batches: the size, which a compiled service bounds to a list (engine.py,
``admitted_sizes``), and the rows, from one up to ``max_batch_size`` images (or one request's
``max_images_per_request``, when more) x 2 (classifier-free guidance doubles them).

The rows need three batches per size, not one per count. Dynamo compiles the first shape it
sees as static; when a dimension changes it compiles once more with that dimension symbolic
("automatic dynamic shapes"), and the symbolic graph holds for every size above 1, which dynamo
always specializes (its 0/1 specialization). So rows 2, then 3, then 1 cover every count. A size
after the first makes the spatial dimensions symbolic the same way. Dynamo also specializes on
whether First Block Cache reuses its cache at a step: during warm-up every step after a batch's
first does (denoiser_cache.every_branch), so both branches compile.
``imagegen_recompiles_total`` (metrics.py) is how a service sees that this held.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from . import denoiser_cache
from .config import ServerSettings
from .engine import admitted_sizes, default_size
from .families import FamilySteps
from .optimize import denoiser, has_repeated_blocks
from .request import GenerationParams, Job

log = logging.getLogger(__name__)

# Rows in the order that leaves dynamo one static graph for 2, one symbolic for 2..N, one for 1.
ROW_ORDER = (2, 3, 1)
POWERS_OF_TWO = tuple(2**k for k in range(2, 11))


def compiles_regionally(steps: FamilySteps, settings: ServerSettings) -> bool:
    """Whether the denoiser is compiled block by block (optimize.compile_denoiser): only a
    model with repeated blocks is, when compile_regional asks for it."""
    return bool(settings.compile_regional) and has_repeated_blocks(denoiser(steps.pipeline))


@dataclass
class WarmupReport:
    seconds: float = 0.0
    #: (width, height, rows) of every batch the warm-up ran, in order
    batches: list[tuple[int, int, int]] = field(default_factory=list)


def most_rows(settings: ServerSettings) -> int:
    """The most rows one denoise batch can hold: a batch's images are at most max_batch_size
    (stages.py), or one request's when it asks for more, doubled by guidance."""
    return max(settings.max_batch_size, settings.max_images_per_request) * 2


def warmup_plan(steps: FamilySteps, settings: ServerSettings) -> list[tuple[int, int, int]]:
    """(width, height, rows) per warm-up batch: with compile on, every admitted size at rows
    2, 3 and 1 (those a batch can hold), or at 2 rows with ahead-of-time packages; without,
    one request at the default size, which pays for kernel selection and the first
    allocations."""
    if not settings.compile_enabled:
        width, height = default_size(steps, settings)
        return [(width, height, 1)]
    # Ahead-of-time packages take any rows from 1 up: one batch per size, of 2 rows, which is
    # also the call a package is exported from (aot_denoiser.py).
    rows = [2] if settings.compile_aot else [r for r in ROW_ORDER if r <= most_rows(settings)]
    if not settings.compile_aot and not compiles_regionally(steps, settings):
        # A whole compiled denoiser splits its rows range where its code branches on the batch
        # (diffusers' upsampler at 64 rows, CPU convolutions at 16): a batch past a split
        # would recompile in service. Those splits fall on powers of two, and warm-up runs
        # each of them up to the most rows a batch holds, and that most itself.
        most = most_rows(settings)
        rows += [r for r in dict.fromkeys((*POWERS_OF_TWO, most)) if 3 < r <= most]
    plan = []
    for size in admitted_sizes(steps, settings):
        width, height = (int(side) for side in size.split("x"))
        plan.extend((width, height, r) for r in rows)
    return plan


def warm_up(steps: FamilySteps, settings: ServerSettings) -> WarmupReport:
    """Run the plan through the three steps on this thread, before the stages see a request.

    Each batch is ``rows`` requests of one image without guidance: one row each, whatever the
    family, so the denoiser sees exactly ``rows`` rows.
    """
    report = WarmupReport()
    started = time.perf_counter()
    # With First Block Cache, a step after the first reuses the cache: its branch too.
    with torch.inference_mode(), denoiser_cache.every_branch(denoiser(steps.pipeline)):
        for width, height, rows in warmup_plan(steps, settings):
            jobs = [Job(_params(settings, width, height, seed)) for seed in range(rows)]
            steps.encode(jobs)
            steps.denoise(jobs)
            steps.decode(jobs)
            report.batches.append((width, height, rows))
    if steps.device.type == "cuda":
        torch.cuda.synchronize(steps.device)
    report.seconds = time.perf_counter() - started
    log.info("warm-up: %d batches in %.2fs", len(report.batches), report.seconds)
    return report


def _params(settings: ServerSettings, width: int, height: int, seed: int) -> GenerationParams:
    return GenerationParams(
        prompt="warm-up",
        width=width,
        height=height,
        # Two steps whatever the default: a cache's reuse branch (First Block Cache's) runs
        # from a batch's second step on, and a request may ask for more steps than the default.
        steps=2,
        guidance_scale=0.0,
        seed=seed,
    )
