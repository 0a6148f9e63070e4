"""The node pool, per provider, as documents.

- ``GKE``: the body of ``ClusterManagerClient.create_node_pool`` as a
  ``container.googleapis.com/v1`` ``NodePool`` document. ``spec`` is
  ``google.cloud.container_v1.NodePool`` in proto3 JSON (camelCase), and the
  ``parent`` annotation is the cluster; :func:`create_node_pool_request` turns
  the document into the client's request.
- ``ConfigConnector``: a ``ContainerNodePool`` (container.cnrm.cloud.google.com/v1beta1).
- ``Local``: KWOK Node objects that look like the GKE pool would: GKE's labels,
  the GPU taint and ``nvidia.com/gpu`` allocatable of partitions x clients x GPUs.
- ``Existing``: nothing; the pods' node selectors are enough for node
  auto-provisioning to create a matching pool (GKE's "About node auto-provisioning").

The accelerator settings of a pool are immutable in GKE: a different MIG size
or sharing mode is a different pool, which the derived name reflects.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from imagegen_operator import gke
from imagegen_operator.api import ImageGenService
from imagegen_operator.gke import parse_cluster
from imagegen_operator.planner import Plan
from imagegen_operator.render.common import MANAGED_BY, namespace_of

GKE_DOC_API_VERSION = "container.googleapis.com/v1"
PARENT_ANNOTATION = "container.googleapis.com/parent"
CNRM_API_VERSION = "container.cnrm.cloud.google.com/v1beta1"
CNRM_PROJECT_ANNOTATION = "cnrm.cloud.google.com/project-id"
KWOK_ANNOTATION = "kwok.x-k8s.io/node"
POOL_LABEL = "imagegen.dev/node-pool"
# On every simulated (Local) node: only pods of Local services tolerate it, so a
# service meant for a GKE pool never runs, Available, on a node that is not one.
SIMULATED_TAINT = {"key": "imagegen.dev/simulated", "value": "true", "effect": "NoSchedule"}
# The server image's PyTorch wheels are built with CUDA 13, which needs NVIDIA's R580 driver
# or newer; the driver GKE installs as DEFAULT is older on many GKE versions. LATEST is the
# newest COS carries (a pool's image, COS_CONTAINERD by default).
GPU_DRIVER_VERSION = "LATEST"
# The Google service account the nodes of the pools the operator makes run as (the chart's
# gke.nodeServiceAccount). Unset, GKE's default: the project's Compute Engine default service
# account, which is often an Editor of the whole project. GKE's hardening guide asks for an
# account of its own with the least roles (roles/container.defaultNodeServiceAccount), and
# the cloud-platform scope, which leaves what the nodes may do to IAM.
NODE_SERVICE_ACCOUNT_ENV = "IMAGEGEN_GKE_NODE_SERVICE_ACCOUNT"
CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
_SERVICE_ACCOUNT_EMAIL = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?@[a-z0-9]([-a-z0-9.]*[a-z0-9])?\.gserviceaccount\.com$")
# ANY lets the autoscaler take GPUs from whichever zone has them (scarce, and Spot).
LOCATION_POLICY = "ANY"

def initial_node_count(cluster: str | None, min_nodes: int,
                       zones: Sequence[str] = ()) -> int:
    """The nodes a new pool starts with. GKE counts ``initialNodeCount`` in each of the
    pool's zones while the autoscaling bounds are totals: in a regional cluster (location
    ``us-central1``, not ``us-central1-a``), or with more than one zone in
    ``spec.nodePool.locations`` (or in a zonal cluster's own node locations, which only the
    GKE provider can read), a minimum of 2 would start 2 GPU nodes in every zone.
    There the pool starts empty, and the autoscaler adds nodes for the serving pods that
    wait; in one zone it starts at the minimum."""
    if not min_nodes:
        return min_nodes
    if zones:
        return min_nodes if len(zones) == 1 else 0
    if not cluster:
        return min_nodes
    try:
        _, location, _ = parse_cluster(cluster)
    except ValueError:
        return min_nodes
    return min_nodes if gke.ZONE_RE.match(location) else 0


def _node_labels(plan: Plan) -> dict[str, str]:
    """Labels the pool adds to its nodes (GKE adds its own accelerator labels itself)."""
    return {POOL_LABEL: plan.nodepool_name}


def _resource_labels() -> dict[str, str]:
    # Compute Engine labels: lowercase keys without '/' or '.'.
    return {"managed-by": MANAGED_BY}


# A pool's autoscaling bounds, (min nodes, max nodes).
NodeBounds = tuple[int, int]


def pool_bounds(resource: ImageGenService, bounds: NodeBounds | None = None) -> NodeBounds:
    """``bounds`` when given (those of every service sharing the pool), else this
    service's own ``spec.nodePool.minNodes`` / ``maxNodes``."""
    if bounds is not None:
        return bounds
    pool = resource.spec.node_pool
    return pool.min_nodes, pool.max_nodes


