"""The ImageGenService resource (imagegen.dev/v1alpha1): spec and status as typed models.

These models are the one source of truth for the API: ``crd.py`` generates the
CRD from them, and the operator reads every object through :func:`parse`, which
applies the same defaults and cross-field rules as the API server. Field names
are snake_case in Python and camelCase on the wire; attribute docstrings become
the descriptions ``kubectl explain`` shows.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, PlainValidator, ValidationError, WithJsonSchema

from imagegen_operator import gke
from imagegen_operator.schema import KubeModel, Rule, StatusModel, defaulted
from imagegen_server.config import (
    LORA_NAME_PATTERN,
    MAX_LORAS,
    SIZE_PATTERN,
    DenoiserCache,
    Family,
    Quantization,
    limited,
)

GROUP = "imagegen.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "ImageGenService"
PLURAL = "imagegenservices"
SINGULAR = "imagegenservice"
SHORT_NAMES = ("igs",)
CATEGORIES = ("imagegen",)

# --- enums -------------------------------------------------------------------------
# The GPU types and MIG sizes come from gke.py, the one table of GKE facts.

GpuType = Literal[tuple(gke.ACCELERATORS)]  # type: ignore[valid-type]
MIG_GPU_TYPES: tuple[str, ...] = tuple(t for t, a in gke.ACCELERATORS.items() if a.mig_capable)
ALL_MIG_SIZES: tuple[str, ...] = tuple(
    dict.fromkeys(size for a in gke.ACCELERATORS.values() for size in a.mig_partitions)
)
MigSize = Literal[ALL_MIG_SIZES]  # type: ignore[valid-type]
GpuCount = Literal[gke.GPU_COUNTS_PER_NODE]  # type: ignore[valid-type]

ModelFamily = Literal[tuple(f.value for f in Family)]  # type: ignore[valid-type]
DType = Literal["bfloat16", "float16", "float32"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
Attention = Literal["Flash", "Efficient", "Math", "Auto"]
StageMode = Literal["Pipelined", "Stacked"]
Batching = Literal["Request", "Step"]
QuantizationName = Literal[tuple(q.value for q in Quantization)]  # type: ignore[valid-type]
CacheMethod = Literal[tuple(c.value for c in DenoiserCache)]  # type: ignore[valid-type]
# The caches whose hooks follow one batch's steps, and those that stay out of torch.compile.
STEP_COUNTING_CACHES = tuple(c.value for c in DenoiserCache if c.counts_steps)
UNCOMPILED_CACHES = tuple(c.value for c in DenoiserCache if not c.compiles)
SharingStrategy = Literal["TimeSharing", "MPS"]
Provider = Literal["GKE", "ConfigConnector", "Existing", "Local"]
# Providers that create the pool in a GKE cluster, and so must be told which one.
CLOUD_PROVIDERS: tuple[str, ...] = ("GKE", "ConfigConnector")
# Providers whose pool the operator makes, under a name it knows (Existing: neither).
POOL_PROVIDERS: tuple[str, ...] = (*CLOUD_PROVIDERS, "Local")

# Anchored patterns in the common subset of RE2 (API server) and Rust regex (pydantic).
MODEL_URI_PATTERN = (
    r"^(gs://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9](/[^\t\n\v\f\r ]*)?"
    r"|hf://[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
    r"(@[A-Za-z0-9._/-]{1,255})?"
    r"|pvc://[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?(/[^\t\n\v\f\r ]*)?"
    r"|file:///[^\t\n\v\f\r ]+)$"
)
CLUSTER_PATTERN = (
    r"^projects/[a-z][-a-z0-9]{4,28}[a-z0-9]"
    r"/locations/[a-z0-9-]{1,63}"
    r"/clusters/[a-z]([-a-z0-9]{0,38}[a-z0-9])?$"
)
CLUSTER_MESSAGE = (
    "cluster must be projects/PROJECT/locations/LOCATION/clusters/NAME: a project ID of 6 to "
    "30 lowercase letters, digits and hyphens, a region or zone, a cluster name of up to 40"
)
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"
MACHINE_TYPE_PATTERN = r"^[a-z0-9]+(-[a-z0-9]+)*$"
# metav1.Condition's type: CamelCase, optionally prefixed with a DNS subdomain and '/'.
# Kubernetes' qualified names (apimachinery's IsQualifiedName): an optional DNS subdomain and
# '/', then a name part; label values are a name part or empty (IsValidLabelValue).
_DNS_SUBDOMAIN_PREFIX = r"([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
_NAME_PART = r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
CONDITION_TYPE_PATTERN = rf"^{_DNS_SUBDOMAIN_PREFIX}({_NAME_PART})$"
# Kubernetes' resource.Quantity grammar, as in the built-in types' OpenAPI.
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)


_QUANTITY_SUFFIXES = {
    **{f"{p}i": Decimal(1024) ** n for n, p in enumerate("KMGTPE", 1)},
    **{p: Decimal(1000) ** n for n, p in enumerate("kMGTPE", 1)},
    "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": Decimal(1),
}


def quantity_value(value: int | str) -> Decimal:
    """A quantity's value (``500m`` -> 0.5, ``8Gi`` -> 8589934592), by the grammar of
    QUANTITY_PATTERN. The Kubernetes client's parse_quantity does the same, but loads the
    whole client, which the offline CLI (plan, render) does not."""
    if isinstance(value, int):
        return Decimal(value)
    number = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
    match = re.fullmatch(rf"([+-]?{number})([eE][+-]?{number}|[KMGTPE]i|[numkMGTPE])?", value)
    if match is None:
        raise ValueError(f"{value!r} is not a Kubernetes quantity")
    number, suffix = Decimal(match.group(1)), match.group(2) or ""
    if suffix[:1] in ("e", "E"):
        return number * Decimal(10) ** Decimal(suffix[1:])
    return number * _QUANTITY_SUFFIXES[suffix]


def _quantity(value: Any) -> int | str:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(QUANTITY_PATTERN, value):
        return value
    raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. 500m, 2, 16Gi)")


# int-or-string, validated as one type so an error names one path (no union branches).
Quantity = Annotated[
    int | str,
    PlainValidator(_quantity),
    WithJsonSchema(
        {"anyOf": [{"type": "integer"}, {"type": "string"}], "pattern": QUANTITY_PATTERN,
         "maxLength": 64}
    ),
]


def sharing_summary(partition_size: str | None, strategy: str | None, clients: int | None) -> str:
    """status.sharing, the Sharing column: exclusive, mig:1g.10gb, ts:2, mps:4, mig:1g.10gb+ts:2."""
    parts = []
    if partition_size:
        parts.append(f"mig:{partition_size}")
    if strategy and clients:
        parts.append(f"{'ts' if strategy == 'TimeSharing' else 'mps'}:{clients}")
    return "+".join(parts) or "exclusive"


def _unique_lora_names(loras: list[Any]) -> list[Any]:
    """What the CRD's list-map keyed by name refuses (a request names adapters by name)."""
    names = [lora.name for lora in loras]
    if duplicated := sorted({n for n in names if names.count(n) > 1}):
        raise ValueError(f"names must be unique; given more than once: {', '.join(duplicated)}")
    return loras


