"""Streamed previews: a cheap latent-to-RGB picture at evenly spaced denoising steps.

A preview is the latents (the scheduler's estimate of the clean latents where it gives one)
projected to RGB by a fixed linear map per latent space, the approximation ComfyUI's
previewer uses (``comfy/latent_formats.py``), then scaled up to the requested size: no VAE,
a few microseconds of device work. The denoise loop only hands the tensor over; the
projection is made on the preview thread, beside the decode stage (the route encodes the
PNG), so denoising never waits for a client's previews.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from .request import Job

log = logging.getLogger(__name__)

MAX_PARTIAL_IMAGES = 3  # OpenAI's bound on partial_images


@dataclass(frozen=True)
class LatentRGB:
    """latents [n, c, h, w] -> RGB in [-1, 1]: ``factors`` [c, 3] and a ``bias`` [3]."""

    factors: tuple[tuple[float, float, float], ...]
    bias: tuple[float, float, float] = (0.0, 0.0, 0.0)


SD15_RGB = LatentRGB((
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
))
SDXL_RGB = LatentRGB(
    (
        (0.3651, 0.4232, 0.4341),
        (-0.2533, -0.0042, 0.1068),
        (0.1076, 0.1111, -0.0362),
        (-0.3165, -0.2492, -0.2188),
    ),
    (0.1084, -0.0175, -0.0011),
)


def preview_steps(denoising_steps: int, partial_images: int) -> tuple[int, ...]:
    """After which denoising steps (0-based) the previews are taken: evenly spaced, the last
    before the final step (the final image is the completed event)."""
    count = min(partial_images, max(denoising_steps - 1, 0))
    return tuple(sorted({(i + 1) * denoising_steps // (count + 1) - 1 for i in range(count)}))


@dataclass
class PreviewRequest:
    """A streaming job's previews (``partial_images`` of them, at ``preview_steps``) go to
    ``deliver``, called on the preview thread with the preview's index and its RGB images
    (None for a preview that failed, so nobody waits for it).
    ``handed`` counts the previews the denoise loop has handed over, so the caller knows how
    many are still to come once the final image is there."""

    deliver: Callable[[int, list[Image.Image]], None]
    handed: int = 0


def project(latents: torch.Tensor, rgb: LatentRGB, size: tuple[int, int]) -> list[Image.Image]:
    """RGB pictures of ``latents`` [n, c, h, w] at ``size`` (width, height)."""
    factors = torch.tensor(rgb.factors, dtype=torch.float32)
    bias = torch.tensor(rgb.bias, dtype=torch.float32)
    latents = latents.detach().to("cpu", torch.float32)
    pixels = torch.einsum("nchw,cr->nhwr", latents, factors) + bias
    pixels = ((pixels + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    return [Image.fromarray(p, "RGB").resize(size, Image.Resampling.BILINEAR) for p in pixels]


class Previewer:
    """One thread that turns handed-over latents into previews, in the order handed over."""

    def __init__(self):
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="previews", daemon=True)
        self._thread.start()

    def submit(self, job: Job, index: int, latents: torch.Tensor, rgb: LatentRGB) -> None:
        """Hand over a preview; returns at once. On a GPU an event marks when the tensor is
        ready, so the preview thread waits for the device, never the denoise loop."""
        ready = None
        if latents.is_cuda:
            ready = torch.cuda.Event()
            ready.record()
        job.preview.handed += 1
        self._queue.put((job, index, latents, rgb, ready))

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(5)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            job, index, latents, rgb, ready = item
            future = job.future
            # Done first: a future is cancelled from the event loop at any moment, and one
            # read as not cancelled and then done would raise from exception().
            if future.done() and (future.cancelled() or future.exception() is not None):
                # The caller went away, or the job failed (dropped at its deadline, answered
                # at shutdown): nobody waits for this preview. (A job done with its image
                # still gets it: its stream sends the previews handed over first.)
                continue
            try:
                if ready is not None:
                    ready.synchronize()
                p = job.params
                job.preview.deliver(index, project(latents, rgb, (p.width, p.height)))
            except Exception:
                log.exception("a preview failed; the request goes on without it")
                with contextlib.suppress(Exception):
                    job.preview.deliver(index, None)


def latents_for_preview(step_output: Any, latents: torch.Tensor) -> torch.Tensor:
    """The scheduler's clean-latent estimate when its step returns one, else the latents."""
    if isinstance(step_output, tuple) and len(step_output) > 1:
        estimate = step_output[1]
        if isinstance(estimate, torch.Tensor) and estimate.shape == latents.shape:
            return estimate
    return latents
