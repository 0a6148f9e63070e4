"""Capacity planning: from an ImageGenService spec to a Plan, with typed findings.

Pure arithmetic over the facts in ``gke.py``: how many serving pods ("slots")
one GPU holds, how many GPUs and nodes the replicas need, how many replicas the
pool holds at ``maxNodes``, whether the model fits one slot's memory, what the
nodes cost and which machine type and node-pool name the config maps to.

``plan(spec)`` takes the API model (or anything with the same attribute
names); ``make_plan(PlanInputs(...))`` works on plain values,
which is what the property tests and the CLI table use.

Memory footprint estimate (used only when ``model.memoryGiB`` is unset), in GiB::

    footprint = weights[family] * dtype_factor * (1 - denoiser_share[family])
              + weights[family] * denoiser_share[family] * quantized_factor
              + activations_per_megapixel[family] * dtype_factor
                * images * (pixels / 2**20)
              + CUDA_CONTEXT_GIB

``images`` is the most one batch holds: ``maxBatchSize`` (the server batches by images), or
``maxImagesPerRequest`` when larger (such a request runs alone). ``pixels`` are those of the
largest image a request may ask for: the largest of ``limits.sizes`` and the default size;
without a list, the default size for a compiled server, and for an uncompiled one
``limits.maxPixels`` or else the family's native size, where larger than the default.

``weights`` are the 16-bit weights of the whole pipeline (text encoders, the
denoiser and the VAE), rounded up: SD 1.5 about 1.1B parameters, SDXL about
3.5B, SD3 medium with its T5-XXL encoder about 7.5B, Flux.1 with T5-XXL about
17B. ``activations_per_megapixel`` is the peak working memory of one image
during denoise and VAE decode at one megapixel, rounded up from what diffusers
pipelines use with SDPA attention. ``dtype_factor`` is 1 for bfloat16/float16
and 2 for float32. ``denoiser_share`` is the UNet's or transformer's part of those weights
(SD 1.5's UNet 860M of 1.07B, SDXL's 2.6B of 3.5B, SD3 medium's 2B beside a 4.7B T5, Flux's 12B
of 17B): ``model.quantization`` stores only the denoiser in 8 bits, so its
``quantized_factor`` is 0.5 (8-bit against 16-bit weights), and ``dtype_factor`` when
unquantized. ``Auto`` means the family is only known at load time: the
planner then assumes SDXL and says so in a finding. These are estimates to catch
configurations that cannot work; set ``model.memoryGiB`` to plan on a measured
figure.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from pydantic.alias_generators import to_camel

from imagegen_operator import gke
from imagegen_operator.api import (
    CLOUD_PROVIDERS,
    POOL_PROVIDERS,
    ImageGenServiceSpec,
    quantity_value,
    sharing_summary,
)

# family -> (16-bit weights GiB, activations GiB per megapixel image)
FOOTPRINT_TABLE: dict[str, tuple[float, float]] = {
    "SD15": (2.5, 1.5),
    "SDXL": (7.0, 2.0),
    "SD3": (15.0, 2.5),
    "Flux": (33.0, 3.0),
}
# family -> the denoiser's share of those weights (what model.quantization stores in 8 bits)
DENOISER_SHARE: dict[str, float] = {"SD15": 0.8, "SDXL": 0.75, "SD3": 0.27, "Flux": 0.7}
QUANTIZED_FACTOR = 0.5
# family -> GiB one pod downloads for an hf:// model into its own emptyDir: the safetensors
# diffusers picks (no fp16 variants), rounded up. SD 1.5 about 5.5 GB (its UNet in 32 bits
# and the safety checker), SDXL about 13.9 GB (32 bits), SD3 medium about 15.5 GB (T5-XXL
# included), Flux.1 about 33.7 GB. An hf:// LoRA adapter: up to about 1 GiB.
DOWNLOAD_GIB: dict[str, int] = {"SD15": 6, "SDXL": 13, "SD3": 15, "Flux": 32}
LORA_DOWNLOAD_GIB = 1
AUTO_FAMILY_ASSUMED = "SDXL"
# family -> its native size in pixels, which an uncompiled server admits without a list or
# maxPixels (engine.py's max_pixels: the native size or the default, the larger)
NATIVE_PIXELS: dict[str, int] = {"SD15": 512 * 512, "SDXL": 1024 * 1024, "SD3": 1024 * 1024,
                                 "Flux": 1024 * 1024}
DTYPE_FACTOR = {"bfloat16": 1, "float16": 1, "float32": 2}
CUDA_CONTEXT_GIB = 0.75
# A model using more than this share of its slot leaves little room for
# fragmentation and compile workspaces: worth a warning.
TIGHT_FIT_SHARE = 0.9



# --- findings ---------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """A problem with a spec: ``reason`` (CamelCase) names its kind for conditions.

    ``blocking`` findings mean the Deployment cannot run as specified: the
    operator creates nothing and ``render`` refuses. ``fields`` are the spec
    paths a user would change.
    """

    message: str
    fields: tuple[str, ...]
    blocking: bool = True
    # The service can run, but never as specified: it waits for a person (kstatus'
    # Stalled), e.g. more replicas than the pool can ever hold.
    stalls: bool = False

    # Informational findings describe the plan rather than a problem with it.
    informational: ClassVar[bool] = False

    @property
    def reason(self) -> str:
        return type(self).__name__

    @property
    def severity(self) -> str:
        """error (blocks the Deployment), warning, or info."""
        if self.blocking:
            return "error"
        return "info" if self.informational else "warning"

    def to_dict(self) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "severity": self.severity,
            "blocking": self.blocking,
            "fields": list(self.fields),
            "message": self.message,
        }


class ModelDoesNotFitSlice(Finding):
    """The model's footprint exceeds the memory of one slot (slice or share of a GPU)."""


class ModelFitsTightly(Finding):
    """The model fits its slot with less than 10% to spare."""


class FootprintEstimated(Finding):
    """No model.memoryGiB: the plan uses the estimate table (informational)."""

    informational = True