def _unique_zones(zones: list[str]) -> list[str]:
    """What the CRD's set-typed list refuses."""
    if duplicated := sorted({z for z in zones if zones.count(z) > 1}):
        raise ValueError(f"zones must be unique; given more than once: {', '.join(duplicated)}")
    return zones


def _cel_string(value: str) -> str:
    # A CEL raw string: backslashes reach the regex engine as written.
    assert "'" not in value
    return f"r'{value}'"


def _cel_list(values: tuple[str, ...] | list[str]) -> str:
    return "[" + ", ".join(_cel_string(v) for v in values) + "]"


# --- spec: model ---------------------------------------------------------------------


def _uri_rule(what: str) -> Rule:
    # A rule rather than a schema pattern: the API server's pattern error prints the
    # whole regex, this one says what a valid URI looks like.
    return Rule(
        cel=f"self.uri.matches({_cel_string(MODEL_URI_PATTERN)})",
        check=lambda m: re.fullmatch(MODEL_URI_PATTERN, m.uri) is not None,
        field=".uri",
        message=(
            f"uri must be gs://bucket/path, hf://org/name[@revision], "
            f"pvc://claim[/sub/path] or file:///absolute/path{what}"
        ),
    )


class LoraAdapter(KubeModel):
    """A LoRA adapter for the denoiser, loaded at start; requests name it in `lora`."""

    name: str = Field(max_length=63, pattern=LORA_NAME_PATTERN)
    """How requests name it (a DNS label)."""
    uri: str = Field(min_length=1, max_length=2048)
    """Where it lives, with the model's URI schemes: a .safetensors file, or a directory
    holding pytorch_lora_weights.safetensors."""
    scale: float = limited("lora_scale")
    """Its scale when a request names it without one."""

    rules = (_uri_rule(", to a .safetensors file or a directory"),)


class ModelSource(KubeModel):
    """Which diffusion model to serve and how to load it."""

    uri: str = Field(min_length=1, max_length=2048)
    """Where the model lives: gs://bucket/path, hf://org/name[@revision],
    pvc://claim/sub/path (ReadOnlyMany where replicas span nodes) or file:///abs/path."""
    family: ModelFamily = "Auto"
    """Model family (Auto detects it from the pipeline's model_index.json)."""
    dtype: DType = "bfloat16"
    """Weight and activation dtype on the GPU."""
    memory_gib: float | None = Field(default=None, alias="memoryGiB", gt=0, le=1024)
    """GPU memory one replica needs, in GiB; overrides the planner's estimate from the
    model size."""
    loras: Annotated[list[LoraAdapter], AfterValidator(_unique_lora_names)] | None = Field(
        default=None,
        max_length=MAX_LORAS,
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["name"],
        },
    )
    """LoRA adapters for the denoiser (names unique), loaded when a server starts; a request
    names the ones it wants, with scales, in `lora`. Only requests with the same adapters
    share a denoising batch."""
    quantization: QuantizationName = "None"
    """The denoiser's weights (torchao): Int8WeightOnly on any GPU, Float8 on GPU types with
    FP8 tensor cores (nvidia-l4, nvidia-h100-80gb, nvidia-h200-141gb). Quantized weights take
    half the memory of 16-bit ones, which the planner counts."""
    token_secret_ref: SecretKeyRef | None = None
    """Secret holding a Hugging Face access token, for gated hf:// models and adapters
    (FLUX.1-dev, Stable Diffusion 3.5): mounted as a file the server reads at start (and the
    precompile Job), never put in the environment or the logs."""

    rules = (
        _uri_rule(""),
        Rule(
            cel="!has(self.tokenSecretRef) || self.uri.startsWith('hf://')"
            " || (has(self.loras) && self.loras.exists(l, l.uri.startsWith('hf://')))",
            check=lambda m: m.token_secret_ref is None or m.uri.startswith("hf://")
            or any(lora.uri.startswith("hf://") for lora in m.loras or ()),
            field=".tokenSecretRef",
            message="tokenSecretRef is read only for hf:// models and adapters: this one "
            "loads nothing from the hub",
        ),
        Rule(
            cel="!has(self.quantization) || self.quantization == 'None' || !has(self.loras)"
            " || size(self.loras) == 0",
            check=lambda m: m.quantization == "None" or not m.loras,
            field=".quantization",
            message="quantization and loras are not served together yet: LoRA adapters need "
            "the denoiser unquantized",
        ),
    )


# --- spec: pipeline ------------------------------------------------------------------


class CompileCache(KubeModel):
    """Persistent cache for compiled kernels, so a restart does not recompile."""

    pvc_name: str = Field(max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)
    """PersistentVolumeClaim (same namespace) mounted as the torch.compile / Inductor cache
    by every replica and the precompile Job: ReadWriteMany where they span nodes."""


class CompileSpec(KubeModel):
    """torch.compile settings for the denoiser."""

    enabled: bool = True
    """Compile the denoiser with torch.compile."""
    mode: CompileMode = "max-autotune-no-cudagraphs"
    """torch.compile mode."""
    regional: bool = True
    """Compile one repeated block and reuse it (regional compilation): much shorter cold starts."""
    cache: CompileCache | None = None
    """Where compiled artifacts persist across restarts; none keeps them in the pod."""
    precompile_job: bool = False
    """Compile once in a Job before the replicas start: a new service's Deployment stays at
    0 replicas until the Job has left the compiled artifacts on the cache volume, so every
    replica starts warm. A change to what is compiled (model, image, GPU, sizes, batch size)
    runs a new Job; a service already serving is not held meanwhile. The serving pods then
    mount `cache` read-only: only the Job writes what later starts load and run. Needs
    `cache`."""
    aot: bool = False
    """Compile the denoiser ahead of time with AOTInductor instead of torch.compile: one
    package per admitted size, kept on `cache`, which a replica's start loads in about a tenth
    of a second with nothing traced. The packages hold no weights, so another checkpoint of
    the same architecture reuses them. Without loras, quantization or a denoiser cache;
    compiled in inductor's default mode whatever `mode` says."""

    rules = (
        Rule(
            cel="!has(self.aot) || !self.aot || !has(self.enabled) || self.enabled",
            check=lambda c: not c.aot or c.enabled,
            field=".aot",
            message="aot needs enabled: it is a way to compile the denoiser",
        ),
        Rule(
            cel="!has(self.precompileJob) || !self.precompileJob || has(self.cache)",
            check=lambda c: not c.precompile_job or c.cache is not None,
            field=".precompileJob",
            message="precompileJob needs cache: the Job leaves the compiled artifacts on the "
            "cache volume for the replicas to load",
        ),
        Rule(
            cel="!has(self.precompileJob) || !self.precompileJob || !has(self.enabled)"
            " || self.enabled",
            check=lambda c: not c.precompile_job or c.enabled,
            field=".precompileJob",
            message="precompileJob needs enabled: with compile off there is nothing to compile",
        ),
    )


