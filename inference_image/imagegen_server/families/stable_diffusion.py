"""Stable Diffusion 1.x/2.x and SDXL as stage steps, mirroring diffusers' pipelines.

Numbered as in ``StableDiffusionPipeline.__call__`` so the two read side by side; the
difference is that a batch holds several requests, each with its own scheduler, generator,
guidance scale and negative prompt.
"""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor

from ..request import GenerationParams, Job
from .base import FamilySteps, split_rows


class StableDiffusionSteps(FamilySteps):
    """SD 1.5 (and 2.x): one CLIP text encoder, a UNet, classifier-free guidance."""

    @property
    def native_size(self) -> tuple[int, int]:
        side = self.pipeline.unet.config.sample_size * self.vae_scale_factor
        return side, side

    def reference_kwargs(self, params: GenerationParams) -> dict:
        return {
            "prompt": params.prompt,
            "negative_prompt": params.negative_prompt,
            "width": params.width,
            "height": params.height,
            "num_inference_steps": params.steps,
            "guidance_scale": params.guidance_scale,
            "num_images_per_prompt": params.n,
            "generator": self.new_generator(params.seed),
        }

    @staticmethod
    def uses_guidance(job: Job) -> bool:
        # diffusers: do_classifier_free_guidance = guidance_scale > 1
        return job.params.guidance_scale > 1

    @classmethod
    def guided(cls, job: Job, pred: torch.Tensor) -> torch.Tensor:
        """The noise prediction after classifier-free guidance, combined as diffusers does."""
        if not cls.uses_guidance(job):
            return pred
        uncond, text = pred.chunk(2)
        return uncond + job.params.guidance_scale * (text - uncond)

    # 1. Encode -------------------------------------------------------------------------------
    def encode(self, jobs: list[Job]) -> None:
        # Prompts go through the text encoder as one batch and negative prompts as another,
        # each as diffusers encodes them: one request alone then runs diffusers' very
        # arithmetic. One batch of both would round differently on some CPU kernels (a GEMM of
        # 2 rows is not two GEMMs of 1 row), for a gain too small to measure.
        positives = self._encode_texts([job.params.prompt for job in jobs])
        encoded_negative = [
            i for i, job in enumerate(jobs) if self.uses_guidance(job) and not self._zero_negative(job)
        ]
        negatives = {}
        if encoded_negative:
            negatives = self._encode_texts(
                [jobs[i].params.negative_prompt or "" for i in encoded_negative]
            )
        row_of_negative = {i: row for row, i in enumerate(encoded_negative)}
        for i, job in enumerate(jobs):
            positive = {k: v[i : i + 1] for k, v in positives.items()}
            negative = None
            if i in row_of_negative:
                row = row_of_negative[i]
                negative = {k: v[row : row + 1] for k, v in negatives.items()}
            elif self.uses_guidance(job):
                negative = {k: torch.zeros_like(v) for k, v in positive.items()}
            job.conditioning = self._conditioning(positive, negative, job.params.n)

    def _zero_negative(self, job: Job) -> bool:
        return False

    def _encode_texts(self, texts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _ = self.pipeline.encode_prompt(
            texts, self.device, 1, do_classifier_free_guidance=False
        )
        return {"embeds": embeds}

    @staticmethod
    def _conditioning(positive: dict, negative: dict | None, n: int) -> dict[str, torch.Tensor]:
        # Rows as diffusers lays them out: n negative rows, then n positive rows.
        out = {}
        for key, value in positive.items():
            rows = [value.repeat_interleave(n, dim=0)]
            if negative is not None:
                rows.insert(0, negative[key].repeat_interleave(n, dim=0))
            out[key] = torch.cat(rows)
        return out

    # 2. Denoise ------------------------------------------------------------------------------
    def prepare(self, job: Job) -> None:
        p = job.params
        scheduler = self.new_scheduler()
        scheduler.set_timesteps(p.steps, device=self.device)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        job.scheduler = scheduler
        job.generator = self.new_generator(p.seed)
        shape = (
            p.n,
            self.pipeline.unet.config.in_channels,
            p.height // self.vae_scale_factor,
            p.width // self.vae_scale_factor,
        )
        dtype = job.conditioning["embeds"].dtype
        noise = randn_tensor(shape, generator=job.generator, device=self.device, dtype=dtype)
        job.latents = noise * scheduler.init_noise_sigma

    def added_conditions(self, jobs: list[Job]) -> dict | None:
        return None

    def denoise(self, jobs: list[Job]) -> None:
        for job in jobs:
            self.prepare(job)
        unet = self.pipeline.unet
        # All jobs in a batch share size and step count, hence the timestep sequence.
        for step, t, live, changed in self.denoising_steps(jobs, jobs[0].scheduler.timesteps):
            if changed:
                embeds = torch.cat([job.conditioning["embeds"] for job in live])
                added = self.added_conditions(live)
                rows = [job.conditioning["embeds"].shape[0] for job in live]
            inputs = []
            for job in live:
                x = torch.cat([job.latents] * 2) if self.uses_guidance(job) else job.latents
                inputs.append(job.scheduler.scale_model_input(x, job.scheduler.timesteps[step]))
            noise_pred = unet(
                torch.cat(inputs),
                t,
                encoder_hidden_states=embeds,
                added_cond_kwargs=added,
                return_dict=False,
            )[0]
            for job, pred in zip(live, split_rows(noise_pred, rows), strict=True):
                job.latents = job.scheduler.step(
                    self.guided(job, pred),
                    job.scheduler.timesteps[step],
                    job.latents,
                    **self.step_kwargs(job),
                    return_dict=False,
                )[0]

    # 3. Decode -------------------------------------------------------------------------------
    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.pipeline.vae.config.scaling_factor

    def decode(self, jobs: list[Job]) -> list[list]:
        vae = self.pipeline.vae
        latents = torch.cat([job.latents for job in jobs])
        latents = self.scale_latents(latents).to(vae.dtype)
        image = vae.decode(latents, return_dict=False)[0]
        images = self.postprocess(image)
        out, start = [], 0
        for job in jobs:
            out.append(images[start : start + job.params.n])
            start += job.params.n
        return out


class StableDiffusionXLSteps(StableDiffusionSteps):
    """SDXL: two text encoders, pooled text embeddings and size/crop time ids."""

    def _zero_negative(self, job: Job) -> bool:
        # diffusers' SDXL uses zeros, not the encoded empty string, when no negative prompt is
        # given and the model asks for it (force_zeros_for_empty_prompt).
        return job.params.negative_prompt is None and bool(
            self.pipeline.config.get("force_zeros_for_empty_prompt", False)
        )

    def _encode_texts(self, texts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            texts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return {"embeds": embeds, "pooled": pooled}

    def _time_ids(self, job: Job, dtype: torch.dtype) -> torch.Tensor:
        p = job.params
        size = (p.height, p.width)
        encoder_2 = self.pipeline.text_encoder_2
        projection_dim = (
            int(job.conditioning["pooled"].shape[-1])
            if encoder_2 is None
            else encoder_2.config.projection_dim
        )
        ids = self.pipeline._get_add_time_ids(
            size, (0, 0), size, dtype=dtype, text_encoder_projection_dim=projection_dim
        )
        return ids.to(self.device).repeat(job.conditioning["embeds"].shape[0], 1)

    def added_conditions(self, jobs: list[Job]) -> dict:
        dtype = jobs[0].conditioning["embeds"].dtype
        return {
            "text_embeds": torch.cat([job.conditioning["pooled"] for job in jobs]),
            "time_ids": torch.cat([self._time_ids(job, dtype) for job in jobs]),
        }

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.pipeline.vae.config
        mean = getattr(config, "latents_mean", None)
        std = getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            return latents * std / config.scaling_factor + mean
        return latents / config.scaling_factor
