"""Stable Diffusion 1.x/2.x and SDXL as stage steps, mirroring diffusers' pipelines.

Numbered as in ``StableDiffusionPipeline.__call__`` so the two read side by side; the
difference is that a batch holds several requests, each with its own scheduler, generator,
guidance scale and negative prompt. Edits follow ``StableDiffusionImg2ImgPipeline`` (no
mask) and ``StableDiffusionInpaintPipeline`` (a mask, a 4-channel UNet): the encode step
also encodes the image to latents, denoising starts part way, and with a mask every step
puts the kept region back.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import (
    retrieve_latents,
)
from diffusers.utils.torch_utils import randn_tensor

from ..previews import SD15_RGB, SDXL_RGB
from ..request import EditInput, GenerationParams, Job
from .base import FamilySteps, split_rows

log = logging.getLogger(__name__)


class StableDiffusionSteps(FamilySteps):
    """SD 1.5 (and 2.x): one CLIP text encoder, a UNet, classifier-free guidance."""

    supports_edits = True
    latent_rgb = SD15_RGB

    def __init__(self, pipeline, device: torch.device):
        super().__init__(pipeline, device)
        # As diffusers' inpainting pipeline makes it: grayscale, binarized at 0.5.
        self.mask_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor,
            do_normalize=False,
            do_binarize=True,
            do_convert_grayscale=True,
        )

    @property
    def native_size(self) -> tuple[int, int]:
        side = self.pipeline.unet.config.sample_size * self.vae_scale_factor
        return side, side

    def fitted(self, edit: EditInput, width: int, height: int) -> EditInput:
        """The edit's image and mask resized as preprocessing resizes them, when accepted: a
        queued edit holds a picture of its own size, not a 16-megapixel upload, and
        preprocessing finds nothing left to resize (Pillow's resize to the same size is a
        copy), so the pixels are the same."""
        if edit.image.size == (width, height):
            return edit
        image = self.pipeline.image_processor.resize(edit.image, height, width)
        mask = None if edit.mask is None else self.mask_processor.resize(edit.mask, height, width)
        return dataclasses.replace(edit, image=image, mask=mask)

    def reference_kwargs(self, params: GenerationParams) -> dict:
        kwargs = {
            "prompt": params.prompt,
            "negative_prompt": params.negative_prompt,
            "width": params.width,
            "height": params.height,
            "num_inference_steps": params.steps,
            "guidance_scale": params.guidance_scale,
            "num_images_per_prompt": params.n,
            "generator": self.new_generator(params.seed),
        }
        edit = params.edit
        if edit is not None:
            kwargs.update(image=edit.image, strength=edit.strength)
            if edit.mask is None:  # the img2img pipeline takes the image's own size
                del kwargs["width"], kwargs["height"]
            else:
                kwargs["mask_image"] = edit.mask
        return kwargs

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
            if job.params.edit is not None:
                try:
                    self._encode_image(job)
                except Exception as exc:  # this edit's own image: its batch mates go on
                    log.exception("an edit's image could not be encoded")
                    job.fail(exc)

    def _encode_image(self, job: Job) -> None:
        """The image to latents (and the mask to latent size), as diffusers' edit pipelines.

        The VAE samples its latents with the request's generator: the first draw from it, so
        the generator is made here rather than in denoise.
        """
        p, edit = job.params, job.params.edit
        vae = self.pipeline.vae
        dtype = job.conditioning["embeds"].dtype
        job.generator = self.new_generator(p.seed)
        image = self.pipeline.image_processor.preprocess(edit.image, height=p.height, width=p.width)
        # In the VAE's dtype: float32 where loading keeps an fp16 model's VAE upcast.
        image = image.to(device=self.device, dtype=vae.dtype)
        latents = retrieve_latents(vae.encode(image), generator=job.generator).to(dtype)
        job.conditioning["image_latents"] = self.image_latents(latents, masked=edit.mask is not None)
        if edit.mask is not None:
            mask = self.mask_processor.preprocess(edit.mask, height=p.height, width=p.width)
            size = (p.height // self.vae_scale_factor, p.width // self.vae_scale_factor)
            mask = torch.nn.functional.interpolate(mask, size=size)
            job.conditioning["mask"] = mask.to(device=self.device, dtype=dtype)

    def image_latents(self, latents: torch.Tensor, masked: bool) -> torch.Tensor:
        """The VAE's sample in the denoiser's latent space."""
        return self.pipeline.vae.config.scaling_factor * latents

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
    def denoise_key(self, job: Job) -> tuple:
        # An edit's strength decides where its timestep sequence starts.
        edit = job.params.edit
        return (*super().denoise_key(job), None if edit is None else edit.strength)

    def prepare(self, job: Job) -> None:
        p = job.params
        scheduler = self.new_scheduler()
        scheduler.set_timesteps(p.steps, device=self.device)
        # An edit skips the first steps (diffusers' get_timesteps): it starts from its image.
        start = (p.steps - p.denoising_steps) * scheduler.order
        job.timesteps = scheduler.timesteps[start:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start)
        job.scheduler = scheduler
        if job.generator is None:
            job.generator = self.new_generator(p.seed)
        shape = (
            p.n,
            self.pipeline.unet.config.in_channels,
            p.height // self.vae_scale_factor,
            p.width // self.vae_scale_factor,
        )
        dtype = job.conditioning["embeds"].dtype
        noise = randn_tensor(shape, generator=job.generator, device=self.device, dtype=dtype)
        if p.edit is None:
            job.latents = noise * scheduler.init_noise_sigma
        else:
            self._noised_image(job, noise)

    def _noised_image(self, job: Job, noise: torch.Tensor) -> None:
        """An edit's first latents: its image's, noised to where its timesteps start."""
        c, p = job.conditioning, job.params
        c["image_latents"] = c["image_latents"].repeat(p.n, 1, 1, 1)
        first = job.timesteps[:1].repeat(p.n)
        if "mask" not in c:
            job.latents = job.scheduler.add_noise(c["image_latents"], noise, first)
            return
        c["mask"] = c["mask"].repeat(p.n, 1, 1, 1)
        c["noise"] = noise
        if p.edit.strength == 1.0:
            job.latents = noise * job.scheduler.init_noise_sigma
        else:
            job.latents = job.scheduler.add_noise(c["image_latents"], noise, first)
        # diffusers' inpainting then encodes the masked image, sampling from the generator,
        # though a 4-channel UNet never reads those latents. The same draw, without the VAE,
        # keeps the generator's later draws (an ancestral scheduler's) equal to diffusers'.
        randn_tensor(c["image_latents"][:1].shape, generator=job.generator, device=self.device,
                     dtype=self.pipeline.vae.dtype)

    def keep_unmasked(self, job: Job, step: int) -> None:
        """Inpainting: the kept region back from the image, noised to the next timestep."""
        c = job.conditioning
        kept = c["image_latents"]
        if step < len(job.timesteps) - 1:
            # The next timestep as a slice: on the device, no wait for it (diffusers makes a
            # CPU tensor of it, the same value).
            kept = job.scheduler.add_noise(kept, c["noise"], job.timesteps[step + 1 : step + 2])
        job.latents = (1 - c["mask"]) * kept + c["mask"] * job.latents

    def added_conditions(self, jobs: list[Job]) -> dict | None:
        return None

    def batch_inputs(self, jobs: list[Job]) -> dict:
        return {
            "embeds": torch.cat([job.conditioning["embeds"] for job in jobs]),
            "added": self.added_conditions(jobs),
            "rows": [job.conditioning["embeds"].shape[0] for job in jobs],
        }

    def denoise_step(self, jobs: list[Job], inputs: dict) -> None:
        rows = inputs["rows"]
        samples = []
        for job in jobs:
            x = torch.cat([job.latents] * 2) if self.uses_guidance(job) else job.latents
            samples.append(job.scheduler.scale_model_input(x, job.timesteps[job.step]))
        noise_pred = self.pipeline.unet(
            torch.cat(samples),
            self.timestep_rows(jobs, rows),
            encoder_hidden_states=inputs["embeds"],
            added_cond_kwargs=inputs["added"],
            return_dict=False,
        )[0]
        for job, pred in zip(jobs, split_rows(noise_pred, rows), strict=True):
            step = job.step
            output = job.scheduler.step(
                self.guided(job, pred),
                job.timesteps[step],
                job.latents,
                **self.step_kwargs(job),
                return_dict=False,
            )
            job.latents = output[0]
            if "mask" in job.conditioning:
                self.keep_unmasked(job, step)
            self.hand_preview(job, step, output)
            job.step = step + 1

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

    # As StableDiffusionXLImg2ImgPipeline and StableDiffusionXLInpaintPipeline for a base model
    # (no aesthetic-score conditioning, no denoising_start or _end): the same time ids as
    # text-to-image, and the latents scaled as below.
    supports_edits = True
    latent_rgb = SDXL_RGB

    def image_latents(self, latents: torch.Tensor, masked: bool) -> torch.Tensor:
        # diffusers' SDXL img2img normalizes by the VAE's latents_mean/_std where the config
        # has them; its inpainting pipeline only scales. Mirrored, so each equals its own.
        factor = self.pipeline.vae.config.scaling_factor
        statistics = None if masked else self._latent_statistics(latents)
        if statistics is None:
            return factor * latents
        mean, std = statistics
        return (latents - mean) * factor / std

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

    def _latent_statistics(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The VAE's latents_mean and latents_std, shaped and placed like ``like``, if any."""
        config = self.pipeline.vae.config
        mean = getattr(config, "latents_mean", None)
        std = getattr(config, "latents_std", None)
        if mean is None or std is None:
            return None
        return tuple(torch.tensor(v).view(1, 4, 1, 1).to(like.device, like.dtype)
                     for v in (mean, std))

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        factor = self.pipeline.vae.config.scaling_factor
        statistics = self._latent_statistics(latents)
        if statistics is not None:
            mean, std = statistics
            return latents * std / factor + mean
        return latents / factor
