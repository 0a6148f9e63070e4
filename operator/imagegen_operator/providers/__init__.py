"""Node-pool providers: GKE (API), ConfigConnector, Existing and Local (KWOK)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from imagegen_operator.api import ImageGenService
from imagegen_operator.planner import Plan
from imagegen_operator.providers.base import (
    MadePool,
    NodePoolProvider,
    PoolState,
    ProviderError,
)
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

    def pools_made(self, cluster: str | None) -> list[MadePool]:
        # Off GKE (no cluster) there is nothing to look through, and no credentials to build
        # the client with.
        return self._get().pools_made(cluster) if cluster else []


# A day: longer than any backoff or hold that makes sense, short enough to print as a time.
MAX_SETTING_S = 86_400


def _backoff_setting(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value <= MAX_SETTING_S:  # NaN and infinity too
        raise ValueError(
            f"{name} must be a number of seconds above 0 and at most {MAX_SETTING_S}, "
            f"got {raw!r}")
    return value


def _gke_backoff() -> tuple[float, float]:
    """The backoff of GKE calls that failed in a way that passes (busy, rate-limited, down),
    base and cap in seconds, from the environment."""
    from imagegen_operator.providers.gke import BACKOFF_BASE_S, BACKOFF_MAX_S

    base = _backoff_setting("IMAGEGEN_GKE_BACKOFF_BASE_S", BACKOFF_BASE_S)
    cap = _backoff_setting("IMAGEGEN_GKE_BACKOFF_MAX_S", max(BACKOFF_MAX_S, base))
    if base > cap:
        raise ValueError(
            f"IMAGEGEN_GKE_BACKOFF_BASE_S ({base:g}) must not exceed "
            f"IMAGEGEN_GKE_BACKOFF_MAX_S ({cap:g})"
        )
    return base, cap


def _gke_hold() -> float:
    """How long a create GKE refused (a quota, a stockout) is held before it is sent again."""
    from imagegen_operator.providers.gke import FAILED_CREATE_HOLD_S

    return _backoff_setting("IMAGEGEN_GKE_FAILED_CREATE_HOLD_S", FAILED_CREATE_HOLD_S)


def _gke(kube: Kube) -> NodePoolProvider:
    from imagegen_operator import gke
    from imagegen_operator.providers.gke import GkeProvider
    from imagegen_operator.providers.local import node_ready

    def count_nodes(pool: str) -> int:
        # GKE labels each node with its pool's name; the autoscaler decides how many.
        nodes = kube.list("v1", "Node", label_selector=f"{gke.LABEL_NODEPOOL}={pool}")
        return sum(1 for node in nodes if node_ready(node))

    base, cap = _gke_backoff()
    return GkeProvider(backoff_base=base, backoff_max=cap, failed_create_hold=_gke_hold(),
                       count_nodes=count_nodes)


# The providers that need nothing heavy to import; GKE's is imported on first use.
PROVIDER_CLASSES: dict[str, type] = {
    "ConfigConnector": ConfigConnectorProvider,
    "Existing": ExistingProvider,
    "Local": LocalProvider,
}


def build_providers(
    kube: Kube, gke: Callable[[], NodePoolProvider] | None = None
) -> dict[str, NodePoolProvider]:
    """One provider per ``spec.nodePool.provider`` value. The GKE one is built on first use,
    but its settings are checked now: a typo fails the start, not the first GKE service."""
    if gke is None:
        _gke_backoff()
        _gke_hold()

        def gke() -> NodePoolProvider:
            return _gke(kube)

    return {"GKE": _Lazy("GKE", gke), **{n: cls(kube) for n, cls in PROVIDER_CLASSES.items()}}
