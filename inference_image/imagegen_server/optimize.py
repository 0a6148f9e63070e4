"""Speed levers applied once after loading, each switchable and reported at startup."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import denoiser_cache
from .config import Attention, ServerSettings
from .quantization import quantize_denoiser

log = logging.getLogger(__name__)

SDPA_BACKENDS = {
    Attention.FLASH: SDPBackend.FLASH_ATTENTION,
    Attention.EFFICIENT: SDPBackend.EFFICIENT_ATTENTION,
    Attention.MATH: SDPBackend.MATH,
}


@dataclass
class OptimizationReport:
    device: str
    dtype: str
    channels_last: bool = False
    quantization: str = "None"
    cache: str = "None"
    compiled: list[str] = field(default_factory=list)
    compile_mode: str | None = None
    compile_regional: bool | None = None
    compile_cache_dir: str | None = None
    #: "loaded": this start loaded its compiled artifacts; "saved": it had none, and saved them;
    #: None: none were saved (no cache dir, no warm-up, or a volume that refused them)
    compile_artifacts: str | None = None
    compile_artifacts_key: str | None = None
    #: why compile_cache_dir was not written (full or read-only); None when it was, or none is set
    compile_cache_skipped: str | None = None
    #: the volume read for its artifacts and written nothing (compile_cache_read_only, or
    #: skipped); None when none was, or it was written too
    compile_cache_read: str | None = None
    attention_requested: str = Attention.AUTO.value
    attention_active: str = Attention.AUTO.value
    attention_note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)

    def log(self) -> None:
        for key, value in self.as_dict().items():
            log.info("optimization %s = %s", key, value)


def denoiser(pipeline) -> torch.nn.Module:
    """The module run at every step: the UNet or the transformer."""
    module = getattr(pipeline, "unet", None) or getattr(pipeline, "transformer", None)
    if module is None:
        raise ValueError(f"{type(pipeline).__name__} has neither a unet nor a transformer")
    return module


def configure_compile_cache(directory) -> None:
    """Point inductor's caches at ``directory``; on a persistent volume later starts reuse them."""
    os.makedirs(directory, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory)
    os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "1"
    os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "1"
    # Triton's kernels too (on a GPU): by default under ~/.triton, which a read-only root
    # filesystem refuses, and which a restart would lose.
    os.environ["TRITON_CACHE_DIR"] = os.path.join(str(directory), "triton")
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True


def has_repeated_blocks(module: torch.nn.Module) -> bool:
    """Whether diffusers can compile ``module`` block by block (regional compilation)."""
    return bool(getattr(module, "_repeated_blocks", None)
                and hasattr(module, "compile_repeated_blocks"))


def compile_denoiser(pipeline, mode: str, regional: bool) -> tuple[str, bool]:
    """torch.compile the denoiser; regional compiles just its repeated blocks (much faster cold)."""
    module = denoiser(pipeline)
    name = type(module).__name__
    if regional and has_repeated_blocks(module):
        module.compile_repeated_blocks(mode=mode, fullgraph=False)
        return f"{name} (repeated blocks: {', '.join(module._repeated_blocks)})", True
    if regional:
        log.warning("%s names no repeated blocks; compiling the whole module", name)
    module.compile(mode=mode)
    return name, False


class AttentionSelection:
    """Restricts scaled-dot-product attention to one backend for the whole process.

    PyTorch keeps the SDPA backend switches process-wide, so the selection is entered once at
    startup (not per call, where threads would race on the same switches). The math backend stays
    enabled at the lowest priority, so a shape the chosen kernel cannot take still runs.
    """

    def __init__(self, requested: Attention, device: torch.device, dtype: torch.dtype):
        self.requested = requested
        self.active = Attention.AUTO
        self.note = ""
        self._stack = contextlib.ExitStack()
        # sdpa_kernel keeps a context variable beside the process-wide switches: entered
        # in the loading thread, it must be left in that same context, whichever thread
        # shuts the server down (else: "Token ... was created in a different Context").
        self._context = contextvars.copy_context()
        if requested == Attention.AUTO:
            self.note = "PyTorch chooses per call"
            return
        problem = probe_backend(SDPA_BACKENDS[requested], device, dtype)
        if problem is None:
            self.active = requested
        else:
            self.note = f"{requested.value} unavailable on {device.type}/{dtype}: {problem}"
            log.warning("attention backend fallback to Auto: %s", self.note)

    def activate(self) -> None:
        if self.active == Attention.AUTO:
            return
        backends = [SDPA_BACKENDS[self.active]]
        if self.active != Attention.MATH:
            backends.append(SDPBackend.MATH)
        self._context.run(self._stack.enter_context, sdpa_kernel(backends, set_priority=True))

    def deactivate(self) -> None:
        self._context.run(self._stack.close)


def probe_backend(backend: SDPBackend, device: torch.device, dtype: torch.dtype) -> str | None:
    """None if ``backend`` runs a typical attention call here, else the reason it does not."""
    q = torch.randn(1, 2, 16, 64, device=device, dtype=dtype)
    try:
        with sdpa_kernel([backend]), torch.inference_mode():
            F.scaled_dot_product_attention(q, q, q)
    except RuntimeError as exc:
        return str(exc).splitlines()[0]
    return None


def apply_optimizations(
    pipeline, settings: ServerSettings, device: torch.device, dtype: torch.dtype
) -> tuple[OptimizationReport, AttentionSelection]:
    report = OptimizationReport(device=str(device), dtype=str(dtype).removeprefix("torch."))
    if settings.torch_threads and device.type == "cpu":
        torch.set_num_threads(settings.torch_threads)
    # Before compiling: the compiled graphs then hold the quantized matmuls.
    quantize_denoiser(denoiser(pipeline), settings.quantization, device)
    report.quantization = settings.quantization.value
    denoiser_cache.enable(
        denoiser(pipeline), settings.cache, settings.cache_threshold, settings.cache_interval,
        settings.default_steps,
    )
    report.cache = settings.cache.value
    if settings.channels_last:
        # Convolutions in the UNet and VAE run faster in NHWC on tensor cores.
        for name in ("unet", "vae"):
            module = getattr(pipeline, name, None)
            if module is not None:
                module.to(memory_format=torch.channels_last)
        report.channels_last = True
    attention = AttentionSelection(settings.attention, device, dtype)
    attention.activate()
    report.attention_requested = settings.attention.value
    report.attention_active = attention.active.value
    report.attention_note = attention.note
    # With compile_aot the denoiser is compiled ahead of time instead (aot_denoiser.py).
    if settings.compile_enabled and not settings.compile_aot:
        if settings.compile_cache_dir is not None:
            # One cache per attention backend: inductor's cache keys leave it out, so a
            # graph traced under one would be served to a server asking for another.
            directory = settings.compile_cache_dir / f"inductor-{attention.active.value.lower()}"
            configure_compile_cache(directory)
            report.compile_cache_dir = str(directory)
        compiled, regional = compile_denoiser(
            pipeline, settings.compile_mode, settings.compile_regional
        )
        report.compiled.append(compiled)
        report.compile_mode = settings.compile_mode
        report.compile_regional = regional
    return report, attention
