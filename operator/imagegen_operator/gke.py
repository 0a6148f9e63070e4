"""Every GKE fact the operator relies on, as data.

The planner, the renderers, the CRD generator and the providers read GPU
types, MIG sizes, machine types, node labels and prices from here and nowhere
else, so a change in GKE is a change in this one module.

Where each fact was checked (November 2026):

- Node labels ``cloud.google.com/gke-gpu-sharing-strategy: time-sharing`` and
  ``cloud.google.com/gke-max-shared-clients-per-gpu: "3"`` (a string), and that a
  time-shared pod may request at most one ``nvidia.com/gpu``: GKE's
  "Time-sharing GPUs on GKE" and "About GPU sharing strategies" pages.
- GPU sharing strategies ``TIME_SHARING`` and ``MPS`` and the field
  ``max_shared_clients_per_gpu``: the ``google.cloud.container_v1``
  ``GPUSharingConfig`` reference (enum values 1 and 2).
- MPS: GKE's "Share GPUs with multiple workloads using NVIDIA MPS" page
  (Standard clusters, GKE 1.27.7-gke.1088000 and later, all NVIDIA GPU types;
  per-container pinned device memory limit and active thread percentage come
  from ``max-shared-clients-per-gpu``). ``hostIPC: true`` on MPS pods: the
  page's example workload, as quoted by a secondary source (the excerpts of
  the page itself reachable here stop before the example); the MPS clients
  need the node's IPC namespace to reach the MPS control daemon, so this is
  kept. Those pods select ``cloud.google.com/gke-gpu-sharing-strategy: mps``
  and ``cloud.google.com/gke-max-shared-clients-per-gpu``.
- ``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT`` format ``<device>=<size>`` with ``G``
  or ``M`` suffixes (``0=1G``, ``0=512M``): NVIDIA's MPS documentation,
  "Volta MPS execution resource provisioning".
- MIG-capable types and partition syntax ``[compute]g.[memory]gb``: GKE's
  "Running multi-instance GPUs" page (A100 40GB, A100 80GB, H100 80GB,
  H200 141GB; seven compute units and eight memory units each).
- Partitions per GPU for each size: NVIDIA's MIG user guide, "Supported MIG
  profiles" (A100 and H100 tables), and for the H200 141GB the profile set of
  NVIDIA's mig-parted default configuration: 1g.18gb x7, 1g.35gb x4,
  2g.35gb x3, 3g.71gb x2, 7g.141gb x1. NVIDIA also
  offers 4g.* profiles (one per GPU); GKE's table does not list them, so they
  are left out here.
- A3 Ultra (``a3-ultragpu-8g``) carries 8 H200 141GB GPUs and is the only
  H200 shape: Google Cloud's accelerator-optimized machine family page and the
  Cluster Toolkit v1.44.1 release notes. A countPerNode other than 8 on an H200
  therefore has no machine type (the planner reports it).
- How the A3 machines can be had: Compute Engine's "GPU machine types" page
  (cloud.google.com/compute/docs/gpus) says a3-highgpu-1g, -2g and -4g are created only as
  Spot or Flex-start VMs, and A3 Ultra only on reserved capacity, as Spot or Flex-start VMs
  (or through a resize request). The planner refuses on-demand pools of the first and
  warns about the second (GKE nodes consume a matching reservation by default).
- Flex-start VMs in GKE (the "About GPU obtainability with flex-start" and "Run a small
  batch workload with GPUs and flex-start" pages, and ``NodeConfig.flex_start`` in the
  ``container_v1`` API): a pool made with ``flexStart`` gets its nodes, through the Dynamic
  Workload Scheduler, when capacity frees up, billed at its prices (discounted from
  on-demand), each node running at most seven days; GKE labels them
  ``cloud.google.com/gke-flex-start: "true"``. Google's documented pool has autoscaling from
  zero, location policy ANY, no reservation and no auto-repair, and is not Spot; GKE
  1.32.2-gke.1652000 or later. Config Connector's ContainerNodePool has no field for it
  (v1.155), so only the GKE provider makes such pools.
- N1 with T4: N1 machines take 1, 2 or 4 T4s; the machine types chosen here
  (n1-standard-8/16/32) are this project's defaults, not a GKE rule.

- The node taint ``nvidia.com/gpu=present:NoSchedule`` on GPU nodes: GKE's "Run GPUs in
  GKE Standard node pools" page (cloud.google.com/kubernetes-engine/docs/how-to/gpus).
- That node auto-provisioning creates pools from pending pods' GPU requests and node
  selectors: GKE's "About node auto-provisioning" page
  (cloud.google.com/kubernetes-engine/docs/concepts/node-auto-provisioning); that it does so
  for time-shared GPUs: "Share GPUs with multiple workloads using GPU time-sharing"
  (cloud.google.com/kubernetes-engine/docs/how-to/timesharing-gpus). Not checked against GKE
  itself, which this project's tests cannot reach.

Prices (``PRICE_TABLE_DATE``) are ESTIMATES in USD per hour for us-central1,
list prices without discounts, rounded; Spot prices move up to once a day.
T4 and the A2 host figures follow SkyPilot's GCP catalog snapshot of
2026-09-25 (T4 on demand 0.35, Spot 0.2088; a2-highgpu-1g host 0.73948,
Spot 0.44371); the others are approximate list prices that were not
re-checked against Google's pricing pages for this table. They are for
comparing configurations, not for billing: check the pricing pages before
spending money on the difference.

Node-pool names: 1 to 40 characters, a lowercase letter first, then lowercase
letters, digits or hyphens, not ending in a hyphen (the gcloud/API rule).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

# --- node labels and taints -------------------------------------------------

LABEL_ACCELERATOR = "cloud.google.com/gke-accelerator"
LABEL_PARTITION_SIZE = "cloud.google.com/gke-gpu-partition-size"
LABEL_SHARING_STRATEGY = "cloud.google.com/gke-gpu-sharing-strategy"
LABEL_MAX_SHARED_CLIENTS = "cloud.google.com/gke-max-shared-clients-per-gpu"
LABEL_NODEPOOL = "cloud.google.com/gke-nodepool"
LABEL_SPOT = "cloud.google.com/gke-spot"
LABEL_FLEX_START = "cloud.google.com/gke-flex-start"

# Values of LABEL_SHARING_STRATEGY on pools created by hand or by the API.
SHARING_LABEL_TIME_SHARING = "time-sharing"
SHARING_LABEL_MPS = "mps"

# The GKE API (container_v1.GPUSharingConfig.GPUSharingStrategy) spelling.
API_STRATEGY_TIME_SHARING = "TIME_SHARING"
API_STRATEGY_MPS = "MPS"

# spec.gpu.sharing.strategy -> node label value and API enum name.
SHARING_LABEL_VALUES = {"TimeSharing": SHARING_LABEL_TIME_SHARING, "MPS": SHARING_LABEL_MPS}
SHARING_API_VALUES = {"TimeSharing": API_STRATEGY_TIME_SHARING, "MPS": API_STRATEGY_MPS}

GPU_RESOURCE = "nvidia.com/gpu"
GPU_TAINT_KEY = "nvidia.com/gpu"
GPU_TAINT_VALUE = "present"
GPU_TAINT_EFFECT = "NoSchedule"
# Config Connector and the GKE API spell taint effects as an enum.
GPU_TAINT_EFFECT_API = "NO_SCHEDULE"

MIN_SHARED_CLIENTS = 2
MAX_SHARED_CLIENTS = 48
# NVIDIA's MPS client limit per device (Volta and later); on a MIG slice it is
# lowered in proportion to the compute instance's share of the GPU's 7 units
# (NVIDIA MIG user guide, "CUDA MPS" section).
MPS_MAX_CLIENTS = 48
MIG_COMPUTE_UNITS = 7

GPU_COUNTS_PER_NODE = (1, 2, 4, 8)

# GKE node-pool names: lowercase letters, digits and hyphens, starting with a
# letter, at most 40 characters (the API rejects longer names).
NODEPOOL_NAME_MAX = 40
NODEPOOL_NAME_RE = re.compile(r"^[a-z](?:[-a-z0-9]{0,38}[a-z0-9])?$")

# Compute Engine zones (us-central1-a) and regions (us-central1). A node pool's zones
# (NodePool.locations, Config Connector's nodeLocations) must be in its cluster's region:
# the region itself for a regional cluster, the zone's region for a zonal one. Unset, the
# pool takes the cluster's zones; GKE counts initialNodeCount in each zone of the pool.
LABEL_ZONE = "topology.kubernetes.io/zone"
LABEL_REGION = "topology.kubernetes.io/region"
ZONE_PATTERN = r"^[a-z]+-[a-z]+[0-9]+-[a-z]$"
ZONE_RE = re.compile(ZONE_PATTERN)
POOL_LOCATIONS_MAX = 16


def region_of(location: str) -> str:
    """The region of a zone (``us-central1-a`` -> ``us-central1``); a region is its own."""
    return location.rsplit("-", 1)[0] if ZONE_RE.match(location) else location


_CLUSTER_RE = re.compile(r"^projects/([^/]+)/locations/([^/]+)/clusters/([^/]+)$")


def parse_cluster(cluster: str) -> tuple[str, str, str]:
    """``projects/P/locations/L/clusters/C`` -> (P, L, C)."""
    match = _CLUSTER_RE.match(cluster or "")
    if not match:
        raise ValueError(
            f"spec.nodePool.cluster must be projects/P/locations/L/clusters/C, got {cluster!r}"
        )
    return match.group(1), match.group(2), match.group(3)


def zones_outside(cluster: str, zones: Sequence[str]) -> list[str]:
    """The zones outside the region of ``cluster`` (none when it is not a cluster's full
    name: the cluster's own check says so)."""
    try:
        _, location, _ = parse_cluster(cluster)
    except ValueError:
        return []
    region = region_of(location)
    return [zone for zone in zones if region_of(zone) != region]


PRICE_TABLE_DATE = "2026-11-26"
PRICE_REGION = "us-central1"


@dataclass(frozen=True)
class MachinePrice:
    """Hourly USD estimate for the host part (vCPUs, memory, bundled SSD) of a machine."""

    on_demand: float
    spot: float


# The share of its memory units' part of the GPU that a MIG slice gives a process, by the
# number of units (of eight), as `nvidia-smi mig -lgip` lists the profiles. Ampere: NVIDIA's
# MIG user guide gives the A100 40GB's 1g.5gb 4.75 GiB, 2g.10gb 9.75, 3g.20gb 19.62 and
# 7g.40gb 39.50 of its 40 GiB (the A100 80GB's 1g.10gb, 9.5 GiB of 80, agrees). Hopper: an
# H100 80GB lists 1g.10gb 9.75 GiB, 1g.20gb 19.62, 3g.40gb 39.50 and 7g.80gb 79.25 of its
# 79.65; the H200 is taken to keep the same shares. Rounded down: the fit check errs towards
# "does not fit" rather than a pod out of memory at load.
AMPERE_MIG_MEMORY_SHARE = {1: 0.95, 2: 0.975, 4: 0.981, 8: 0.9875}
HOPPER_MIG_MEMORY_SHARE = {1: 0.979, 2: 0.985, 4: 0.991, 8: 0.994}


@dataclass(frozen=True)
class Accelerator:
    """One ``gpu.type``: its memory, MIG sizes, machine shapes and GPU price."""

    name: str  # the gpu.type value, also the cloud.google.com/gke-accelerator label value
    display_name: str
    memory_gib: int  # as sold: decimal GB, the number in the name
    # What CUDA reports (nvidia-smi's memory.total, MiB): the L4's "24GB" is 22.5 GiB.
    usable_mib: int
    # MIG size -> partitions per GPU; empty when the GPU has no MIG.
    mig_partitions: dict[str, int] = field(hash=False)
    # GPUs per node -> machine type; a missing count has no machine shape.
    machine_types: dict[int, str] = field(hash=False)
    gpu_usd_hour: float
    gpu_spot_usd_hour: float
    # A short tag for derived node-pool names (``h100``, ``l4``).
    short_name: str
    # FP8 tensor cores: Ada (L4) and Hopper (H100, H200); not Turing (T4) or Ampere (A100).
    fp8: bool = False
    # Memory units of a MIG slice -> the share of their part a process gets (see above).
    mig_memory_share: dict[int, float] = field(default_factory=dict, hash=False)

    @property
    def mig_capable(self) -> bool:
        return bool(self.mig_partitions)


ACCELERATORS: dict[str, Accelerator] = {
    a.name: a
    for a in (
        Accelerator(
            name="nvidia-tesla-t4",
            display_name="NVIDIA T4 16GB",
            memory_gib=16,
            usable_mib=15360,
            mig_partitions={},
            machine_types={1: "n1-standard-8", 2: "n1-standard-16", 4: "n1-standard-32"},
            gpu_usd_hour=0.35,
            gpu_spot_usd_hour=0.21,
            short_name="t4",
        ),
        Accelerator(
            name="nvidia-l4",
            display_name="NVIDIA L4 24GB",
            memory_gib=24,
            usable_mib=23034,
            mig_partitions={},
            machine_types={
                1: "g2-standard-8",
                2: "g2-standard-24",
                4: "g2-standard-48",
                8: "g2-standard-96",
            },
            gpu_usd_hour=0.56,
            gpu_spot_usd_hour=0.22,
            short_name="l4",
            fp8=True,
        ),
        Accelerator(
            name="nvidia-tesla-a100",
            display_name="NVIDIA A100 40GB",
            memory_gib=40,
            usable_mib=40960,
            mig_partitions={"1g.5gb": 7, "2g.10gb": 3, "3g.20gb": 2, "7g.40gb": 1},
            machine_types={
                1: "a2-highgpu-1g",
                2: "a2-highgpu-2g",
                4: "a2-highgpu-4g",
                8: "a2-highgpu-8g",
            },
            gpu_usd_hour=2.93,
            gpu_spot_usd_hour=1.17,
            short_name="a100",
            mig_memory_share=AMPERE_MIG_MEMORY_SHARE,
        ),
        Accelerator(
            name="nvidia-a100-80gb",
            display_name="NVIDIA A100 80GB",
            memory_gib=80,
            usable_mib=81920,
            mig_partitions={"1g.10gb": 7, "2g.20gb": 3, "3g.40gb": 2, "7g.80gb": 1},
            machine_types={
                1: "a2-ultragpu-1g",
                2: "a2-ultragpu-2g",
                4: "a2-ultragpu-4g",
                8: "a2-ultragpu-8g",
            },
            gpu_usd_hour=3.93,
            gpu_spot_usd_hour=1.57,
            short_name="a100-80",
            mig_memory_share=AMPERE_MIG_MEMORY_SHARE,
        ),
        Accelerator(
            name="nvidia-h100-80gb",
            display_name="NVIDIA H100 80GB",
            memory_gib=80,
            usable_mib=81559,
            mig_partitions={"1g.10gb": 7, "1g.20gb": 4, "2g.20gb": 3, "3g.40gb": 2, "7g.80gb": 1},
            machine_types={
                1: "a3-highgpu-1g",
                2: "a3-highgpu-2g",
                4: "a3-highgpu-4g",
                8: "a3-highgpu-8g",
            },
            gpu_usd_hour=9.80,
            gpu_spot_usd_hour=2.25,
            short_name="h100",
            mig_memory_share=HOPPER_MIG_MEMORY_SHARE,
            fp8=True,
        ),
        Accelerator(
            name="nvidia-h200-141gb",
            display_name="NVIDIA H200 141GB",
            memory_gib=141,
            usable_mib=143771,
            mig_partitions={
                "1g.18gb": 7,
                "1g.35gb": 4,
                "2g.35gb": 3,
                "3g.71gb": 2,
                "7g.141gb": 1,
            },
            machine_types={8: "a3-ultragpu-8g"},
            gpu_usd_hour=10.60,
            gpu_spot_usd_hour=3.72,
            short_name="h200",
            mig_memory_share=HOPPER_MIG_MEMORY_SHARE,
            fp8=True,
        ),
    )
}

# vCPUs and memory (GiB) of each machine type, from Compute Engine's machine families.
MACHINE_SHAPES: dict[str, tuple[int, float]] = {
    "n1-standard-8": (8, 30), "n1-standard-16": (16, 60), "n1-standard-32": (32, 120),
    "g2-standard-8": (8, 32), "g2-standard-24": (24, 96), "g2-standard-48": (48, 192),
    "g2-standard-96": (96, 384),
    "a2-highgpu-1g": (12, 85), "a2-highgpu-2g": (24, 170), "a2-highgpu-4g": (48, 340),
    "a2-highgpu-8g": (96, 680),
    "a2-ultragpu-1g": (12, 170), "a2-ultragpu-2g": (24, 340), "a2-ultragpu-4g": (48, 680),
    "a2-ultragpu-8g": (96, 1360),
    "a3-highgpu-1g": (26, 234), "a3-highgpu-2g": (52, 468), "a3-highgpu-4g": (104, 936),
    "a3-highgpu-8g": (208, 1872),
    "a3-ultragpu-8g": (224, 2952),
}


def _tiers(total: float, tiers: tuple[tuple[float, float], ...], rest: float) -> float:
    """What GKE reserves of ``total``: each (size, share) tier in turn, then ``rest``."""
    reserved = 0.0
    for size, share in tiers:
        reserved += min(max(total, 0.0), size) * share
        total -= size
    return reserved + max(total, 0.0) * rest


# Pods one node of a Standard cluster runs: 110 unless the cluster or the pool set another
# number when made, up to 256, and only in a VPC-native cluster (GKE's "Configure maximum
# Pods per node", cloud.google.com/kubernetes-engine/docs/how-to/flexible-pod-cidr), GKE's
# own pods counted.
DEFAULT_MAX_PODS_PER_NODE = 110
MAX_PODS_PER_NODE_LIMIT = 256
# GKE's pods on a GPU node (kube-proxy, logging and metrics agents, netd, the CSI drivers,
# the GPU device plugin, the metadata server): an allowance, their number varying with the
# cluster's features.
SYSTEM_PODS_PER_NODE = 10


def max_pods_per_node(slots: int) -> int:
    """The maximum pods per node a pool of ``slots`` serving pods a node is made with, set
    on every pool the operator makes (a pool that sets none takes the cluster's default,
    which may be below 110): GKE's default of 110 while a node's serving pods and GKE's
    own fit it, else the next power of two, within GKE's 256. A node gets twice its
    maximum in pod addresses, rounded up to a power of two, so 128 takes the /24 that
    110 does, and 256 a /23."""
    wanted = slots + SYSTEM_PODS_PER_NODE
    if wanted <= DEFAULT_MAX_PODS_PER_NODE:
        return DEFAULT_MAX_PODS_PER_NODE
    return min(1 << (wanted - 1).bit_length(), MAX_PODS_PER_NODE_LIMIT)


def pods_short(max_pods: int | None, slots: int) -> int | None:
    """The pods a node needs (its serving pods and GKE's own, within GKE's limit) where a
    pool's maximum ``max_pods`` (None or 0: not known) is below that; else None."""
    wanted = min(slots + SYSTEM_PODS_PER_NODE, MAX_PODS_PER_NODE_LIMIT)
    return wanted if max_pods and max_pods < wanted else None


# The local ephemeral storage a node of a pool that names no boot disk (the operator's name
# none: GKE's default of 100 GB) offers pods, once GKE's reservation and the kubelet's
# eviction threshold are taken: the node on GKE's "Plan GKE Standard node sizes" page shows
# 98831908Ki of capacity and 47060071478 bytes allocatable.
DEFAULT_EPHEMERAL_ALLOCATABLE_BYTES = 47_060_071_478
DEFAULT_EPHEMERAL_ALLOCATABLE_GIB = DEFAULT_EPHEMERAL_ALLOCATABLE_BYTES / 2**30


def node_allocatable(machine_type: str) -> tuple[float, float] | None:
    """(CPU cores, memory GiB) a GKE Standard node of ``machine_type`` offers pods, by GKE's
    documented reservations (plan-node-sizes: CPU 6% of the first core, 1% of the next, 0.5%
    of the next two, 0.25% above four; memory 25% of the first 4 GiB, 20% of the next 4, 10%
    of the next 8, 6% of the next 112, 2% above 128, and 100 MiB for eviction). Before the
    cluster's own pods (logging, the GPU device plugin), which take some too. None for a
    machine type this table does not hold."""
    shape = MACHINE_SHAPES.get(machine_type)
    if shape is None:
        return None
    cpus, memory = shape
    cpu = cpus - _tiers(cpus, ((1, 0.06), (1, 0.01), (2, 0.005)), 0.0025)
    memory_left = memory - _tiers(memory, ((4, 0.25), (4, 0.2), (8, 0.1), (112, 0.06)), 0.02)
    return cpu, memory_left - 100 / 1024


# Host part of each machine type (what the machine costs beyond its GPUs).
MACHINE_PRICES: dict[str, MachinePrice] = {
    "n1-standard-8": MachinePrice(0.38, 0.08),
    "n1-standard-16": MachinePrice(0.76, 0.16),
    "n1-standard-32": MachinePrice(1.52, 0.32),
    "g2-standard-8": MachinePrice(0.29, 0.12),
    "g2-standard-24": MachinePrice(0.88, 0.35),
    "g2-standard-48": MachinePrice(1.76, 0.70),
    "g2-standard-96": MachinePrice(3.52, 1.40),
    "a2-highgpu-1g": MachinePrice(0.74, 0.44),
    "a2-highgpu-2g": MachinePrice(1.48, 0.89),
    "a2-highgpu-4g": MachinePrice(2.96, 1.77),
    "a2-highgpu-8g": MachinePrice(5.92, 3.55),
    "a2-ultragpu-1g": MachinePrice(1.14, 0.46),
    "a2-ultragpu-2g": MachinePrice(2.28, 0.91),
    "a2-ultragpu-4g": MachinePrice(4.56, 1.82),
    "a2-ultragpu-8g": MachinePrice(9.12, 3.65),
    "a3-highgpu-1g": MachinePrice(1.26, 0.44),
    "a3-highgpu-2g": MachinePrice(2.52, 0.88),
    "a3-highgpu-4g": MachinePrice(5.04, 1.76),
    "a3-highgpu-8g": MachinePrice(10.08, 3.52),
    "a3-ultragpu-8g": MachinePrice(11.20, 3.92),
}

_MIG_SIZE_RE = re.compile(r"^(\d+)g\.(\d+)gb$")


def accelerator(gpu_type: str) -> Accelerator:
    """The Accelerator for a gpu.type value; KeyError names the known types."""
    try:
        return ACCELERATORS[gpu_type]
    except KeyError:
        raise KeyError(
            f"unknown gpu.type {gpu_type!r}; known: {', '.join(sorted(ACCELERATORS))}"
        ) from None


def fp8_types() -> list[str]:
    """The gpu.type values with FP8 tensor cores."""
    return [name for name, acc in ACCELERATORS.items() if acc.fp8]


def mig_sizes(gpu_type: str) -> dict[str, int]:
    """MIG size -> partitions per GPU for a gpu.type; empty when it has no MIG."""
    return dict(accelerator(gpu_type).mig_partitions)


def usable_gib(gpu_type: str) -> float:
    """What one whole GPU of ``gpu_type`` gives a process, in GiB."""
    return accelerator(gpu_type).usable_mib / 1024


def mig_slice_memory_gib(partition_size: str) -> int:
    """The memory of one MIG slice, read from its name (``3g.40gb`` -> 40).

    Names round to whole GB (3g.71gb is half of an H200's 141 GB), so this is
    nominal; ``usable_slice_gib`` says what a process in the slice gets.
    """
    match = _MIG_SIZE_RE.match(partition_size)
    if not match:
        raise ValueError(f"not a MIG partition size: {partition_size!r}")
    return int(match.group(2))


MIG_MEMORY_UNITS = 8


def mig_memory_units(gpu_type: str, partition_size: str) -> int:
    """Of the GPU's eight memory units, how many a slice has: its name's memory over an
    eighth of the GPU's (``1g.18gb`` of an H200's 141 GB: 1; ``3g.71gb``: 4)."""
    eighth = accelerator(gpu_type).memory_gib / MIG_MEMORY_UNITS
    return round(mig_slice_memory_gib(partition_size) / eighth)


def usable_slice_gib(gpu_type: str, partition_size: str) -> float:
    """What a process in one MIG slice of ``gpu_type`` can allocate, in GiB: its memory
    units' part of what the whole GPU reports, less what the driver keeps per slice
    (``mig_memory_share``). Not the name's number: an H200's 1g.18gb holds about 17 GiB."""
    acc = accelerator(gpu_type)
    units = mig_memory_units(gpu_type, partition_size)
    return units * acc.usable_mib / 1024 / MIG_MEMORY_UNITS * acc.mig_memory_share[units]


def mig_compute_units(partition_size: str) -> int:
    """The compute units of a MIG size (``3g.40gb`` -> 3)."""
    match = _MIG_SIZE_RE.match(partition_size)
    if not match:
        raise ValueError(f"not a MIG partition size: {partition_size!r}")
    return int(match.group(1))


def mps_client_limit(partition_size: str | None) -> int:
    """MPS clients one device (a whole GPU, or a MIG slice) accepts."""
    if not partition_size:
        return MPS_MAX_CLIENTS
    return max(1, MPS_MAX_CLIENTS * mig_compute_units(partition_size) // MIG_COMPUTE_UNITS)


# The longest a Flex-start node runs before Compute Engine takes it back.
FLEX_START_MAX_RUN_DAYS = 7
# Machine types Compute Engine creates only as Spot or Flex-start VMs.
SPOT_OR_FLEX_START_ONLY = frozenset({"a3-highgpu-1g", "a3-highgpu-2g", "a3-highgpu-4g"})
# Machine types that run on demand only on capacity reserved for them.
RESERVED_ON_DEMAND_ONLY = frozenset({"a3-ultragpu-8g"})


def machine_type(gpu_type: str, gpus_per_node: int) -> str | None:
    """The machine type carrying that many GPUs of this type, or None if GKE has none."""
    return accelerator(gpu_type).machine_types.get(gpus_per_node)


# The machine series each GPU type comes on, and how many GPUs each machine type of an
# accelerator-optimized series carries (fixed by its name), from Compute Engine's "GPU
# machine types" page: G2 carries L4s (g2-standard-4 to -32: 1, -24: 2, -48: 4, -96: 8),
# A2 Standard A100 40GB (a2-highgpu-Ng, a2-megagpu-16g), A2 Ultra A100 80GB
# (a2-ultragpu-Ng), A3 High/Mega/Edge H100 (a3-highgpu-Ng, a3-megagpu-8g, a3-edgegpu-8g)
# and A3 Ultra H200 (a3-ultragpu-8g). T4s attach to N1 machines, custom ones
# (custom-CPUS-MEMORY) included: 1, 2 or 4 of them, on at most 48 vCPUs with one or two GPUs
# and 96 with four. Custom G2 shapes (g2-custom-*) are taken on trust.
GPU_MACHINE_SERIES = {
    "nvidia-tesla-t4": ("n1-standard-", "n1-highmem-", "n1-highcpu-", "n1-custom-", "custom-"),
    "nvidia-l4": ("g2-standard-", "g2-custom-"),
    "nvidia-tesla-a100": ("a2-highgpu-", "a2-megagpu-"),
    "nvidia-a100-80gb": ("a2-ultragpu-",),
    "nvidia-h100-80gb": ("a3-highgpu-", "a3-megagpu-", "a3-edgegpu-"),
    "nvidia-h200-141gb": ("a3-ultragpu-",),
}
G2_GPUS = {"4": 1, "8": 1, "12": 1, "16": 1, "32": 1, "24": 2, "48": 4, "96": 8}
N1_T4_MAX_VCPUS = {1: 48, 2: 48, 4: 96}


def machine_mismatch(gpu_type: str, gpus_per_node: int, machine: str) -> str | None:
    """Why Compute Engine cannot give ``machine`` that many GPUs of this type (a phrase),
    or None when it can."""
    series = GPU_MACHINE_SERIES[gpu_type]
    if not machine.startswith(series):
        return f"{gpu_type} comes only on {' or '.join(s + '*' for s in series)} machines"
    if machine.startswith("g2-custom-"):
        return None
    size = machine.rsplit("-", 1)[-1]
    if machine.startswith(("n1-custom-", "custom-")):
        size = machine.removeprefix("n1-").split("-")[1]  # custom-CPUS-MEMORY
    if machine.startswith(("n1-", "custom-")):
        most = N1_T4_MAX_VCPUS.get(gpus_per_node)
        if most is None:
            return "an N1 machine takes 1, 2 or 4 T4s"
        if not size.isdigit() or int(size) > most:
            return f"an N1 machine with {gpus_per_node} T4(s) has at most {most} vCPUs"
        return None
    carried = G2_GPUS.get(size) if machine.startswith("g2-") else (
        int(size[:-1]) if size.endswith("g") and size[:-1].isdigit() else None)
    if carried is None:
        return f"Compute Engine has no machine type {machine}"
    if carried != gpus_per_node:
        return f"{machine} comes with {carried} GPU(s), not {gpus_per_node}"
    return None


def machine_price(machine: str) -> MachinePrice | None:
    return MACHINE_PRICES.get(machine)
