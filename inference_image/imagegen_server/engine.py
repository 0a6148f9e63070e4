"""Engines: the same stage steps run Pipelined (a thread per stage) or Stacked (one worker).

The engine owns admission control, by cost rather than by count: a request's cost is its
pixels x steps x images, in units of one request at the default size and step count, and at
most ``queue_capacity`` units are in flight. A request beyond that is refused at once with
``QueueFullError`` (HTTP 429), with a Retry-After from the work ahead, instead of waiting in an
unbounded queue. One request is always admitted into an idle engine, whatever it costs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import InvalidStateError
from typing import Any

import torch

from .config import LIMITS, Batching, ServerSettings, StageMode
from .families import FamilySteps
from .metrics import ServerMetrics
from .previews import MAX_PARTIAL_IMAGES, Previewer, PreviewRequest
from .request import MIN_SIDE, GenerationParams, Job, ShutdownError
from .stages import Stage
from .step_batching import StepBatchingStage

log = logging.getLogger(__name__)


def device_usable() -> bool:
    """Whether the GPU still runs work after a CUDA error: an illegal memory access or a
    device-side assert leaves the context unusable, every later call failing; a launch
    refused for its configuration does not."""
    try:
        torch.ones(1, device="cuda").add_(1)
        torch.cuda.synchronize()
    except Exception:
        return False
    return True


# The longest Retry-After a 429 names.
MAX_RETRY_AFTER_S = 60


class QueueFullError(RuntimeError):
    def __init__(self, retry_after_s: int):
        super().__init__(f"server busy, retry in {retry_after_s}s")
        self.retry_after_s = retry_after_s


class Place:
    """Room held for a request before its job exists (:meth:`Engine.reserve`)."""

    taken = False


class EngineClosedError(RuntimeError):
    """The engine is draining or stopped and takes no new work."""


class InvalidRequest(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def default_size(steps: FamilySteps, settings: ServerSettings) -> tuple[int, int]:
    """What a request that names no size gets: the configured default, else the native size."""
    native_w, native_h = steps.native_size
    return (settings.default_width or native_w, settings.default_height or native_h)


def check_sizes(steps: FamilySteps, settings: ServerSettings) -> None:
    """Refuse to serve a default or listed size that no request could get: one the family
    cannot make (SD3 and Flux take whole transformer patches), or a size the settings name
    above the maxPixels they set. Every request without a size would otherwise fail, and a
    listed size be compiled for nothing."""
    multiple = steps.size_multiple
    default = "{}x{}".format(*default_size(steps, settings))
    for size in admitted_sizes(steps, settings):
        width, height = (int(side) for side in size.split("x"))
        where = f"size {size} (spec.pipeline.defaults or spec.pipeline.limits.sizes)"
        if size == default and not (settings.default_width and settings.default_height):
            where += ", the default: the model's native size where no default is set"
        if width % multiple or height % multiple:
            raise InvalidRequest(
                "size", f"{where}: this model takes sizes in multiples of {multiple}")
        if settings.max_pixels is not None and width * height > settings.max_pixels:
            raise InvalidRequest(
                "size", f"{where}: {width * height} pixels, above spec.pipeline.limits."
                f"maxPixels={settings.max_pixels}")


def max_pixels(steps: FamilySteps, settings: ServerSettings) -> int:
    """The largest width x height a request may ask for: the setting, or else the native size
    (the default or a listed size, when larger: the sizes a service names are admitted)."""
    if settings.max_pixels is not None:
        return settings.max_pixels
    native_w, native_h = steps.native_size
    named = (math.prod(int(side) for side in size.split("x"))
             for size in admitted_sizes(steps, settings))
    return max(native_w * native_h, *named)


def listed_sizes(steps: FamilySteps, settings: ServerSettings) -> list[str] | None:
    """The only sizes admitted, or None when any within max_pixels is. Only listed sizes are
    admitted with a list, and always with compile on, where each size is compiled before
    ready (warmup.py) and any other would wait for a recompile."""
    if settings.allowed_sizes or settings.compile_enabled:
        return admitted_sizes(steps, settings)
    return None


def admitted_sizes(steps: FamilySteps, settings: ServerSettings) -> list[str]:
    """The listed sizes and the default size (what a request without one gets)."""
    width, height = default_size(steps, settings)
    default = f"{width}x{height}"
    listed = list(settings.allowed_sizes or [])
    return listed if default in listed else [default, *listed]


def check_request(params: GenerationParams, steps: FamilySteps, settings: ServerSettings) -> None:
    """Every limit on what one request may ask for, in one place, before any device work.

    Each message says what was asked and what is allowed, and ``field`` names the request
    field (OpenAI's ``param``).
    """
    multiple = steps.size_multiple
    size = f"{params.width}x{params.height}"
    for name, value in (("width", params.width), ("height", params.height)):
        if value % multiple or value < MIN_SIDE:
            raise InvalidRequest(
                "size",
                f"size {size}: the {name} must be a multiple of {multiple}, at least {MIN_SIDE}",
            )
    admitted = listed_sizes(steps, settings)
    if admitted is not None and size not in admitted:
        why = "" if settings.allowed_sizes else (
            " (its denoiser is compiled for the default size only; the service's size list, "
            "spec.pipeline.limits.sizes, adds more)"
        )
        raise InvalidRequest(
            "size", f"size {size} is not one this service admits: {', '.join(admitted)}{why}"
        )
    limit = max_pixels(steps, settings)
    if params.width * params.height > limit:
        native_w, native_h = steps.native_size
        raise InvalidRequest(
            "size",
            f"size {size} is {params.width * params.height} pixels; this server admits at most "
            f"{limit} (the model's native size is {native_w}x{native_h})",
        )
    if not 1 <= params.n <= settings.max_images_per_request:
        raise InvalidRequest(
            "n", f"n must be between 1 and {settings.max_images_per_request}, not {params.n}"
        )
    if not 1 <= params.steps <= settings.max_steps:
        raise InvalidRequest(
            "steps", f"steps must be between 1 and {settings.max_steps}, not {params.steps}"
        )
    if not 0 <= params.guidance_scale <= settings.max_guidance_scale:
        raise InvalidRequest(
            "guidance_scale",
            f"guidance_scale must be between 0 and {settings.max_guidance_scale:g}, "
            f"not {params.guidance_scale:g}",
        )
    for name in ("prompt", "negative_prompt"):
        text = getattr(params, name)
        if text is not None and len(text) > settings.max_prompt_chars:
            raise InvalidRequest(
                name, f"{name} is longer than {settings.max_prompt_chars} characters"
            )
    if params.edit is not None:
        check_edit(params, steps)
    if params.loras:
        check_loras(params, steps)
    if not 0 <= params.partial_images <= MAX_PARTIAL_IMAGES:
        raise InvalidRequest(
            "partial_images",
            f"partial_images must be between 0 and {MAX_PARTIAL_IMAGES}, not {params.partial_images}",
        )


def family_name(steps: FamilySteps) -> str:
    """How messages name the model family: StableDiffusionXLSteps -> StableDiffusionXL."""
    return type(steps).__name__.removesuffix("Steps")


def check_loras(params: GenerationParams, steps: FamilySteps) -> None:
    declared = list(steps.adapters.names) if steps.adapters is not None else []
    low, high = LIMITS["lora_scale"].ge, LIMITS["lora_scale"].le
    seen = set()
    for i, (name, scale) in enumerate(params.loras):
        if name not in declared:
            have = f"one of {', '.join(declared)}" if declared else "none are declared"
            raise InvalidRequest(
                f"lora.{i}.name", f"lora {name!r} is not an adapter this service serves: {have}"
            )
        if name in seen:
            raise InvalidRequest(f"lora.{i}.name", f"lora {name!r} is named twice")
        seen.add(name)
        if not low <= scale <= high:
            raise InvalidRequest(
                f"lora.{i}.scale", f"lora {name!r}: scale must be between {low} and {high}, "
                f"not {scale:g}"
            )


def check_edits_served(steps: FamilySteps) -> None:
    if not steps.supports_edits:
        raise InvalidRequest(
            "image", f"this model ({family_name(steps)}) serves "
            "text-to-image only: image edits are not supported for it"
        )


def check_edit(params: GenerationParams, steps: FamilySteps) -> None:
    check_edits_served(steps)
    strength = params.edit.strength
    if not 0 < strength <= 1:
        raise InvalidRequest("strength", f"strength must be above 0 and at most 1, not {strength:g}")
    if params.denoising_steps < 1:
        raise InvalidRequest(
            "strength", f"strength {strength:g} of {params.steps} steps leaves no denoising "
            f"step: raise strength or steps so that strength x steps is at least 1"
        )


class Engine:
    """Admission, hand-off to the first stage, and drain; subclasses choose the stages."""

    mode: StageMode

    def __init__(self, steps: FamilySteps, settings: ServerSettings, metrics: ServerMetrics):
        self.steps = steps
        self.settings = settings
        self.metrics = metrics
        self._lock = threading.Condition()
        # Every job accepted and not yet let go of; the count and the work in flight are its own.
        self._jobs: set[Job] = set()
        self._places = 0  # held by requests with work to do before submit (reserve)
        self._closed = False
        self._cancelled = False
        # A CUDA error the device reported (an illegal memory access, a device-side assert):
        # the context is unusable from then on, so the pod must restart (/healthz fails).
        self.device_error: BaseException | None = None
        width, height = default_size(steps, settings)
        self._unit = width * height * settings.default_steps
        # Running estimate of the seconds one unit of work takes, for Retry-After.
        self._seconds_per_unit = 1.0
        self._last_done: float | None = None
        self._answers = 0
        # Streamed previews are made on a thread of their own (previews.py).
        self.previewer = Previewer() if steps.latent_rgb is not None else None
        steps.previews = self.previewer
        self.stages = self._build_stages()

    def _build_stages(self) -> list[Stage]:
        raise NotImplementedError

    def _stage(self, name, step, key, on_output) -> Stage:
        return Stage(name, step, key, on_output=on_output, **self._stage_settings())

    def _stage_settings(self) -> dict:
        s = self.settings
        return {
            "max_batch_size": s.max_batch_size,
            "batch_window_s": s.batch_window_ms / 1000.0,
            "capacity": s.queue_capacity,
            "metrics": self.metrics,
            "device": self.steps.device,
        }

    # --- lifecycle ----------------------------------------------------------------------------
    def start(self) -> Engine:
        for stage in self.stages:
            stage.start()
        return self

    def stop_accepting(self) -> None:
        """From now on ``submit`` refuses (503); accepted work goes on."""
        with self._lock:
            self._closed = True

    def wait_idle(self, timeout: float | None) -> bool:
        """Wait until nothing accepted is left, the requests that hold a place included;
        returns whether that happened in time."""
        with self._lock:
            return self._lock.wait_for(lambda: not self._jobs and not self._places, timeout)

    def cancel_all(self, error: BaseException) -> int:
        """Answer every accepted request with ``error`` now; returns how many there were.

        The stages drop each job at its next step boundary, which frees its slot; its device
        work stops there.
        """
        with self._lock:
            self._cancelled = True  # and a request holding a place is refused from now on
            jobs = list(self._jobs)
        for job in jobs:
            with contextlib.suppress(InvalidStateError):
                job.future.set_exception(error)
        return len(jobs)

    def drain(self, timeout: float | None) -> bool:
        """Refuse new work (503) and let accepted work finish until shortly before
        ``timeout``; then answer what is left with ShutdownError (503) and wait for the stages
        to drop it. Returns whether everything accepted finished."""
        self.stop_accepting()
        if timeout is None:
            return self.wait_idle(None)
        # Cancelled jobs leave at their next step boundary: keep a little time for that.
        cancel_grace = min(5.0, timeout / 4)
        if self.wait_idle(timeout - cancel_grace):
            return True
        cancelled = self.cancel_all(ShutdownError("the server shut down before this finished"))
        log.warning("drain deadline: cancelled %d request(s)", cancelled)
        self.wait_idle(cancel_grace)
        return False

    def close(self, timeout: float | None = None) -> bool:
        """Drain (up to ``timeout``), then stop the threads: no caller is left waiting.

        Returns whether everything accepted was finished.
        """
        drained = self.drain(timeout)
        # In pipeline order, each after the one before it has handed on all it had; a job
        # handed to a stage already stopped fails at once (Stage.put).
        for stage in self.stages:
            stage.stop(timeout=5)
        if self.previewer is not None:
            self.previewer.stop()
        return drained

    @property
    def in_flight(self) -> int:
        return len(self._jobs)

    @property
    def accepting(self) -> bool:
        return not self._closed

    @property
    def fault(self) -> str | None:
        """Why the engine cannot serve any more (a stage thread died), or None."""
        for stage in self.stages:
            if stage.died is not None:
                return f"the {stage.name} stage stopped working: {stage.died!r}"
        if self.device_error is not None:
            return f"the device failed: {self.device_error!r}"
        return None

    # --- requests -----------------------------------------------------------------------------
    def submit(
        self,
        params: GenerationParams,
        timeout_s: float | None = None,
        on_preview: Callable[[int, list], None] | None = None,
        place: Place | None = None,
    ) -> Job:
        """Accept a request or refuse it now; the job's future resolves to a list of images.

        With ``on_preview``, the request's ``partial_images`` previews are handed to it (from
        the preview thread) as they are made, each with its index. ``place``: one ``reserve``
        held for it, which the job takes over.
        """
        check_request(params, self.steps, self.settings)
        deadline = time.monotonic() + timeout_s if timeout_s else None
        # The slot is given back when the engine lets go of the job, not when the caller stops
        # waiting: a timed-out request a stage is running still occupies the device until the
        # stage drops it. One still queued is let go at once (Stage.take_back).
        job = Job(params, deadline=deadline, cost=self.cost(params), on_release=self._released)
        # A family without a latent-to-RGB map streams the final image only: as OpenAI's
        # streams, which may send fewer partial images than asked for.
        if on_preview is not None and params.partial_images and self.previewer is not None:
            job.preview = PreviewRequest(on_preview)
        with self._lock:
            placed = place is not None and not place.taken
            try:
                if placed:
                    place.taken = True  # the place becomes the job's: not counted twice
                    self._places -= 1
                # A request holding a place was accepted before a drain began: it goes on,
                # unless the drain's deadline has passed.
                self._check_room(job.cost,
                                 closed=self._closed and (not placed or self._cancelled))
                self._jobs.add(job)
            finally:
                self._count_in_flight()
                if placed and job not in self._jobs:
                    self._lock.notify_all()  # its place is free, and no job holds it: a drain
        self.stages[0].put(job)
        # Answered before a stage took it (its caller left): out of the queue it waits in.
        job.future.add_done_callback(
            lambda _: job.waiting_at is not None and job.waiting_at.take_back(job))
        return job

    @contextlib.contextmanager
    def reserve(self) -> Iterator[Place]:
        """A place for a request with work to do before ``submit`` (an upload to decode):
        refused now if a full server would refuse any request, and counted against the
        room while that work runs, so that a burst of uploads decodes no more of them than
        the server can take. ``submit(..., place=...)`` hands it to the job; left unused, it
        is given back on leaving. (Its cost is not known yet, an edit's size and share of
        the steps being the upload's: ``submit`` weighs that.)"""
        place = Place()
        with self._lock:
            self._check_room(None)
            self._places += 1
            self._count_in_flight()
        try:
            yield place
        finally:
            with self._lock:
                if not place.taken:
                    place.taken = True
                    self._places -= 1
                    self._count_in_flight()
                    self._lock.notify_all()  # a drain may wait on it

    def _count_in_flight(self) -> None:
        """The in-flight gauge, which the autoscaler scales on: jobs, and the requests that
        hold a place while their uploads decode. Under the lock."""
        self.metrics.in_flight.set(len(self._jobs) + self._places)

    def _check_room(self, cost: float | None, closed: bool | None = None) -> None:
        if self._closed if closed is None else closed:
            raise EngineClosedError("server is shutting down")
        capacity = self.settings.queue_capacity
        busy = bool(self._jobs)
        if len(self._jobs) + self._places >= capacity or (
                cost is not None and busy and self.work_in_flight + cost > capacity):
            raise QueueFullError(self.retry_after_s(1.0 if cost is None else cost))

    def generate(self, params: GenerationParams, timeout_s: float | None = None) -> list:
        """Submit and wait: the blocking form for warm-up, benchmarks and tests."""
        job = self.submit(params, timeout_s)
        try:
            return job.future.result(timeout_s)
        finally:
            job.future.cancel()  # waited for no longer (a no-op once answered)

    def cost(self, params: GenerationParams) -> float:
        """Pixels x steps x images, in units of one request at the default size and steps
        (an edit counts the steps it runs)."""
        return params.width * params.height * params.denoising_steps * params.n / self._unit

    @property
    def work_in_flight(self) -> float:
        with self._lock:  # reentrant: submit and retry_after_s read it holding the lock
            return sum(job.cost for job in self._jobs)

    def retry_after_s(self, cost: float = 1.0) -> int:
        """Seconds until a request of ``cost`` would be let in, at the rate recent requests
        went: the work of the jobs that must end first, oldest first (a job gives its room
        back when it ends), not all the work in flight. At most ``MAX_RETRY_AFTER_S``:
        clients wait no longer (OpenAI's Python client ignores a longer Retry-After)."""
        capacity = self.settings.queue_capacity
        with self._lock:
            jobs = sorted(self._jobs, key=lambda job: job.submitted_at)
            left, waited = sum(job.cost for job in jobs), 0.0
            for count, job in zip(range(len(jobs), 0, -1), jobs, strict=True):
                if count < capacity and left + cost <= capacity:
                    break  # room enough once the jobs before this one have ended
                left, waited = left - job.cost, waited + job.cost
            seconds = waited * self._seconds_per_unit
        return max(1, min(MAX_RETRY_AFTER_S, math.ceil(seconds)))

    def _released(self, job: Job, succeeded: bool) -> None:
        now = time.monotonic()
        if (isinstance(job.error, torch.AcceleratorError) and self.device_error is None
                and not device_usable()):
            log.critical("the device failed; the server must restart: %r", job.error)
            self.device_error = job.error
        with self._lock:
            if succeeded:
                # The time since the last answer is this job's share of the device while work
                # queued; its latency bounds that when the engine sat idle in between.
                latency = now - job.submitted_at
                share = latency if self._last_done is None else min(latency, now - self._last_done)
                rate = share / job.cost
                # The first answer sets the pace (warm-up, which compiles, runs before the
                # engine takes requests); later ones move it smoothly, as answers of one
                # batch come all but together.
                if self._answers:
                    self._seconds_per_unit = 0.8 * self._seconds_per_unit + 0.2 * rate
                else:
                    self._seconds_per_unit = rate
                self._answers += 1
                self._last_done = now
            self._jobs.discard(job)
            self._count_in_flight()
            self._lock.notify_all()

    def _complete(self, job: Job, images: Any) -> None:
        self.metrics.images.inc(len(images))
        job.finish(images)


class PipelinedEngine(Engine):
    """encode -> denoise -> decode, each on its own thread, so requests overlap on the device;
    the denoise stage batches per request or, with ``batching: Step``, per step."""

    mode = StageMode.PIPELINED

    def _build_stages(self) -> list[Stage]:
        steps = self.steps
        decode = self._stage("decode", steps.decode, steps.decode_key, self._complete)
        if self.settings.batching == Batching.STEP:
            denoise = StepBatchingStage(
                "denoise", steps, on_output=lambda job, _: decode.put(job),
                **self._stage_settings(),
            )
        else:
            denoise = self._stage(
                "denoise", steps.denoise, steps.denoise_key, lambda job, _: decode.put(job)
            )
        encode = self._stage(
            "encode", steps.encode, steps.encode_key, lambda job, _: denoise.put(job)
        )
        return [encode, denoise, decode]


class StackedEngine(Engine):
    """One worker runs a batch through all three steps before taking the next: the baseline."""

    mode = StageMode.STACKED

    def _build_stages(self) -> list[Stage]:
        return [self._stage("stacked", self._all_steps, self.steps.denoise_key, self._complete)]

    def _all_steps(self, jobs: list[Job]) -> list:
        (stage,) = self.stages
        with stage.timed("encode"):
            self.steps.encode(jobs)
        with stage.timed("denoise"):
            self.steps.denoise(jobs)
        # The denoise loop drops a job whose caller left (its latents gone with it): decode
        # the rest, and give the stage one output per job it passed.
        live = [job for job in jobs if not job.released]
        with stage.timed("decode"):
            images = iter(self.steps.decode(live) if live else [])
        return [None if job.released else next(images) for job in jobs]


def build_engine(steps: FamilySteps, settings: ServerSettings, metrics: ServerMetrics) -> Engine:
    cls = PipelinedEngine if settings.stage_mode == StageMode.PIPELINED else StackedEngine
    return cls(steps, settings, metrics).start()