class DenoiserCacheSpec(KubeModel):
    """diffusers' cache hooks on the denoiser: fewer denoiser passes, at a small cost in
    fidelity. Only denoisers with diffusers' cache hooks take one (Flux's transformer); a server
    of another model reports the field as the reason it did not start."""

    method: CacheMethod = "None"
    """FirstBlockCache: a step whose first transformer block changed less than the threshold
    reuses the rest of the last step's output. MagCache: a step reuses the last computed
    residual of the blocks while the error estimated from Flux's published magnitude ratios
    stays under the threshold, at most 3 steps in a row and none in the first 20%.
    TaylorSeerCache: attention outputs are computed every `interval` steps and extrapolated by
    a Taylor series in between. PyramidAttentionBroadcast: in the middle of the schedule
    (timesteps 100 to 800) attention runs every `interval` steps and its last output is reused
    between. FasterCache: the same below timestep 681, the reused output corrected by its
    trend. All but FirstBlockCache need stages.batching Request (they follow one batch's
    steps) and compile.enabled false (their hooks stay out of torch.compile)."""
    threshold: float = Field(default=0.05, gt=0, le=1)
    """FirstBlockCache: relative change of the first block's output below which a step is
    skipped. MagCache: the estimated error a run of skipped steps may add up to (its authors
    use about 0.06). Higher is faster and further from the uncached image."""
    interval: int = Field(default=2, ge=2, le=10)
    """TaylorSeerCache, PyramidAttentionBroadcast and FasterCache: every how many steps
    attention is computed in full. Higher is faster and further from the uncached image."""


class StagesSpec(KubeModel):
    """How requests flow through the encode, denoise and decode stages."""

    mode: StageMode = "Pipelined"
    """Pipelined runs one thread per stage with queues between; Stacked runs one request
    at a time through all stages."""
    batching: Batching = "Request"
    """How the denoise stage batches: Request runs a batch through all its steps together;
    Step lets requests join the running batch at the next denoising step, each at its own
    timestep, so a request arriving mid-batch does not wait for the batch to finish
    (Pipelined only). Step gains most where requests ask for different step counts and where
    a step over more rows costs little more than over one; where a step's cost grows in
    step with its rows (a large image on a busy GPU), the one joining slows the batch about
    as much as it saves, and Request does as well."""
    max_batch_size: int = limited("max_batch_size")
    """Most images batched together in one stage step: a request of n images counts n, and
    one of more than this runs alone. The planner's memory estimate is for this many images
    (or maxImagesPerRequest, when more) at the largest size a request may ask for."""
    batch_window_ms: int = limited("batch_window_ms")
    """How long a stage waits for more requests to fill a batch, in milliseconds."""
    queue_capacity: int = limited("queue_capacity")
    """Work admitted and waiting, in requests at the default size and steps (a larger request
    counts for more); beyond it the server answers 429 with Retry-After."""

    rules = (
        Rule(
            cel="!has(self.batching) || self.batching == 'Request' || !has(self.mode)"
            " || self.mode == 'Pipelined'",
            check=lambda s: s.batching == "Request" or s.mode == "Pipelined",
            field=".batching",
            message="batching Step needs mode Pipelined: it is the denoise stage's own loop",
        ),
    )


class GenerationDefaults(KubeModel):
    """Generation parameters used when a request does not set them."""

    steps: int = limited("default_steps")
    """Denoising steps."""
    guidance_scale: float = limited("default_guidance_scale")
    """Classifier-free guidance scale."""
    width: int = Field(default=1024, ge=64, le=4096, multiple_of=8)
    """Image width in pixels: a multiple of 8 in 64..4096."""
    height: int = Field(default=1024, ge=64, le=4096, multiple_of=8)
    """Image height in pixels: a multiple of 8 in 64..4096."""



class RequestLimits(KubeModel):
    """What one request may ask for; the server answers anything beyond with a 400 naming the
    field, before any GPU work."""

    sizes: list[Annotated[str, Field(pattern=SIZE_PATTERN, max_length=9)]] | None = Field(
        default=None, max_length=32
    )
    """The only sizes a request may ask for besides the default size, as WIDTHxHEIGHT
    (multiples of 8); unset: any size up to maxPixels, or with compile enabled the default
    size only. A compiled server compiles each of them before it turns ready."""
    max_pixels: int | None = limited("max_pixels")
    """Largest width x height of one request; unset: the model's native size (or the default
    size, when that is larger)."""
    max_steps: int = limited("max_steps")
    """Most denoising steps one request may ask for."""
    max_images_per_request: int = limited("max_images_per_request")
    """Largest n of one request."""

    rules = (
        Rule(
            cel="!has(self.sizes) || self.sizes.all(s, s.split('x').all(side,"
            " int(side) % 8 == 0 && int(side) >= 64 && int(side) <= 4096))",
            check=lambda r: all(int(side) % 8 == 0 and 64 <= int(side) <= 4096
                                for size in r.sizes or [] for side in size.split("x")),
            field=".sizes",
            message="sizes are WIDTHxHEIGHT, each side a multiple of 8 in 64..4096 "
            "(the latents are an eighth of the image)",
        ),
    )


