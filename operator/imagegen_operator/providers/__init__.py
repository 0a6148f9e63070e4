"""Node-pool providers: GKE (API), ConfigConnector, Existing and Local (KWOK)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from imagegen_operator.api import ImageGenService
from imagegen_operator.planner import Plan
from imagegen_operator.providers.base import NodePoolProvider, PoolState, ProviderError
from imagegen_operator.providers.config_connector import ConfigConnectorProvider
from imagegen_operator.providers.existing import ExistingProvider
from imagegen_operator.providers.local import LocalProvider
from imagegen_operator.render.nodepool import NodeBounds

if TYPE_CHECKING:  # the Kubernetes client stays out of `render` and `plan`
    from imagegen_operator.kube import Kube

__all__ = ["PROVIDER_CLASSES", "NodePoolProvider", "PoolState", "ProviderError",
           "build_providers", "render_pool"]


def _gke_class() -> type:
    from imagegen_operator.providers.gke import GkeProvider

    return GkeProvider


def render_pool(resource: ImageGenService, plan: Plan) -> list[dict[str, Any]]:
    """The node-pool documents of the resource's provider (each provider renders its own)."""
    provider = resource.spec.node_pool.provider
    cls = _gke_class() if provider == "GKE" else PROVIDER_CLASSES[provider]
    return cls.render(resource, plan)


class _Lazy:
    """Builds a provider on first use, so a cluster that never asks for GKE never
    needs Google credentials or the client library."""

    def __init__(self, name: str, factory: Callable[[], NodePoolProvider]):
        self.name = name
        self._factory = factory
        self._provider: NodePoolProvider | None = None

    def _get(self) -> NodePoolProvider:
        if self._provider is None:
            self._provider = self._factory()
        return self._provider

    def ensure(
        self, resource: ImageGenService, plan: Plan, target_nodes: int,
        bounds: NodeBounds | None = None,
    ) -> PoolState:
        return self._get().ensure(resource, plan, target_nodes, bounds)

    def delete(self, resource: ImageGenService, plan: Plan) -> bool:
        return self._get().delete(resource, plan)


def _gke() -> NodePoolProvider:
    import os

    from imagegen_operator.providers.gke import BACKOFF_BASE_S, BACKOFF_MAX_S, GkeProvider

    # The backoff of calls that failed in a way that passes (busy, rate-limited, down).
    return GkeProvider(
        backoff_base=float(os.environ.get("IMAGEGEN_GKE_BACKOFF_BASE_S", BACKOFF_BASE_S)),
        backoff_max=float(os.environ.get("IMAGEGEN_GKE_BACKOFF_MAX_S", BACKOFF_MAX_S)),
    )


# The providers that need nothing heavy to import; GKE's is imported on first use.
PROVIDER_CLASSES: dict[str, type] = {
    "ConfigConnector": ConfigConnectorProvider,
    "Existing": ExistingProvider,
    "Local": LocalProvider,
}


def build_providers(
    kube: Kube, gke: Callable[[], NodePoolProvider] = _gke
) -> dict[str, NodePoolProvider]:
    """One provider per ``spec.nodePool.provider`` value."""
    return {"GKE": _Lazy("GKE", gke), **{n: cls(kube) for n, cls in PROVIDER_CLASSES.items()}}
