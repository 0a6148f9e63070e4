"""From settings to a warmed-up engine: load once, optimize, start the stages, warm up.

The HTTP layer talks only to this object, which keeps the model apart from the routes.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from . import cache_volume
from .aot_denoiser import AotDenoiser
from .compiled_artifacts import CompiledArtifacts, enable_precompile
from .config import ServerSettings
from .engine import Engine, build_engine, check_sizes, default_size
from .families import FamilySteps, steps_for
from .loading import LoadedModel, import_libraries, load_model, resolve_lora_uri
from .lora import AdapterSlot
from .metrics import ServerMetrics
from .optimize import AttentionSelection, OptimizationReport, apply_optimizations, denoiser
from .request import EditInput, GenerationParams
from .warmup import WarmupReport, warm_up

log = logging.getLogger(__name__)


class ModelRuntime:
    def __init__(self, settings: ServerSettings, metrics: ServerMetrics | None = None):
        self.settings = settings
        self.metrics = metrics or ServerMetrics()
        self.model: LoadedModel | None = None
        self.steps: FamilySteps | None = None
        self.engine: Engine | None = None
        self.report: OptimizationReport | None = None
        self.attention: AttentionSelection | None = None
        self.error: BaseException | None = None
        self.warmup: WarmupReport | None = None
        self.startup_seconds: dict[str, float] = {}
        self.warmup_seconds: float | None = None
        self._ready = threading.Event()
        self._drain_deadline: float | None = None  # monotonic; set by a SIGTERM's drain
        self._drained = True  # whether that drain finished every accepted request
        self._thread: threading.Thread | None = None
        self._marks: cache_volume.KeepMarked | None = None  # the compile cache key in use
        # Read at each scrape: 0 as soon as the server stops taking requests, whatever the
        # cause (draining, a stage thread gone), as /readyz says.
        self.metrics.ready.set_function(lambda: float(self.ready))

    # --- lifecycle ----------------------------------------------------------------------------
    def load(self) -> ModelRuntime:
        """Load, optimize and warm up; blocking. Raises what went wrong and remembers it."""
        try:
            self._load()
        except BaseException as exc:
            self.error = exc
            log.exception("model failed to load")
            raise
        return self

    def load_in_background(self) -> threading.Thread:
        """Load on a thread so /healthz answers while a large model loads and compiles."""

        def run() -> None:
            # A failure is already logged and kept in self.error, where /healthz reports it.
            with contextlib.suppress(BaseException):
                self.load()

        self._thread = threading.Thread(target=run, name="model-loader", daemon=True)
        self._thread.start()
        return self._thread

    def _load(self) -> None:
        s = self.settings
        phase = self._phases()
        import_libraries()
        phase("imports")
        self.model = load_model(s)
        m = self.model
        self.steps = steps_for(m.family, m.pipeline, m.device)
        check_sizes(self.steps, s)
        if s.loras:
            # Before compiling: the slot's modules are part of the graph from the start.
            adapters = {lora.name: resolve_lora_uri(lora.uri, s) for lora in s.loras}
            self.steps.adapters = AdapterSlot(m.pipeline, denoiser(m.pipeline), adapters)
        phase("load")
        skipped, read_from = None, None
        if s.compile_enabled and s.compile_cache_dir is not None:
            if not s.compile_cache_read_only:
                skipped = cache_volume.unusable(s.compile_cache_dir)
                if skipped is not None:
                    log.warning("compile cache not written, compiling in local scratch; this "
                                "start loads what it holds and saves nothing: %s", skipped)
            if s.compile_cache_read_only or skipped is not None:
                # Read for what it holds; inductor's own caches go to local scratch.
                read_from = s.compile_cache_dir
                s = self.settings = s.model_copy(update={"compile_cache_dir": None})
        if s.compile_enabled and s.compile_precompile:
            enable_precompile()
        self.report, self.attention = apply_optimizations(m.pipeline, s, m.device, m.dtype)
        self.report.compile_cache_skipped = skipped
        self.report.compile_cache_read = None if read_from is None else str(read_from)
        self.engine = build_engine(self.steps, s, self.metrics)
        artifacts = None
        if s.compile_enabled and s.compile_aot:
            self._compile_ahead_of_time(phase, read_from)
        elif s.compile_enabled and (read_from or s.compile_cache_dir) is not None:
            artifacts = CompiledArtifacts.for_server(self.steps, s, m.dtype, read_from)
            self.report.compile_artifacts = "loaded" if artifacts.load() else None
            self.report.compile_artifacts_key = artifacts.key
        self.report.log()
        phase("optimize")
        if s.warmup:
            # Compilation and kernel selection for every admitted shape, paid before /readyz.
            self.warmup = warm_up(self.steps, s)
            self.warmup_seconds = self.warmup.seconds
            phase("warmup")
            if artifacts is not None and not artifacts.loaded and read_from is None:
                if artifacts.save():  # 0 bytes: a volume that refused them (logged)
                    self.report.compile_artifacts = "saved"
                phase("save_artifacts")
        key = self.report.compile_artifacts_key
        if s.compile_cache_dir is not None and key is not None:
            cache_volume.mark_used(s.compile_cache_dir, key)
            cache_volume.prune(s.compile_cache_dir, key, s.compile_cache_retention_days)
            if s.compile_cache_retention_days > 0:  # 0: nothing is ever pruned
                # Marked at least twice within the retention: never pruned while it serves.
                every_s = min(3600.0, s.compile_cache_retention_days * 86400 / 2)
                self._marks = cache_volume.KeepMarked(s.compile_cache_dir, key, every_s)
        self.metrics.info.info(
            {
                "model": m.name,
                "family": m.family.value,
                "dtype": self.report.dtype,
                "device": self.report.device,
                "stage_mode": s.stage_mode.value,
                "batching": s.batching.value,
                "attention": self.report.attention_active,
                "compiled": "true" if self.report.compiled else "false",
            }
        )
        # From here on every graph torch.compile makes is a request waiting for it.
        self.metrics.recompiles.mark_ready()
        self._ready.set()

    def _compile_ahead_of_time(self, phase, read_from: Path | None = None) -> None:
        """Load the denoiser's AOTInductor packages; compile those the volume lacks from calls
        recorded in an eager warm-up, then run the denoiser from the packages. ``read_from``:
        a volume only read."""
        aot = AotDenoiser.for_server(self.steps, self.settings, self.model.dtype, read_from)
        aot.load()
        phase("aot_load")
        aot.compile_missing(self.steps, self.settings)
        if aot.built:
            phase("aot_compile")
        aot.install()
        self.report.compiled.append(f"{type(aot.module).__name__} (AOTInductor)")
        self.report.compile_mode = self.settings.compile_mode
        # Compiled without saving (no cache dir, or a volume that refused it): neither.
        self.report.compile_artifacts = (
            "saved" if aot.saved else None if aot.built else "loaded"
        )
        self.report.compile_artifacts_key = aot.key

    def _phases(self):
        """A clock for the start: each call records the seconds since the last one under a
        name (``startup_seconds``, in /readyz: where a start's time goes)."""
        last = [time.perf_counter()]

        def phase(name: str) -> None:
            now = time.perf_counter()
            self.startup_seconds[name] = round(now - last[0], 3)
            last[0] = now

        return phase

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    @property
    def ready(self) -> bool:
        return (self._ready.is_set() and self.engine is not None and self.engine.accepting
                and self.engine.fault is None
                and self._drain_deadline is None)  # a SIGTERM while loading: never ready

    @property
    def draining(self) -> bool:
        """Whether a SIGTERM's drain (or the close after it) has begun."""
        return self._drain_deadline is not None or (
            self.engine is not None and not self.engine.accepting)

    def drain(self, timeout: float) -> bool:
        """SIGTERM's work, within one deadline: /readyz turns 503 and the engine drains
        (Engine.drain: accepted requests finish or are cancelled by the deadline)."""
        self._drain_deadline = time.monotonic() + timeout
        self._drained = self.engine is None or self.engine.drain(timeout)
        return self._drained

    def close(self, timeout: float | None = None) -> bool:
        """Drain accepted work and stop; returns whether everything finished in time.

        After a SIGTERM's drain only what is left of its deadline: the pod's grace period
        holds one drain, and a job still in a long step was answered already."""
        if self._drain_deadline is not None:
            left = max(0.0, self._drain_deadline - time.monotonic())
            timeout = left if timeout is None else min(timeout, left)
        drained = True
        if self.engine is not None:
            drained = self.engine.close(timeout)
        if self.attention is not None:
            self.attention.deactivate()
        if self._marks is not None:
            self._marks.stop()
        # After a SIGTERM's drain the engine is empty by now: what counts is whether that
        # drain finished its work or cancelled some at its deadline.
        return drained and self._drained

    # --- requests -----------------------------------------------------------------------------
    @property
    def default_size(self) -> tuple[int, int]:
        assert self.steps is not None
        return default_size(self.steps, self.settings)

    def params(
        self,
        prompt: str,
        *,
        n: int = 1,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        negative_prompt: str | None = None,
        edit: EditInput | None = None,
        lora: Sequence[tuple[str, float | None]] = (),
        partial_images: int = 0,
    ) -> GenerationParams:
        """A request with the server's defaults filled in; a missing seed is drawn at random,
        a LoRA named without a scale gets the one the service declared."""
        s = self.settings
        declared = {source.name: source.scale for source in s.loras}
        loras = tuple(
            (name, declared.get(name, 1.0) if scale is None else scale) for name, scale in lora
        )
        default_w, default_h = self.default_size
        return GenerationParams(
            prompt=prompt,
            n=n,
            width=default_w if width is None else width,
            height=default_h if height is None else height,
            steps=s.default_steps if steps is None else steps,
            guidance_scale=s.default_guidance_scale if guidance_scale is None else guidance_scale,
            # Below 2**53: the seed an answer names must survive JavaScript's JSON numbers,
            # or a browser client cannot ask for the same image again.
            seed=secrets.randbits(53) if seed is None else seed,
            negative_prompt=negative_prompt,
            edit=edit,
            loras=loras,
            partial_images=partial_images,
        )
