"""The ConfigConnector provider: a ``ContainerNodePool`` object in the cluster.

Config Connector's controller turns it into a GKE node pool; we apply it and
read its ``Ready`` condition. Nodes are counted by GKE's node-pool label.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from imagegen_operator import gke
from imagegen_operator.api import ImageGenService
from imagegen_operator.planner import Plan
from imagegen_operator.providers.base import (
    MadePool,
    PoolNotOwned,
    PoolState,
    ProviderError,
    check_pods_room,
)
from imagegen_operator.providers.local import node_ready
from imagegen_operator.render.common import MANAGED_BY
from imagegen_operator.render.nodepool import (
    CNRM_API_VERSION,
    POOL_LABEL,
    NodeBounds,
    render_config_connector_nodepool,
)

if TYPE_CHECKING:  # the Kubernetes client stays out of `render` and `plan`
    from imagegen_operator.kube import Kube

KIND = "ContainerNodePool"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
# Config Connector deletes the object but keeps the Google Cloud resource.
ABANDON = ("cnrm.cloud.google.com/deletion-policy", "abandon")

log = logging.getLogger(__name__)


class ConfigConnectorProvider:
    name = "ConfigConnector"

    @staticmethod
    def render(resource: ImageGenService, plan: Plan) -> list[dict[str, Any]]:
        return [render_config_connector_nodepool(resource, plan)]

    def __init__(self, kube: Kube):
        self.kube = kube
        # One GKE pool, one lock, whichever namespace asks: the check for another
        # namespace's object and the apply must not interleave with theirs.
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._guard = threading.Lock()
        self._said_forbidden = False

    def _lock(self, desired: dict[str, Any]) -> threading.Lock:
        key = (desired["spec"]["clusterRef"]["external"], desired["metadata"]["name"])
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def ensure(
        self, resource: ImageGenService, plan: Plan, target_nodes: int,
        bounds: NodeBounds | None = None,
    ) -> PoolState:
        from imagegen_operator.kube import MissingKind

        # The bounds of every service on the pool: one spec, whichever of them applies it.
        desired = render_config_connector_nodepool(resource, plan, bounds)
        meta = desired["metadata"]
        try:
            live = self.kube.get(CNRM_API_VERSION, KIND, meta["name"], meta.get("namespace"))
        except MissingKind as exc:
            raise ProviderError(
                "ConfigConnectorMissing",
                f"{exc}: install Config Connector or use provider GKE",
            ) from exc
        if live is not None and not _made_by_us(live):
            raise PoolNotOwned(_not_ours(meta))
        if live is not None:
            _check_unchangeable(live, desired, resource)
            # Immutable as well: the maximum it was made with, or none (the cluster's).
            made_for = (live.get("spec") or {}).get("maxPodsPerNode")
            check_pods_room(meta["name"], made_for, plan)
            desired["spec"].pop("maxPodsPerNode")
            if made_for is not None:
                desired["spec"]["maxPodsPerNode"] = made_for
        if live is not None and "initialNodeCount" in live.get("spec", {}):
            # Immutable in Config Connector (a change would recreate the pool): the count
            # it was made with stays, whatever minNodes the pool's services ask for now.
            desired["spec"]["initialNodeCount"] = live["spec"]["initialNodeCount"]
        if live is not None:
            # Immutable too: a pool keeps the nodes' account it was made with (the
            # operator's setting names the account of pools made from then on).
            node_config = desired["spec"]["nodeConfig"]
            made_with = (live.get("spec") or {}).get("nodeConfig") or {}
            for field in ("serviceAccountRef", "oauthScopes"):
                node_config.pop(field, None)
                if field in made_with:
                    node_config[field] = made_with[field]
            # Immutable as well, and found to match what the spec asks for: the machines a
            # derived type now names (another release's table) and the GPUs' settings
            # (another release's driver) stay as they were made.
            if resource.spec.node_pool.machine_type is None and "machineType" in made_with:
                node_config["machineType"] = made_with["machineType"]
            if "guestAccelerator" in made_with:
                node_config["guestAccelerator"] = made_with["guestAccelerator"]
        if live is None:
            self._refuse_a_pool_made_elsewhere(meta["name"])
        with self._lock(desired):
            if live is None and self._claimed_by(desired):
                raise ProviderError(
                    "PoolClaimed",
                    f"node pool {meta['name']} of cluster {_cluster(desired)} is already made "
                    f"from a {KIND} of another namespace. Set spec.nodePool.name to a "
                    "name of this namespace's own.",
                )
            now = self.kube.apply(desired, live=live)
        ready = _ready_condition(now)
        nodes = self.kube.list("v1", "Node", label_selector=f"{gke.LABEL_NODEPOOL}={meta['name']}")
        ready_nodes = sum(1 for n in nodes if node_ready(n))
        if ready and ready.get("status") == "True":
            return PoolState(
                meta["name"],
                True,
                ready_nodes,
                "Ready",
                ready.get("message") or "ContainerNodePool is Ready",
            )
        reason = (ready or {}).get("reason") or "Provisioning"
        message = (ready or {}).get("message") or "waiting for Config Connector"
        # A pool that was made and has nodes serves on while an update of it fails (new
        # bounds refused, the cluster busy): what failed is said, the pool is not down.
        serving = (live is not None and ready_nodes > 0
                   and not now["metadata"].get("deletionTimestamp"))
        return PoolState(meta["name"], serving, ready_nodes, _camel(reason), message)

    def pools_made(self, cluster: str | None) -> list[MadePool]:
        from imagegen_operator.kube import Forbidden, MissingKind

        try:
            objects = self.kube.list(CNRM_API_VERSION, KIND,
                                     label_selector=f"{MANAGED_BY_LABEL}={MANAGED_BY}")
        except MissingKind:
            return []  # no Config Connector: none made
        except Forbidden as exc:
            # The chart grants this provider nothing where it is turned off
            # (providers.configConnector.enabled), though the cluster serves the kind:
            # none made by this install. Said once, not at every sweep.
            if not self._said_forbidden:
                self._said_forbidden = True
                log.info("not looking for ContainerNodePools this operator made: %s", exc)
            return []
        return [MadePool(_cluster(o) or "", o["metadata"]["name"], o["metadata"]["namespace"])
                for o in objects if _made_by_us(o) and not o["metadata"].get("deletionTimestamp")]

    def delete(self, resource: ImageGenService, plan: Plan, keep_pool: bool = False) -> bool:
        """Delete the object, and with it the GKE pool; ``keep_pool``: the object only (the
        service now manages that pool through GKE's API)."""
        from imagegen_operator.kube import MissingKind

        desired = render_config_connector_nodepool(resource, plan)
        meta = desired["metadata"]
        try:
            live = self.kube.get(CNRM_API_VERSION, KIND, meta["name"], meta.get("namespace"))
            if live is None:
                return True
            if not _made_by_us(live):
                raise PoolNotOwned(_not_ours(meta))
            if _cluster(live) != _cluster(desired):
                raise PoolNotOwned(
                    f"{KIND} {meta['namespace']}/{meta['name']} stands for the pool of cluster "
                    f"{_cluster(live)}, not of {_cluster(desired)}; it is left alone")
            with self._lock(desired):
                abandon = keep_pool or self._claimed_by(desired)
                if abandon and ABANDON not in _annotations(live).items():
                    # The pool is managed through GKE's API now, or another namespace's
                    # object stands for it (both made before pools were kept per
                    # namespace): delete only this object.
                    self.kube.apply({**desired, "spec": live["spec"], "metadata": {
                        **meta, "annotations": {**meta["annotations"], ABANDON[0]: ABANDON[1]}}},
                        live=live)
                return self.kube.delete(CNRM_API_VERSION, KIND, meta["name"], meta["namespace"])
        except MissingKind:
            return True

    def _refuse_a_pool_made_elsewhere(self, name: str) -> None:
        """Before the object is made: Config Connector acquires a GKE pool that already has
        its name, and deletes it with the object. One whose nodes the operator did not make
        (the cluster's default-pool, a pool of Terraform's) is refused, and left alone. (A
        pool of the operator's own, through the GKE provider before, is handed over.)"""
        nodes = self.kube.list("v1", "Node", label_selector=f"{gke.LABEL_NODEPOOL}={name}")
        if foreign := _foreign_nodes(nodes):
            raise PoolNotOwned(
                f"node pool {name} exists in this cluster (its node {foreign[0]}) and was not "
                f"made by {MANAGED_BY}: Config Connector would take it over, and delete it "
                "with the service. It is left alone: set spec.nodePool.name to a free name, "
                "or serve on it with provider Existing")

    def _claimed_by(self, desired: dict[str, Any]) -> str | None:
        """namespace/name of a ContainerNodePool of ours in another namespace that stands
        for the same GKE pool, if there is one.

        A pool's object lives in its service's namespace, and Config Connector makes one
        GKE pool of every object with the same name and cluster: two namespaces' objects
        would fight over its settings, and deleting either would delete the pool under
        the other's nodes.
        """
        meta = desired["metadata"]
        for other in self.kube.list(CNRM_API_VERSION, KIND,
                                    label_selector=f"{MANAGED_BY_LABEL}={MANAGED_BY}"):
            theirs = other["metadata"]
            if (theirs["name"] == meta["name"] and theirs.get("namespace") != meta["namespace"]
                    and not theirs.get("deletionTimestamp")
                    and _cluster(other) == _cluster(desired)):
                return f"{theirs.get('namespace')}/{theirs['name']}"
        return None


def _ready_condition(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The object's Ready condition; none that reads ready for an object on its way out
    (its last user's delete under way: the pool goes with it)."""
    meta, status = obj["metadata"], obj.get("status") or {}
    if meta.get("deletionTimestamp"):
        return {"status": "False", "reason": "Deleting",
                "message": f"{KIND} {meta.get('namespace')}/{meta['name']} is being deleted; "
                           "the pool is made again once it is gone"}
    return next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)


def _unchangeable(spec: dict[str, Any], derived_machine: bool) -> dict[str, Any]:
    """What the operator does not change on a pool: its machines and GPUs (Config
    Connector's CRD marks them immutable) and its zones (a change would add and remove
    nodes under every service on the pool)."""
    node = spec.get("nodeConfig") or {}
    gpu = (node.get("guestAccelerator") or [{}])[0]
    sharing = gpu.get("gpuSharingConfig") or {}
    out = {
        "machine type": node.get("machineType"),
        "spot": bool(node.get("spot")),
        "GPU": gpu.get("type"),
        "GPUs per node": int(gpu.get("count") or 0),
        "partition size": gpu.get("gpuPartitionSize"),
        "sharing": sharing.get("gpuSharingStrategy"),
        "clients per GPU": int(sharing.get("maxSharedClientsPerGpu") or 0),
        "zones": sorted(spec.get("nodeLocations") or []),
    }
    if derived_machine:
        del out["machine type"]  # follows GKE's machine types across operator upgrades
    return out


def _check_unchangeable(live: dict[str, Any], desired: dict[str, Any],
                        resource: ImageGenService) -> None:
    """Refuse, naming the fields, a spec the live object cannot take: another cluster, or
    other machines or GPUs. Config Connector would refuse the apply with a message that
    names neither the spec's fields nor the way out."""
    name = desired["metadata"]["name"]
    if _cluster(live) != _cluster(desired):
        raise ProviderError(
            "PoolConfigMismatch",
            f"{KIND} {live['metadata'].get('namespace')}/{name} stands for node pool {name} of "
            f"cluster {_cluster(live)}, and Config Connector cannot move it to cluster "
            f"{_cluster(desired)}. Set spec.nodePool.name to a name for the pool in the new "
            "cluster.",
        )
    derived = resource.spec.node_pool.machine_type is None
    have = _unchangeable(live.get("spec") or {}, derived)
    want = _unchangeable(desired["spec"], derived)
    if not want["zones"]:
        # Named by no spec, the pool's zones are the cluster's: any it has are the spec's.
        del want["zones"], have["zones"]
    if differ := [k for k in want if want[k] != have[k]]:
        changes = ", ".join(f"{k} {have[k]} (the spec asks for {want[k]})" for k in differ)
        raise ProviderError(
            "PoolConfigMismatch",
            f"node pool {name} has {changes}, which the operator does not change on a pool. "
            "Set spec.nodePool.name to a free name (or remove it for a name derived from the "
            "GPU settings), and the service moves to a new pool.",
        )


def _cluster(obj: dict[str, Any]) -> str | None:
    return ((obj.get("spec") or {}).get("clusterRef") or {}).get("external")


def _annotations(obj: dict[str, Any]) -> dict[str, str]:
    return obj["metadata"].get("annotations") or {}


def _foreign_nodes(nodes: list[dict[str, Any]]) -> list[str]:
    """Nodes of a GKE pool that the operator did not make: without the label its pools put
    on their nodes (a pool made by hand, by Terraform, or the cluster's default-pool)."""
    return [n["metadata"]["name"] for n in nodes
            if POOL_LABEL not in (n["metadata"].get("labels") or {})]


def _not_ours(meta: dict[str, Any]) -> str:
    return (
        f"{KIND} {meta['namespace']}/{meta['name']} exists and was not made by {MANAGED_BY}; "
        "it is left alone. Set spec.nodePool.name to a free name."
    )


def _made_by_us(obj: dict[str, Any]) -> bool:
    return (obj["metadata"].get("labels") or {}).get(MANAGED_BY_LABEL) == MANAGED_BY


def _camel(reason: str) -> str:
    # Condition reasons must be CamelCase words; Config Connector's already are.
    return "".join(part[:1].upper() + part[1:] for part in reason.replace("-", " ").split())
