"""The Existing provider: use GPU nodes that are already there; create nothing.

It reports how many Ready nodes match the serving pods' node selector and that its pods
may take: not cordoned, no sharing label they exclude, and, unless the spec names the
pool, not in a pool the operator made (``imagegen.dev/node-pool``). With
both sharing labels in that selector, GKE's node auto-provisioning can create a
matching pool by itself once pods are Pending, so no nodes yet is not an error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from imagegen_operator import gke
from imagegen_operator.api import ImageGenService
from imagegen_operator.planner import Plan
from imagegen_operator.providers.base import MadePool, PoolState
from imagegen_operator.providers.local import node_ready
from imagegen_operator.render.deployment import absent_labels, nodeselector, shuns_operator_pools
from imagegen_operator.render.nodepool import SIMULATED_TAINT, NodeBounds

if TYPE_CHECKING:  # the Kubernetes client stays out of `render` and `plan`
    from imagegen_operator.kube import Kube


def takes_pods_of(node: dict[str, Any], plan: Plan, pool_named: bool = False) -> bool:
    """Whether the serving pods may land on ``node``: none of the labels their affinity
    excludes (sharing they did not ask for; a pool the operator made, unless the spec names
    the pool), in one of the spec's zones if it names some, not cordoned, and not a
    simulated node (they do not tolerate it)."""
    labels = node["metadata"].get("labels") or {}
    spec = node.get("spec") or {}
    excluded = absent_labels(plan, shuns_operator_pools("Existing", pool_named))
    return (
        not any(key in labels for key in excluded)
        and (not plan.locations or labels.get(gke.LABEL_ZONE) in plan.locations)
        and not spec.get("unschedulable")
        and not any(t.get("key") == SIMULATED_TAINT["key"] for t in spec.get("taints") or [])
    )


class ExistingProvider:
    name = "Existing"

    @staticmethod
    def render(resource: ImageGenService, plan: Plan) -> list[dict[str, Any]]:
        return []  # node auto-provisioning, or a pool already there

    def __init__(self, kube: Kube):
        self.kube = kube

    def ensure(
        self, resource: ImageGenService, plan: Plan, target_nodes: int,
        bounds: NodeBounds | None = None,
    ) -> PoolState:
        named = resource.spec.node_pool.name is not None  # then that pool's nodes only
        selector = ",".join(
            f"{k}={v}" for k, v in sorted(nodeselector(plan, pool_named=named).items()))
        nodes = [n for n in self.kube.list("v1", "Node", label_selector=selector)
                 if node_ready(n) and takes_pods_of(n, plan, named)]
        if plan.locations:
            selector += f" in zone {' or '.join(plan.locations)}"
        if nodes:
            return PoolState(
                plan.nodepool_name,
                True,
                len(nodes),
                "Ready",
                f"{len(nodes)} existing node(s) match {selector}",
            )
        if plan.sharing_strategy:
            return PoolState(
                plan.nodepool_name,
                False,
                0,
                "AwaitingAutoProvisioning",
                f"no Ready node matches {selector} yet; GKE node auto-provisioning "
                "can create one for the pending pods",
            )
        return PoolState(
            plan.nodepool_name,
            False,
            0,
            "NoMatchingNodes",
            f"no Ready node matches {selector}; create a GPU node pool with "
            "these labels or use provider GKE",
        )

    def delete(self, resource: ImageGenService, plan: Plan) -> bool:
        return True  # not ours to delete

    def pools_made(self, cluster: str | None) -> list[MadePool]:
        return []  # it makes none
