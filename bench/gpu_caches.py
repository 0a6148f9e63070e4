"""The denoiser caches on a GPU, for bench/gpu.py: Flux, the family diffusers' cache hooks fit.

FLUX.1-dev's transformer at its own widths (24 heads of 128, T5-XXL's 4096-wide text states)
but a third of its depth (6 of 19 double-stream blocks, 12 of 38 single-stream ones: 3.8B of
its 11.9B parameters), with random weights, so it builds in seconds and an image at 1024 px takes about a second; FLUX.1's
VAE; CLIP-L for the pooled prompt and a 2-layer T5 at XXL's width for the text states (text
encoding runs once per request, and no cache changes it). Through the server's own Flux steps
and optimizations, bf16 with SDPA flash and without torch.compile (every cache but First Block
Cache needs compile off), one request at a time: seconds per image for each cache setting,
its speedup over no cache, and the PSNR of its first image against the uncached one of the
same seed. The caches that follow the schedule (MagCache, TaylorSeer, Pyramid Attention
Broadcast, FasterCache) skip the same steps as on the real model; First Block Cache decides
from the weights, which are random here.
"""

from __future__ import annotations

import gc
import time
from typing import Any

import common

# diffusers' FluxTransformer2DModel config of black-forest-labs/FLUX.1-dev, but the depth.
FLUX_TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
DEPTH = {"num_layers": 6, "num_single_layers": 12}
# SD's VAE layout with FLUX.1's 16 latent channels, its scale and shift, no quant convs.
FLUX_VAE_CHANGES = {
    "latent_channels": 16,
    "sample_size": 1024,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "shift_factor": 0.1159,
    "scaling_factor": 0.3611,
}
T5_XXL_WIDTH = {"d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_heads": 64}
STEPS = 28  # FLUX.1-dev's usual count
# name -> the server settings; each threshold or interval is the default of diffusers' config
# for the method (Pyramid Attention Broadcast has none: 2 is its docs' example).
SETTINGS = {
    "no cache": {},
    "FirstBlockCache 0.05": {"cache": "FirstBlockCache", "cache_threshold": 0.05},
    "MagCache 0.06": {"cache": "MagCache", "cache_threshold": 0.06},
    "TaylorSeerCache 5": {"cache": "TaylorSeerCache", "cache_interval": 5},
    "PyramidAttentionBroadcast 2": {"cache": "PyramidAttentionBroadcast", "cache_interval": 2},
    "FasterCache 2": {"cache": "FasterCache", "cache_interval": 2},
}


