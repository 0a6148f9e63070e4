"""The denoiser compiled ahead of time with AOTInductor: one package per admitted size, on the
cache volume, so a start loads compiled code instead of tracing anything.

A warm start with torch.compile's saved artifacts (compiled_artifacts.py) still runs dynamo:
it imports the compiler and installs the traced code and guards of every compiled frame, about
2 s on the CPU small model. AOTInductor compiles an exported program into a shared
library with a C++ runner (PyTorch's ``torch._inductor.aoti_compile_and_package``); a start
only loads it, about 0.1 s. Nothing is traced in service, so nothing can recompile: a shape
without a package is an error, which the admitted sizes and warm-up rule out.

The packages hold no weights. Each one is compiled with runtime constant folding and its
constants left out of the library, and ``load_constants`` hands it the loaded denoiser's own
tensors (user-managed: not copied, no second copy in GPU memory). A package therefore depends
on the architecture, never the weights, like the artifact key it shares; a fine-tuned checkpoint
of the same architecture reuses it.

Each package is exported from one real call of the denoiser per size, recorded during an eager
warm-up (``capture``), a UNet's or a transformer's alike, the shape of its latents naming the
package: the rows dimension is exported dynamic, 1 to the most a batch holds; the
keyword arguments that are not tensors (``return_dict``, an absent ``added_cond_kwargs``) are
part of the program, and a later call must pass the same ones.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree

from .compiled_artifacts import artifact_key, cpu_features, key_parts, write_atomically
from .config import ServerSettings
from .engine import admitted_sizes
from .families import FamilySteps
from .optimize import denoiser
from .warmup import most_rows, warm_up

log = logging.getLogger(__name__)

SUBDIRECTORY = "aot"


class AotError(RuntimeError):
    """The ahead-of-time denoiser cannot serve this model or this call."""


def _has_tensor(value: Any) -> bool:
    return any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(value))


def _split(kwargs: dict) -> tuple[dict, dict]:
    """(the keyword arguments that carry tensors, the rest)."""
    tensors = {k: v for k, v in kwargs.items() if _has_tensor(v)}
    return tensors, {k: v for k, v in kwargs.items() if k not in tensors}


def _latents(args: tuple, kwargs: dict) -> torch.Tensor:
    """A call's latents: the UNet's ``sample`` (positional), the transformers'
    ``hidden_states``. Their shape past the rows picks the package."""
    latents = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
    if not isinstance(latents, torch.Tensor):
        raise AotError(f"no latents among the denoiser's arguments ({', '.join(kwargs)})")
    return latents


def _described(constants: dict) -> dict[str, str]:
    return {k: repr(v) for k, v in constants.items()}


def _layout(tensor: torch.Tensor) -> list:
    return [list(tensor.shape), str(tensor.dtype)]


class _Call(torch.nn.Module):
    """One denoiser call as a module to export: the non-tensor arguments fixed, the first
    output returned (what the families take from ``return_dict=False``)."""

    def __init__(self, module: torch.nn.Module, constants: dict):
        super().__init__()
        self.module = module
        self.constants = constants

    def forward(self, args: tuple, kwargs: dict) -> torch.Tensor:
        return self.module(*args, **kwargs, **self.constants)[0]


@dataclass
class _Package:
    runner: Any
    constants: dict


@dataclass
class AotDenoiser:
    """The packages of one denoiser: ``load`` what the volume has, ``capture`` and ``build``
    the rest, then ``install`` in place of the denoiser's forward."""

    module: torch.nn.Module
    #: on the cache volume; None without a cache dir (compiled at every start)
    directory: Path | None
    parts: dict
    most_rows: int
    inductor_configs: dict
    #: the latents' shape past the rows -> its package
    packages: dict[tuple[int, ...], _Package] = field(default_factory=dict)
    captured: dict[tuple[int, ...], tuple[tuple, dict]] = field(default_factory=dict)
    built: list[str] = field(default_factory=list)
    #: the packages built that the volume holds for the next start
    saved: list[str] = field(default_factory=list)
    #: the volume is read, never written (compile_cache_read_only)
    read_only: bool = False
    #: where packages are compiled, and kept until this object goes when the volume is not
    scratch: tempfile.TemporaryDirectory | None = None

    @classmethod
    def for_server(
        cls, steps: FamilySteps, settings: ServerSettings, dtype: torch.dtype,
        read_from: Path | None = None,
    ) -> AotDenoiser:
        """The packages of the settings' compile_cache_dir; ``read_from``: of a volume read
        only, where what is compiled stays in local scratch."""
        module = denoiser(steps.pipeline)
        directory = None
        if (volume := read_from or settings.compile_cache_dir) is not None:
            directory = Path(volume) / SUBDIRECTORY
        # Constants folded at load from the weights handed over, not at compile time. Inductor's
        # default mode whatever compile_mode says: with max-autotune, the CPU's GEMM templates
        # leave constants the runtime folding cannot map (PyTorch 2.15: "Not all constant gets
        # mapped for constant folding graph").
        configs = {
            "aot_inductor.package_constants_in_so": False,
            "aot_inductor.use_runtime_constant_folding": True,
        }
        # torch.compile's settings play no part: the packages are inductor's default mode.
        parts = {k: v for k, v in key_parts(steps, settings, dtype).items()
                 if k not in ("compile_mode", "regional", "precompile")}
        parts["aot"] = configs
        if "cpu_capability" not in parts:
            # On a GPU too, the package's C++ wrapper is built for this host's CPU (inductor's
            # -march=native): a node of another CPU platform in the pool must not load it.
            parts["host_cpu"] = cpu_features()
        return cls(module, directory, parts, most_rows(settings), configs,
                   read_only=read_from is not None)

    @property
    def key(self) -> str:
        return artifact_key(self.parts)

    def _name(self, signature: tuple[int, ...]) -> str:
        shape = "x".join(str(d) for d in signature)
        return f"{self.key}-{shape}.pt2"

    def _local(self) -> Path:
        if self.scratch is None:
            self.scratch = tempfile.TemporaryDirectory(prefix="imagegen-aot-")
        return Path(self.scratch.name)

    def _index(self) -> dict:
        """The volume's index of this key's packages (empty when there is none)."""
        if self.directory is None:
            return {}
        index = self.directory / f"{self.key}.json"
        if not index.is_file():
            return {}
        try:
            found = json.loads(index.read_text())
            found["signatures"] = [tuple(s) for s in found["signatures"]]
            return found
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Cut short by a node that died mid-write, or not ours: compile, do not fail.
            log.warning("AOT index %s unreadable, compiling instead: %s", index, exc)
            return {}

    def _signatures_on_disk(self) -> list[tuple[int, ...]]:
        return self._index().get("signatures", [])

    # --- load -----------------------------------------------------------------------------
    def load(self) -> None:
        """Load every package the volume has for this key; a broken one is only logged."""
        for signature in self._signatures_on_disk():
            path = self.directory / self._name(signature)
            try:
                self._load(signature, path)
            except Exception as exc:  # a package that cannot load means compiling, not failing
                log.warning("AOT package %s not loaded, compiling instead: %s", path, exc)
        log.info("AOT packages: %d loaded for key %s", len(self.packages), self.key)

    def _load(self, signature: tuple[int, ...], path: Path) -> None:
        meta = json.loads(path.with_suffix(".json").read_text())
        tensors = self._weights()
        # The package runs the code it was compiled from: weights it names that this denoiser
        # lacks, or holds in another shape, mean other code (a renamed or reshaped layer).
        layout = {name: _layout(t) for name, t in tensors.items()}
        if meta.get("weights") != layout:
            raise AotError("its denoiser's weights differ in names or shapes from this one's")
        runner = torch._inductor.aoti_load_package(str(path))
        names = runner.get_constant_fqns()
        unknown = [n for n in names if n.startswith("module.") and n not in tensors]
        if unknown:
            raise AotError(f"it names weights this denoiser lacks: {unknown[:3]}")
        wanted = {name: tensors[name] for name in names
                  if name in tensors}  # the rest are folded from these at the first call
        runner.load_constants(wanted, check_full_update=False, user_managed=True)
        self.packages[signature] = _Package(runner, meta["constants"])

    def _weights(self) -> dict[str, torch.Tensor]:
        own = [*self.module.named_parameters(), *self.module.named_buffers()]
        return {f"module.{name}": t.detach() for name, t in own}  # as _Call names them

    # --- build ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def capture(self):
        """Record one call per input shape not yet packaged, of more than one row (exported
        from a single row, the rows dimension would be specialized to 1)."""

        def record(_module, args, kwargs):
            latents = _latents(args, kwargs)
            signature = tuple(latents.shape[1:])
            if (signature not in self.packages and signature not in self.captured
                    and latents.shape[0] > 1):
                self.captured[signature] = (args, kwargs)

        handle = self.module.register_forward_pre_hook(record, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def compile_missing(self, steps: FamilySteps, settings: ServerSettings) -> None:
        """Compile a package for each admitted size without one: from the calls an eager
        warm-up makes, recorded."""
        index = self._index()
        if index.get("complete") and set(index["signatures"]) <= set(self.packages):
            # Every input shape of every admitted size, all loaded: sizes may share one
            # (Flux's 768x1344 and 1344x768 make the same token count), so not one per size.
            return
        if len(self.packages) >= len(admitted_sizes(steps, settings)):
            return
        with self.capture():
            warm_up(steps, settings)
        self.build()

    def build(self) -> None:
        """Export and compile a package for each captured shape, save it, then load it."""
        saved = []
        wanted = len(self.captured)
        for signature, (args, kwargs) in self.captured.items():
            started = time.perf_counter()
            path = self._compile(signature, args, kwargs)
            log.info("AOT package %s compiled in %.1fs", path.name, time.perf_counter() - started)
            if self._save(path):
                path = self.directory / path.name
                saved.append(signature)
            self._load(signature, path)
            self.built.append(path.name)
        self.captured.clear()
        if saved:
            signatures = sorted({*self._signatures_on_disk(), *saved})
            # Complete: this warm-up's every new shape saved, so the volume holds them all.
            complete = len(saved) == wanted
            with contextlib.suppress(OSError):  # _save has said what the volume refused
                write_atomically(self.directory / f"{self.key}.json", json.dumps(
                    {"parts": self.parts, "signatures": signatures, "complete": complete},
                    indent=2, sort_keys=True, default=str).encode())
                self.saved += [self._name(s) for s in saved]

    def _save(self, package: Path) -> bool:
        """Copy a package onto the volume, atomically (replicas may start together). A volume
        that refuses it (full, read-only) costs the next start its head start, not this one
        its service: logged, and the package served from local scratch."""
        if self.directory is None or self.read_only:
            return False
        path = self.directory / package.name
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, package.read_bytes())
            write_atomically(path.with_suffix(".json"), package.with_suffix(".json").read_bytes())
        except OSError as exc:
            log.warning("AOT package not saved to %s, served from local scratch: %s", path, exc)
            return False
        return True

    def _compile(self, signature: tuple[int, ...], args: tuple, kwargs: dict) -> Path:
        # Out of inference mode: the recorded tensors become ordinary inputs to trace.
        args, kwargs = pytree.tree_map_only(torch.Tensor, torch.clone, (args, kwargs))
        tensors, constants = _split(kwargs)
        rows = _latents(args, kwargs).shape[0]
        dim = torch.export.Dim("rows", min=1, max=self.most_rows)
        dynamic = pytree.tree_map(
            lambda leaf: {0: dim} if isinstance(leaf, torch.Tensor) and leaf.ndim
            and leaf.shape[0] == rows else None,
            (args, tensors),
        )
        program = torch.export.export(_Call(self.module, constants), (args, tensors),
                                      dynamic_shapes=dynamic)
        path = self._local() / self._name(signature)
        torch._inductor.aoti_compile_and_package(
            program, package_path=str(path),
            inductor_configs=dict(self.inductor_configs),  # it adds to the dict it gets
        )
        path.with_suffix(".json").write_text(json.dumps({
            "constants": _described(constants),
            "weights": {name: _layout(t) for name, t in self._weights().items()},
        }))
        return path

    # --- serve ----------------------------------------------------------------------------
    def install(self) -> None:
        """The denoiser's forward runs the packages from here on."""
        self.module.forward = self._forward

    def _forward(self, *args, **kwargs):
        signature = tuple(_latents(args, kwargs).shape[1:])
        package = self.packages.get(signature)
        if package is None:
            raise AotError(f"no ahead-of-time package for denoiser input {signature}; "
                           f"packaged: {sorted(self.packages)}")
        tensors, constants = _split(kwargs)
        if _described(constants) != package.constants:
            raise AotError(f"denoiser called with {constants}, packaged with "
                           f"{package.constants}")
        # On a GPU the runner launches on the current stream, the denoise stage's own (PyTorch's
        # AOTIModelContainerRunnerCuda::run_impl takes getCurrentCUDAStream when given none).
        return (package.runner(args, tensors),)
