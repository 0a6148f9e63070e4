"""Server settings: one pydantic-settings model, read from ``IMAGEGEN_*`` environment variables.

This module imports neither torch nor diffusers on purpose: the operator imports it to render
the Deployment's environment, so a renamed setting breaks an operator test instead of a pod.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .request import MIN_SIDE

ENV_PREFIX = "IMAGEGEN_"

# After the drain, how long the HTTP server may take to write the last answers and close
# connections. A pod's grace period must hold the drain timeout plus this (the operator's does).
SHUTDOWN_FLUSH_S = 5


@dataclass(frozen=True)
class Limit:
    """The default and bounds of one setting that the ImageGenService API also sets."""

    default: int | float | None
    ge: int | float | None = None
    le: int | float | None = None


# The one table of request limits and defaults, read by these settings and by the
# operator's API (spec.pipeline.limits, .defaults, .stages), so the two cannot disagree.
LIMITS: dict[str, Limit] = {
    "max_images_per_request": Limit(4, 1, 64),
    "max_steps": Limit(200, 1, 1000),
    "max_pixels": Limit(None, 64 * 64, 4096 * 4096),  # None: the model's native size
    "default_steps": Limit(30, 1, 200),
    "default_guidance_scale": Limit(7.0, 0, 50),
    "max_batch_size": Limit(4, 1, 64),
    "batch_window_ms": Limit(5, 0, 1000),
    "queue_capacity": Limit(64, 1, 4096),
    "lora_scale": Limit(1.0, -10, 10),
}
# A LoRA adapter's name, as requests and spec.model.loras spell it: a DNS label.
LORA_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# At most this many adapters declared per service.
MAX_LORAS = 16
# WIDTHxHEIGHT, as requests spell a size and limits list them.
SIZE_PATTERN = r"^[1-9][0-9]{1,3}x[1-9][0-9]{1,3}$"


def limited(name: str, **kwargs: Any) -> Any:
    """A pydantic Field with the shared default and bounds of ``LIMITS[name]``."""
    limit = LIMITS[name]
    return Field(default=limit.default, ge=limit.ge, le=limit.le, **kwargs)


class Family(StrEnum):
    """Model families, spelled as in the ImageGenService API."""

    AUTO = "Auto"
    SD15 = "SD15"
    SDXL = "SDXL"
    SD3 = "SD3"
    FLUX = "Flux"


@dataclass(frozen=True)
class FamilyEntry:
    """How the server serves one family: diffusers' pipeline class (``_class_name`` in
    model_index.json) and the stage steps that drive it (``families.<module>.<steps>``)."""

    pipeline_class: str
    module: str
    steps: str


# The one family registry: loading detects a family by it, the stages are built from it,
# and the API's spec.model.family values are Family's.
FAMILIES: dict[Family, FamilyEntry] = {
    Family.SD15: FamilyEntry("StableDiffusionPipeline", "stable_diffusion", "StableDiffusionSteps"),
    Family.SDXL: FamilyEntry(
        "StableDiffusionXLPipeline", "stable_diffusion", "StableDiffusionXLSteps"),
    Family.SD3: FamilyEntry("StableDiffusion3Pipeline", "sd3", "StableDiffusion3Steps"),
    Family.FLUX: FamilyEntry("FluxPipeline", "flux", "FluxSteps"),
}


class DType(StrEnum):
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"
    FLOAT32 = "float32"


class Attention(StrEnum):
    """Scaled-dot-product-attention backends (``torch.nn.attention.SDPBackend``)."""

    FLASH = "Flash"
    EFFICIENT = "Efficient"
    MATH = "Math"
    AUTO = "Auto"


class StageMode(StrEnum):
    """Pipelined: one thread per stage with queues between; Stacked: one worker runs all stages."""

    PIPELINED = "Pipelined"
    STACKED = "Stacked"


class Batching(StrEnum):
    """Request: a denoise batch runs all its steps together; Step: requests join the running
    batch at the next denoising step (step_batching.py)."""

    REQUEST = "Request"
    STEP = "Step"


class Quantization(StrEnum):
    """How the denoiser's weights are stored (torchao; see quantization.py)."""

    NONE = "None"
    INT8_WEIGHT_ONLY = "Int8WeightOnly"
    FLOAT8 = "Float8"


class DenoiserCache(StrEnum):
    """diffusers' cache hooks on the denoiser (see denoiser_cache.py)."""

    NONE = "None"
    FIRST_BLOCK_CACHE = "FirstBlockCache"
    MAG_CACHE = "MagCache"
    TAYLOR_SEER_CACHE = "TaylorSeerCache"
    PYRAMID_ATTENTION_BROADCAST = "PyramidAttentionBroadcast"
    FASTER_CACHE = "FasterCache"

    @property
    def counts_steps(self) -> bool:
        """Its hooks count a batch's steps or read its timestep, one for every row: with
        step-level batching rows sit at different steps."""
        return self not in (DenoiserCache.NONE, DenoiserCache.FIRST_BLOCK_CACHE)

    @property
    def compiles(self) -> bool:
        """Whether it may go with torch.compile: First Block Cache only, the one whose both
        branches warm-up takes (denoiser_cache.every_branch), so nothing compiles after ready."""
        return self in (DenoiserCache.NONE, DenoiserCache.FIRST_BLOCK_CACHE)


CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


class LoraSource(BaseModel):
    """A LoRA adapter the server loads at start, which requests may then name."""

    name: str = Field(max_length=63, pattern=LORA_NAME_PATTERN)
    uri: str = Field(
        min_length=1,
        description="A .safetensors file or a directory holding pytorch_lora_weights.safetensors; "
        "the model's URI schemes.",
    )
    scale: float = limited("lora_scale", description="When a request names it without a scale.")


class ServerSettings(BaseSettings):
    """Every knob of the inference server. Each field ``x`` is read from ``IMAGEGEN_X``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, case_sensitive=False, extra="ignore", use_enum_values=False
    )

    # What to serve.
    model: str = Field(
        default="",
        description="Model directory or URI: file://, pvc://, gs://, hf://org/name[@rev].",
    )
    model_name: str | None = Field(
        default=None,
        description="Id reported by /v1/models; defaults to the model's last path part.",
    )
    family: Family = Field(default=Family.AUTO, description="Auto reads model_index.json.")
    dtype: DType = DType.BFLOAT16
    device: str = Field(default="auto", description="auto, cpu, cuda or cuda:N.")
    pvc_root: Path = Field(
        default=Path("/mnt/models"),
        description="Where pvc://CLAIM/sub/path is mounted: PVC_ROOT/CLAIM/sub/path.",
    )
    gcs_root: Path = Field(
        default=Path("/mnt/gcs"),
        description="Where gs://BUCKET/path is mounted (GCS FUSE CSI driver): GCS_ROOT/BUCKET/path.",
    )
    hf_cache_dir: Path | None = Field(default=None, description="Cache for hf:// downloads.")
    hf_token_file: Path | None = Field(
        default=None,
        description="File holding a Hugging Face access token, for gated hf:// models (read "
        "at start, never logged).",
    )
    quantization: Quantization = Field(
        default=Quantization.NONE,
        description="The denoiser's weights: Int8WeightOnly anywhere, Float8 on GPUs with FP8 "
        "tensor cores only.",
    )
    loras: list[LoraSource] = Field(
        default_factory=list, max_length=MAX_LORAS,
        description="LoRA adapters for the denoiser, loaded at start; in the environment, a JSON "
        'list such as [{"name": "ink", "uri": "pvc://models/ink.safetensors", "scale": 0.8}].',
    )

    # HTTP.
    host: str = "0.0.0.0"
    port: int = Field(default=8080, ge=1, le=65535)
    auth_token_file: Path | None = Field(
        default=None, description="File holding the bearer token required on /v1/* routes."
    )
    auth_token: SecretStr | None = Field(
        default=None,
        description="Bearer token given directly; auth_token_file wins when both are set.",
    )
    request_timeout_s: float = Field(default=300.0, gt=0)
    drain_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="After SIGTERM, the one deadline for accepted requests; then they are "
        "cancelled and answered 503.",
    )
    max_body_bytes: int = Field(
        default=1 << 20, ge=1024, description="Largest JSON request body read; more is a 413."
    )
    max_upload_bytes: int = Field(
        default=32 << 20, ge=1024,
        description="Largest edit form (image, mask and fields) read; more is a 413.",
    )
    max_upload_pixels: int = Field(
        default=4096 * 4096, ge=64 * 64,
        description="Most pixels an uploaded image or mask may have; read from its header, "
        "before it is decoded.",
    )

    # What one request may ask for: anything beyond is a 400 naming the field, before any
    # device work. These bound the work a single valid request can cost.
    max_prompt_chars: int = Field(default=2000, ge=1)
    max_images_per_request: int = limited("max_images_per_request")
    max_pixels: int | None = limited(
        "max_pixels",
        description="Largest width x height a request may ask for; unset: the model's native size.",
    )
    allowed_sizes: list[str] | None = Field(
        default=None,
        description="The only sizes (WIDTHxHEIGHT) a request may ask for besides the default "
        "size; unset: any within max_pixels. In the environment, a JSON list.",
    )
    max_steps: int = limited("max_steps")
    max_guidance_scale: float = Field(default=100.0, gt=0)

    # What the answers carry.
    provenance: bool = Field(
        default=True,
        description="Mark each PNG: its generation parameters and IPTC's "
        "trainedAlgorithmicMedia source type (see provenance.py).",
    )
    c2pa_cert_file: Path | None = Field(
        default=None,
        description="PEM certificate chain, leaf first, that signs a C2PA manifest into each "
        "PNG (with c2pa_key_file); unset: no manifest.",
    )
    c2pa_key_file: Path | None = Field(default=None, description="PEM private key of the leaf.")
    c2pa_algorithm: Literal["es256", "es384", "es512", "ps256", "ps384", "ps512", "ed25519"] = (
        "es256"
    )
    c2pa_timestamp_url: str | None = Field(
        default=None, description="RFC 3161 time-stamp authority the signatures are stamped by."
    )

    # Speed levers.
    compile_enabled: bool = False
    compile_mode: CompileMode = "max-autotune-no-cudagraphs"
    compile_regional: bool = Field(
        default=True,
        description="Compile only the repeated blocks (diffusers compile_repeated_blocks).",
    )
    compile_cache_dir: Path | None = Field(
        default=None,
        description="Inductor cache (TORCHINDUCTOR_CACHE_DIR); a volume makes warm starts fast.",
    )
    compile_cache_read_only: bool = Field(
        default=False,
        description="Load what compile_cache_dir holds (the compiled artifacts, AOT packages) "
        "and write nothing there: inductor compiles in local scratch, nothing is saved, "
        "marked or pruned. For serving pods of a service whose precompile Job writes the "
        "cache: a pod that takes uploads from the network cannot plant code there that "
        "later starts would load.",
    )
    compile_cache_retention_days: float = Field(
        default=30, ge=0,
        description="Compiled artifacts and AOT packages of other keys (an older torch, other "
        "sizes) not used for this many days are removed from compile_cache_dir at start, so "
        "the volume does not fill up across upgrades; 0 keeps them all.",
    )
    compile_precompile: bool = Field(
        default=False,
        description="With a cache dir: keep dynamo's traced code in the compiled artifacts too "
        "(caching_precompile), so a warm start traces nothing; but each compiled block installs "
        "that code again, so it pays where a denoiser has few repeated blocks.",
    )
    compile_aot: bool = Field(
        default=False,
        description="With compile: compile the denoiser ahead of time with AOTInductor, one "
        "package per admitted size (in compile_cache_dir when set), which a later start loads "
        "in a tenth of a second with no tracing; torch.compile is then not used. Without "
        "loras, quantization or a cache.",
    )
    cache: DenoiserCache = Field(
        default=DenoiserCache.NONE,
        description="FirstBlockCache: a step whose first block's output changed less than "
        "cache_threshold reuses the rest of the last step's. MagCache: a step reuses the last "
        "computed residual while the error estimated from Flux's published magnitude ratios "
        "stays under cache_threshold, at most 3 steps in a row and none in the first 20%. "
        "TaylorSeerCache: attention outputs are computed every cache_interval steps and "
        "extrapolated by a Taylor series between. PyramidAttentionBroadcast: attention runs "
        "every cache_interval steps in the middle of the schedule (timesteps 100 to 800) and "
        "its last output is reused between. FasterCache: the same, with the reused output "
        "corrected by its trend. All but FirstBlockCache need batching Request and compile "
        "off. Denoisers with diffusers' cache hooks only: Flux.",
    )
    cache_threshold: float = Field(
        default=0.05, gt=0, le=1, description="FirstBlockCache and MagCache only."
    )
    cache_interval: int = Field(
        default=2, ge=2, le=10,
        description="TaylorSeerCache, PyramidAttentionBroadcast and FasterCache only: every "
        "how many steps attention is computed in full.",
    )
    channels_last: bool = True
    attention: Attention = Attention.AUTO
    warmup: bool = Field(default=True, description="Run one generation before /readyz turns ready.")
    torch_threads: int | None = Field(
        default=None, ge=1, description="torch.set_num_threads on CPU."
    )

    # The stage pipeline.
    stage_mode: StageMode = StageMode.PIPELINED
    batching: Batching = Field(
        default=Batching.REQUEST,
        description="Step: requests join the running denoise batch at the next step instead "
        "of waiting for it to finish (Pipelined stages only).",
    )
    max_batch_size: int = limited(
        "max_batch_size",
        description="Most images one stage step batches: a request of n images counts n; one "
        "of more runs alone.",
    )
    batch_window_ms: float = limited("batch_window_ms")
    queue_capacity: int = limited("queue_capacity")

    # Request defaults; width/height None means the model's native size.
    default_steps: int = limited("default_steps")
    default_guidance_scale: float = limited("default_guidance_scale")
    default_width: int | None = Field(default=None, ge=MIN_SIDE, le=4096, multiple_of=8)
    default_height: int | None = Field(default=None, ge=MIN_SIDE, le=4096, multiple_of=8)

    # The levels both Python's logging and uvicorn take (uvicorn's "trace" and logging's
    # "warn" are one side's only), in any case.
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    # One JSON object a line with Cloud Logging's `severity`: GKE's agent takes a plain
    # line on stderr for an ERROR, whatever its level.
    log_format: Literal["text", "json"] = "text"

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("allowed_sizes")
    @classmethod
    def _check_sizes(cls, value: list[str] | None) -> list[str] | None:
        for size in value or []:
            parts = size.split("x")
            if len(parts) != 2 or not all(p.isdigit() and int(p) >= MIN_SIDE for p in parts):
                raise ValueError(
                    f"allowed size {size!r} is not WIDTHxHEIGHT, each at least {MIN_SIDE}")
        return value

    @field_validator("loras")
    @classmethod
    def _unique_loras(cls, value: list[LoraSource]) -> list[LoraSource]:
        names = [lora.name for lora in value]
        if len(set(names)) != len(names):
            raise ValueError(f"LoRA names must be unique: {', '.join(names)}")
        return value

    @model_validator(mode="after")
    def _quantized_without_loras(self) -> ServerSettings:
        if self.loras and self.quantization != Quantization.NONE:
            raise ValueError("loras and quantization are not served together yet: the LoRA "
                             "slot needs the denoiser's linear layers unquantized")
        return self

    @model_validator(mode="after")
    def _aot_alone(self) -> ServerSettings:
        if not self.compile_aot:
            return self
        # The package is the denoiser's graph with the weights handed over at load: a LoRA
        # slot, torchao's weight subclasses and diffusers' cache hooks all change that graph.
        clashes = {
            "compile_enabled false": not self.compile_enabled,
            "loras": bool(self.loras),
            f"quantization {self.quantization.value}": self.quantization != Quantization.NONE,
            f"cache {self.cache.value}": self.cache != DenoiserCache.NONE,
        }
        if named := [name for name, clash in clashes.items() if clash]:
            raise ValueError(f"compile_aot does not go with {' or '.join(named)}: the "
                             "ahead-of-time package holds the plain denoiser's graph, compiled")
        return self

    @model_validator(mode="after")
    def _cache_batching_and_compile(self) -> ServerSettings:
        method = self.cache.value
        if self.cache.counts_steps and self.batching != Batching.REQUEST:
            raise ValueError(f"cache {method} needs batching Request: its hooks follow one "
                             "batch's steps, and with Step rows join at other steps")
        if self.compile_enabled and self.cache == DenoiserCache.MAG_CACHE:
            raise ValueError("cache MagCache runs every transformer block outside "
                             "torch.compile (diffusers' MagCache hooks are compiler-disabled), "
                             "so compiling adds nothing: set compile_enabled false, or use "
                             "FirstBlockCache")
        if self.compile_enabled and not self.cache.compiles:
            raise ValueError(f"cache {method} with compile: its hooks decide each step in "
                             "Python around every attention layer, which breaks the compiled "
                             "blocks apart, and warm-up does not take each of its branches, so "
                             "a request could wait for a compile: set compile_enabled false, "
                             "or use FirstBlockCache")
        return self

    @model_validator(mode="after")
    def _step_batching_pipelined(self) -> ServerSettings:
        if self.batching == Batching.STEP and self.stage_mode != StageMode.PIPELINED:
            raise ValueError("batching Step needs stage_mode Pipelined: it is the denoise "
                             "stage's own loop")
        return self

    @model_validator(mode="after")
    def _c2pa_pair(self) -> ServerSettings:
        if (self.c2pa_cert_file is None) != (self.c2pa_key_file is None):
            raise ValueError("c2pa_cert_file and c2pa_key_file are set together or not at all")
        return self

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value not in ("auto", "cpu", "cuda") and not value.startswith("cuda:"):
            raise ValueError("device must be auto, cpu, cuda or cuda:N")
        return value

    def to_env(self, *, only_set: bool = True) -> dict[str, str]:
        """The environment that reproduces these settings (what a Deployment would carry).

        Secrets are left out: the token travels as a mounted file, never as a plain env value.
        """
        fields = self.model_fields_set if only_set else set(type(self).model_fields)
        env: dict[str, str] = {}
        for name in sorted(fields):
            value = getattr(self, name)
            if value is None or isinstance(value, SecretStr):
                continue
            env[env_var_name(name)] = _env_value(value)
        return env


def _env_value(value: Any) -> str:
    if isinstance(value, list):
        # How pydantic-settings reads a list from the environment.
        return json.dumps([v.model_dump() if isinstance(v, BaseModel) else v for v in value])
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def env_var_name(field: str) -> str:
    """The environment variable a settings field is read from, e.g. ``IMAGEGEN_MAX_BATCH_SIZE``."""
    if field not in ServerSettings.model_fields:
        raise KeyError(f"ServerSettings has no field {field!r}")
    return ENV_PREFIX + field.upper()
