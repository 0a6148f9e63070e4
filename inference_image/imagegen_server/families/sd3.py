"""Stable Diffusion 3 as stage steps, mirroring diffusers' ``StableDiffusion3Pipeline``.

Text conditioning as in SD/SDXL (classifier-free guidance, negative rows first), denoising with
a flow-matching transformer as in Flux, latents unscaled and shifted on decode.
"""

from __future__ import annotations

import torch
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
    calculate_shift,
    retrieve_timesteps,
)
from diffusers.utils.torch_utils import randn_tensor

from ..request import GenerationParams, Job
from .stable_diffusion import StableDiffusionSteps

MAX_SEQUENCE_LENGTH = 256  # diffusers' default for StableDiffusion3Pipeline


class StableDiffusion3Steps(StableDiffusionSteps):
    """SD3: three text encoders and a flow-matching transformer on 16-channel latents."""

    # Not inherited: SD3's edit pipelines and its latent space are its own.
    supports_edits = False
    latent_rgb = None

    @property
    def size_multiple(self) -> int:  # type: ignore[override]
        # The transformer takes latents in patches: 16 pixels for SD3 (diffusers' check_inputs).
        return max(8, self.vae_scale_factor * self.pipeline.patch_size)

    @property
    def native_size(self) -> tuple[int, int]:
        side = self.pipeline.default_sample_size * self.vae_scale_factor
        return side, side

    def reference_kwargs(self, params: GenerationParams) -> dict:
        return {**super().reference_kwargs(params), "max_sequence_length": MAX_SEQUENCE_LENGTH}

    # 1. Encode: StableDiffusionSteps.encode, with SD3's three text encoders.
    def _encode_texts(self, texts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=texts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )
        return {"embeds": embeds, "pooled": pooled}

    # 2. Denoise ------------------------------------------------------------------------------
    def prepare(self, job: Job) -> None:
        pipe, p = self.pipeline, job.params
        shape = (
            p.n,
            pipe.transformer.config.in_channels,
            p.height // self.vae_scale_factor,
            p.width // self.vae_scale_factor,
        )
        job.generator = self.new_generator(p.seed)
        dtype = job.conditioning["embeds"].dtype
        job.latents = randn_tensor(shape, generator=job.generator, device=self.device, dtype=dtype)
        scheduler = self.new_scheduler()
        kwargs = {}
        config = scheduler.config
        if config.get("use_dynamic_shifting", None):
            patch = pipe.transformer.config.patch_size
            kwargs["mu"] = calculate_shift(
                (shape[2] // patch) * (shape[3] // patch),
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.16),
            )
        retrieve_timesteps(scheduler, p.steps, self.device, **kwargs)
        job.scheduler = scheduler
        job.timesteps = scheduler.timesteps

    def batch_inputs(self, jobs: list[Job]) -> dict:
        return {
            "embeds": torch.cat([job.conditioning["embeds"] for job in jobs]),
            "pooled": torch.cat([job.conditioning["pooled"] for job in jobs]),
            "rows": [job.conditioning["embeds"].shape[0] for job in jobs],
        }

    def denoise_step(self, jobs: list[Job], inputs: dict) -> None:
        rows = inputs["rows"]
        samples = [
            torch.cat([job.latents] * 2) if self.uses_guidance(job) else job.latents
            for job in jobs
        ]
        noise_pred = self.pipeline.transformer(
            hidden_states=torch.cat(samples),
            timestep=self.timestep_rows(jobs, rows),
            encoder_hidden_states=inputs["embeds"],
            pooled_projections=inputs["pooled"],
            return_dict=False,
        )[0]
        self.step_schedulers(jobs, noise_pred, rows, guide=self.guided)

    # 3. Decode -------------------------------------------------------------------------------
    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.pipeline.vae.config
        return latents / config.scaling_factor + config.shift_factor
