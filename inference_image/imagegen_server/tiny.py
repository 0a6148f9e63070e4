"""Tiny random-weight pipelines for demos, tests and benchmarks, built fully offline.

Configs follow the dummy components of diffusers' own pipeline tests; the tokenizers are built
from a byte-level vocabulary written here, so nothing is downloaded. The same seed writes the
same weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

TinyFamily = Literal["sd15", "sdxl", "sd3", "flux"]
TinySize = Literal["tiny", "small"]
FAMILIES: tuple[str, ...] = ("sd15", "sdxl", "sd3", "flux")
SIZES: tuple[str, ...] = ("tiny", "small")


def _byte_unicode_chars() -> list[str]:
    """The 256 printable stand-ins GPT-2/CLIP byte-level BPE uses for raw bytes."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def clip_tokenizer(max_length: int = 77):
    """A CLIP tokenizer whose vocabulary is every byte, alone and word-final (514 ids)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in _byte_unicode_chars():
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def t5_tokenizer(max_length: int = 64):
    """A T5 (unigram) tokenizer over lowercase letters, digits and a little punctuation."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"]
    pieces += [("▁" + c, -2.5) for c in "abcdefghijklmnopqrstuvwxyz"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def _clip_config(projection_dim: int = 32, layers: int = 2):
    from transformers import CLIPTextConfig

    # eos_token_id matches the tokenizer above so the pooled output is taken at the end token.
    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=layers,
        vocab_size=1000,
        hidden_act="gelu",
        projection_dim=projection_dim,
    )


def _latent_diffusion_vae(small: bool):
    """The VAE SD1.5 and SDXL share (diffusers' defaults for shift and scale)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[8, 16] if small else [4, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=2,
        sample_size=128 if small else 64,
    )


def _flow_matching_vae(small: bool):
    """The VAE SD3 and Flux share: no quant convs, with a shift and scale of its own."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        sample_size=128 if small else 64,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16) if small else (4, 8),
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=2,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


def _seeded(seed: int, offset: int) -> None:
    # Each component gets its own seed so adding one never changes the weights of another.
    torch.manual_seed(seed * 1000 + offset)


def build_sd15(seed: int = 0, size: TinySize = "tiny"):
    from diffusers import (
        EulerAncestralDiscreteScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel

    small = size == "small"
    _seeded(seed, 1)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64) if small else (4, 8),
        layers_per_block=1,
        sample_size=64 if small else 32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8 if small else 2,
        norm_num_groups=8 if small else 2,
    )
    _seeded(seed, 2)
    vae = _latent_diffusion_vae(small)
    _seeded(seed, 3)
    text_encoder = CLIPTextModel(_clip_config())
    # An ancestral scheduler draws noise at every step, which makes the per-request generator
    # observable in tests.
    scheduler = EulerAncestralDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def build_sdxl(seed: int = 0, size: TinySize = "tiny"):
    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    small = size == "small"
    _seeded(seed, 1)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64) if small else (4, 8),
        layers_per_block=1 if small else 2,
        sample_size=64 if small else 32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(8, 8) if small else (2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 time ids * 8 + 32 pooled text dims
        cross_attention_dim=64,  # the two text encoders' hidden states side by side
        norm_num_groups=8 if small else 1,
    )
    _seeded(seed, 2)
    vae = _latent_diffusion_vae(small)
    _seeded(seed, 3)
    text_encoder = CLIPTextModel(_clip_config())
    _seeded(seed, 4)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config())
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        scheduler=scheduler,
        image_encoder=None,
        feature_extractor=None,
        add_watermarker=False,
    )


