"""GPU benchmark: SD 1.5 and SDXL architectures on one GPU, with random weights, through the server.

One command, no downloads: the UNet, VAE and text-encoder configs below are those of
diffusers' published model configs (stable-diffusion-v1-5 and stable-diffusion-xl-base-1.0),
written inline, with random weights; the tokenizer is the byte-level one from
``imagegen_server.tiny``. Speed does not depend on the weights' values.

For each model it measures, with the server's own optimizations, stage steps and engines:

* three variants: eager (float32, PyTorch's attention choice, no channels_last: diffusers out
  of the box), bf16 + SDPA flash (+ channels_last), and that + torch.compile (regional); a
  fourth when asked (``--variants ... bf16+flash+aot``): bf16 + flash compiled ahead of time
  into AOTInductor packages (the server's compile_aot), which compiles the whole UNet (78 s
  for the toy-width smoke UNet on a 2-core CPU), so it is not in the default run;
  for each: UNet it/s (batch 2, classifier-free guidance) and seconds per image at --steps
  through the Stacked engine, one request at a time;
* share of the FLOP floor: FLOPs of one image (text encoders + steps x UNet + VAE decode),
  counted with torch.utils.flop_counter, over seconds per image x the GPU's dense bf16 peak;
* Stacked vs Pipelined at concurrency 1/2/4/8 with the fastest variant, and Pipelined with
  batches of 4 per request and per step (step-level batching): images/s and p50/p95;
* that variant with the denoiser quantized (int8 weight-only; FP8 where the GPU has FP8 tensor
  cores): seconds per image, speedup, and PSNR against the unquantized image of the same seed;
* graphs torch.compile made during the sweep, after the server's own warm-up (should be 0);
* the UNet step's cost at 2, 8 and 32 rows, fitted as fixed + per row: the sub-linear curve
  ``bench/step_batching.py --step-ms`` replays for step-level batching;
* ``flux``: diffusers' cache hooks on FLUX.1's transformer at a third of its depth
  (``gpu_caches.py``): seconds per image, speedup and PSNR against no cache, for each.

Bars on an H100: SDXL 30 steps at 1024px under 1.5 s per image; Pipelined >= 1.3x Stacked
throughput at concurrency 4.

    .venv/bin/python bench/gpu.py                 # the real run, < 8 minutes on one H100
    .venv/bin/python bench/gpu.py --smoke         # tiny shapes on the CPU, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common
import gpu_caches

SDXL_BAR_S = 1.5
# In the order they run: the concurrency sweep after them uses the last one's settings.
VARIANTS = ["eager", "bf16+flash", "bf16+flash+aot", "bf16+flash+compile"]
PIPELINE_BAR = 1.3

# Dense bf16 tensor-core peaks in TFLOP/s from the vendors' data sheets; the yardstick for every
# variant (float32 eager too), so shares compare across variants.
PEAK_BF16_TFLOPS = {
    "H100 SXM": 989.4,
    "H100 80GB HBM3": 989.4,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H200": 989.4,
    "A100": 312.0,
    "L4": 121.0,
}

# --- architectures (diffusers' published configs) ---------------------------------------------
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
}
SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
}
CLIP_L = {  # openai/clip-vit-large-patch14: SD 1.5's encoder and SDXL's first
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
CLIP_BIGG = {  # laion CLIP ViT-bigG/14: SDXL's second encoder
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
    "hidden_act": "gelu",
}
SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}
ARCHITECTURES = {
    "sd15": {"unet": SD15_UNET, "vae": {**VAE, "sample_size": 512, "scaling_factor": 0.18215}},
    "sdxl": {"unet": SDXL_UNET, "vae": {**VAE, "sample_size": 1024, "scaling_factor": 0.13025}},
}


def smoke_architecture(name: str) -> dict:
    """The same block layout at toy widths, so --smoke runs the same code paths in seconds."""
    unet = dict(ARCHITECTURES[name]["unet"])
    depth = len(unet["block_out_channels"])
    unet.update(block_out_channels=(32,) * depth, norm_num_groups=8, sample_size=8)
    if name == "sd15":
        unet.update(cross_attention_dim=32, attention_head_dim=4)
    else:
        unet.update(
            transformer_layers_per_block=(1,) * depth,
            attention_head_dim=(4,) * depth,
            cross_attention_dim=64,
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,
        )
    vae = dict(ARCHITECTURES[name]["vae"])
    vae.update(
        block_out_channels=(8, 8, 8, 8), norm_num_groups=4, sample_size=64, layers_per_block=1
    )
    return {"unet": unet, "vae": vae}


def clip_config(base: dict, smoke: bool):
    from transformers import CLIPTextConfig

    values = dict(base)
    if smoke:
        values.update(hidden_size=32, intermediate_size=37, num_attention_heads=4)
        values.update(num_hidden_layers=2, projection_dim=32)
    # Token ids as the byte-level tokenizer of imagegen_server.tiny numbers them.
    return CLIPTextConfig(
        **values, vocab_size=49408, max_position_embeddings=77,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip


def build_pipeline(name: str, device, smoke: bool):
    """A diffusers pipeline of the named architecture with random float32 weights on device."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from imagegen_server.tiny import clip_tokenizer

    arch = smoke_architecture(name) if smoke else ARCHITECTURES[name]
    torch.manual_seed(0)
    # Initialise straight on the device: SDXL's 2.6B-parameter UNet inits in seconds there.
    with torch.device(device):
        unet = UNet2DConditionModel(**arch["unet"])
        vae = AutoencoderKL(**arch["vae"])
        text_encoder = CLIPTextModel(clip_config(CLIP_L, smoke))
        text_encoder_2 = (
            CLIPTextModelWithProjection(clip_config(CLIP_BIGG, smoke)) if name == "sdxl" else None
        )
    scheduler = EulerDiscreteScheduler(**SCHEDULER)
    if name == "sd15":
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None,
            image_encoder=None, requires_safety_checker=False,
        )  # fmt: skip
    else:
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
            tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), unet=unet,
            scheduler=scheduler, image_encoder=None, feature_extractor=None,
            force_zeros_for_empty_prompt=True, add_watermarker=False,
        )  # fmt: skip
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()  # built, not loaded (from_pretrained would set eval mode)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


