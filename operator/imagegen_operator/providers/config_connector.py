"""The ConfigConnector provider: a ``ContainerNodePool`` object in the cluster.

Config Connector's controller turns it into a GKE node pool; we apply it and
read its ``Ready`` condition. Nodes are counted by GKE's node-pool label.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from imagegen_operator import gke
from imagegen_operator.api import ImageGenService
from imagegen_operator.planner import Plan
from imagegen_operator.providers.base import PoolState, ProviderError
from imagegen_operator.providers.local import node_ready
from imagegen_operator.render.nodepool import (
    CNRM_API_VERSION,
    NodeBounds,
    render_config_connector_nodepool,
)

if TYPE_CHECKING:  # the Kubernetes client stays out of `render` and `plan`
    from imagegen_operator.kube import Kube

KIND = "ContainerNodePool"


class ConfigConnectorProvider:
    name = "ConfigConnector"

    @staticmethod
    def render(resource: ImageGenService, plan: Plan) -> list[dict[str, Any]]:
        return [render_config_connector_nodepool(resource, plan)]

    def __init__(self, kube: Kube):
        self.kube = kube

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
        self.kube.apply(desired, live=live)
        ready = next(
            (
                c
                for c in ((live or {}).get("status") or {}).get("conditions") or []
                if c.get("type") == "Ready"
            ),
            None,
        )
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
        return PoolState(meta["name"], False, ready_nodes, _camel(reason), message)

    def delete(self, resource: ImageGenService, plan: Plan) -> bool:
        from imagegen_operator.kube import MissingKind

        desired = render_config_connector_nodepool(resource, plan)
        meta = desired["metadata"]
        try:
            return self.kube.delete(CNRM_API_VERSION, KIND, meta["name"], meta.get("namespace"))
        except MissingKind:
            return True


def _camel(reason: str) -> str:
    # Condition reasons must be CamelCase words; Config Connector's already are.
    return "".join(part[:1].upper() + part[1:] for part in reason.replace("-", " ").split())
