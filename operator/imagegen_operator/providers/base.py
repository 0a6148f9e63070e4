"""The one small interface every node-pool provider implements.

A provider makes sure the node pool a plan asks for exists (without blocking:
it starts what must be started and reports how far it got) and deletes it when
the last service using it is gone. What a pool is shared by is the operator's
business, not the provider's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from imagegen_operator import gke
from imagegen_operator.api import ImageGenService
from imagegen_operator.planner import Plan
from imagegen_operator.render.nodepool import NodeBounds


@dataclass(frozen=True)
class PoolState:
    """What a provider observed about one pool.

    ``reason`` is a CamelCase word for the NodePoolReady condition
    (``Ready``, ``Provisioning``, ``QuotaExceeded``...), ``message`` a sentence a
    user can act on.
    """

    name: str
    ready: bool
    ready_nodes: int
    reason: str
    message: str = ""


@dataclass(frozen=True)
class MadePool:
    """A pool found made by the operator: its cluster (cloud providers), name, and namespace
    (a ConfigConnector pool's object's)."""

    scope: str
    name: str
    namespace: str = ""


class ProviderError(Exception):
    """A pool operation failed; ``retry_after`` is set when trying again can help.

    ``unanswered``: the provider could not be asked at all (busy, rate-limited, unreachable),
    which says nothing of the pool itself.
    """

    def __init__(self, reason: str, message: str, retry_after: float | None = None,
                 unanswered: bool = False):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retry_after = retry_after
        self.unanswered = unanswered

    @property
    def transient(self) -> bool:
        return self.retry_after is not None


class PoolNotOwned(ProviderError):
    """A pool of the planned name exists that the operator did not make: it is neither
    changed nor deleted."""

    def __init__(self, message: str):
        super().__init__("PoolNotOwned", message)


def check_pods_room(name: str, max_pods: int | None, plan: Plan) -> None:
    """Refuse a pool found with room for fewer pods a node than its slots and GKE's own
    pods (made by hand, or before pools were made for their pods): the maximum cannot
    change on a running pool, and the pods past it would stay Pending on a pool read as
    Ready."""
    if wanted := gke.pods_short(max_pods, plan.slots_per_node):
        raise ProviderError(
            "PoolConfigMismatch",
            f"node pool {name} runs at most {max_pods} pods on a node, and a node's "
            f"{plan.slots_per_node} serving pods and GKE's own need {wanted}, which GKE "
            "does not change on a running pool. Set spec.nodePool.name to a free name (or "
            "remove it for a name derived from the GPU settings), and the service moves to "
            "a new pool made for them.",
        )


class NodePoolProvider(Protocol):
    """``ensure`` and ``delete`` are idempotent and keyed by ``plan.nodepool_name``."""

    name: str

    @staticmethod
    def render(resource: ImageGenService, plan: Plan) -> list[dict[str, Any]]:
        """The pool as documents (what ``imagegen-operator render`` prints); none when
        the provider makes no object of its own."""
        ...

    def ensure(
        self, resource: ImageGenService, plan: Plan, target_nodes: int,
        bounds: NodeBounds | None = None,
    ) -> PoolState:
        """Create the pool if it is missing, start nothing twice, report its state.

        ``target_nodes`` is what every service sharing the pool needs together,
        within ``bounds`` (a hint: GKE's autoscaler decides by itself). ``bounds``:
        the autoscaling (min, max) nodes of all those services together, which a
        pool already there is brought to; None means this service's own.
        """
        ...

    def delete(self, resource: ImageGenService, plan: Plan) -> bool:
        """Start deleting the pool; True once it is gone. Raises :class:`PoolNotOwned` for a
        pool the operator did not make."""
        ...

    def pools_made(self, cluster: str | None) -> list[MadePool]:
        """Every pool of this provider that the operator made and that is still there, in
        ``cluster`` (the operator's own GKE cluster, None when not known) for the cloud
        providers: what a sweep for pools no service uses looks through."""
        ...