# --- measurements ------------------------------------------------------------------------------
def unet_inputs(pipe, name: str, size: int, device, dtype, rows: int = 2) -> dict[str, Any]:
    """One denoising step's UNet inputs: batch 2 is one request with classifier-free guidance."""
    import torch

    latent = size // pipe.vae_scale_factor
    unet = pipe.unet
    inputs: dict[str, Any] = {
        "sample": torch.randn(rows, 4, latent, latent, device=device, dtype=dtype),
        "timestep": torch.tensor(500.0, device=device),
        "encoder_hidden_states": torch.randn(
            rows, 77, unet.config.cross_attention_dim, device=device, dtype=dtype
        ),
        "return_dict": False,
    }
    if name == "sdxl":
        pooled = pipe.text_encoder_2.config.projection_dim
        ids = torch.tensor([[size, size, 0, 0, size, size]] * rows, device=device).to(dtype)
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(rows, pooled, device=device, dtype=dtype),
            "time_ids": ids,
        }
    return inputs


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def unet_its(pipe, name: str, size: int, device, dtype, iterations: int, rows: int = 2) -> float:
    """UNet forward passes per second at batch 2: diffusers' progress-bar it/s."""
    import torch

    inputs = unet_inputs(pipe, name, size, device, dtype, rows)
    with torch.inference_mode():
        for _ in range(2):
            pipe.unet(**inputs)
        synchronize(device)
        started = time.perf_counter()
        for _ in range(iterations):
            pipe.unet(**inputs)
        synchronize(device)
    return iterations / (time.perf_counter() - started)