def node_service_account(environ: Mapping[str, str] = os.environ) -> str | None:
    """The nodes' Google service account, or None for GKE's default (see above)."""
    email = environ.get(NODE_SERVICE_ACCOUNT_ENV) or None
    if email is not None and not _SERVICE_ACCOUNT_EMAIL.match(email):
        raise ValueError(f"{NODE_SERVICE_ACCOUNT_ENV}={email!r} is not a Google service "
                         "account's email (NAME@PROJECT.iam.gserviceaccount.com)")
    return email


def render_gke_nodepool(
    resource: ImageGenService, plan: Plan, bounds: NodeBounds | None = None,
    start_empty: bool = False,
) -> dict[str, Any]:
    """The pool GKE's API is asked for. ``start_empty``: the pool's zones are more than one
    although neither the cluster's location nor ``spec.nodePool.locations`` says so (a
    zonal cluster with other node locations, which only the GKE provider can read)."""
    pool = resource.spec.node_pool
    min_nodes, max_nodes = pool_bounds(resource, bounds)
    accelerator: dict[str, Any] = {
        "acceleratorCount": str(plan.count_per_node),
        "acceleratorType": plan.gpu_type,
        "gpuDriverInstallationConfig": {"gpuDriverVersion": GPU_DRIVER_VERSION},
    }
    if plan.partition_size:
        accelerator["gpuPartitionSize"] = plan.partition_size
    if plan.sharing_strategy:
        accelerator["gpuSharingConfig"] = {
            "gpuSharingStrategy": gke.SHARING_API_VALUES[plan.sharing_strategy],
            # int64 fields are strings in proto3 JSON.
            "maxSharedClientsPerGpu": str(plan.clients_per_gpu),
        }
    body = {
        "name": plan.nodepool_name,
        "initialNodeCount": 0 if start_empty else initial_node_count(
            pool.cluster, min_nodes, plan.locations),
        "config": {
            "machineType": plan.machine_type,
            "spot": bool(pool.spot),
            "labels": _node_labels(plan),
            "resourceLabels": _resource_labels(),
            "accelerators": [accelerator],
            **_node_identity("serviceAccount"),
        },
        "autoscaling": {
            "enabled": True,
            "totalMinNodeCount": min_nodes,
            "totalMaxNodeCount": max_nodes,
            "locationPolicy": LOCATION_POLICY,
        },
        "management": {"autoRepair": True, "autoUpgrade": True},
        "maxPodsConstraint": {"maxPodsPerNode": str(plan.max_pods_per_node)},
    }
    if plan.locations:
        body["locations"] = list(plan.locations)
    if pool.flex_start:
        # GKE's documented Flex-start pool: it starts empty, autoscales, takes no
        # reservation, and is not auto-repaired (a node is replaced when its run ends).
        body["initialNodeCount"] = 0
        body["config"]["flexStart"] = True
        body["config"]["reservationAffinity"] = {"consumeReservationType": "NO_RESERVATION"}
        body["management"]["autoRepair"] = False
    return {
        "apiVersion": GKE_DOC_API_VERSION,
        "kind": "NodePool",
        "metadata": {
            "name": plan.nodepool_name,
            "annotations": {PARENT_ANNOTATION: pool.cluster},
        },
        "spec": body,
    }


