"""The contract every family implements: three stage steps over a batch of jobs."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import torch

from ..previews import LatentRGB, latents_for_preview, preview_steps
from ..request import EditInput, GenerationParams, Job, JobTimeout

log = logging.getLogger(__name__)


class FamilySteps:
    """encode -> denoise -> decode for one loaded pipeline.

    Each step takes a list of jobs the stage batched together (jobs with equal ``*_key``), reads
    what the previous step left on each job and writes its own output there. The pipeline's
    modules are shared and read-only; per-request state (scheduler, generator) lives on the job.
    """

    #: images are a multiple of this many pixels on each side
    size_multiple: int = 8
    #: whether requests may start from an image (POST /v1/images/edits)
    supports_edits: bool = False
    #: the latent-to-RGB map streamed previews use; None: this family streams none
    latent_rgb: LatentRGB | None = None

    def __init__(self, pipeline, device: torch.device):
        self.pipeline = pipeline
        self.device = device
        self.vae_scale_factor: int = pipeline.vae_scale_factor
        self._step_accepts = _step_parameters(pipeline.scheduler)
        # The LoRA slot on the denoiser, when the service declares adapters (lora.py).
        self.adapters = None
        # The engine's preview thread, for streaming requests (previews.py).
        self.previews = None

    def fitted(self, edit: EditInput, width: int, height: int) -> EditInput:
        """An edit's pictures at the size the request makes (families with edits resize)."""
        return edit

    # --- what can be batched together -------------------------------------------------------
    def encode_key(self, job: Job) -> Hashable:
        return None

    def denoise_key(self, job: Job) -> Hashable:
        p = job.params
        # Same size and step count means same shapes and the same timestep sequence; the
        # same adapters, the same denoiser weights.
        return (p.width, p.height, p.steps, p.loras)

    def join_key(self, job: Job) -> Hashable:
        """What step-level batching needs equal between rows of one denoiser call: the shapes
        and the adapters. Each job keeps its own timesteps, so step count, strength and
        guidance may differ."""
        p = job.params
        return (p.width, p.height, p.loras)

    def decode_key(self, job: Job) -> Hashable:
        return (job.params.width, job.params.height)

    # --- the steps ----------------------------------------------------------------------------
    def encode(self, jobs: list[Job]) -> None:
        raise NotImplementedError

    def denoise(self, jobs: list[Job]) -> None:
        """Request-level batching: the batch runs all its steps together, then goes on."""
        self.use_adapters(jobs)
        inputs = None
        for live, changed in self.denoising_steps(self.start_all(jobs)):
            if changed:
                inputs = self.batch_inputs(live)
            self.denoise_step(live, inputs)

    def start_all(self, jobs: list[Job]) -> list[Job]:
        """Start each job that is not released yet; one whose own inputs cannot start fails
        alone, and the batch goes on without it. The jobs started."""
        started = []
        for job in jobs:
            if job.released:
                continue  # failed in an earlier step (a Stacked batch's encode)
            try:
                self.start_denoising(job)
            except Exception as exc:
                log.exception("a request could not start denoising")
                job.fail(exc)
                continue
            started.append(job)
        return started

    def start_denoising(self, job: Job) -> None:
        """The job's scheduler, timesteps and first latents; ``job.step`` back at 0."""
        self.prepare(job)
        job.step = 0

    def prepare(self, job: Job) -> None:
        raise NotImplementedError

    def batch_inputs(self, jobs: list[Job]) -> dict[str, Any]:
        """The denoiser's inputs that hold while the batch's jobs stay the same (the text
        conditioning concatenated, each job's row count): built again when the batch changes."""
        raise NotImplementedError

    def denoise_step(self, jobs: list[Job], inputs: dict[str, Any]) -> None:
        """One denoiser call over the batch, each job at its own ``job.step``, which it then
        advances; the rest of the batch does not change what a job computes."""
        raise NotImplementedError

    def decode(self, jobs: list[Job]) -> list[list]:
        raise NotImplementedError

    # --- helpers ------------------------------------------------------------------------------
    def hand_preview(self, job: Job, step: int, step_output) -> None:
        """After a denoising step: give the preview thread this job's latents if it wants a
        preview here. Only a hand-over: the denoise loop never waits for a preview."""
        if job.preview is None or self.previews is None:
            return
        # Over the loop's own steps: a second-order scheduler runs about twice its step count.
        steps = preview_steps(len(job.timesteps), job.params.partial_images)
        # A step run again (its batch failed, the job runs alone) hands no preview twice.
        if step in steps and (index := steps.index(step)) >= job.preview.handed:
            latents = latents_for_preview(step_output, job.latents)
            self.previews.submit(job, index, latents, self.latent_rgb)

    def use_adapters(self, jobs: list[Job]) -> None:
        """Put the batch's LoRA adapters on the denoiser (one set per batch: its key)."""
        if self.adapters is not None:
            self.adapters.activate(jobs[0].params.loras)

    @property
    def native_size(self) -> tuple[int, int]:
        raise NotImplementedError

    def reference_kwargs(self, params: GenerationParams) -> dict:
        """Arguments for the diffusers pipeline's own ``__call__`` giving the same images."""
        raise NotImplementedError

    def new_scheduler(self):
        """A fresh scheduler per request: diffusers schedulers keep step state on themselves."""
        base = self.pipeline.scheduler
        return type(base).from_config(base.config)

    def new_generator(self, seed: int) -> torch.Generator:
        # A CPU generator, as diffusers recommends for reproducibility: the same seed gives the
        # same image on any device. Only the initial noise is drawn there.
        return torch.Generator(device="cpu").manual_seed(seed)

    @staticmethod
    def denoising_steps(jobs: list[Job]) -> Iterator[tuple[list[Job], bool]]:
        """``(jobs, changed)`` before each denoising step of a batch that steps together.

        At every step boundary the jobs whose deadline passed or whose client went away are
        dropped (failed now, giving back their batch rows and their slot within one step, not
        after the whole loop); ``changed`` says the batch is new or smaller, so the step's
        concatenated inputs must be built again. The loop ends when no job is left or all
        are denoised.
        """
        first = True
        while jobs and not jobs[0].denoised:
            wanted = drop_unwanted(jobs)
            if not wanted:
                return
            changed = first or len(wanted) < len(jobs)
            first = False
            jobs = wanted
            yield jobs, changed

    @staticmethod
    def timestep_rows(jobs: list[Job], rows: list[int]) -> torch.Tensor:
        """Each job's current timestep, once per row of it: the denoiser's ``timestep``."""
        return torch.cat(
            [job.timesteps[job.step].expand(n) for job, n in zip(jobs, rows, strict=True)]
        )

    @staticmethod
    def step_schedulers(jobs: list[Job], noise_pred: torch.Tensor, rows: list[int],
                        guide: Callable[[Job, torch.Tensor], torch.Tensor] | None = None) -> None:
        """Each job's scheduler steps its latents with its rows of the prediction (after
        ``guide``), and the job moves on one step."""
        for job, pred in zip(jobs, split_rows(noise_pred, rows), strict=True):
            if guide is not None:
                pred = guide(job, pred)
            job.latents = job.scheduler.step(
                pred, job.timesteps[job.step], job.latents, return_dict=False
            )[0]
            job.step += 1

    def step_kwargs(self, job: Job) -> dict:
        kwargs = {}
        if "eta" in self._step_accepts:
            kwargs["eta"] = 0.0
        if "generator" in self._step_accepts:
            kwargs["generator"] = job.generator
        return kwargs

    def postprocess(self, image: torch.Tensor) -> list:
        return self.pipeline.image_processor.postprocess(image, output_type="pil")


def drop_unwanted(jobs: list[Job]) -> list[Job]:
    """The jobs still wanted; the others (deadline passed, caller gone) fail now."""
    wanted = []
    for job in jobs:
        if reason := job.drop_reason():
            job.fail(JobTimeout(f"{reason} at denoising step {job.step}"))
        else:
            wanted.append(job)
    return wanted


def _step_parameters(scheduler) -> set[str]:
    return set(inspect.signature(scheduler.step).parameters)


def split_rows(tensor: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(torch.split(tensor, sizes, dim=0))