def step_row_curve(pipe, name: str, size: int, device, dtype, iterations: int) -> dict:
    """Seconds of one UNet step over 2, 8 and 32 rows (1, 4 and 16 requests with guidance),
    and the least-squares line fixed + rows x per-row through them: the sub-linear step cost
    bench/step_batching.py models (its --step-ms takes these two numbers)."""
    seconds = {rows: 1 / unet_its(pipe, name, size, device, dtype, iterations, rows)
               for rows in (2, 8, 32)}
    xs, ys = list(seconds), list(seconds.values())
    per_row, fixed = statistics.linear_regression(xs, ys)
    print(f"  step cost: {fixed * 1e3:.2f} ms + {per_row * 1e3:.2f} ms/row "
          f"(rows 2/8/32: {', '.join(f'{v * 1e3:.1f}' for v in ys)} ms)", flush=True)
    return {"seconds_by_rows": seconds, "fixed_ms": fixed * 1e3, "per_row_ms": per_row * 1e3}


def flop_floor(pipe, name: str, size: int, steps: int, device) -> dict[str, float]:
    """FLOPs of one image: both prompts through the text encoders, steps x UNet, one decode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    dtype = pipe.unet.dtype
    counts = {}
    with torch.inference_mode():
        ids = torch.ones(2, 77, dtype=torch.long, device=device)
        with FlopCounterMode(display=False) as counter:
            pipe.text_encoder(ids)
            if name == "sdxl":
                pipe.text_encoder_2(ids)
        counts["encode"] = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            pipe.unet(**unet_inputs(pipe, name, size, device, dtype))
        counts["unet_step"] = counter.get_total_flops()
        latent = torch.randn(1, 4, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor)
        with FlopCounterMode(display=False) as counter:
            pipe.vae.decode(latent.to(device, pipe.vae.dtype))
        counts["decode"] = counter.get_total_flops()
    counts["image"] = counts["encode"] + steps * counts["unet_step"] + counts["decode"]
    return counts


def peak_tflops(device, override: float | None) -> tuple[float | None, str]:
    import torch

    if override:
        return override, "given with --peak-tflops"
    if device.type != "cuda":
        return None, "no GPU"
    gpu = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():
        if all(part in gpu for part in key.split()):
            return value, f"data-sheet dense bf16 peak for {key}"
    return None, f"unknown GPU {gpu!r}: pass --peak-tflops"


def settings_for(variant: str, device, args, **overrides):
    from imagegen_server.config import ServerSettings

    values = {
        "model": "random-weights",
        "device": str(device),
        "default_steps": args.steps,
        "default_guidance_scale": 7.0,
        "max_batch_size": 1,
        "batch_window_ms": 0,
        "queue_capacity": 64,
        "compile_mode": args.compile_mode,
    }
    if variant == "eager":
        values.update(dtype="float32", attention="Auto", channels_last=False)
    else:
        values.update(dtype="bfloat16", attention="Flash", channels_last=True)
        values.update(compile_enabled=variant.endswith(("compile", "aot")),
                      compile_aot=variant.endswith("aot"))
    values.update(overrides)
    return ServerSettings(**values)


def engine(mode: str, steps, settings):
    from imagegen_server.engine import PipelinedEngine, StackedEngine
    from imagegen_server.metrics import ServerMetrics

    cls = PipelinedEngine if mode == "Pipelined" else StackedEngine
    return cls(steps, settings, ServerMetrics()).start()


def request(steps, size: int, step_count: int, i: int):
    from imagegen_server.request import GenerationParams

    return GenerationParams(
        prompt=f"a photograph of an astronaut riding a horse, number {i}",
        width=size, height=size, steps=step_count, guidance_scale=7.0, seed=i,
    )  # fmt: skip


def measure_model(name: str, device, args, deadline: float, out: dict,
                  save: Callable[[], None]) -> dict:
    """Fills ``out`` as it goes, and ``save``s after each part: a run cut short (the
    session's time, a crash in a later part) keeps what it measured."""
    import torch

    from imagegen_server.config import Family
    from imagegen_server.families import steps_for
    from imagegen_server.loading import torch_dtype
    from imagegen_server.optimize import apply_optimizations

    # Native sizes: the UNet's sample_size x the VAE's factor of 8 (64 px for the smoke shapes).
    size = 64 if args.smoke else (1024 if name == "sdxl" else 512)
    family = Family.SD15 if name == "sd15" else Family.SDXL
    started = time.perf_counter()
    pipe = build_pipeline(name, device, args.smoke)
    built_s = time.perf_counter() - started
    params = sum(p.numel() for p in pipe.unet.parameters())
    print(f"{name}: built in {built_s:.1f}s, UNet {params / 1e9:.2f}B parameters", flush=True)
    floor = flop_floor(pipe, name, size, args.steps, device)
    peak, peak_source = peak_tflops(device, args.peak_tflops)
    out.update({
        "size": size,
        "steps": args.steps,
        "unet_parameters": params,
        "flops": floor,
        "peak_tflops": peak,
        "peak_source": peak_source,
        "variants": {},
    })
    steps = attention = settings = None
    first_images: dict[str, Any] = {}
    for variant in args.variants:
        if variant.endswith(("compile", "aot")) and args.smoke and not args.smoke_compile:
            out["variants"][variant] = {"skipped": "--smoke without --smoke-compile"}
            continue
        if time.perf_counter() > deadline:
            out["variants"][variant] = {"skipped": "over --budget-s"}
            continue
        settings = settings_for(variant, device, args)
        dtype = torch_dtype(settings.dtype)
        # Each compiled variant from nothing: the graphs of the one before would count
        # against dynamo's recompile limit, past which it runs eager without a word.
        torch.compiler.reset()
        pipe.to(dtype=dtype)
        if attention is not None:
            attention.deactivate()
        compile_started = time.perf_counter()
        report, attention = apply_optimizations(pipe, settings, device, dtype)
        steps = steps_for(family, pipe, device)
        if settings.compile_aot:
            compile_ahead_of_time(steps, settings, dtype)
        stacked = engine("Stacked", steps, settings)
        try:
            # The first request pays for compilation and autotuning; it is reported apart.
            stacked.generate(request(steps, size, 2, 0))
            first_s = time.perf_counter() - compile_started
            # The AOT packages take the server's own call of the UNet only: no it/s apart.
            its = None if settings.compile_aot else unet_its(
                pipe, name, size, device, dtype, args.unet_iterations)
            latencies, first_images[variant] = timed_images(stacked, steps, size, args)
        finally:
            stacked.close(timeout=120)
            if settings.compile_aot:
                del pipe.unet.forward  # the module's own forward again, for the next variant
        per_image = common.percentile(latencies, 50)
        row = {
            "dtype": report.dtype,
            "attention": report.attention_active,
            "attention_note": report.attention_note,
            "compiled": report.compiled,
            "channels_last": report.channels_last,
            "first_request_s": first_s,
            "unet_it_per_s": its,
            "seconds_per_image": per_image,
            "images_per_s": 1 / per_image,
            "latencies_s": latencies,
            "achieved_tflops": floor["image"] / per_image / 1e12,
            "share_of_peak": floor["image"] / per_image / (peak * 1e12) if peak else None,
        }
        out["variants"][variant] = row
        save()
        share = f"{row['share_of_peak']:.1%} of peak" if peak else "peak unknown"
        print(
            f"  {variant:<20} {its or float('nan'):7.2f} it/s  {per_image:7.3f} s/image  "
            f"{row['achieved_tflops']:7.1f} TFLOP/s ({share}); first request {first_s:.1f}s",
            flush=True,
        )
    if steps is not None and time.perf_counter() < deadline:
        with recorded(out, "step_rows"):
            out["step_rows"] = step_row_curve(pipe, name, size, device, pipe.unet.dtype,
                                              args.unet_iterations)
        save()
    with recorded(out, "concurrency"):
        out["concurrency"], out["recompiles_after_warmup"] = concurrency_sweep(
            name, steps, settings, size, args, deadline
        )
    save()
    if attention is not None:
        attention.deactivate()
    # Everything that reaches the pipeline goes (a closed engine still holds it through its
    # steps): the quantized pipelines are built next, on the same GPU.
    pipe = steps = stacked = report = None  # noqa: F841
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with recorded(out, "quantized"):
        measure_quantized(name, family, size, device, args, deadline, first_images,
                          out["variants"], out.setdefault("quantized", {}), save)
    return out


@contextlib.contextmanager
def recorded(out: dict, part: str):
    """A part that fails is recorded under its name, and the model's other parts stand."""
    try:
        yield
    except Exception as exc:
        traceback.print_exc()
        out[part] = {"failed": repr(exc)}


def compile_ahead_of_time(steps, settings, dtype) -> None:
    """What the server's start does with compile_aot (runtime.py): record a call per size in
    an eager warm-up, compile AOTInductor packages from them, run the UNet from those."""
    from imagegen_server.aot_denoiser import AotDenoiser

    aot = AotDenoiser.for_server(steps, settings, dtype)
    aot.compile_missing(steps, settings)
    aot.install()


def timed_images(stacked, steps, size: int, args) -> tuple[list[float], Any]:
    """Seconds of each of --images requests one at a time, and the first one's image."""
    latencies, first = [], None
    for i in range(args.images):
        started = time.perf_counter()
        images = stacked.generate(request(steps, size, args.steps, i + 1))
        latencies.append(time.perf_counter() - started)
        first = images[0] if first is None else first
    return latencies, first


def measure_quantized(
    name, family, size, device, args, deadline, first_images: dict, variants: dict,
    out: dict, save: Callable[[], None],
) -> dict:
    """The fastest variant again, with the denoiser quantized (int8 weight-only, FP8): a
    fresh pipeline each (quantization is in place), seconds per image and the PSNR of the
    first image against the unquantized one of the same seed; into ``out``, saved after
    each."""
    import torch

    from imagegen_server.families import steps_for
    from imagegen_server.loading import torch_dtype
    from imagegen_server.optimize import apply_optimizations
    from imagegen_server.quantization import fp8_problem

    base = "bf16+flash+compile" if not args.smoke or args.smoke_compile else "bf16+flash"
    for quantization in args.quantization:
        if quantization == "Float8" and (problem := fp8_problem(device)):
            out[quantization] = {"skipped": f"no FP8 tensor cores: {problem}"}
            continue
        if time.perf_counter() > deadline or base not in first_images:
            out[quantization] = {"skipped": "over --budget-s, or no unquantized figure"}
            continue
        settings = settings_for(base, device, args, quantization=quantization)
        dtype = torch_dtype(settings.dtype)
        torch.compiler.reset()  # a fresh pipeline's graphs, not on top of the last ones
        pipe = build_pipeline(name, device, args.smoke).to(dtype=dtype)
        started = time.perf_counter()
        try:
            report, attention = apply_optimizations(pipe, settings, device, dtype)
        except Exception as exc:  # torchao missing or built for another torch: the rest runs
            out[quantization] = {"skipped": f"cannot quantize here: {exc!r}"}
            print(f"  {base}+{quantization}: skipped ({exc!r})", flush=True)
            continue
        stacked = None
        try:
            stacked = engine("Stacked", steps_for(family, pipe, device), settings)
            stacked.generate(request(stacked.steps, size, 2, 0))
            first_s = time.perf_counter() - started
            latencies, image = timed_images(stacked, stacked.steps, size, args)
        except Exception as exc:  # FP8 has never run before this: the other one still counts
            traceback.print_exc()
            out[quantization] = {"failed": repr(exc)}
            save()
            continue
        finally:
            if stacked is not None:
                stacked.close(timeout=120)
            attention.deactivate()
            # The pipeline goes before the next is built (an engine holds it through its
            # steps).
            del stacked, pipe
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        per_image = common.percentile(latencies, 50)
        unquantized = variants[base]["seconds_per_image"]
        out[quantization] = {
            "base": base,
            "quantization": report.quantization,
            "first_request_s": first_s,
            "seconds_per_image": per_image,
            "psnr_db": common.psnr_db(image, first_images[base]),
            "speedup": unquantized / per_image,
        }
        print(f"  {base}+{quantization:<14} {per_image:7.3f} s/image  "
              f"PSNR {out[quantization]['psnr_db']:.1f} dB", flush=True)
        save()
    return out


def concurrency_sweep(
    name: str, steps, settings, size: int, args, deadline: float
) -> tuple[list, int | None]:
    """Stacked vs Pipelined with the last (fastest) variant still loaded, modes interleaved;
    the server's warm-up first. Returns the rows and how many graphs torch.compile made after
    warm-up (the server's imagegen_recompiles_total: 0 when warm-up covered every shape)."""
    from torch._dynamo.utils import counters

    from imagegen_server.config import Batching
    from imagegen_server.warmup import warm_up

    if steps is None:
        return [], None
    # Batches of up to 4 requests, per request and per step (step-level batching), beside the
    # unbatched modes; warm-up covers the larger batches' rows too.
    batched = settings.model_copy(update={"max_batch_size": 4, "batch_window_ms": 5})
    stepped = batched.model_copy(update={"batching": Batching.STEP})
    warm_up(steps, batched)
    graphs = int(counters["stats"]["unique_graphs"])
    engines = {mode: engine(mode, steps, settings) for mode in ("Stacked", "Pipelined")}
    engines["Pipelined+batch4"] = engine("Pipelined", steps, batched)
    engines["Pipelined+batch4+Step"] = engine("Pipelined", steps, stepped)
    rows = []
    try:
        for e in engines.values():  # each engine's threads see the shapes once
            e.generate(request(steps, size, 2, 0))
        for concurrency in args.concurrency:
            for mode, e in engines.items():
                if time.perf_counter() > deadline:
                    rows.append({"mode": mode, "concurrency": concurrency, "skipped": "budget"})
                    continue
                load = common.closed_loop(
                    lambda i, e=e: e.generate(request(steps, size, args.steps, i)),
                    concurrency,
                    max(2, 2 * concurrency),
                )
                rows.append({"mode": mode, **load.as_dict()})
                print(
                    f"  c={concurrency:<2} {mode:<21} {load.throughput:6.2f} images/s  "
                    f"p50 {rows[-1]['p50_s']:.2f}s  p95 {rows[-1]['p95_s']:.2f}s",
                    flush=True,
                )
    finally:
        for e in engines.values():
            e.close(timeout=120)
    compiled = int(counters["stats"]["unique_graphs"]) - graphs
    print(f"  graphs compiled after warm-up: {compiled}", flush=True)
    return rows, compiled


def measure_caches(device, args, deadline: float) -> dict:
    """gpu_caches.measure, its failure recorded rather than raised: it runs last, after
    minutes of figures that must still reach gpu.json."""
    import traceback

    try:
        return gpu_caches.measure(device, args, deadline)
    except Exception as exc:
        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {exc}"}


def bars(results: dict, args) -> list[dict]:
    out = []
    note = "smoke run on the CPU: not a measurement" if args.smoke else ""
    sdxl = results.get("sdxl")
    if sdxl and "variants" in sdxl:
        measured = [
            (v, r["seconds_per_image"])
            for v, r in sdxl["variants"].items()
            if "seconds_per_image" in r
        ]
        if measured:
            variant, best = min(measured, key=lambda x: x[1])
            out.append(
                common.bar(
                    f"GPU: SDXL {args.steps} steps at {sdxl['size']}px",
                    f"< {SDXL_BAR_S} s per image on an H100",
                    f"{best:.3f} s ({variant})",
                    None if args.smoke else best < SDXL_BAR_S,
                    note,
                )
            )
    for name, r in results.items():
        if name == "flux":
            out += gpu_caches.bars(r, note)
            continue
        sweep = r.get("concurrency")
        rows = sweep if isinstance(sweep, list) else []  # {"failed": ...}: no rows
        by = {(row["mode"], row["concurrency"]): row for row in rows}
        s, p = by.get(("Stacked", 4), {}), by.get(("Pipelined", 4), {})
        if "throughput_per_s" in s and "throughput_per_s" in p:
            ratio = p["throughput_per_s"] / s["throughput_per_s"]
            out.append(
                common.bar(
                    f"GPU: {name} Pipelined vs Stacked at c=4",
                    f">= {PIPELINE_BAR}x throughput",
                    f"{ratio:.2f}x",
                    None if args.smoke else ratio >= PIPELINE_BAR,
                    note,
                )
            )
        if r.get("recompiles_after_warmup") is not None:
            n = r["recompiles_after_warmup"]
            out.append(common.bar(f"GPU: {name} graphs compiled after warm-up (Stacked and "
                                  "Pipelined sweep)", "0", str(n),
                                  None if args.smoke else n == 0, note))
        quantized = r.get("quantized", {})
        for quantization, q in quantized.items() if "failed" not in quantized else ():
            if "seconds_per_image" in q:
                measured = (f"{q['seconds_per_image']:.3f} s, {q['speedup']:.2f}x, "
                            f"PSNR {q['psnr_db']:.1f} dB")
            else:
                measured = next(f"{k}: {q[k]}" for k in ("skipped", "failed") if k in q)
            out.append(common.bar(f"GPU: {name} {quantization} denoiser",
                                  "speedup and PSNR against unquantized (no bar)", measured,
                                  None, note))
    return out


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, seconds")
    parser.add_argument("--smoke-compile", action="store_true", help="compile in --smoke too")
    parser.add_argument(
        # SDXL first: the bar is its, and a session cut short keeps what ran first.
        "--models", nargs="+", choices=[*ARCHITECTURES, "flux"], default=["sdxl", "sd15", "flux"],
        help="flux: the cache levers (gpu_caches.py)",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        # AOT compiles the whole UNet, slowly: asked for, not in the default run.
        default=["eager", "bf16+flash", "bf16+flash+compile"],
        help="bf16+flash+aot: the UNet from AOTInductor packages (the server's compile_aot)",
    )
    parser.add_argument(
        "--quantization", nargs="*", choices=["Int8WeightOnly", "Float8"],
        default=["Int8WeightOnly", "Float8"], help="the fastest variant again, quantized",
    )
    parser.add_argument("--steps", type=int, default=None, help="30, or 2 with --smoke")
    parser.add_argument("--images", type=int, default=None, help="timed images per variant")
    parser.add_argument("--unet-iterations", type=int, default=None)
    parser.add_argument("--concurrency", type=int, nargs="+", default=None)
    parser.add_argument(
        "--compile-mode",
        default="default",
        help="torch.compile mode; max-autotune would not fit the time limit",
    )
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument(
        "--budget-s", type=float, default=360.0, help="skip what is left after this long"
    )
    common.add_output_argument(parser)
    args = parser.parse_args(argv)
    args.variants = [v for v in VARIANTS if v in args.variants]
    defaults = (2, 1, 2, [1, 4]) if args.smoke else (30, 3, 10, [1, 2, 4, 8])
    args.steps = args.steps or defaults[0]
    args.images = args.images or defaults[1]
    args.unet_iterations = args.unet_iterations or defaults[2]
    args.concurrency = args.concurrency or defaults[3]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    common.quiet_libraries()
    import torch

    from imagegen_server.loading import resolve_device

    started = time.perf_counter()
    deadline = started + args.budget_s
    device = torch.device("cpu") if args.smoke else resolve_device("auto")
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("no GPU here: run with --smoke for the CPU check")
    results: dict[str, Any] = {}
    result = {
        "settings": {
            "smoke": args.smoke,
            "steps": args.steps,
            "images": args.images,
            "compile_mode": args.compile_mode,
            "max_batch_size": 1,
        },
        "models": results,
    }
    name_of_result = "gpu_smoke" if args.smoke else "gpu"

    def save() -> Path:
        result["wall_s"] = time.perf_counter() - started
        try:
            result["bars"] = bars(results, args)
        except Exception:  # a model half measured: its bars once it is whole
            traceback.print_exc()
        return common.write_result(name_of_result, result, args.out_dir)

    for name in args.models:
        try:
            if name == "flux":
                results[name] = measure_caches(device, args, deadline)
            else:
                measure_model(name, device, args, deadline, results.setdefault(name, {}), save)
        except Exception as exc:  # one model's failure: the others still run, and it is said
            traceback.print_exc()
            results[name] = {**results.get(name, {}), "failed": repr(exc)}
        # Written after each model too: a session's time running out keeps what was measured.
        path = save()
    print(f"wrote {path} after {result['wall_s']:.0f}s")
    return result


if __name__ == "__main__":
    main()
