"""Fake GKE GPU nodes for the local control plane.

KWOK manages every node annotated ``kwok.x-k8s.io/node=fake``: it marks it
Ready and runs (pretends to run) the pods the real scheduler binds to it. The
labels, taint and allocatable ``nvidia.com/gpu`` follow GKE's, so the
scheduler's decisions are the ones GKE would make.
"""

from __future__ import annotations

from typing import Any

from imagegen_operator import gke


def slots_per_gpu(gpu_type: str, partition_size: str | None, clients: int | None) -> int:
    """Allocatable nvidia.com/gpu per physical GPU: partitions x clients."""
    partitions = gke.mig_sizes(gpu_type)[partition_size] if partition_size else 1
    return partitions * (clients or 1)


def fake_gpu_node(
    name: str,
    gpu_type: str,
    *,
    gpus: int = 1,
    partition_size: str | None = None,
    strategy: str | None = None,
    clients: int | None = None,
    pool: str = "test-pool",
) -> dict[str, Any]:
    """A Node as GKE would register it for this GPU configuration.

    ``strategy`` is the API's spelling (``TimeSharing`` or ``MPS``).
    """
    labels = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "type": "kwok",
        gke.LABEL_NODEPOOL: pool,
        gke.LABEL_ACCELERATOR: gpu_type,
    }
    if partition_size:
        labels[gke.LABEL_PARTITION_SIZE] = partition_size
    if strategy:
        labels[gke.LABEL_SHARING_STRATEGY] = gke.SHARING_LABEL_VALUES[strategy]
        labels[gke.LABEL_MAX_SHARED_CLIENTS] = str(clients)
    resources = {
        "cpu": "8",
        "memory": "32Gi",
        "pods": "110",
        gke.GPU_RESOURCE: str(gpus * slots_per_gpu(gpu_type, partition_size, clients)),
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": labels,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": {
            "taints": [{
                "key": gke.GPU_TAINT_KEY, "value": gke.GPU_TAINT_VALUE,
                "effect": gke.GPU_TAINT_EFFECT,
            }],
        },
        "status": {"allocatable": resources, "capacity": resources},
    }
