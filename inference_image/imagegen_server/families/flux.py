"""FLUX.1 as stage steps, mirroring diffusers' ``FluxPipeline``.

Guidance is the distilled kind (an embedding of ``guidance_scale`` fed to the transformer), so a
request costs one transformer row per image and negative prompts are not used, as in diffusers
when ``true_cfg_scale`` is left at 1.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor

from .. import denoiser_cache
from ..request import GenerationParams, Job
from .base import FamilySteps

MAX_SEQUENCE_LENGTH = 512  # diffusers' default for FluxPipeline


class FluxSteps(FamilySteps):
    @property
    def size_multiple(self) -> int:  # type: ignore[override]
        # Latents are packed in 2x2 patches.
        return max(8, self.vae_scale_factor * 2)

    @property
    def native_size(self) -> tuple[int, int]:
        side = self.pipeline.default_sample_size * self.vae_scale_factor
        return side, side

    def reference_kwargs(self, params: GenerationParams) -> dict:
        return {
            "prompt": params.prompt,
            "width": params.width,
            "height": params.height,
            "num_inference_steps": params.steps,
            "guidance_scale": params.guidance_scale,
            "num_images_per_prompt": params.n,
            "max_sequence_length": MAX_SEQUENCE_LENGTH,
            "generator": self.new_generator(params.seed),
        }

    # 1. Encode -------------------------------------------------------------------------------
    def encode(self, jobs: list[Job]) -> None:
        embeds, pooled, text_ids = self.pipeline.encode_prompt(
            prompt=[job.params.prompt for job in jobs],
            prompt_2=None,
            device=self.device,
            num_images_per_prompt=1,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )
        for i, job in enumerate(jobs):
            n = job.params.n
            job.conditioning = {
                "embeds": embeds[i : i + 1].repeat_interleave(n, dim=0),
                "pooled": pooled[i : i + 1].repeat_interleave(n, dim=0),
                "text_ids": text_ids,
            }

    # 2. Denoise ------------------------------------------------------------------------------
    def _latent_side(self, pixels: int) -> int:
        return 2 * (pixels // (self.vae_scale_factor * 2))

    def prepare(self, job: Job) -> None:
        pipe, p = self.pipeline, job.params
        channels = pipe.transformer.config.in_channels // 4
        h, w = self._latent_side(p.height), self._latent_side(p.width)
        dtype = job.conditioning["embeds"].dtype
        job.generator = self.new_generator(p.seed)
        noise = randn_tensor(
            (p.n, channels, h, w), generator=job.generator, device=self.device, dtype=dtype
        )
        job.latents = pipe._pack_latents(noise, p.n, channels, h, w)
        scheduler = self.new_scheduler()
        sigmas = np.linspace(1.0, 1 / p.steps, p.steps)
        if getattr(scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        config = scheduler.config
        mu = calculate_shift(
            job.latents.shape[1],
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        retrieve_timesteps(scheduler, p.steps, self.device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        job.scheduler = scheduler
        job.timesteps = scheduler.timesteps
        job.conditioning["image_ids"] = pipe._prepare_latent_image_ids(
            p.n, h // 2, w // 2, self.device, dtype
        )

    def batch_inputs(self, jobs: list[Job]) -> dict:
        transformer = self.pipeline.transformer
        # A cached denoiser compares each step with the last step of the same batch, and
        # MagCache follows the schedule of the batch's longest job, from where it stands.
        longest = max(jobs, key=lambda job: len(job.timesteps) - job.step)
        denoiser_cache.reset(transformer, steps=len(longest.timesteps), done=longest.step)
        first = jobs[0].conditioning  # one size and one prompt length in a batch
        return {
            "embeds": torch.cat([job.conditioning["embeds"] for job in jobs]),
            "pooled": torch.cat([job.conditioning["pooled"] for job in jobs]),
            "guidance": self._guidance(jobs, transformer),
            "text_ids": first["text_ids"],
            "image_ids": first["image_ids"],
            "rows": [job.params.n for job in jobs],
        }

    def denoise_step(self, jobs: list[Job], inputs: dict) -> None:
        transformer = self.pipeline.transformer
        rows = inputs["rows"]
        latents = torch.cat([job.latents for job in jobs])
        timestep = self.timestep_rows(jobs, rows).to(latents.dtype)
        # The hooks that follow the schedule read one timestep: under request-level batching
        # (the only batching they take) a batch's rows share it.
        first = jobs[0]
        # A number, not a device tensor: the cache hooks compare it at every block, and each
        # comparison with a GPU tensor would wait for the device.
        with denoiser_cache.context(transformer, float(first.timesteps[first.step])):
            noise_pred = transformer(
                hidden_states=latents,
                timestep=timestep / 1000,
                guidance=inputs["guidance"],
                pooled_projections=inputs["pooled"],
                encoder_hidden_states=inputs["embeds"],
                txt_ids=inputs["text_ids"],
                img_ids=inputs["image_ids"],
                return_dict=False,
            )[0]
        self.step_schedulers(jobs, noise_pred, rows)

    def _guidance(self, jobs: list[Job], transformer) -> torch.Tensor | None:
        if not transformer.config.guidance_embeds:
            return None
        return torch.cat(
            [
                torch.full([job.params.n], job.params.guidance_scale, dtype=torch.float32)
                for job in jobs
            ]
        ).to(self.device)

    # 3. Decode -------------------------------------------------------------------------------
    def decode(self, jobs: list[Job]) -> list[list]:
        pipe = self.pipeline
        p = jobs[0].params  # a decode batch shares one size
        latents = torch.cat([job.latents for job in jobs])
        latents = pipe._unpack_latents(latents, p.height, p.width, self.vae_scale_factor)
        latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        image = pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0]
        images = self.postprocess(image)
        out, start = [], 0
        for job in jobs:
            out.append(images[start : start + job.params.n])
            start += job.params.n
        return out