class AutoscalingUnscraped(Finding):
    """An HPA on the servers' requests in flight, and no monitor for Prometheus to read it with
    (informational: the pods may be scraped another way)."""

    informational = True


class ServingUnauthenticated(Finding):
    """Neither a bearer token nor a NetworkPolicy guards the server's port: any pod of the
    cluster may call it. A warning: a cluster fenced otherwise, or a trial, may want that."""


class MachineTypeMismatch(Finding):
    """spec.nodePool.machineType does not carry spec.gpu.countPerNode GPUs of spec.gpu.type."""


class PoolTooSmall(Finding):
    """maxNodes cannot hold the replicas (or the autoscaler's maximum)."""


class NoMachineType(Finding):
    """GKE has no machine type with that many GPUs of this type."""


class MachineNeedsSpot(Finding):
    """A machine type Compute Engine creates only as Spot (or Flex-start) VMs, asked for on
    demand; or, not blocking, one that runs on demand only on reserved capacity."""


class FlexStartNeedsGke(Finding):
    """flexStart with a provider that cannot make Flex-start pools."""


class RequestsExceedNode(Finding):
    """A node's slots times the pods' CPU, memory or local disk requests are more than the
    node offers: the pods past that stay Pending however many slots are free."""


class TooManyPodsPerNode(Finding):
    """A node has more slots than GKE runs pods on one node: the pods past that stay
    Pending, and the node count is that much short."""


class FlexStartOnOneNode(Finding):
    """Flex-start nodes end after seven days: a service on one node ends with it."""


class MigNotSupported(Finding):
    """partitionSize on a GPU type without MIG."""


class UnknownPartitionSize(Finding):
    """partitionSize not offered by this GPU type."""


class SharingClientsOutOfRange(Finding):
    """maxSharedClientsPerGpu outside 2..48, or a strategy without a client count."""


class MpsClientsAboveSliceLimit(Finding):
    """NVIDIA lowers MPS's 48-client limit in proportion to a MIG compute instance's size."""


class QuantizationUnsupported(Finding):
    """model.quantization Float8 on a GPU type without FP8 tensor cores."""


class UnknownGpuType(Finding):
    """gpu.type not one of the six GKE accelerator names."""


# --- inputs and plan ----------------------------------------------------------


@dataclass(frozen=True)
class PlanInputs:
    """Everything the planner reads, as plain values (the spec's field paths in comments)."""

    gpu_type: str  # gpu.type
    count_per_node: int = 1  # gpu.countPerNode
    partition_size: str | None = None  # gpu.partitionSize
    sharing_strategy: str | None = None  # gpu.sharing.strategy: TimeSharing | MPS
    max_shared_clients: int | None = None  # gpu.sharing.maxSharedClientsPerGpu
    replicas: int = 1  # replicas
    max_replicas: int | None = None  # autoscaling.maxReplicas
    min_replicas: int | None = None  # autoscaling.minReplicas
    provider: str = "GKE"  # nodePool.provider
    nodepool_name: str | None = None  # nodePool.name
    machine_type: str | None = None  # nodePool.machineType
    spot: bool = False  # nodePool.spot
    flex_start: bool = False  # nodePool.flexStart
    locations: tuple[str, ...] = ()  # nodePool.locations
    min_nodes: int = 0  # nodePool.minNodes
    max_nodes: int | None = None  # nodePool.maxNodes
    monitored: bool = True  # monitoring set and enabled (or no autoscaling to feed)
    guarded: bool = True  # server.authSecretRef, or a server.allowFrom not admitting every pod
    family: str = "Auto"  # model.family
    dtype: str = "bfloat16"  # model.dtype
    memory_gib: float | None = None  # model.memoryGiB
    quantization: str = "None"  # model.quantization
    # Whether the API would take a quantization for it: not beside model.loras, nor with
    # pipeline.compile.aot.
    quantizable: bool = True
    max_batch_size: int = 1  # pipeline.stages.maxBatchSize
    max_images_per_request: int = 1  # pipeline.limits.maxImagesPerRequest
    width: int = 1024  # pipeline.defaults.width
    height: int = 1024  # pipeline.defaults.height
    sizes: tuple[str, ...] = ()  # pipeline.limits.sizes
    max_pixels: int | None = None  # pipeline.limits.maxPixels
    compiled: bool = False  # pipeline.compile.enabled: no list then admits the default size only
    cpu_request: float | None = None  # server.resources.requests.cpu, in cores
    memory_request_gib: float | None = None  # server.resources.requests.memory
    # server.resources.requests.ephemeral-storage, else what each pod downloads from the hub
    # (hub_download_gib), which the Deployment requests
    disk_request_gib: float | None = None


@dataclass(frozen=True)
class Cost:
    """Estimated USD per hour for a number of nodes (see gke.PRICE_TABLE_DATE)."""

    nodes: int
    on_demand: float
    spot: float


