"""Fake GKE GPU nodes for the local control plane, for any GPU configuration.

The nodes are built by the same renderer the `Local` provider uses, so they
carry GKE's labels, the ``nvidia.com/gpu`` taint and allocatable
``nvidia.com/gpu`` of partitions x clients x GPUs. KWOK manages every node
annotated ``kwok.x-k8s.io/node=fake``: it marks it Ready and pretends to run
the pods the real scheduler binds to it.
"""

from __future__ import annotations

from typing import Any

from imagegen_operator import api, gke
from imagegen_operator.planner import PlanInputs, make_plan, plan
from imagegen_operator.render.nodepool import POOL_LABEL, kwok_node


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
    """A Node as GKE would register it; ``strategy`` is ``TimeSharing`` or ``MPS``."""
    plan = make_plan(PlanInputs(
        gpu_type=gpu_type, count_per_node=gpus, partition_size=partition_size,
        sharing_strategy=strategy, max_shared_clients=clients, provider="Local",
    ))
    node = kwok_node(plan, name, spot=False)
    # A pool of the test's own: never one the operator derives and manages.
    node["metadata"]["labels"].update({gke.LABEL_NODEPOOL: pool, POOL_LABEL: pool})
    return node


def pool_name(body: dict[str, Any]) -> str:
    """The pool name the operator derives for an ImageGenService body."""
    return plan(api.parse(body).spec).nodepool_name
