"""LoRA adapters on the denoiser: loaded once at start, switched per batch without recompiling.

Each declared adapter is read with diffusers' own ``load_lora_weights`` (so every format it
converts, kohya's and others, works), its factors copied out, and the adapter removed again.
The denoiser then carries one peft adapter of its own, the *slot*, whose rank is the sum of
all declared ranks; the factors wait in host memory, and a switch copies them in. A batch
that asks for adapters ``[(a, 0.7), (b, -0.5)]`` gets the slot's factors written in place:
A is ``[A_a; A_b]`` and B is ``[0.7 s_a B_a, -0.5 s_b B_b]`` (``s`` each adapter's own
alpha/rank), zero beyond, so the slot adds exactly
``0.7 s_a B_a A_a x - 0.5 s_b B_b A_b x``: what diffusers' ``set_adapters`` computes. A
batch with none gets zeros, which add nothing.

Nothing the compiled graph guards on changes (the same modules, the same adapter name, the
same shapes and scaling), only tensor values: switching adapters does not recompile, the
problem diffusers' LoRA hot-swap solves for one adapter at a time (diffusers#9279).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SLOT = "imagegen-slot"
# (adapter name, scale) pairs, in the order a request named them.
AdapterSet = tuple[tuple[str, float], ...]


class LoraError(ValueError):
    """A declared adapter cannot be served; the message says which and why."""


@dataclass(frozen=True)
class Factors:
    a: torch.Tensor  # [rank, in, ...]
    b: torch.Tensor  # [out, rank, ...], with the adapter's own alpha/rank folded in


class AdapterSlot:
    """The declared adapters' factors, and the one peft adapter that applies a set of them."""

    def __init__(self, pipeline, denoiser: torch.nn.Module, adapters: dict[str, Path]):
        self.denoiser = denoiser
        self.factors: dict[str, dict[str, Factors]] = {}
        for name, path in adapters.items():
            self.factors[name] = _read_adapter(pipeline, denoiser, name, path)
        modules = sorted({m for per_module in self.factors.values() for m in per_module})
        self.rank = max(
            sum(f[m].a.shape[0] for f in self.factors.values() if m in f) for m in modules
        )
        from peft import LoraConfig

        # lora_alpha = r: the slot's own scaling is 1, the scales live in its B. The targets
        # as one anchored pattern: peft matches a list of names by suffix, and Flux's root
        # proj_out (kohya's final_layer) would put the slot on every block's proj_out too.
        pattern = "^(" + "|".join(re.escape(m) for m in modules) + ")$"
        denoiser.add_adapter(
            LoraConfig(r=self.rank, lora_alpha=self.rank, target_modules=pattern,
                       init_lora_weights=False),
            adapter_name=SLOT,
        )
        # Every module the slot landed on, so that every one is written (zeros where no
        # declared adapter has factors): none keeps peft's random initial weights.
        self.layers = {name: module for name, module in denoiser.named_modules()
                       if SLOT in (getattr(module, "lora_A", None) or {})}
        missing = set(modules) - set(self.layers)
        if missing:
            raise LoraError(f"the LoRA slot did not reach {', '.join(sorted(missing))}")
        for layer in self.layers.values():
            for weight in (layer.lora_A[SLOT].weight, layer.lora_B[SLOT].weight):
                weight.requires_grad_(False)
        self.active: AdapterSet | None = None
        self.activate(())
        log.info("LoRA adapters %s on %d modules, slot rank %d",
                 ", ".join(self.factors), len(self.layers), self.rank)

    @property
    def names(self) -> Sequence[str]:
        return list(self.factors)

    @torch.no_grad()
    def activate(self, adapters: AdapterSet) -> None:
        """Write the slot's factors for ``adapters`` (nothing to do when they are in already)."""
        if adapters == self.active:
            return
        # Until every module is written the slot holds no one set: a write that fails part
        # way (out of memory) must not leave the old set named, over a mix of weights.
        self.active = None
        for module, layer in self.layers.items():
            a, b = layer.lora_A[SLOT].weight, layer.lora_B[SLOT].weight
            a.zero_()
            b.zero_()
            offset = 0
            for name, scale in adapters:
                factors = self.factors[name].get(module)
                if factors is None:
                    continue
                rank = factors.a.shape[0]
                a[offset : offset + rank].copy_(factors.a, non_blocking=True)
                b[:, offset : offset + rank].copy_(factors.b, non_blocking=True)
                b[:, offset : offset + rank].mul_(scale)
                offset += rank
        self.active = adapters


def _read_adapter(pipeline, denoiser, name: str, path: Path) -> dict[str, Factors]:
    """One adapter's factors per denoiser module, read by diffusers, then unloaded."""
    kwargs = {"weight_name": path.name} if path.is_file() else {}
    source = path.parent if path.is_file() else path
    try:
        pipeline.load_lora_weights(str(source), adapter_name=name, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise LoraError(f"LoRA {name!r} at {path} cannot be loaded: {exc}") from exc
    try:
        for component in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            encoder = getattr(pipeline, component, None)
            if name in (getattr(encoder, "peft_config", None) or {}):
                raise LoraError(
                    f"LoRA {name!r} has {component} weights: only denoiser LoRAs are served"
                )
        factors = {}
        for module_name, module in denoiser.named_modules():
            if name not in getattr(module, "lora_A", {}):
                continue
            if module.use_dora.get(name):
                raise LoraError(f"LoRA {name!r} is a DoRA adapter, which is not served")
            if getattr(module, "lora_bias", {}).get(name):
                # The slot holds A and B; a bias of B's would be left out without a word.
                raise LoraError(f"LoRA {name!r} has biases on its B factors (peft's "
                                "lora_bias), which are not served")
            scaling = module.scaling[name]
            factors[module_name] = Factors(
                _host_copy(module.lora_A[name].weight),
                _host_copy(module.lora_B[name].weight * scaling),
            )
        if not factors:
            raise LoraError(f"LoRA {name!r} at {path} has no weights for the denoiser")
        return factors
    finally:
        pipeline.delete_adapters(name)


def _host_copy(weight: torch.Tensor) -> torch.Tensor:
    """A factor kept in host memory: the device holds the slot only, not every declared
    adapter beside it. Pinned for a GPU's slot, so a switch copies it asynchronously."""
    host = weight.detach().to("cpu", copy=True)
    return host.pin_memory() if weight.device.type == "cuda" else host