class PipelineSpec(KubeModel):
    """How the inference server runs the pipeline."""

    compile: CompileSpec = defaulted()
    """torch.compile settings."""
    attention: Attention = "Flash"
    """Scaled-dot-product attention backend (Auto lets PyTorch choose)."""
    cache: DenoiserCacheSpec = defaulted()
    """Cache hooks on the denoiser (diffusers'); none by default."""
    stages: StagesSpec = defaulted()
    """Stage threading and batching."""
    defaults: GenerationDefaults = defaulted()
    """Defaults for requests that leave parameters out."""
    limits: RequestLimits = defaulted()
    """What one request may ask for: the work a single request can cost."""

    # The defaults must be a request the limits admit: the server warms up with them.
    rules = (
        Rule(
            cel=(
                "!has(self.limits) || !has(self.limits.maxPixels) || !has(self.defaults)"
                " || self.defaults.width * self.defaults.height <= self.limits.maxPixels"
            ),
            check=lambda p: p.limits.max_pixels is None
            or p.defaults.width * p.defaults.height <= p.limits.max_pixels,
            field=".limits.maxPixels",
            message="limits.maxPixels must hold defaults.width x defaults.height",
        ),
        Rule(
            # A listed size above it would be compiled at start and refused to every request.
            cel=(
                "!has(self.limits) || !has(self.limits.maxPixels) || !has(self.limits.sizes)"
                " || self.limits.sizes.all(s, int(s.split('x')[0]) * int(s.split('x')[1])"
                " <= self.limits.maxPixels)"
            ),
            check=lambda p: p.limits.max_pixels is None or all(
                math.prod(int(side) for side in size.split("x")) <= p.limits.max_pixels
                for size in p.limits.sizes or []),
            field=".limits.maxPixels",
            message="limits.maxPixels must hold every size of limits.sizes",
        ),
        Rule(
            cel=(
                "!has(self.limits) || !has(self.defaults) || !has(self.limits.maxSteps)"
                " || !has(self.defaults.steps) || self.defaults.steps <= self.limits.maxSteps"
            ),
            check=lambda p: p.defaults.steps <= p.limits.max_steps,
            field=".limits.maxSteps",
            message="limits.maxSteps must not be below defaults.steps",
        ),
        Rule(
            cel=(
                "!has(self.cache) || !has(self.cache.method)"
                f" || !(self.cache.method in {_cel_list(STEP_COUNTING_CACHES)})"
                " || !has(self.stages) || !has(self.stages.batching)"
                " || self.stages.batching == 'Request'"
            ),
            check=lambda p: p.cache.method not in STEP_COUNTING_CACHES
            or p.stages.batching == "Request",
            field=".cache.method",
            message="cache methods other than FirstBlockCache need stages.batching Request: "
            "their hooks follow one batch's steps, and with Step requests join at other steps",
        ),
        Rule(
            cel=(
                "!has(self.cache) || !has(self.cache.method)"
                f" || !(self.cache.method in {_cel_list(UNCOMPILED_CACHES)})"
                " || (has(self.compile) && has(self.compile.enabled) && !self.compile.enabled)"
            ),
            check=lambda p: p.cache.method not in UNCOMPILED_CACHES or not p.compile.enabled,
            field=".cache.method",
            message="cache methods other than FirstBlockCache need compile.enabled false: "
            "their hooks run outside torch.compile and decide each step in Python",
        ),
        Rule(
            cel=(
                "!has(self.compile) || !has(self.compile.aot) || !self.compile.aot"
                " || !has(self.cache) || !has(self.cache.method) || self.cache.method == 'None'"
            ),
            check=lambda p: not p.compile.aot or p.cache.method == "None",
            field=".compile.aot",
            message="compile.aot does not go with a cache: the package holds the plain "
            "denoiser's graph, and the cache's hooks change it",
        ),
    )


# --- spec: GPU -----------------------------------------------------------------------


class GpuSharing(KubeModel):
    """Time-sharing or NVIDIA MPS on each GPU (or on each MIG slice); both fields are required."""

    strategy: SharingStrategy
    """TimeSharing (GPU time slices; memory shared, not isolated, so the planner counts a
    pod 1/N of it) or MPS (concurrent kernels, memory split per client; its pods run with hostIPC, so their namespace needs the privileged
    Pod Security level)."""
    max_shared_clients_per_gpu: int = Field(ge=gke.MIN_SHARED_CLIENTS, le=gke.MAX_SHARED_CLIENTS)
    """Pods sharing each GPU (or each MIG slice): 2..48."""


def _mig_rules() -> tuple[Rule, ...]:
    only_mig_types = Rule(
        cel=f"!has(self.partitionSize) || self.type in {_cel_list(MIG_GPU_TYPES)}",
        check=lambda g: g.partition_size is None or g.type in MIG_GPU_TYPES,
        field=".partitionSize",
        reason="FieldValueForbidden",
        message=(
            "partitionSize (multi-instance GPU) needs a MIG-capable gpu.type: "
            + ", ".join(MIG_GPU_TYPES)
        ),
    )
    per_type = tuple(
        Rule(
            cel=(
                f"self.type != '{gpu_type}' || !has(self.partitionSize)"
                f" || self.partitionSize in {_cel_list(list(gke.mig_sizes(gpu_type)))}"
            ),
            check=lambda g, t=gpu_type: (
                g.type != t or g.partition_size is None or g.partition_size in gke.mig_sizes(t)
            ),
            field=".partitionSize",
            message=f"partitionSize on {gpu_type} must be one of "
            + ", ".join(gke.mig_sizes(gpu_type)),
        )
        for gpu_type in MIG_GPU_TYPES
    )
    return (only_mig_types, *per_type)


class GpuSpec(KubeModel):
    """The GPUs each replica runs on, and how they are shared."""

    type: GpuType
    """GKE accelerator type (the cloud.google.com/gke-accelerator node label)."""
    count_per_node: GpuCount = 1
    """Physical GPUs per node; each serving pod still uses one GPU (or slice)."""
    partition_size: MigSize | None = None
    """Multi-instance GPU (MIG) slice size, e.g. 1g.10gb; only on A100, H100 and H200,
    with that type's sizes."""
    sharing: GpuSharing | None = None
    """Time-sharing or MPS on each GPU, or on each MIG slice when partitionSize is set."""

    rules = _mig_rules()

    def sharing_summary(self) -> str:
        """Short form for status.sharing (the Sharing column)."""
        sharing = self.sharing
        return sharing_summary(
            self.partition_size,
            sharing.strategy if sharing else None,
            sharing.max_shared_clients_per_gpu if sharing else None,
        )


# --- spec: node pool, scaling, server ------------------------------------------------