def create_node_pool_request(document: dict[str, Any]) -> dict[str, Any]:
    """``{"parent": ..., "node_pool": container_v1.NodePool}`` for ``create_node_pool(**req)``.

    Strict: a field the client library does not know is an error, not dropped.
    """
    from google.cloud import container_v1  # heavy; only the GKE provider needs it

    node_pool = container_v1.NodePool.from_json(
        json.dumps(document["spec"]), ignore_unknown_fields=False
    )
    return {
        "parent": document["metadata"]["annotations"][PARENT_ANNOTATION],
        "node_pool": node_pool,
    }


def render_config_connector_nodepool(
    resource: ImageGenService, plan: Plan, bounds: NodeBounds | None = None
) -> dict[str, Any]:
    pool = resource.spec.node_pool
    project, location, cluster = parse_cluster(pool.cluster)
    min_nodes, max_nodes = pool_bounds(resource, bounds)
    accelerator: dict[str, Any] = {
        "type": plan.gpu_type,
        "count": plan.count_per_node,
        "gpuDriverInstallationConfig": {"gpuDriverVersion": GPU_DRIVER_VERSION},
    }
    if plan.partition_size:
        accelerator["gpuPartitionSize"] = plan.partition_size
    if plan.sharing_strategy:
        accelerator["gpuSharingConfig"] = {
            "gpuSharingStrategy": gke.SHARING_API_VALUES[plan.sharing_strategy],
            "maxSharedClientsPerGpu": plan.clients_per_gpu,
        }
    return {
        "apiVersion": CNRM_API_VERSION,
        "kind": "ContainerNodePool",
        "metadata": {
            "name": plan.nodepool_name,
            "namespace": namespace_of(resource),
            "labels": {"app.kubernetes.io/managed-by": MANAGED_BY},
            "annotations": {CNRM_PROJECT_ANNOTATION: project},
        },
        "spec": {
            "location": location,
            "clusterRef": {"external": pool.cluster},
            "initialNodeCount": initial_node_count(pool.cluster, min_nodes, plan.locations),
            **({"nodeLocations": list(plan.locations)} if plan.locations else {}),
            "maxPodsPerNode": plan.max_pods_per_node,
            # The bounds of the whole pool (total*), as for GKE's API: minNodeCount and
            # maxNodeCount, the other pair the CRD has, count per zone, and a regional
            # cluster would get three times the nodes asked for.
            "autoscaling": {
                "totalMinNodeCount": min_nodes,
                "totalMaxNodeCount": max_nodes,
                "locationPolicy": LOCATION_POLICY,
            },
            "management": {"autoRepair": True, "autoUpgrade": True},
            "nodeConfig": {
                "machineType": plan.machine_type,
                "spot": bool(pool.spot),
                "labels": _node_labels(plan),
                "resourceLabels": _resource_labels(),
                "guestAccelerator": [accelerator],
                **_node_identity("serviceAccountRef"),
            },
        },
    }


def _node_identity(field: str) -> dict[str, Any]:
    """The nodes' service account and scopes as ``field`` takes it (GKE's API: the email;
    Config Connector: a reference), or nothing for GKE's default."""
    email = node_service_account()
    if email is None:
        return {}
    return {field: email if field == "serviceAccount" else {"external": email},
            "oauthScopes": [CLOUD_PLATFORM_SCOPE]}


def kwok_node_count(resource: ImageGenService, plan: Plan) -> int:
    """Nodes a Local pool shows: what the replicas need, within minNodes..maxNodes."""
    min_nodes, max_nodes = pool_bounds(resource)
    return max(min_nodes, min(plan.nodes_needed, max_nodes))