def build_sd3(seed: int = 0, size: TinySize = "tiny"):
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    small = size == "small"
    _seeded(seed, 1)
    transformer = SD3Transformer2DModel(
        sample_size=64 if small else 32,
        patch_size=2 if small else 1,
        in_channels=4,
        num_layers=2 if small else 1,
        attention_head_dim=16 if small else 8,
        num_attention_heads=4,
        caption_projection_dim=64 if small else 32,  # the transformer width: heads x head dim
        joint_attention_dim=32,  # the T5 width; CLIP states are padded or cut to it
        pooled_projection_dim=64,  # both CLIP pooled outputs side by side
        out_channels=4,
    )
    _seeded(seed, 2)
    vae = _flow_matching_vae(small)
    _seeded(seed, 3)
    text_encoder = CLIPTextModelWithProjection(_clip_config())
    _seeded(seed, 4)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config())
    _seeded(seed, 5)
    text_encoder_3 = T5EncoderModel(_t5_config())
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=text_encoder_3,
        tokenizer_3=t5_tokenizer(),
        image_encoder=None,
        feature_extractor=None,
    )


def _t5_config():
    from transformers import T5Config

    return T5Config(
        vocab_size=100,
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )


def build_flux(seed: int = 0, size: TinySize = "tiny"):
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextModel, T5EncoderModel

    small = size == "small"
    _seeded(seed, 1)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2 if small else 1,
        num_single_layers=2 if small else 1,
        attention_head_dim=16,
        num_attention_heads=4 if small else 2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=[4, 4, 8],
    )
    _seeded(seed, 2)
    vae = _flow_matching_vae(small)
    _seeded(seed, 3)
    text_encoder = CLIPTextModel(_clip_config())
    _seeded(seed, 4)
    text_encoder_2 = T5EncoderModel(_t5_config())
    return FluxPipeline(
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=clip_tokenizer(),
        tokenizer_2=t5_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        image_encoder=None,
        feature_extractor=None,
    )


BUILDERS = {"sd15": build_sd15, "sdxl": build_sdxl, "sd3": build_sd3, "flux": build_flux}


def make_tiny_model(
    directory: str | Path, family: TinyFamily = "sd15", *, seed: int = 0, size: TinySize = "tiny"
) -> Path:
    """Write a random-weight pipeline to ``directory``; ``DiffusionPipeline.from_pretrained`` loads it."""
    if family not in BUILDERS:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, not {family!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, not {size!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pipeline = BUILDERS[family](seed=seed, size=size)
    pipeline.save_pretrained(directory, safe_serialization=True)
    return directory


# The attention projections: what most LoRAs for these denoisers train.
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def make_tiny_lora(
    directory: str | Path, model_dir: str | Path, *, seed: int = 0, rank: int = 4,
    targets: list[str] | str | None = None, bias: bool = False,
) -> Path:
    """Write a random LoRA (peft) for the denoiser of the pipeline at ``model_dir``; with
    ``bias``, its B factors have biases too (peft's ``lora_bias``).

    Saved the way diffusers' training scripts save one (``save_lora_weights``), so
    ``load_lora_weights`` reads it. A and B are both random (a trained LoRA's B is not zero),
    B scaled up so that the adapter visibly changes a tiny model's image (about ten 8-bit
    levels on average).
    """
    import json

    import diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model_dir = Path(model_dir)
    pipeline_class = getattr(diffusers, json.loads((model_dir / "model_index.json").read_text())
                             ["_class_name"])
    part = "unet" if (model_dir / "unet").is_dir() else "transformer"
    model_class = getattr(diffusers, json.loads((model_dir / part / "config.json").read_text())
                          ["_class_name"])
    denoiser = model_class.from_pretrained(model_dir / part)
    _seeded(seed, 100)
    denoiser.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                    target_modules=targets or LORA_TARGETS, lora_bias=bias))
    with torch.no_grad():
        for name, param in denoiser.named_parameters():
            if "lora_B" in name:
                param.mul_(8.0)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pipeline_class.save_lora_weights(
        directory, **{f"{part}_lora_layers": get_peft_model_state_dict(denoiser)},
        safe_serialization=True,
    )
    return directory


def parameter_count(pipeline) -> dict[str, int]:
    """Parameters per component, for reports."""
    counts = {}
    for name, component in pipeline.components.items():
        if isinstance(component, torch.nn.Module):
            counts[name] = sum(p.numel() for p in component.parameters())
    return counts