def build_flux(device, smoke: bool):
    """The pipeline above with random weights, initialised on the device in bfloat16."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from gpu import CLIP_L, VAE, clip_config
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    from imagegen_server.tiny import clip_tokenizer, t5_tokenizer

    transformer = {**FLUX_TRANSFORMER, **DEPTH}
    vae = {**VAE, **FLUX_VAE_CHANGES}
    t5 = {**T5_XXL_WIDTH, "num_layers": 2}
    if smoke:
        transformer.update(num_layers=1, num_single_layers=1, attention_head_dim=16,
                           num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                           axes_dims_rope=(4, 4, 8))  # fmt: skip
        vae.update(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, layers_per_block=1)
        t5 = {"d_model": 32, "d_kv": 8, "d_ff": 37, "num_heads": 4, "num_layers": 2}
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # half the memory and time of a float32 init
    try:
        with torch.device(device):
            pipe = FluxPipeline(
                transformer=FluxTransformer2DModel(**transformer),
                vae=AutoencoderKL(**vae),
                # Its pooled output, CLIP-L's width, is what Flux takes as pooled projection.
                text_encoder=CLIPTextModel(clip_config(CLIP_L, smoke)),
                text_encoder_2=T5EncoderModel(T5Config(
                    **t5, vocab_size=100, relative_attention_num_buckets=32,
                    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)),
                tokenizer=clip_tokenizer(),
                tokenizer_2=t5_tokenizer(max_length=512),
                scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
                image_encoder=None,
                feature_extractor=None,
            )  # fmt: skip
    finally:
        torch.set_default_dtype(default)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()  # built, not loaded: T5's dropout would be on
    pipe.set_progress_bar_config(disable=True)
    return pipe


def measure(device, args, deadline: float) -> dict[str, Any]:
    """Each cache setting on one pipeline, its hooks taken off before the next."""
    import torch
    from gpu import engine, settings_for

    from imagegen_server.config import Family
    from imagegen_server.families import steps_for
    from imagegen_server.optimize import apply_optimizations, denoiser
    from imagegen_server.request import GenerationParams

    size, steps = (64, 4) if args.smoke else (1024, STEPS)
    started = time.perf_counter()
    pipe = build_flux(device, args.smoke)
    parameters = sum(p.numel() for p in pipe.transformer.parameters())
    print(f"flux: built in {time.perf_counter() - started:.1f}s, transformer "
          f"{parameters / 1e9:.2f}B parameters", flush=True)
    out: dict[str, Any] = {"size": size, "steps": steps, "transformer_parameters": parameters,
                           "depth": DEPTH, "settings": {}}  # fmt: skip
    first_images: dict[str, Any] = {}
    for name, overrides in SETTINGS.items():
        if time.perf_counter() > deadline:
            out["settings"][name] = {"skipped": "over --budget-s"}
            continue
        settings = settings_for("bf16+flash", device, args, default_steps=steps,
                                default_guidance_scale=3.5, **overrides)  # fmt: skip
        report, attention = apply_optimizations(pipe, settings, device, torch.bfloat16)
        stacked = engine("Stacked", steps_for(Family.FLUX, pipe, device), settings)
        latencies = []
        try:
            for i in range(args.images + 1):  # the first one warms up, untimed
                params = GenerationParams(prompt=f"a lighthouse at dusk, number {i}", width=size,
                                          height=size, steps=steps, guidance_scale=3.5, seed=i)
                begun = time.perf_counter()
                images = stacked.generate(params)
                if i == 0:
                    continue
                latencies.append(time.perf_counter() - begun)
                first_images.setdefault(name, images[0])
        finally:
            stacked.close(timeout=120)
            attention.deactivate()
            if report.cache != "None":
                denoiser(pipe).disable_cache()
        per_image = common.percentile(latencies, 50)
        row = {"cache": report.cache, "seconds_per_image": per_image, "latencies_s": latencies}
        if "no cache" in out["settings"] and "seconds_per_image" in out["settings"]["no cache"]:
            row["speedup"] = out["settings"]["no cache"]["seconds_per_image"] / per_image
            row["psnr_db"] = common.psnr_db(first_images[name], first_images["no cache"])
        out["settings"][name] = row
        print(f"  flux {name:<28} {per_image:7.3f} s/image  {row.get('speedup', 1.0):.2f}x  "
              f"PSNR {row.get('psnr_db', float('inf')):.1f} dB", flush=True)
    del pipe
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def bars(result: dict, note: str) -> list[dict]:
    if "error" in result:
        return [common.bar("GPU: Flux cache levers", "speedup and PSNR against no cache "
                           "(no bar)", f"failed: {result['error']}", None, note)]
    out = []
    for name, row in result["settings"].items():
        if name == "no cache":
            continue
        measured = ("skipped: " + row["skipped"]) if "skipped" in row else (
            f"{row['seconds_per_image']:.3f} s, {row.get('speedup', float('nan')):.2f}x, "
            f"PSNR {row.get('psnr_db', float('nan')):.1f} dB")
        out.append(common.bar(
            f"GPU: Flux (FLUX.1 widths, a third of its depth) {name}, {result['size']}px "
            f"{result['steps']} steps", "speedup and PSNR against no cache (no bar)", measured,
            None, note))  # fmt: skip
    return out
