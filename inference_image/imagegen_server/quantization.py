"""The denoiser's weights quantized with torchao: int8 weight-only anywhere, FP8 only where
the GPU has FP8 tensor cores.

Only the denoiser is quantized: it holds most of the weights of the families served here
besides SD3's T5 encoder, and runs at every step. The text encoders and the VAE keep the
model's dtype. Quantization comes before torch.compile, which then fuses the dequantization
into the matmuls (diffusers-torchao).
"""

from __future__ import annotations

import torch

from .config import Quantization

# FP8 tensor cores came with compute capability 8.9 (Ada: L4) and 9.0 (Hopper: H100, H200).
FP8_CAPABILITY = (8, 9)


class QuantizationError(ValueError):
    """A quantization this device cannot run."""


def fp8_problem(device: torch.device) -> str | None:
    """None if ``device`` has FP8 tensor cores, else why not."""
    if device.type != "cuda":
        return f"this device is {device.type}"
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return f"{name} has compute capability {capability[0]}.{capability[1]}"
    return None


def quantize_denoiser(module: torch.nn.Module, quantization: Quantization,
                      device: torch.device) -> None:
    """Quantize ``module``'s linear layers in place; raises QuantizationError if impossible."""
    if quantization == Quantization.NONE:
        return
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int8WeightOnlyConfig,
        quantize_,
    )

    if quantization == Quantization.FLOAT8:
        problem = fp8_problem(device)
        if problem is not None:
            raise QuantizationError(
                "quantization Float8 needs a GPU with FP8 tensor cores (compute capability "
                f"8.9 or later: L4, H100, H200); {problem}. Use Int8WeightOnly or None."
            )
        # set_inductor_config off: torchao would otherwise change inductor's settings for
        # the whole process (coordinate descent tuning: much longer compiles).
        config = Float8DynamicActivationFloat8WeightConfig(set_inductor_config=False)
    else:
        config = Int8WeightOnlyConfig(set_inductor_config=False)
    quantize_(module, config)