@dataclass(frozen=True)
class Plan:
    gpu_type: str
    accelerator: str
    count_per_node: int
    partition_size: str | None
    sharing_strategy: str | None
    clients_per_gpu: int  # clients per physical GPU, or per MIG slice when both are set
    sharing: str  # short form for printer columns: exclusive, mig:1g.10gb+ts:2, mps:4
    partitions_per_gpu: int
    slots_per_gpu: int
    slots_per_node: int
    # Serving pods a node holds: a pod per slot while GKE runs that many pods on a node and
    # its CPU and memory take their requests (else fewer, and a finding says why).
    pods_per_node: int
    replicas: int
    target_replicas: int  # replicas, or autoscaling.maxReplicas when autoscaling is set
    floor_replicas: int  # what runs whatever the load: replicas, or autoscaling.minReplicas
    gpus_needed: int  # whole GPUs holding target_replicas
    nodes_needed: int
    max_nodes: int | None
    replicas_at_max_nodes: int | None
    gpu_memory_gib: float  # what CUDA reports of one whole GPU
    slot_memory_gib: float
    footprint_gib: float
    footprint_source: str  # "spec.model.memoryGiB" or "estimate:<family>/<dtype>"
    mps_thread_percentage: int | None
    mps_pinned_memory_mib: int | None
    machine_type: str | None
    nodepool_name: str
    spot: bool
    cost: Cost  # for the nodes floor_replicas need, at least nodePool.minNodes
    cost_at_max_nodes: Cost | None
    findings: tuple[Finding, ...] = field(default_factory=tuple)
    flex_start: bool = False
    locations: tuple[str, ...] = ()  # the pool's zones; empty: the cluster's

    @property
    def blocking(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.blocking)

    @property
    def stalling(self) -> tuple[Finding, ...]:
        """Findings that leave the service running short of its spec until a person acts."""
        return tuple(f for f in self.findings if f.stalls and not f.blocking)

    @property
    def warnings(self) -> tuple[Finding, ...]:
        """Problems that do not stop the Deployment (degraded, risky), without the notes."""
        return tuple(f for f in self.findings if not f.blocking and not f.informational)

    @property
    def workable(self) -> bool:
        return not self.blocking

    @property
    def max_pods_per_node(self) -> int:
        """What a pool the operator makes runs on a node (gke.max_pods_per_node)."""
        return gke.max_pods_per_node(self.slots_per_node)

    @property
    def slots(self) -> int:
        """Slots on the GPUs the plan provisions (status.capacity.slots)."""
        return self.nodes_provisioned * self.slots_per_node

    @property
    def nodes_provisioned(self) -> int:
        """The nodes the replicas need, within what maxNodes lets the pool grow to."""
        if self.replicas_at_max_nodes is None or self.max_nodes is None:
            return self.nodes_needed
        return min(self.nodes_needed, self.max_nodes)

    def to_dict(self) -> dict[str, Any]:
        """The plan in the API's dialect: camelCase keys, as status and the spec spell them."""
        out = asdict(self)
        out["findings"] = [f.to_dict() for f in self.findings]
        out["locations"] = list(self.locations)
        out["workable"] = self.workable
        out["slots"] = self.slots
        return _camel_keys(out)


# Where the API spells a word its own way (nodePool, memoryGiB), the plan does too.
_API_SPELLING = {
    "nodepool_name": "nodePoolName",
    "footprint_gib": "footprintGiB",
    "gpu_memory_gib": "gpuMemoryGiB",
    "mps_pinned_memory_mib": "mpsPinnedMemoryMiB",
    "slot_memory_gib": "slotMemoryGiB",
}


def _camel_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {_API_SPELLING.get(k) or to_camel(k): _camel_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_camel_keys(v) for v in value]
    return value


# --- arithmetic ---------------------------------------------------------------


def sharing_clients(strategy: str | None, clients: int | None) -> int:
    """Pods per GPU (or per MIG slice) that sharing adds: 1 without a strategy."""
    return clients if strategy and clients else 1


def partitions_per_gpu(gpu_type: str, partition_size: str | None) -> int:
    if not partition_size:
        return 1
    return gke.mig_sizes(gpu_type).get(partition_size, 0)


def slots_per_gpu(
    gpu_type: str,
    partition_size: str | None,
    strategy: str | None,
    clients: int | None,
) -> int:
    """Allocatable nvidia.com/gpu per physical GPU: partitions x clients, as GKE reports it."""
    return partitions_per_gpu(gpu_type, partition_size) * sharing_clients(strategy, clients)


def slot_memory_gib(
    gpu_type: str, partition_size: str | None, strategy: str | None, clients: int | None
) -> float:
    """Memory one pod can count on: the slice (or GPU) divided among its sharing clients.

    Time-sharing does not partition memory, but every client loads its own
    copy of the model, so each can only rely on an equal share.
    """
    whole = (
        gke.usable_slice_gib(gpu_type, partition_size)
        if partition_size
        else gke.usable_gib(gpu_type)
    )
    return whole / sharing_clients(strategy, clients)