class NodePoolSpec(KubeModel):
    """Where the GPU nodes come from."""

    provider: Provider = "GKE"
    """GKE (the GKE API), ConfigConnector (a ContainerNodePool object), Existing (a pool
    or node auto-provisioning already there) or Local (simulated nodes for development)."""
    name: str | None = Field(
        default=None, max_length=gke.NODEPOOL_NAME_MAX, pattern=gke.NODEPOOL_NAME_RE.pattern
    )
    """Node pool name; by default derived from the GPU configuration, so services with
    identical GPU settings share a pool."""
    # A rule rather than a pattern, as for the model's uri: its message says what is wrong.
    cluster: str | None = Field(default=None, max_length=256)
    """GKE cluster, projects/P/locations/L/clusters/C, for the GKE and ConfigConnector
    providers; by default the cluster the operator runs in (its gke.cluster chart value,
    or GKE's metadata server). Where the operator knows that cluster, another is refused:
    the serving pods run there."""
    machine_type: str | None = Field(default=None, max_length=63, pattern=MACHINE_TYPE_PATTERN)
    """Compute Engine machine type; by default derived from gpu.type and gpu.countPerNode."""
    spot: bool = False
    """Use Spot VMs (cheaper, may be preempted)."""
    flex_start: bool = False
    """Use Flex-start VMs (GKE's Dynamic Workload Scheduler): GPUs obtained as capacity frees
    up, at a discount; Compute Engine takes each node back after at most seven days (keep
    minNodes 2 or more). The GKE provider only (Local simulates it); not with spot."""
    locations: Annotated[
        list[Annotated[str, Field(pattern=gke.ZONE_PATTERN, max_length=63)]],
        AfterValidator(_unique_zones),
    ] | None = Field(
        default=None, min_length=1, max_length=gke.POOL_LOCATIONS_MAX,
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    """Zones of the pool's nodes (us-central1-a), in the cluster's region; by default the
    cluster's own zones. Not every zone has every GPU type: a pool of a GPU type that one
    of a regional cluster's zones lacks is refused by GKE, so name the zones that have it
    (gcloud compute accelerator-types list). Part of the derived pool name (other zones,
    another pool); the serving pods are kept to these zones with every provider."""
    min_nodes: int = Field(default=0, ge=0, le=1000)
    """Fewest nodes the pool autoscaler keeps."""
    max_nodes: int = Field(default=4, ge=1, le=1000)
    """Most nodes the pool autoscaler may create."""

    rules = (
        Rule(
            cel=f"!has(self.cluster) || self.cluster.matches({_cel_string(CLUSTER_PATTERN)})",
            check=lambda p: p.cluster is None
            or re.fullmatch(CLUSTER_PATTERN, p.cluster) is not None,
            field=".cluster",
            message=CLUSTER_MESSAGE,
        ),
        Rule(
            # has(): rules also run on partial objects (a default, an old stored object).
            cel="!has(self.minNodes) || !has(self.maxNodes) || self.minNodes <= self.maxNodes",
            check=lambda p: p.min_nodes <= p.max_nodes,
            field=".minNodes",
            message="minNodes must not exceed maxNodes",
        ),
        Rule(
            cel="!has(self.locations) || self.locations.all(z, "
                "z.substring(0, z.lastIndexOf('-')) == "
                "self.locations[0].substring(0, self.locations[0].lastIndexOf('-')))",
            check=lambda p: len({gke.region_of(z) for z in p.locations or []}) <= 1,
            field=".locations",
            message="locations must be zones of one region, the cluster's",
        ),
        Rule(
            # The cluster's location is its region, or a zone of it (gke.region_of).
            cel="!has(self.locations) || !has(self.cluster)"
                " || self.cluster.split('/').size() < 4 || self.locations.all(z, "
                "z.substring(0, z.lastIndexOf('-')) == "
                f"(self.cluster.split('/')[3].matches({_cel_string(gke.ZONE_PATTERN)})"
                " ? self.cluster.split('/')[3].substring(0, self.cluster.split('/')[3]"
                ".lastIndexOf('-')) : self.cluster.split('/')[3]))",
            check=lambda p: not (p.cluster and gke.zones_outside(p.cluster, p.locations or [])),
            field=".locations",
            message="locations must be zones in the region of nodePool.cluster",
        ),
        Rule(
            cel="!has(self.spot) || !has(self.flexStart) || !(self.spot && self.flexStart)",
            check=lambda p: not (p.spot and p.flex_start),
            field=".flexStart",
            message="flexStart and spot cannot both be set: a node is a Flex-start VM or a "
                    "Spot VM",
        ),
        Rule(
            cel="!has(self.flexStart) || !self.flexStart || !has(self.provider)"
            " || self.provider in ['GKE', 'Local']",
            check=lambda p: not p.flex_start or p.provider in ("GKE", "Local"),
            field=".flexStart",
            message="flexStart needs provider GKE (or Local, which simulates it): Config "
            "Connector's ContainerNodePool has no such field, and with Existing the operator "
            "makes no pool",
        ),
    )


class AutoscalingSpec(KubeModel):
    """Replica autoscaling on requests in flight (a HorizontalPodAutoscaler on the scale subresource)."""

    min_replicas: int = Field(default=1, ge=1, le=1000)
    """Fewest replicas."""
    max_replicas: int = Field(ge=1, le=1000)
    """Most replicas."""
    target_queue_depth: int = Field(default=4, ge=1, le=4096)
    """Requests in flight per replica (queued or being served) the autoscaler aims for."""

    rules = (
        Rule(
            cel="!has(self.minReplicas) || self.minReplicas <= self.maxReplicas",
            check=lambda a: a.min_replicas <= a.max_replicas,
            field=".minReplicas",
            message="minReplicas must not exceed maxReplicas",
        ),
    )


class SecretRef(KubeModel):
    """A Secret in the same namespace."""

    name: str = Field(max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)
    """Secret name."""


class SecretKeyRef(KubeModel):
    """A key of a Secret in the same namespace."""

    name: str = Field(max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)
    """Secret name."""
    key: str = Field(default="token", min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")
    """Key in the Secret."""


class ResourceRequirements(KubeModel):
    """CPU, memory and extra resources for the server container (nvidia.com/gpu is set
    by the operator, and for an hf:// model an ephemeral-storage request of its estimated
    download unless one is given here)."""

    requests: dict[str, Quantity] | None = Field(default=None, max_length=16)
    """Minimum resources, e.g. cpu: 4, memory: 32Gi."""
    limits: dict[str, Quantity] | None = Field(default=None, max_length=16)
    """Maximum resources, e.g. memory: 48Gi."""

    # The API server refuses such a Deployment; here it is refused where the user wrote it.
    rules = (
        Rule(
            cel=(
                "!has(self.requests) || !has(self.limits) || self.requests.all(k,"
                " !(k in self.limits) || quantity(string(self.requests[k]))"
                ".compareTo(quantity(string(self.limits[k]))) <= 0)"
            ),
            check=lambda r: _requests_within_limits(r.requests, r.limits),
            field=".requests",
            message="resources.requests must not exceed resources.limits for the same resource",
        ),
        Rule(
            cel="(!has(self.requests) || !('nvidia.com/gpu' in self.requests))"
            " && (!has(self.limits) || !('nvidia.com/gpu' in self.limits))",
            check=lambda r: gke.GPU_RESOURCE not in (r.requests or {})
            and gke.GPU_RESOURCE not in (r.limits or {}),
            field=".requests",
            message="resources must not name nvidia.com/gpu: every serving pod gets one GPU "
            "(or one shared slot of it), set by the operator from spec.gpu",
        ),
    )


def _requests_within_limits(requests: dict | None, limits: dict | None) -> bool:
    if not requests or not limits:
        return True
    return all(
        quantity_value(value) <= quantity_value(limits[key])
        for key, value in requests.items()
        if key in limits
    )


class ProvenanceSpec(KubeModel):
    """What each generated PNG says about how it was made."""

    metadata: bool = True
    """PNG text chunks with the generation parameters (prompt, seed, steps, size, model) and an
    XMP packet with IPTC's trainedAlgorithmicMedia digital source type. Metadata, not a
    watermark: it can be stripped."""
    signing_secret_ref: SecretRef | None = None
    """A kubernetes.io/tls Secret (tls.crt: the PEM certificate chain, leaf first; tls.key: its
    key) with which each PNG gets a signed C2PA manifest declaring it trainedAlgorithmicMedia;
    no manifest when unset. A certificate that cannot sign keeps the server from starting."""
    signing_algorithm: Literal["ES256", "ES384", "ES512", "PS256", "PS384", "PS512",
                               "Ed25519"] = "ES256"
    """The signature algorithm; it must match the key."""


# Label keys are qualified names whose name part is at most 63 characters.
LABEL_VALUE_PATTERN = rf"^({_NAME_PART})?$"
LABEL_KEY_PATTERN = rf"^{_DNS_SUBDOMAIN_PREFIX}[A-Za-z0-9]([-A-Za-z0-9_.]{{0,61}}[A-Za-z0-9])?$"
def _label_keys_rule(field: str, attribute: str, example: str) -> Rule:
    """The keys of the label map ``field`` (``attribute`` in Python) are label keys."""
    return Rule(
        cel=f"!has(self.{field}) || self.{field}.all(k, size(k) <= 253 && "
            f"k.matches({_cel_string(LABEL_KEY_PATTERN)}))",
        check=lambda m: all(len(k) <= 253 and re.fullmatch(LABEL_KEY_PATTERN, k)
                            for k in getattr(m, attribute) or {}),
        field=f".{field}",
        message="a label key is an optional DNS subdomain and '/', then at most 63 "
        "letters, digits, '-', '_' or '.', starting and ending with a letter or digit "
        f"(e.g. {example})",
    )


def _network_cidr(cidr: str) -> bool:
    """What the CRD's CEL takes (isCIDR, no bits beyond the prefix): one network, written as
    such, IPv4 or IPv6 (not an IPv4-mapped one, nor with a zone)."""
    import ipaddress

    # Go's netip.ParsePrefix (what CEL's cidr() runs): a prefix length, in decimal without
    # a leading zero, never left out nor written as a mask, which Python would take.
    _, slash, bits = cidr.partition("/")
    if not slash or not (bits.isascii() and bits.isdigit()) or (bits != "0" and bits[0] == "0"):
        return False
    try:
        network = ipaddress.ip_network(cidr, strict=True)
    except ValueError:
        return False
    return "%" not in cidr and not (network.version == 6 and network.network_address.ipv4_mapped)


class SelectorRequirement(KubeModel):
    """A label selector's requirement: a key, an operator and values."""

    key: str = Field(max_length=253, pattern=LABEL_KEY_PATTERN)
    """The label key, e.g. kubernetes.io/metadata.name."""
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    """In or NotIn the values; Exists or DoesNotExist (without values)."""
    values: list[Annotated[str, Field(max_length=63, pattern=LABEL_VALUE_PATTERN)]] | None = (
        Field(default=None, max_length=16))
    """Label values, for In and NotIn."""

    rules = (
        Rule(
            cel="(self.operator in ['In', 'NotIn']) == (has(self.values) && size(self.values) > 0)",
            check=lambda r: (r.operator in ("In", "NotIn")) == bool(r.values),
            field=".values",
            message="values are given with In and NotIn, and only with them",
        ),
    )


class LabelSelector(KubeModel):
    """Objects by their labels; say matchLabels: {} for every one (an empty selector is
    refused: it is what a misspelt field leaves once the API server drops it)."""

    match_labels: dict[str, Annotated[str, Field(max_length=63, pattern=LABEL_VALUE_PATTERN)]] | None = (
        Field(default=None, max_length=16))
    """Label key and value each selected object has, e.g.
    kubernetes.io/metadata.name: gateway for the namespace named gateway."""
    match_expressions: list[SelectorRequirement] | None = Field(
        default=None, min_length=1, max_length=16)
    """Requirements each selected object meets, all of them."""

    rules = (
        _label_keys_rule("matchLabels", "match_labels", "kubernetes.io/metadata.name"),
        Rule(
            cel="has(self.matchLabels) || has(self.matchExpressions)",
            check=lambda s: s.match_labels is not None or s.match_expressions is not None,
            field=".matchLabels",
            message="a selector has matchLabels or matchExpressions; matchLabels: {} selects "
            "every one",
        ),
    )


class CidrBlock(KubeModel):
    """An IP range."""

    cidr: str = Field(max_length=64)
    """The range in CIDR notation, its network address first, e.g. 10.8.0.0/14 or
    2001:db8::/64."""

    rules = (
        Rule(
            # Kubernetes' CIDR library (CRD rules on 1.31 and later).
            cel="isCIDR(self.cidr) && cidr(self.cidr) == cidr(self.cidr).masked()",
            check=lambda b: _network_cidr(b.cidr),
            field=".cidr",
            message="cidr is a network in CIDR notation, no bits set beyond its prefix "
            "(10.8.0.0/14, 2001:db8::/64; one address: 10.8.1.2/32)",
        ),
    )


class TrafficSource(KubeModel):
    """Who may send requests, as a NetworkPolicy peer: pods (podSelector: of this namespace,
    or of the namespaces namespaceSelector selects), or an IP range (ipBlock)."""

    namespace_selector: LabelSelector | None = None
    """The namespaces whose pods may call; matchLabels: {} for every namespace."""
    pod_selector: LabelSelector | None = None
    """The pods that may call (in this namespace unless namespaceSelector is set)."""
    ip_block: CidrBlock | None = None
    """Addresses that may call (outside the cluster, or nodes: pod addresses are
    rewritten by some load balancers)."""

    rules = (
        Rule(
            cel="has(self.ipBlock) != (has(self.namespaceSelector) || has(self.podSelector))",
            check=lambda t: (t.ip_block is not None)
            != (t.namespace_selector is not None or t.pod_selector is not None),
            field=".ipBlock",
            message="a source is pods (namespaceSelector, podSelector) or an ipBlock: "
            "one of the two",
        ),
    )

    def admits_all(self) -> bool:
        """Whether it lets every pod of the cluster in (every namespace's every pod), or
        every address."""
        if self.ip_block is not None:
            return self.ip_block.cidr in ("0.0.0.0/0", "::/0")
        return _selects_all(self.namespace_selector) and (
            self.pod_selector is None or _selects_all(self.pod_selector))


def _selects_all(selector: LabelSelector | None) -> bool:
    return selector is not None and not selector.match_labels and not selector.match_expressions


class ServerSpec(KubeModel):
    """The inference server container."""

    image: str | None = Field(default=None, max_length=512, pattern=r"^[^\s]+$")
    """Container image; the operator's configured server image when unset."""
    image_pull_secrets: list[SecretRef] | None = Field(default=None, min_length=1, max_length=8)
    """Secrets of type kubernetes.io/dockerconfigjson the serving pods (and the precompile
    Job) pull the image with, from a registry the nodes' own account cannot read."""
    port: int = Field(default=8080, ge=1, le=65535)
    """HTTP port of the server and its Service."""
    auth_secret_ref: SecretKeyRef | None = None
    """Secret holding the bearer token clients must send; no authentication when unset."""
    allow_from: list[TrafficSource] | None = Field(default=None, min_length=1, max_length=16)
    """Who may reach the server's port (its API and /metrics: list your Prometheus too when
    monitoring or autoscaling is on): a NetworkPolicy admits only these, besides the kubelet's probes,
    where the cluster enforces NetworkPolicies (GKE Dataplane V2 does). Unset: no policy,
    and any pod of the cluster may call it (then set authSecretRef)."""
    service_account_name: str | None = Field(
        default=None, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)
    """ServiceAccount the serving pods (and the precompile Job) run as, in the service's
    namespace: the one Workload Identity grants read access to a gs:// model's bucket, so
    that no other workload of the namespace gets it; the namespace's default when unset.
    Its token is not mounted: nothing in the pod calls the Kubernetes API."""
    resources: ResourceRequirements | None = None
    """Container resources beyond the GPU. For an hf:// model (or adapter) the operator asks
    for the local disk its download takes (ephemeral-storage: 6Gi for SD15, 13Gi for SDXL,
    15Gi for SD3, 32Gi for Flux, 1Gi an adapter) unless a request or limit is given here."""
    log_format: Literal["Text", "JSON"] = "Text"
    """The server's log lines: Text, or JSON (one object a line with the severity Cloud
    Logging reads; GKE's agent takes a plain line on stderr for an error)."""
    provenance: ProvenanceSpec = defaulted()
    """How generated images are marked as made by a model."""




class MonitoringSpec(KubeModel):
    """A Prometheus operator monitor for the servers' /metrics."""

    enabled: bool = True
    """Create the monitor; the cluster must run the Prometheus operator."""
    kind: Literal["ServiceMonitor", "PodMonitor"] = "ServiceMonitor"
    """ServiceMonitor scrapes through the Service, PodMonitor each pod directly."""
    interval: str = Field(default="30s", max_length=16, pattern=r"^[0-9]+(ms|s|m|h)$")
    """How often Prometheus scrapes, e.g. 15s."""
    labels: dict[str, Annotated[str, Field(max_length=63, pattern=LABEL_VALUE_PATTERN)]] | None = (
        Field(default=None, max_length=16))
    """Extra labels on the monitor, e.g. the one your Prometheus selects monitors by."""

    rules = (_label_keys_rule("labels", "labels", "release or example.com/team"),)


def _gke_table_rules() -> tuple[Rule, ...]:
    """What GKE's tables (gke.py) refuse, where the API server can look it up; the planner
    says the same of an object stored before these rules."""
    count = "(has(self.gpu.countPerNode) ? self.gpu.countPerNode : 1)"
    not_cloud = ("(has(self.nodePool) && has(self.nodePool.provider)"
                 f" && !(self.nodePool.provider in {_cel_list(sorted(CLOUD_PROVIDERS))}))")
    named_machine = "(has(self.nodePool) && has(self.nodePool.machineType))"
    shapes = {t: sorted(a.machine_types) for t, a in gke.ACCELERATORS.items()}
    spot_only = {t: sorted(n for n, m in a.machine_types.items()
                           if m in gke.SPOT_OR_FLEX_START_ONLY)
                 for t, a in gke.ACCELERATORS.items()}
    spot_only = {t: counts for t, counts in spot_only.items() if counts}

    def counted(table: dict[str, list[int]]) -> str:
        return " || ".join(f"(self.gpu.type == '{t}' && {count} in {counts})"
                           for t, counts in table.items()) or "false"

    def listed(table: dict[str, list[int]]) -> str:
        return "; ".join(f"{', '.join(map(str, n))} {t}" for t, n in table.items())

    def cloud_derived(s: ImageGenServiceSpec) -> bool:
        return s.node_pool.provider in CLOUD_PROVIDERS and s.node_pool.machine_type is None

    return (
        Rule(
            cel="!has(self.model.quantization) || self.model.quantization != 'Float8'"
            f" || self.gpu.type in {_cel_list(gke.fp8_types())}",
            check=lambda s: s.model.quantization != "Float8" or s.gpu.type in gke.fp8_types(),
            field=".model.quantization",
            message="model.quantization Float8 needs FP8 tensor cores, on gpu.type "
            + " or ".join(gke.fp8_types()) + "; elsewhere use Int8WeightOnly",
        ),
        Rule(
            cel=f"{not_cloud} || {named_machine} || {counted(shapes)}",
            check=lambda s: not cloud_derived(s) or s.gpu.count_per_node in shapes[s.gpu.type],
            field=".gpu.countPerNode",
            message=f"gpu.countPerNode: GKE's machine types carry {listed(shapes)} GPUs "
            "(or name one in nodePool.machineType)",
        ),
        Rule(
            cel=f"{not_cloud} || {named_machine}"
            " || (has(self.nodePool) && ((has(self.nodePool.spot) && self.nodePool.spot)"
            " || (has(self.nodePool.flexStart) && self.nodePool.flexStart)))"
            f" || !({counted(spot_only)})",
            check=lambda s: not cloud_derived(s) or s.node_pool.spot or s.node_pool.flex_start
            or s.gpu.count_per_node not in spot_only.get(s.gpu.type, []),
            field=".nodePool.spot",
            message="nodePool.spot or nodePool.flexStart: Compute Engine sells the machine "
            f"types of {listed(spot_only)} GPUs only as Spot or Flex-start VMs "
            "(or choose another gpu.countPerNode)",
        ),
    )


class ImageGenServiceSpec(KubeModel):
    """Desired state of an ImageGenService."""

    model: ModelSource
    """The model to serve."""
    pipeline: PipelineSpec = defaulted()
    """How the server runs the pipeline."""
    gpu: GpuSpec
    """GPU type and sharing."""
    node_pool: NodePoolSpec = defaulted()
    """Where the GPU nodes come from: by default a GKE node pool in the operator's own
    cluster."""
    replicas: int = Field(default=1, ge=0, le=1000)
    """Serving pods (the scale subresource; managed by the autoscaler when autoscaling is set)."""
    autoscaling: AutoscalingSpec | None = None
    """Scale replicas on requests in flight per pod; a fixed replica count when unset."""
    server: ServerSpec = defaulted()
    """The inference server container."""
    monitoring: MonitoringSpec | None = None
    """A ServiceMonitor or PodMonitor for the servers; none when unset."""

    rules = (
        Rule(
            cel=(
                "!has(self.pipeline) || !has(self.pipeline.compile)"
                " || !has(self.pipeline.compile.aot) || !self.pipeline.compile.aot"
                " || ((!has(self.model.quantization) || self.model.quantization == 'None')"
                " && (!has(self.model.loras) || size(self.model.loras) == 0))"
            ),
            check=lambda s: not s.pipeline.compile.aot
            or (s.model.quantization == "None" and not s.model.loras),
            field=".pipeline.compile.aot",
            message="pipeline.compile.aot does not go with model.loras or model.quantization: "
            "the package holds the plain denoiser's graph",
        ),
        Rule(
            # SD3's and Flux's transformers take latents in 2x2 patches of 8-pixel latents.
            cel=(
                "!has(self.model.family) || !(self.model.family in ['SD3', 'Flux'])"
                " || !has(self.pipeline) || ((!has(self.pipeline.defaults)"
                " || ((!has(self.pipeline.defaults.width) || self.pipeline.defaults.width % 16 == 0)"
                " && (!has(self.pipeline.defaults.height)"
                " || self.pipeline.defaults.height % 16 == 0)))"
                " && (!has(self.pipeline.limits) || !has(self.pipeline.limits.sizes)"
                " || self.pipeline.limits.sizes.all(s, s.split('x').all(side,"
                " int(side) % 16 == 0))))"
            ),
            check=lambda s: s.model.family not in ("SD3", "Flux") or (
                s.pipeline.defaults.width % 16 == 0 and s.pipeline.defaults.height % 16 == 0
                and all(int(side) % 16 == 0 for size in s.pipeline.limits.sizes or []
                        for side in size.split("x"))),
            field=".pipeline",
            message="SD3 and Flux take sizes in multiples of 16 (pipeline.defaults.width, "
            "height and pipeline.limits.sizes)",
        ),
        *_gke_table_rules(),
    )


# --- status --------------------------------------------------------------------------


class Condition(StatusModel):
    """One aspect of the service's state, in the shape of metav1.Condition."""

    type: str = Field(max_length=316, pattern=CONDITION_TYPE_PATTERN)
    """Condition type: Ready, NodePoolReady, Available, ..."""
    status: Literal["True", "False", "Unknown"]
    """Whether the condition holds."""
    reason: str = Field(max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    """CamelCase reason for the last transition."""
    message: str = Field(default="", max_length=32768)
    """Human-readable details."""
    last_transition_time: datetime
    """When status last changed."""
    observed_generation: int | None = Field(default=None, ge=0)
    """The metadata.generation this condition was computed from."""


class NodePoolRef(StatusModel):
    """A node pool."""

    name: str | None = None
    """Node pool name."""
    provider: str | None = None
    """Provider that manages it."""
    cluster: str | None = None
    """The GKE cluster it is in (GKE and ConfigConnector providers)."""
    created: bool | None = None
    """Whether its provider ever reported it made or being made. False: every ask was
    refused (no credentials, say), so deleting the service waits for no pool."""


class NodePoolStatus(NodePoolRef):
    """The node pool serving this service."""

    ready_nodes: int | None = None
    """Nodes ready to run pods; during a move, those of the pool moved to."""
    moving_to: NodePoolRef | None = None
    """During a move to a new pool (a new GPU configuration): that pool. The pool named
    above serves until the Deployment has moved, then goes if nobody else uses it."""
    releasing: list[NodePoolRef] | None = Field(default=None, max_length=16)
    """Other pools this service left (a move an edit turned elsewhere) that are being
    deleted; the operator finishes their deletion from this record."""


class CapacityStatus(StatusModel):
    """Serving slots the node pool is planned to offer at its largest."""

    slots_per_gpu: int | None = None
    """Pods per physical GPU (MIG partitions x shared clients)."""
    gpus: int | None = None
    """Physical GPUs in the pool at its planned largest (with autoscaling, at
    maxReplicas); nodePool.readyNodes says how many nodes it has now."""
    slots: int | None = None
    """GPU slots the pool offers at its largest, one pod each (slotsPerGpu x gpus). Fewer
    pods run on a
    node whose CPU, memory or local disk cannot take their requests (what plan calls
    RequestsExceedNode)."""


class ImageGenServiceStatus(StatusModel):
    """Observed state of an ImageGenService, written by the operator."""

    observed_generation: int | None = None
    """The metadata.generation the operator last acted on."""
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=16,
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    )
    """Ready, NodePoolReady, Available and more, each with its observedGeneration."""
    replicas: int | None = None
    """Serving pods that exist (the scale subresource's status replicas)."""
    ready_replicas: int | None = None
    """Serving pods that are ready."""
    selector: str | None = None
    """Label selector of the serving pods, as a string (for the scale subresource and HPA)."""
    sharing: str | None = None
    """GPU sharing in short form: exclusive, mig:1g.10gb, ts:2, mps:4, mig:1g.10gb+ts:2."""
    node_pool: NodePoolStatus | None = None
    """The node pool serving this service."""
    capacity: CapacityStatus | None = None
    """Serving slots the node pool offers."""
    endpoint: str | None = None
    """In-cluster URL of the service."""
    precompiled_job: str | None = None
    """The precompile Job that last succeeded: its artifacts are on the cache volume, and it
    is not run again, even once the Job itself is gone."""


# --- the resource --------------------------------------------------------------------


# The name is its Service's and its pods' app.kubernetes.io/instance label: a DNS-1035 label.
# The API server takes more for a custom resource (dots, a leading digit, 253 characters), so
# the CRD's rule (crd.py) and this one refuse such a name before anything is made.
NAME_PATTERN = "^[a-z]([-a-z0-9]*[a-z0-9])?$"
NAME_MAX_LENGTH = 63
NAME_RULE = (
    f"must be at most {NAME_MAX_LENGTH} lowercase letters, digits or '-', starting with a "
    "letter and ending with a letter or digit (a DNS-1035 label): it names the service's "
    "Service and labels its pods"
)


def _service_name(name: str) -> str:
    if name and (len(name) > NAME_MAX_LENGTH or not re.fullmatch(NAME_PATTERN, name)):
        raise ValueError(f"{name!r} {NAME_RULE}")
    return name


class ObjectMeta(StatusModel):
    """The parts of metadata the operator reads; the rest is ignored."""

    name: Annotated[str, AfterValidator(_service_name)] = ""
    """Object name."""
    namespace: str | None = None
    """Object namespace."""
    uid: str | None = None
    """Object UID (for owner references)."""
    generation: int | None = None
    """Spec generation (for observedGeneration)."""
    resource_version: str | None = None
    """Resource version."""
    labels: dict[str, str] = Field(default_factory=dict)
    """Object labels."""
    annotations: dict[str, str] = Field(default_factory=dict)
    """Object annotations."""


class ImageGenService(KubeModel):
    """A diffusion-model serving deployment on (shared) GPUs."""

    model_config = {"extra": "ignore"}

    api_version: Literal["imagegen.dev/v1alpha1"] = API_VERSION
    """API group and version."""
    kind: Literal["ImageGenService"] = KIND
    """Resource kind."""
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    """Standard object metadata."""
    spec: ImageGenServiceSpec
    """Desired state."""
    status: ImageGenServiceStatus | None = None
    """Observed state, written by the operator."""


class InvalidSpec(ValueError):
    """An object that breaks the API's rules; ``problems`` are ``path: message`` strings."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


def parse(body: Mapping[str, Any]) -> ImageGenService:
    """Read an ImageGenService body (as kopf or YAML gives it) with defaults applied.

    Raises InvalidSpec whose messages start with the offending field's path
    (``spec.gpu.partitionSize: ...``), as the API server's do.
    """
    try:
        return ImageGenService.model_validate(_plain(body))
    except ValidationError as err:
        raise InvalidSpec([_describe(e) for e in err.errors()]) from None


def _plain(value: Any) -> Any:
    # kopf hands over mapping views, not dicts; strict models accept only dicts.
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


# Errors in defaulted nested objects carry Python field names; users know the wire names.
_WIRE_NAMES = {
    name: field.alias or name
    for model in list(globals().values())
    if isinstance(model, type) and issubclass(model, KubeModel)
    for name, field in model.model_fields.items()
}


def _describe(error: Any) -> str:
    path = ""
    for part in error["loc"]:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            part = _WIRE_NAMES.get(part, part)
            path += f".{part}" if path else part
    field = (error.get("ctx") or {}).get("field_path", "")
    message = error["msg"].removeprefix("Value error, ")
    if field:
        # A rule's message names its field for the API server's report, which leads with
        # the object's path only; here the path already says it.
        message = message.removeprefix(f"{field.removeprefix('.')}: ")
    return f"{path}{field}: {message}"
