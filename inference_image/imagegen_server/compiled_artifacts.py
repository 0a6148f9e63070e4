"""Compiled artifacts as one file per key on the cache volume, so a warm start loads, not compiles.

Inductor's cache directory alone still leaves a restart tracing every graph and compiling the
static shapes before dynamo learns which dimensions vary. PyTorch's mega-cache
(``torch.compiler.save_cache_artifacts`` / ``load_cache_artifacts``) bundles what a compile
left behind: inductor's FX graphs, AOT-autograd entries, autotuning results and the
profile-guided dynamic-shape decisions; with ``compile_precompile`` it holds dynamo's traced
code too, so a warm start traces nothing. One bundle is kept per key: what the compiled code
depends on (the denoiser's architecture, the torch version, the device, dtype, compile
settings, the shapes warm-up ran, the LoRA slot). A different key is a different file, never a
wrong hit. ``imagegen-server precompile`` writes the bundle and exits, for a Job that runs once
per key before any replica starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch

from .cache_volume import PARTIAL_PREFIX
from .config import ServerSettings
from .engine import admitted_sizes
from .families import FamilySteps
from .optimize import denoiser
from .warmup import most_rows

log = logging.getLogger(__name__)

SUBDIRECTORY = "artifacts"


def enable_precompile() -> None:
    """Let dynamo keep its traced code in the bundle (``caching_precompile``). Dynamo then
    drops the guards it cannot write down (object identities), which the server never breaks:
    its modules and attention processors stay the ones loaded."""
    torch._dynamo.config.caching_precompile = True


def key_parts(steps: FamilySteps, settings: ServerSettings, dtype: torch.dtype) -> dict:
    """Everything the compiled code depends on; weights are inputs to it, not part of it."""
    module = denoiser(steps.pipeline)
    device = steps.device
    parts = {
        "denoiser": type(module).__name__,
        "config": {k: v for k, v in dict(module.config).items() if not k.startswith("_")},
        "torch": torch.__version__,
        # The denoiser's code: an ahead-of-time package holds its trace, and nothing checks
        # that trace against the code installed at load.
        "diffusers": diffusers.__version__,
        "device": device.type,
        "dtype": str(dtype),
        "compile_mode": settings.compile_mode,
        "regional": settings.compile_regional,
        "precompile": settings.compile_precompile,
        "channels_last": settings.channels_last,
        # The backend is chosen as the graph is traced, and inductor's caches do not key on
        # it; on one device the requested backend decides the active one.
        "attention": settings.attention.value,
        "quantization": settings.quantization.value,
        "cache": [settings.cache.value, settings.cache_threshold, settings.cache_interval],
        "sizes": sorted(admitted_sizes(steps, settings)),
        "most_rows": most_rows(settings),
        "loras": sorted((lora.name, lora.uri) for lora in settings.loras),
    }
    if (slot := getattr(steps, "adapters", None)) is not None:
        # The slot's shape is compiled in: its rank and the modules it sits on come from the
        # adapters' files, which may change under the same URI (a hub repository's new
        # revision).
        parts["lora_slot"] = {"rank": slot.rank, "modules": sorted(slot.layers)}
    if device.type == "cuda":
        parts["gpu"] = torch.cuda.get_device_name(device)
        parts["capability"] = list(torch.cuda.get_device_capability(device))
    else:
        # Inductor compiles CPU code with -march=native: for this CPU's every extension
        # (AVX-512 VNNI or BF16, AMX), which ATen's level does not tell apart. A node without
        # one must not load it (SIGILL, which nothing can catch): the key holds the CPU's
        # feature flags.
        parts["cpu_capability"] = [torch.backends.cpu.get_cpu_capability(), cpu_features()]
    return parts


def cpu_features() -> str:
    """A digest of this CPU's feature flags (Linux's /proc/cpuinfo), or of its machine name
    where there are none to read."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            flags = next((line.split(":", 1)[1] for line in info
                          if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    text = " ".join(sorted(flags.split())) or platform.machine()
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def artifact_key(parts: dict) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def write_atomically(path: Path, data: bytes) -> None:
    """Replicas may start together on one volume: a reader sees the old file or the whole
    new one, never half of it."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=PARTIAL_PREFIX,
                                     delete=False) as out:
        try:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())  # on disk before the name is: a crash leaves no empty file
        except BaseException:
            # A full volume must not fill up further with what was half written.
            with contextlib.suppress(OSError):
                os.unlink(out.name)
            raise
    os.replace(out.name, path)


@dataclass
class CompiledArtifacts:
    """The bundle for one key: ``load`` before warm-up, ``save`` after it."""

    path: Path
    parts: dict
    loaded: bool = False
    load_seconds: float | None = None

    @classmethod
    def for_server(
        cls, steps: FamilySteps, settings: ServerSettings, dtype: torch.dtype,
        directory: Path | None = None,
    ) -> CompiledArtifacts:
        """The bundle in ``directory`` (the settings' compile_cache_dir by default)."""
        directory = directory or settings.compile_cache_dir
        assert directory is not None
        parts = key_parts(steps, settings, dtype)
        path = Path(directory) / SUBDIRECTORY / f"{artifact_key(parts)}.bin"
        return cls(path, parts)

    @property
    def key(self) -> str:
        return self.path.stem

    def load(self) -> bool:
        """Load the bundle if this key has one; a corrupt or foreign file is only logged."""
        if not self.path.is_file():
            log.info("compiled artifacts: none yet for key %s", self.key)
            return False
        started = time.perf_counter()
        try:
            info = torch.compiler.load_cache_artifacts(self.path.read_bytes())
        except Exception as exc:  # a bundle that cannot be read means compiling, not failing
            log.warning("compiled artifacts %s not loaded, compiling instead: %s", self.path, exc)
            return False
        self.load_seconds = time.perf_counter() - started
        self.loaded = info is not None
        log.info("compiled artifacts: loaded %s in %.2fs", self.path, self.load_seconds)
        return self.loaded

    def save(self) -> int:
        """Write what this process compiled, atomically (replicas may start together). A
        volume that refuses the write (full, read-only) costs the next start its head start,
        not this one its service: logged, and 0 bytes saved."""
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            return 0
        data, _ = saved
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(self.path, data)
            # Beside it, what the key stands for, for whoever lists the volume.
            self.path.with_suffix(".json").write_text(
                json.dumps(self.parts, indent=2, sort_keys=True, default=str)
            )
        except OSError as exc:
            log.warning("compiled artifacts: not saved to %s: %s", self.path, exc)
            return 0
        log.info("compiled artifacts: saved %d bytes to %s", len(data), self.path)
        return len(data)
