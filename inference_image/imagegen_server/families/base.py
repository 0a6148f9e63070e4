"""The contract every family implements: three stage steps over a batch of jobs."""

from __future__ import annotations

import inspect
from collections.abc import Hashable, Iterator
from typing import Any

import torch

from ..previews import LatentRGB, latents_for_preview, preview_steps
from ..request import GenerationParams, Job, JobTimeout


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

    # --- what can be batched together -------------------------------------------------------
    def encode_key(self, job: Job) -> Hashable:
        return None

    def denoise_key(self, job: Job) -> Hashable:
        p = job.params
        # Same size and step count means same shapes and the same timestep sequence; the
        # same adapters, the same denoiser weights.
        return (p.width, p.height, p.steps, p.loras)

    def decode_key(self, job: Job) -> Hashable:
        return (job.params.width, job.params.height)

    # --- the steps ----------------------------------------------------------------------------
    def encode(self, jobs: list[Job]) -> None:
        raise NotImplementedError

    def denoise(self, jobs: list[Job]) -> None:
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
        if step in steps:
            latents = latents_for_preview(step_output, job.latents)
            self.previews.submit(job, steps.index(step), latents, self.latent_rgb)

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
    def denoising_steps(jobs: list[Job], timesteps) -> Iterator[tuple[int, Any, list[Job], bool]]:
        """``(step, t, jobs, changed)`` for each denoising step of a batch.

        At every step boundary the jobs whose deadline passed or whose client went away are
        dropped (failed now, giving back their batch rows and their slot within one step, not
        after the whole loop); ``changed`` says the batch is new or smaller, so the step's
        concatenated inputs must be built again. The loop ends early when no job is left.
        """
        for step, t in enumerate(timesteps):
            wanted = []
            for job in jobs:
                if reason := job.drop_reason():
                    job.fail(JobTimeout(f"{reason} at denoising step {step}"))
                else:
                    wanted.append(job)
            if not wanted:
                return
            changed = step == 0 or len(wanted) < len(jobs)
            jobs = wanted
            yield step, t, jobs, changed

    def step_kwargs(self, job: Job) -> dict:
        kwargs = {}
        if "eta" in self._step_accepts:
            kwargs["eta"] = 0.0
        if "generator" in self._step_accepts:
            kwargs["generator"] = job.generator
        return kwargs

    def postprocess(self, image: torch.Tensor) -> list:
        return self.pipeline.image_processor.postprocess(image, output_type="pil")


def _step_parameters(scheduler) -> set[str]:
    return set(inspect.signature(scheduler.step).parameters)


def split_rows(tensor: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(torch.split(tensor, sizes, dim=0))