def mps_thread_percentage(clients: int) -> int:
    """CUDA_MPS_ACTIVE_THREAD_PERCENTAGE for an equal share: 100 / clients, floored."""
    return max(1, 100 // clients)


def mps_pinned_memory_mib(slot_gib: float) -> int:
    """Per-client device memory limit in MiB (floored, so the clients' sum fits)."""
    return int(slot_gib * 1024)


def estimate_footprint_gib(
    family: str, dtype: str, images: int, pixels: int, quantization: str = "None",
) -> float:
    if family not in FOOTPRINT_TABLE:
        family = AUTO_FAMILY_ASSUMED
    weights, activations = FOOTPRINT_TABLE[family]
    factor = DTYPE_FACTOR.get(dtype, 1)
    share = DENOISER_SHARE[family]
    denoiser_factor = factor if quantization == "None" else QUANTIZED_FACTOR
    megapixels = pixels / 2**20
    total = (
        weights * factor * (1 - share)
        + weights * share * denoiser_factor
        + activations * factor * images * megapixels
        + CUDA_CONTEXT_GIB
    )
    return round(total, 2)


def batch_images(i: PlanInputs) -> int:
    """The most images one batch holds: the server fills a batch up to maxBatchSize images,
    and runs a request of more alone."""
    return max(i.max_batch_size, i.max_images_per_request)


def largest_request(i: PlanInputs) -> tuple[int, str]:
    """The pixels of the largest image a request may ask for, and its words for findings."""
    default = f"{i.width}x{i.height}"
    if i.sizes:
        largest = max((default, *i.sizes), key=_pixels)
        return _pixels(largest), largest
    if not i.compiled:
        if i.max_pixels:
            most, words = i.max_pixels, f"{i.max_pixels} pixels (spec.pipeline.limits.maxPixels)"
        else:
            family = i.family if i.family in NATIVE_PIXELS else AUTO_FAMILY_ASSUMED
            most, words = NATIVE_PIXELS[family], f"the native size of {family}"
        if most > _pixels(default):
            return most, words
    return _pixels(default), default


def _pixels(size: str) -> int:
    return math.prod(int(side) for side in size.split("x"))


def default_nodepool_name(
    gpu_type: str,
    count_per_node: int,
    partition_size: str | None,
    strategy: str | None,
    clients: int | None,
    spot: bool,
    machine_type: str | None = None,
    flex_start: bool = False,
    locations: tuple[str, ...] = (),
) -> str:
    """A stable pool name from the GPU config, so identical configs share one pool.

    ``igs-h100x1-mig1g10gb-ts2-spot``: the accelerator, GPUs per node, MIG size,
    sharing, and Spot or Flex-start (``flex``). A machine type other than the derived one,
    and the zones, are part of the config too; they are folded into one short hash (the
    machine type alone hashes as it always has) to stay within GKE's 40 characters.
    """
    try:
        short = gke.accelerator(gpu_type).short_name
    except KeyError:
        short = "gpu"
    parts = [f"igs-{short}x{count_per_node}"]
    if partition_size:
        parts.append("mig" + partition_size.replace(".", ""))
    if strategy and clients:
        parts.append(f"{'ts' if strategy == 'TimeSharing' else 'mps'}{clients}")
    if spot:
        parts.append("spot")
    if flex_start:
        parts.append("flex")
    derived = gke.ACCELERATORS.get(gpu_type)
    derived_machine = derived.machine_types.get(count_per_node) if derived else None
    machine = machine_type if machine_type and machine_type != derived_machine else ""
    if machine or locations:
        folded = machine + ("|" + ",".join(sorted(locations)) if locations else "")
        parts.append(hashlib.sha256(folded.encode()).hexdigest()[:6])
    return "-".join(parts)[: gke.NODEPOOL_NAME_MAX].rstrip("-")


def nodes_cost(gpu_type: str, count_per_node: int, machine: str | None, nodes: int) -> Cost:
    acc = gke.accelerator(gpu_type)
    host = gke.machine_price(machine) if machine else None
    host_on_demand = host.on_demand if host else 0.0
    host_spot = host.spot if host else 0.0
    on_demand = nodes * (count_per_node * acc.gpu_usd_hour + host_on_demand)
    spot = nodes * (count_per_node * acc.gpu_spot_usd_hour + host_spot)
    return Cost(nodes=nodes, on_demand=round(on_demand, 2), spot=round(spot, 2))


# --- the planner --------------------------------------------------------------


def make_plan(inputs: PlanInputs) -> Plan:
    """The Plan for plain inputs; never raises on a bad spec, reports findings instead."""
    i = inputs
    findings: list[Finding] = []
    if i.gpu_type not in gke.ACCELERATORS:
        findings.append(
            UnknownGpuType(
                f"spec.gpu.type {i.gpu_type!r} is not a GKE accelerator; use one of "
                f"{', '.join(sorted(gke.ACCELERATORS))}",
                ("spec.gpu.type",),
            )
        )
        return _unplannable(i, findings)
    acc = gke.accelerator(i.gpu_type)
    findings += _check_gpu_config(i, acc)
    if i.quantization == "Float8" and not acc.fp8:
        findings.append(
            QuantizationUnsupported(
                f"spec.model.quantization Float8 needs FP8 tensor cores, which {i.gpu_type} "
                f"lacks; use Int8WeightOnly, or spec.gpu.type one of {', '.join(gke.fp8_types())}",
                ("spec.model.quantization", "spec.gpu.type"),
            )
        )
    strategy = i.sharing_strategy if i.max_shared_clients else None
    clients = sharing_clients(strategy, i.max_shared_clients)
    partitions = partitions_per_gpu(i.gpu_type, i.partition_size)
    per_gpu = partitions * clients
    per_node = per_gpu * i.count_per_node
    target = max(i.replicas, i.max_replicas or 0)
    machine = i.machine_type or gke.machine_type(i.gpu_type, i.count_per_node)
    # A node holds a pod per slot only while GKE runs that many pods on it and its CPU,
    # memory and local disk take their requests; the findings below say when it does not.
    fits = _requests_room(i, machine, per_node)
    pods = min(per_node, _pods_room(i), fits)

    nodes_needed = math.ceil(target / pods) if pods else 0
    # GPUs that hold a pod: a node's pods fill its GPUs slot by slot, the rest stay idle.
    gpus_needed = ((target // pods) * math.ceil(pods / per_gpu)
                   + math.ceil(target % pods / per_gpu)) if pods and per_gpu else 0
    # An Existing pool's size is its own (or node auto-provisioning's): maxNodes is not read.
    at_max = (i.max_nodes * pods if i.max_nodes is not None and i.provider != "Existing"
              else None)

    slot_gib = (
        slot_memory_gib(i.gpu_type, i.partition_size, strategy, i.max_shared_clients)
        if partitions
        else 0.0
    )
    if i.memory_gib is not None:
        footprint, source = float(i.memory_gib), "spec.model.memoryGiB"
    else:
        family = i.family if i.family in FOOTPRINT_TABLE else AUTO_FAMILY_ASSUMED
        footprint = estimate_footprint_gib(
            family, i.dtype, batch_images(i), largest_request(i)[0], i.quantization
        )
        source = f"estimate:{family}/{i.dtype}" + (
            "" if i.quantization == "None" else f"/{i.quantization}"
        )
        findings.append(_footprint_estimated(i, family, footprint))
    if partitions:
        findings += _check_fit(i, footprint, slot_gib, source)
    if at_max is not None and pods:
        findings += _check_pool(i, target, at_max, pods)

    if i.machine_type and (why := gke.machine_mismatch(i.gpu_type, i.count_per_node,
                                                        i.machine_type)):
        findings.append(MachineTypeMismatch(
            f"spec.nodePool.machineType {i.machine_type} cannot carry {i.count_per_node} "
            f"{i.gpu_type} GPU(s): {why}; drop it (the planner picks "
            f"{gke.machine_type(i.gpu_type, i.count_per_node) or 'none'}) or change "
            "spec.gpu.type or spec.gpu.countPerNode",
            ("spec.nodePool.machineType", "spec.gpu.type", "spec.gpu.countPerNode"),
        ))
    if machine is None:
        shapes = ", ".join(str(n) for n in sorted(acc.machine_types))
        findings.append(
            NoMachineType(
                f"GKE has no machine type with {i.count_per_node} {i.gpu_type} GPU(s); "
                f"spec.gpu.countPerNode must be one of {shapes} for this type",
                ("spec.gpu.countPerNode", "spec.nodePool.machineType"),
                blocking=i.provider in CLOUD_PROVIDERS,
            )
        )
    if machine is not None and i.provider in CLOUD_PROVIDERS and not (i.spot or i.flex_start):
        findings += _check_obtainable(machine, i)
    if i.provider != "Existing":
        findings += _check_node_room(i, machine, per_node, fits)
    findings += _check_pods_per_node(i, per_node)
    findings += _check_flex_start(i, nodes_needed)
    if i.max_replicas is not None and not i.monitored:
        findings.append(AutoscalingUnscraped(
            "spec.autoscaling scales on imagegen_requests_in_flight per pod, which the HPA "
            "reads through the custom metrics API (prometheus-adapter, say) from Prometheus; "
            "spec.monitoring is not set, so no monitor has Prometheus scrape these pods: set "
            "it, or scrape them another way",
            ("spec.autoscaling", "spec.monitoring"),
            blocking=False,
        ))
    if not i.guarded:
        findings.append(ServingUnauthenticated(
            "spec.server sets no authSecretRef, and no allowFrom or one that admits every "
            "pod: any pod of the cluster can call the server; set authSecretRef (a bearer "
            "token) or allowFrom (a NetworkPolicy) for the callers only",
            ("spec.server.authSecretRef", "spec.server.allowFrom"),
            blocking=False,
        ))
    mps = strategy == "MPS"
    return Plan(
        gpu_type=i.gpu_type,
        accelerator=acc.display_name,
        count_per_node=i.count_per_node,
        partition_size=i.partition_size,
        sharing_strategy=strategy,
        clients_per_gpu=clients,
        sharing=sharing_summary(i.partition_size, strategy, i.max_shared_clients),
        partitions_per_gpu=partitions,
        slots_per_gpu=per_gpu,
        slots_per_node=per_node,
        pods_per_node=pods,
        replicas=i.replicas,
        target_replicas=target,
        floor_replicas=_floor_replicas(i),
        gpus_needed=gpus_needed,
        nodes_needed=nodes_needed,
        max_nodes=i.max_nodes,
        replicas_at_max_nodes=at_max,
        gpu_memory_gib=round(gke.usable_gib(i.gpu_type), 2),
        slot_memory_gib=round(slot_gib, 3),
        footprint_gib=footprint,
        footprint_source=source,
        mps_thread_percentage=mps_thread_percentage(clients) if mps else None,
        mps_pinned_memory_mib=mps_pinned_memory_mib(slot_gib) if mps else None,
        machine_type=machine,
        nodepool_name=i.nodepool_name
        or default_nodepool_name(
            i.gpu_type,
            i.count_per_node,
            i.partition_size,
            strategy,
            i.max_shared_clients,
            i.spot,
            i.machine_type,
            i.flex_start,
            i.locations,
        ),
        spot=i.spot,
        flex_start=i.flex_start,
        locations=i.locations,
        # The nodes the pool runs: those the replicas need (an autoscaled service: its
        # floor, minReplicas; at most, cost_at_max_nodes), never fewer than minNodes.
        cost=nodes_cost(i.gpu_type, i.count_per_node, machine, _floor_nodes(i, pods)),
        cost_at_max_nodes=nodes_cost(i.gpu_type, i.count_per_node, machine, i.max_nodes)
        if at_max is not None
        else None,
        findings=tuple(findings),
    )


def _check_gpu_config(i: PlanInputs, acc: gke.Accelerator) -> list[Finding]:
    """The API server enforces these too; the planner repeats them for plain inputs."""
    out: list[Finding] = []
    if i.partition_size and not acc.mig_capable:
        out.append(
            MigNotSupported(
                f"spec.gpu.partitionSize {i.partition_size!r} needs a MIG-capable GPU; "
                f"{i.gpu_type} has no MIG (use A100, H100 or H200, or drop partitionSize)",
                ("spec.gpu.partitionSize", "spec.gpu.type"),
            )
        )
    elif i.partition_size and i.partition_size not in acc.mig_partitions:
        out.append(
            UnknownPartitionSize(
                f"spec.gpu.partitionSize {i.partition_size!r} is not offered by {i.gpu_type}; "
                f"use one of {', '.join(acc.mig_partitions)}",
                ("spec.gpu.partitionSize",),
            )
        )
    clients = i.max_shared_clients
    if i.sharing_strategy and not (
        clients and gke.MIN_SHARED_CLIENTS <= clients <= gke.MAX_SHARED_CLIENTS
    ):
        out.append(
            SharingClientsOutOfRange(
                f"spec.gpu.sharing.maxSharedClientsPerGpu must be "
                f"{gke.MIN_SHARED_CLIENTS}..{gke.MAX_SHARED_CLIENTS} with strategy "
                f"{i.sharing_strategy}; got {clients}",
                ("spec.gpu.sharing.maxSharedClientsPerGpu",),
            )
        )
    if (
        i.sharing_strategy == "MPS"
        and clients
        and i.partition_size in acc.mig_partitions
        and clients > (limit := gke.mps_client_limit(i.partition_size))
    ):
        out.append(
            MpsClientsAboveSliceLimit(
                f"spec.gpu.sharing.maxSharedClientsPerGpu {clients} exceeds the MPS client "
                f"limit of a {i.partition_size} slice (about {limit}); clients past it may "
                f"fail to start",
                ("spec.gpu.sharing.maxSharedClientsPerGpu", "spec.gpu.partitionSize"),
                # NVIDIA states the proportion, not an exact per-profile figure: warn only.
                blocking=False,
            )
        )
    return out


def _footprint_estimated(i: PlanInputs, family: str, footprint: float) -> Finding:
    assumed = f" (family Auto: assumed {family})" if i.family not in FOOTPRINT_TABLE else ""
    return FootprintEstimated(
        f"model footprint estimated at {footprint:g} GiB for {family}/{i.dtype}"
        f"{'' if i.quantization == 'None' else ' (denoiser ' + i.quantization + ')'}, a batch "
        f"of {batch_images(i)} images at {largest_request(i)[1]}{assumed} (the most a batch "
        f"holds: spec.pipeline.stages.maxBatchSize images, or one request's "
        f"spec.pipeline.limits.maxImagesPerRequest, at the largest size a request may ask "
        f"for); set spec.model.memoryGiB to plan on a measured figure",
        ("spec.model.memoryGiB", "spec.model.family"),
        blocking=False,
    )


def _slot_words(i: PlanInputs, slot_gib: float) -> str:
    where = f"a {i.partition_size} MIG slice" if i.partition_size else f"a {i.gpu_type} GPU"
    shown = math.floor(slot_gib * 100) / 100  # never shown as much as a need it lacks
    if i.sharing_strategy and i.max_shared_clients:
        return f"{shown:g} GiB ({where} shared by {i.max_shared_clients} clients)"
    return f"{shown:g} GiB ({where})"


def _check_flex_start(i: PlanInputs, nodes_needed: int) -> list[Finding]:
    """Flex-start pools are made through GKE's API only (Local simulates them), and a
    service on one node ends with that node's run."""
    if not i.flex_start:
        return []
    if i.provider not in ("GKE", "Local"):
        why = {
            "ConfigConnector": "Config Connector's ContainerNodePool has no flex-start field",
            "Existing": "with provider Existing the operator makes no pool, and it does not "
                        "rely on node auto-provisioning to make Flex-start ones",
        }[i.provider]
        return [FlexStartNeedsGke(
            f"spec.nodePool.flexStart needs spec.nodePool.provider GKE: {why}",
            ("spec.nodePool.flexStart", "spec.nodePool.provider"),
        )]
    if max(nodes_needed, i.min_nodes) < 2:
        return [FlexStartOnOneNode(
            f"every replica fits one node, and Compute Engine takes a Flex-start node back "
            f"after at most {gke.FLEX_START_MAX_RUN_DAYS} days, with the service on it, until "
            "the autoscaler gets another; set spec.nodePool.minNodes: 2 so the replicas "
            "spread over two nodes",
            ("spec.nodePool.minNodes",),
            blocking=False,
        )]
    return []


def _check_obtainable(machine: str, i: PlanInputs) -> list[Finding]:
    """On-demand nodes of a machine type Compute Engine sells otherwise never come up."""
    if machine in gke.SPOT_OR_FLEX_START_ONLY:
        others = sorted(n for n, m in gke.accelerator(i.gpu_type).machine_types.items()
                        if m not in gke.SPOT_OR_FLEX_START_ONLY)
        # A machine type the spec names stays whatever countPerNode says: that goes too.
        count = (f"spec.gpu.countPerNode {' or '.join(map(str, others))}"
                 + (" (without spec.nodePool.machineType)" if i.machine_type else ""))
        return [MachineNeedsSpot(
            f"Compute Engine creates {machine} only as Spot or Flex-start VMs; set "
            f"spec.nodePool.spot: true or spec.nodePool.flexStart: true, or "
            f"{count} for on-demand nodes",
            ("spec.nodePool.spot", "spec.nodePool.flexStart", "spec.gpu.countPerNode",
             *(("spec.nodePool.machineType",) if i.machine_type else ())),
        )]
    if machine in gke.RESERVED_ON_DEMAND_ONLY:
        return [MachineNeedsSpot(
            f"{machine} runs on demand only on capacity reserved for it: the pool's nodes "
            "come up only where the project has a matching Compute Engine reservation (GKE "
            "consumes one by default); without one, set spec.nodePool.spot: true or "
            "spec.nodePool.flexStart: true",
            ("spec.nodePool.spot", "spec.nodePool.flexStart"),
            blocking=False,
        )]
    return []


def _floor_nodes(i: PlanInputs, pods: int) -> int:
    """The nodes that run whatever the load: those the floor of replicas needs at ``pods`` a
    node, never fewer than minNodes nor more than maxNodes (for a pool the operator sizes)."""
    nodes = max(math.ceil(_floor_replicas(i) / pods) if pods else 0, i.min_nodes)
    if i.max_nodes is not None and i.provider != "Existing":
        nodes = min(nodes, i.max_nodes)
    return nodes


def _pods_room(i: PlanInputs) -> int:
    """Serving pods GKE runs on a node: what a pool the operator makes is made for (up to
    GKE's limit), else GKE's default; GKE's own pods taken."""
    most = (gke.MAX_PODS_PER_NODE_LIMIT if i.provider in POOL_PROVIDERS
            else gke.DEFAULT_MAX_PODS_PER_NODE)
    return most - gke.SYSTEM_PODS_PER_NODE


def _requests_room(i: PlanInputs, machine: str | None, per_node: int) -> int:
    """Serving pods whose requests a node of ``machine`` takes (``_node_resources``): per_node
    when the spec requests none of what the table knows of the node, or on an Existing pool."""
    if i.provider == "Existing":
        return per_node
    fits = [math.floor(allocatable / request) for request, allocatable, _ in
            _node_resources(i, machine) if request]
    return min([per_node, *fits])


def _node_resources(i: PlanInputs, machine: str | None) -> list[tuple[float | None, float, str]]:
    """(a pod's request, what a node offers, what) for what the table knows of ``machine``:
    CPU and memory by machine type; local disk on any node of a pool the operator makes,
    which has GKE's default boot disk."""
    room = gke.node_allocatable(machine) if machine else None
    out = [(i.cpu_request, room[0], "CPU"),
           (i.memory_request_gib, room[1], "memory")] if room else []
    if i.provider in POOL_PROVIDERS:
        out.append((i.disk_request_gib, gke.DEFAULT_EPHEMERAL_ALLOCATABLE_GIB, "local disk"))
    return out


def _check_pods_per_node(i: PlanInputs, per_node: int) -> list[Finding]:
    """Whether a node's worth of pods (one per slot) fits the pods GKE runs on one node."""
    room = _pods_room(i)
    if per_node <= room:
        return []
    made = i.provider in POOL_PROVIDERS
    most = room + gke.SYSTEM_PODS_PER_NODE
    if made:
        limit = (f"a pool runs at most {most} pods on a node (GKE's limit, which the pool is "
                 "made with)")
    else:
        limit = (f"GKE runs {most} pods on a node unless the cluster or the pool sets another "
                 "maximum")
    return [TooManyPodsPerNode(
        f"a node has {per_node} slot(s), one pod each, but {limit}, about "
        f"{gke.SYSTEM_PODS_PER_NODE} of them GKE's own: a node holds {room} serving pods, "
        "so the pool needs more nodes and the rest of each node's slots stay empty. Share "
        "each GPU among fewer clients "
        "(spec.gpu.sharing.maxSharedClientsPerGpu), or fewer GPUs per node "
        "(spec.gpu.countPerNode)",
        ("spec.gpu.sharing.maxSharedClientsPerGpu", "spec.gpu.countPerNode",
         "spec.gpu.partitionSize"),
        blocking=False,
    )]


def _check_node_room(i: PlanInputs, machine: str | None, per_node: int,
                     fits: int) -> list[Finding]:
    """Whether a node's worth of pods (one per slot) fits its allocatable CPU, memory and
    local disk; ``fits``: the pods it takes (``_requests_room``)."""
    if not per_node:
        return []
    over = [
        (f"{per_node} x {request:g} {unit} = {per_node * request:g} {unit} of the "
         f"{allocatable:.2f} {unit}{'' if what == 'CPU' else ' of ' + what} it offers", what)
        for request, allocatable, what in _node_resources(i, machine)
        if request and per_node * request > allocatable
        for unit in ("CPU" if what == "CPU" else "GiB",)
    ]
    if not over:
        return []
    held = (f"a node holds {fits} serving pod(s), so the pool needs more nodes and its "
            "other slots stay empty" if fits else "no serving pod fits a node at all")
    disk = any(what == "local disk" for _, what in over)
    article = "an" if machine and machine[0] in "aeiou" else "a"
    where = f"{article} {machine} node" if machine else "a node"
    boot = "; local disk on the default 100 GB boot disk of GKE" if disk else ""
    levers = ("lower spec.server.resources.requests, or share each GPU among fewer clients "
              "(spec.gpu.sharing.maxSharedClientsPerGpu)")
    if disk:
        levers = ("each pod downloads its hf:// model into its own emptyDir (an estimate unless "
                  "spec.server.resources sets ephemeral-storage): load it from gs:// or pvc:// "
                  "(spec.model.uri: mounted once, not copied into every pod), or " + levers)
    return [RequestsExceedNode(
        f"{where} has {per_node} slot(s), one pod each, but "
        f"{'; '.join(words for words, _ in over)} (GKE's reservations taken, before the "
        f"cluster's own pods{boot}): {held}. {levers[0].upper()}{levers[1:]}",
        ("spec.server.resources", "spec.gpu.sharing.maxSharedClientsPerGpu",
         "spec.gpu.partitionSize", *(("spec.model.uri",) if disk else ())),
        blocking=not fits,
    )]


def _batch_levers(i: PlanInputs) -> str:
    """What makes the estimate's batch smaller: the field its images come from, and the one
    its size does."""
    most = {"spec.pipeline.stages.maxBatchSize": i.max_batch_size,
            "spec.pipeline.limits.maxImagesPerRequest": i.max_images_per_request}
    images = " and ".join(f for f, n in most.items() if n == max(most.values()))
    words = largest_request(i)[1]
    size = ("spec.pipeline.limits.maxPixels" if words.endswith("maxPixels)")
            # A native size above the default is what an unset maxPixels admits.
            else "spec.pipeline.limits.maxPixels (unset: the native size), or sizes listed"
            if words.startswith("the native size")
            else "spec.pipeline.defaults size" if words == f"{i.width}x{i.height}"
            else "largest of spec.pipeline.limits.sizes")
    return f"a smaller {images} or a smaller {size}"


def _check_fit(i: PlanInputs, footprint: float, slot_gib: float, source: str) -> list[Finding]:
    fields = (
        "spec.model.memoryGiB" if source == "spec.model.memoryGiB" else "spec.model.family",
        "spec.gpu.partitionSize",
        "spec.gpu.sharing.maxSharedClientsPerGpu",
        "spec.gpu.type",
    )
    if footprint > slot_gib:
        levers = [f"a larger spec.gpu.{'partitionSize' if i.partition_size else 'type'}"]
        if i.max_shared_clients:
            levers.append("fewer spec.gpu.sharing.maxSharedClientsPerGpu")
        if i.quantization == "None" and i.quantizable:
            levers.append("spec.model.quantization Int8WeightOnly (the denoiser in 8 bits"
                          + (", then measure spec.model.memoryGiB again)"
                             if source == "spec.model.memoryGiB" else ")"))
        if source != "spec.model.memoryGiB":
            levers.append(_batch_levers(i))
        choices = (f"{', '.join(levers[:-1])} or {levers[-1]}" if len(levers) > 1
                   else levers[0])
        return [
            ModelDoesNotFitSlice(
                f"the model needs {math.ceil(footprint * 100) / 100:g} GiB ({source}) but one "
                f"slot has {_slot_words(i, slot_gib)}; choose {choices}",
                fields,
            )
        ]
    if footprint > TIGHT_FIT_SHARE * slot_gib:
        return [
            ModelFitsTightly(
                f"the model needs {footprint:g} GiB ({source}) of a slot's "
                f"{_slot_words(i, slot_gib)}: less than 10% headroom",
                fields,
                blocking=False,
            )
        ]
    return []


def _floor_replicas(i: PlanInputs) -> int:
    """What must run whatever the load: replicas, or the autoscaler's floor."""
    return i.replicas if i.max_replicas is None else (i.min_replicas or 1)


def _check_pool(i: PlanInputs, target: int, at_max: int, per_node: int) -> list[Finding]:
    if target <= at_max:
        return []
    floor = _floor_replicas(i)
    stalls = floor > at_max
    if stalls:
        wanted = "spec.autoscaling.minReplicas" if i.max_replicas is not None else "spec.replicas"
        count = floor
    else:  # autoscaled: the most it scales to, or a spec.replicas above that for now
        wanted = ("spec.autoscaling.maxReplicas" if target == i.max_replicas
                  else "spec.replicas")
        count = target
    needed = math.ceil(count / per_node)
    return [
        PoolTooSmall(
            f"{wanted}={count} needs {needed} node(s) of {per_node} serving pod(s) but "
            f"spec.nodePool.maxNodes={i.max_nodes} holds {at_max} replica(s); raise "
            f"spec.nodePool.maxNodes to {needed} or lower {wanted}",
            (wanted, "spec.nodePool.maxNodes"),
            # Some replicas pending is degraded, not broken; no capacity at all is broken.
            blocking=at_max == 0 and target > 0,
            stalls=stalls,
        )
    ]


def _unplannable(i: PlanInputs, findings: list[Finding]) -> Plan:
    return Plan(
        gpu_type=i.gpu_type,
        accelerator="unknown",
        count_per_node=i.count_per_node,
        partition_size=i.partition_size,
        sharing_strategy=i.sharing_strategy,
        clients_per_gpu=sharing_clients(i.sharing_strategy, i.max_shared_clients),
        sharing=sharing_summary(i.partition_size, i.sharing_strategy, i.max_shared_clients),
        partitions_per_gpu=0,
        slots_per_gpu=0,
        slots_per_node=0,
        pods_per_node=0,
        replicas=i.replicas,
        target_replicas=max(i.replicas, i.max_replicas or 0),
        floor_replicas=_floor_replicas(i),
        gpus_needed=0,
        nodes_needed=0,
        max_nodes=i.max_nodes,
        replicas_at_max_nodes=None,
        gpu_memory_gib=0,
        slot_memory_gib=0.0,
        footprint_gib=float(i.memory_gib or 0),
        footprint_source="unknown",
        mps_thread_percentage=None,
        mps_pinned_memory_mib=None,
        machine_type=i.machine_type,
        nodepool_name=i.nodepool_name
        or default_nodepool_name(
            i.gpu_type,
            i.count_per_node,
            i.partition_size,
            i.sharing_strategy,
            i.max_shared_clients,
            i.spot,
            i.machine_type,
            i.flex_start,
            i.locations,
        ),
        spot=i.spot,
        flex_start=i.flex_start,
        locations=i.locations,
        cost=Cost(0, 0.0, 0.0),
        cost_at_max_nodes=None,
        findings=tuple(findings),
    )


# --- from the API model -------------------------------------------------------


def inputs_from_spec(spec: ImageGenServiceSpec) -> PlanInputs:
    """PlanInputs from a parsed spec (api.parse applied every default already)."""
    gpu, pool, autoscaling = spec.gpu, spec.node_pool, spec.autoscaling
    sharing = gpu.sharing
    pipeline = spec.pipeline
    return PlanInputs(
        gpu_type=gpu.type,
        count_per_node=gpu.count_per_node,
        partition_size=gpu.partition_size,
        sharing_strategy=sharing.strategy if sharing else None,
        max_shared_clients=sharing.max_shared_clients_per_gpu if sharing else None,
        replicas=spec.replicas,
        max_replicas=autoscaling.max_replicas if autoscaling else None,
        min_replicas=autoscaling.min_replicas if autoscaling else None,
        provider=pool.provider,
        nodepool_name=pool.name,
        machine_type=pool.machine_type,
        spot=pool.spot,
        flex_start=pool.flex_start,
        # Sorted: services naming the same zones in another order share the pool and
        # render it alike (no object rewritten by each in turn).
        locations=tuple(sorted(pool.locations or ())),
        min_nodes=pool.min_nodes,
        max_nodes=pool.max_nodes,
        monitored=spec.monitoring is not None and spec.monitoring.enabled,
        guarded=spec.server.auth_secret_ref is not None or bool(spec.server.allow_from) and not any(
            source.admits_all() for source in spec.server.allow_from),
        family=spec.model.family,
        dtype=spec.model.dtype,
        memory_gib=spec.model.memory_gib,
        quantization=spec.model.quantization,
        quantizable=not spec.model.loras and not pipeline.compile.aot,
        max_batch_size=pipeline.stages.max_batch_size,
        max_images_per_request=pipeline.limits.max_images_per_request,
        width=pipeline.defaults.width,
        height=pipeline.defaults.height,
        sizes=tuple(pipeline.limits.sizes or ()),
        max_pixels=pipeline.limits.max_pixels,
        compiled=pipeline.compile.enabled,
        **_requests(spec),
    )


def _requests(spec: ImageGenServiceSpec) -> dict[str, float]:
    """The server container's CPU (cores), memory and local disk (GiB) requests, where the
    spec sets them (a limit alone is the request), and the disk an hf:// download takes."""
    resources = spec.server.resources
    # Kubernetes makes a limit given alone the request too.
    requests = {**((resources.limits or {}) if resources else {}),
                **((resources.requests or {}) if resources else {})}
    out = {}
    if "cpu" in requests:
        out["cpu_request"] = float(quantity_value(requests["cpu"]))
    if "memory" in requests:
        out["memory_request_gib"] = float(quantity_value(requests["memory"])) / 2**30
    asked = requests.get("ephemeral-storage")
    disk = (float(quantity_value(asked)) / 2**30 if asked is not None
            else hub_download_gib(spec.model))
    if disk:
        out["disk_request_gib"] = disk
    return out


def hub_download_gib(model: Any) -> int:
    """GiB one serving pod downloads from the Hugging Face hub into its own emptyDir: an
    hf:// model's files (DOWNLOAD_GIB) and up to 1 GiB an hf:// LoRA adapter; 0 when
    nothing comes from the hub."""
    gib = 0
    if model.uri.startswith("hf://"):
        gib += DOWNLOAD_GIB.get(model.family, DOWNLOAD_GIB[AUTO_FAMILY_ASSUMED])
    return gib + LORA_DOWNLOAD_GIB * sum(lora.uri.startswith("hf://")
                                         for lora in model.loras or [])


def plan(spec: ImageGenServiceSpec) -> Plan:
    """The Plan for an ImageGenService spec."""
    return make_plan(inputs_from_spec(spec))
