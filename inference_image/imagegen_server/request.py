"""A generation request and the state it carries through the stages."""

from __future__ import annotations

import contextlib
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

# The smallest side an image may have, in pixels (a few latent pixels less and the models fail).
MIN_SIDE = 64


@dataclass(frozen=True, eq=False)
class EditInput:
    """What an edit starts from: the uploaded image, and where to repaint.

    ``image`` is an RGB PIL image; ``mask``, when given, a grayscale one of the same size,
    white where the image is repainted (inpainting) and black where it is kept; without a
    mask the whole image is transformed (image-to-image). ``strength`` is how far from the
    image the result may go: the share of the denoising steps that run.
    """

    image: Any
    strength: float
    mask: Any = None
    # What a signed edit names as its parent (provenance.Parent); None when unsigned.
    parent: Any = None


@dataclass(frozen=True)
class GenerationParams:
    """What one request asks for, already validated and with defaults filled in."""

    prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    n: int = 1
    negative_prompt: str | None = None
    # Image edits: the image to start from (None: text-to-image).
    edit: EditInput | None = None
    # LoRA adapters and their scales, as (name, scale) in the request's order.
    loras: tuple[tuple[str, float], ...] = ()
    # Streamed previews before the final image (0..3, OpenAI's partial_images).
    partial_images: int = 0

    @property
    def denoising_steps(self) -> int:
        """The steps that run: all of them, or for an edit ``strength`` of them (diffusers)."""
        if self.edit is None:
            return self.steps
        return min(int(self.steps * self.edit.strength), self.steps)


class JobTimeout(TimeoutError):
    """The request's deadline passed, or its caller went away, before the work was done."""


class ShutdownError(RuntimeError):
    """An accepted request the server's shutdown cut short."""


@dataclass(frozen=True)
class Checkpoint:
    """A job's state before a step (Job.checkpoint). The steps replace the job's tensors and
    the dict's entries rather than writing into them, so references are enough, and the
    generator's state is what makes its draws repeat. The scheduler is not copied: it is
    stepped in place, and a checkpoint is only ever taken before denoising starts (which
    makes a new one) or after it ended (decode reads none)."""

    conditioning: dict[str, Any]
    generator: Any
    generator_state: Any
    latents: Any
    timesteps: Any
    scheduler: Any
    step: int


@dataclass(eq=False)
class Job:
    """One request in flight. Each stage reads what the one before wrote, on the same device.

    The job owns its scheduler and its generator, so nothing mutable is shared between requests
    and the result does not depend on which other requests it was batched with.
    """

    params: GenerationParams
    future: Future = field(default_factory=Future)
    deadline: float | None = None
    # Its work in units of one request at the default size and step count (see engine.py).
    cost: float = 1.0
    submitted_at: float = field(default_factory=time.monotonic)
    generator: Any = None
    scheduler: Any = None
    # Written by encode, read by denoise: text embeddings and friends, on the device.
    conditioning: dict[str, Any] = field(default_factory=dict)
    # Written by denoise, read by decode; never copied to the host.
    latents: Any = None
    # The timesteps this job's denoising runs through (an edit's start later), and how many of
    # them are done: each job keeps its own count, so a batch may hold jobs at different steps.
    timesteps: Any = None
    step: int = 0
    # When stages run on their own CUDA streams: recorded after a stage, waited on by the next.
    ready_event: Any = None
    # A streaming request's previews: after which steps, and where to (previews.py).
    preview: Any = None
    # The stage whose queue the job was last put on (it may have been taken off since).
    waiting_at: Any = None
    # Called once when the engine is done with the job (answered, failed or dropped).
    on_release: Callable[[Job, bool], None] | None = None
    released: bool = False
    error: BaseException | None = None  # what it failed with

    def checkpoint(self) -> Checkpoint:
        """What a stage's step may change, to run the job again from here (``rewind``)."""
        generator = self.generator
        return Checkpoint(
            dict(self.conditioning), generator,
            None if generator is None else generator.get_state(),
            self.latents, self.timesteps, self.scheduler, self.step,
        )

    def rewind(self, to: Checkpoint) -> None:
        """Back to ``to``: the same inputs and the same random draws to come, so a step run
        again computes what it would have the first time."""
        self.conditioning = dict(to.conditioning)
        self.generator = to.generator
        if to.generator is not None:
            to.generator.set_state(to.generator_state)
        self.latents, self.timesteps = to.latents, to.timesteps
        self.scheduler, self.step = to.scheduler, to.step

    @property
    def denoised(self) -> bool:
        return self.step >= len(self.timesteps)

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def drop_reason(self) -> str | None:
        """Why no more work should be spent on this job, or None while it is wanted."""
        if self.future.done():
            return "request cancelled"  # the caller gave up: timed out or disconnected
        if self.expired():
            return "request timed out"
        return None

    def finish(self, images: list) -> None:
        # Release first, so a caller woken by the result already finds its slot free again.
        self._release(succeeded=True)
        # The caller may have cancelled (timed out) meanwhile; its answer no longer matters.
        with contextlib.suppress(InvalidStateError):
            self.future.set_result(images)

    def fail(self, error: BaseException) -> None:
        error = _detached(error)
        if not self.released:
            self.error = error
        self._release(succeeded=False)
        with contextlib.suppress(InvalidStateError):
            self.future.set_exception(error)

    def _release(self, succeeded: bool) -> None:
        if self.released:
            return
        self.released = True
        # Drop device tensors as soon as the job is over, not when the caller lets go of it.
        self.conditioning = {}
        self.latents = None
        self.scheduler = None
        self.timesteps = None
        self.ready_event = None
        if self.on_release is not None:
            self.on_release(self, succeeded)


def _detached(error: BaseException) -> BaseException:
    """``error`` with where it was raised kept as text (a note), not as frames. The frames
    hold the failed step's tensors (after an out of memory, nearly all the device's) and the
    job, which holds the error: a cycle that only the garbage collector's rare full pass
    would free. Done once for an error several jobs share."""
    if error.__traceback__ is None:
        return error
    error.add_note("raised at:\n" + "".join(traceback.format_exception(error)).rstrip())
    link, seen = error, set()
    while link is not None and id(link) not in seen:  # the chained ones' frames too
        seen.add(id(link))
        # Cleared as well as dropped: a log record still holding the traceback (a handler
        # that keeps records) then keeps no tensors alive either.
        traceback.clear_frames(link.__traceback__)
        link.__traceback__ = None
        link = link.__cause__ or link.__context__
    return error