def kwok_node_labels(plan: Plan, node_name: str, spot: bool,
                     zone: str | None = None) -> dict[str, str]:
    """The labels GKE puts on a node of this pool, plus the usual well-known ones."""
    labels = {
        "kubernetes.io/hostname": node_name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "node.kubernetes.io/instance-type": plan.machine_type or "kwok",
        "type": "kwok",
        gke.LABEL_NODEPOOL: plan.nodepool_name,
        gke.LABEL_ACCELERATOR: plan.gpu_type,
        POOL_LABEL: plan.nodepool_name,
    }
    if plan.partition_size:
        labels[gke.LABEL_PARTITION_SIZE] = plan.partition_size
    if plan.sharing_strategy:
        labels[gke.LABEL_SHARING_STRATEGY] = gke.SHARING_LABEL_VALUES[plan.sharing_strategy]
        labels[gke.LABEL_MAX_SHARED_CLIENTS] = str(plan.clients_per_gpu)
    if spot:
        labels[gke.LABEL_SPOT] = "true"
    if plan.flex_start:
        labels[gke.LABEL_FLEX_START] = "true"
    if zone:
        labels[gke.LABEL_ZONE] = zone
        labels[gke.LABEL_REGION] = gke.region_of(zone)
    return dict(sorted(labels.items()))


def kwok_allocatable(plan: Plan) -> dict[str, str]:
    """What one simulated node offers: the GPU slots, the pods the pool is made for, and
    the CPU and memory a GKE node of its machine type offers after GKE's reservations (so
    pods that ask for more than the machine has stay Pending here too); room for every
    slot's pod where the machine type is not one the table holds."""
    slots = plan.slots_per_node
    room = gke.node_allocatable(plan.machine_type) if plan.machine_type else None
    cpu, memory = room if room else (max(16, 4 * slots), max(64, 16 * slots))
    return {
        "cpu": f"{math.floor(cpu * 1000)}m",
        "memory": f"{math.floor(memory * 1024)}Mi",
        # GKE's default boot disk, which the operator's pools have: a pod's download counts.
        "ephemeral-storage": str(gke.DEFAULT_EPHEMERAL_ALLOCATABLE_BYTES),
        "pods": str(plan.max_pods_per_node),
        gke.GPU_RESOURCE: str(slots),
    }


def kwok_capacity(plan: Plan, allocatable: dict[str, str]) -> dict[str, str]:
    """The node's capacity: its machine type's vCPUs and memory and the 100 GB boot disk,
    before reservations."""
    disk = {"ephemeral-storage": "98831908Ki"}  # GKE's documented node (gke.py)
    shape = gke.MACHINE_SHAPES.get(plan.machine_type or "")
    if shape is None:
        return {**allocatable, **disk}
    return {**allocatable, **disk, "cpu": str(shape[0]),
            "memory": f"{math.floor(shape[1] * 1024)}Mi"}


def kwok_node(plan: Plan, node_name: str, spot: bool, zone: str | None = None) -> dict[str, Any]:
    """One simulated node of the pool, as GKE would register it."""
    allocatable = kwok_allocatable(plan)
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": node_name,
            "labels": kwok_node_labels(plan, node_name, spot, zone),
            "annotations": {
                KWOK_ANNOTATION: "fake",
                "node.alpha.kubernetes.io/ttl": "0",
            },
        },
        "spec": {
            "taints": [
                {
                    "key": gke.GPU_TAINT_KEY,
                    "value": gke.GPU_TAINT_VALUE,
                    "effect": gke.GPU_TAINT_EFFECT,
                }
            ]
        },
        "status": {"allocatable": allocatable, "capacity": kwok_capacity(plan, allocatable)},
    }


def node_zone(plan: Plan, index: int) -> str | None:
    """The zone of a Local pool's ``index``th node: its zones in turn, as GKE spreads a
    pool's nodes over its zones; none when the spec names none."""
    return plan.locations[index % len(plan.locations)] if plan.locations else None


def local_node(plan: Plan, node_name: str, spot: bool, zone: str | None = None) -> dict[str, Any]:
    """A node of a Local pool: GKE's node, plus the taint that marks it simulated."""
    node = kwok_node(plan, node_name, spot, zone)
    node["spec"]["taints"].append(dict(SIMULATED_TAINT))
    return node


def render_kwok_nodes(resource: ImageGenService, plan: Plan) -> list[dict[str, Any]]:
    spot = bool(resource.spec.node_pool.spot)
    return [
        local_node(plan, f"{plan.nodepool_name}-{index}", spot, node_zone(plan, index))
        for index in range(kwok_node_count(resource, plan))
    ]
