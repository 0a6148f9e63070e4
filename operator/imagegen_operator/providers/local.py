"""The Local provider: a node pool made of KWOK nodes, for demos and tests.

A SIMULATOR, not a cloud: the nodes are Node objects that KWOK keeps Ready and
whose pods it pretends to run. They carry GKE's labels, taint and allocatable
``nvidia.com/gpu``, so the real scheduler places pods as it would on GKE, and one
taint more that only Local services tolerate, so nothing meant for a real pool
lands on them. The pool grows to what all services sharing it need (a stand-in
for GKE's cluster autoscaler) and never shrinks while in use.

Each time a pool is made its nodes get names never used before, as GKE's do: the pods
of a pool just deleted, which only the pod garbage collector removes (no kubelet runs
them), would otherwise count against the GPUs of a new pool's node of the same name.
"""

from __future__ import annotations

import secrets
import threading
from collections import Counter
from typing import TYPE_CHECKING, Any

from imagegen_operator.api import ImageGenService
from imagegen_operator.planner import Plan
from imagegen_operator.providers.base import MadePool, PoolNotOwned, PoolState
from imagegen_operator.render.nodepool import (
    KWOK_ANNOTATION,
    POOL_LABEL,
    SIMULATED_TAINT,
    NodeBounds,
    local_node,
    node_zone,
    render_kwok_nodes,
)

if TYPE_CHECKING:  # the Kubernetes client stays out of `render` and `plan`
    from imagegen_operator.kube import Kube

# The part of its nodes' names one making of a pool has to itself.
POOL_ID_ANNOTATION = "imagegen.dev/simulated-pool-id"


def node_ready(node: dict[str, Any]) -> bool:
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in (node.get("status") or {}).get("conditions") or []
    )


def is_simulated(node: dict[str, Any]) -> bool:
    """A node this provider made: KWOK's annotation and the taint only Local pods tolerate."""
    meta, spec = node.get("metadata") or {}, node.get("spec") or {}
    return KWOK_ANNOTATION in (meta.get("annotations") or {}) and any(
        taint.get("key") == SIMULATED_TAINT["key"] for taint in spec.get("taints") or []
    )


class LocalProvider:
    name = "Local"

    @staticmethod
    def render(resource: ImageGenService, plan: Plan) -> list[dict[str, Any]]:
        return render_kwok_nodes(resource, plan)

    def __init__(self, kube: Kube):
        self.kube = kube
        self._lock = threading.Lock()
        self._pool_locks: dict[str, threading.Lock] = {}

    def _nodes(self, pool: str) -> list[dict[str, Any]]:
        """The pool's simulated nodes, and only those: a real GKE pool of the same name
        labels its nodes alike, and this provider deletes what it lists."""
        nodes = self.kube.list("v1", "Node", label_selector=f"{POOL_LABEL}={pool},type=kwok")
        return [node for node in nodes if is_simulated(node)]

    def _pool_lock(self, pool: str) -> threading.Lock:
        # Services sharing a pool reconcile in parallel: one at a time per pool, so
        # a node is written once per change, not once per service.
        with self._lock:
            return self._pool_locks.setdefault(pool, threading.Lock())

    def ensure(
        self, resource: ImageGenService, plan: Plan, target_nodes: int,
        bounds: NodeBounds | None = None,
    ) -> PoolState:
        with self._pool_lock(plan.nodepool_name):
            nodes = self._nodes(plan.nodepool_name)
            live = {n["metadata"]["name"]: n for n in nodes}
            spot = bool(resource.spec.node_pool.spot)
            pool_id = _pool_id(nodes)
            for index in range(target_nodes):
                name = f"{plan.nodepool_name}-{pool_id}-{index}" if pool_id else (
                    f"{plan.nodepool_name}-{index}")
                if name not in live:
                    self._refuse_a_node_not_ours(name, plan.nodepool_name)
                node = local_node(plan, name, spot, node_zone(plan, index))
                if pool_id:
                    node["metadata"]["annotations"][POOL_ID_ANNOTATION] = pool_id
                # Compared with the listed node: written only when missing or changed.
                self.kube.apply(node, live=live.get(name), read_first=False)
        # A node made just now is not Ready yet: the list from before counts them all.
        ready = sum(1 for n in nodes if node_ready(n))
        if target_nodes and ready == 0:
            return PoolState(
                plan.nodepool_name,
                False,
                0,
                "Provisioning",
                f"waiting for the simulated nodes of pool {plan.nodepool_name}",
            )
        return PoolState(
            plan.nodepool_name,
            True,
            ready,
            "Ready",
            f"{ready} simulated node(s) Ready in pool {plan.nodepool_name}",
        )

    def _refuse_a_node_not_ours(self, name: str, pool: str) -> None:
        """A Node of that name that is not a simulated one of this pool (a real node, say):
        never applied over (its taints, labels and status would become a simulated node's,
        and the pool's delete would then remove it)."""
        existing = self.kube.get("v1", "Node", name)
        labels = (existing or {}).get("metadata", {}).get("labels") or {}
        if existing is None or (is_simulated(existing) and labels.get(POOL_LABEL) == pool):
            return
        raise PoolNotOwned(
            f"a Node named {name} exists that the Local provider did not make; it is neither "
            "changed nor deleted: give the pool another name (spec.nodePool.name)")

    def pools_made(self, cluster: str | None) -> list[MadePool]:
        nodes = self.kube.list("v1", "Node", label_selector=f"{POOL_LABEL},type=kwok")
        names = {n["metadata"]["labels"][POOL_LABEL] for n in nodes if is_simulated(n)}
        return [MadePool("", name) for name in sorted(names)]

    def delete(self, resource: ImageGenService, plan: Plan) -> bool:
        with self._pool_lock(plan.nodepool_name):
            nodes = self._nodes(plan.nodepool_name)
            for node in nodes:
                self.kube.delete("v1", "Node", node["metadata"]["name"])
        return not nodes


def _pool_id(nodes: list[dict[str, Any]]) -> str:
    """The id the pool's nodes carry; a new one for a pool that has none. Nodes made
    before pools had ids keep their names (``{pool}-{index}``), and so do their peers:
    where any node has no id, the pool keeps the old names."""
    if not nodes:
        return secrets.token_hex(3)
    ids = [(n["metadata"].get("annotations") or {}).get(POOL_ID_ANNOTATION, "") for n in nodes]
    return "" if "" in ids else Counter(ids).most_common(1)[0][0]
