"""The ``GKE`` provider: node pools made through GKE's API (google-cloud-container).

Level-based and non-blocking: every call to :meth:`GkeProvider.ensure` reads the
pool, starts what is missing and returns at once; the operator calls again on
its timer, and the next call sees how far GKE got. Nothing here waits for a
long-running operation.

- The pool's name is the key: a pool that exists is never created again, and
  ``AlreadyExists`` from a create that raced another one is success.
- GKE runs one operation at a time per cluster and refuses a second with
  ``FAILED_PRECONDITION``/``409`` "Operation ... is currently ... Please wait and
  try again once it is done." That is ``ClusterBusy``, transient, with an
  exponential backoff counted per pool.
- Errors become :class:`ProviderError` with a reason for the NodePoolReady
  condition and GKE's own words as the message.
- A create GKE refuses for good (a quota, a permission, a refused config) or whose
  operation fails (a GPU stockout) is reported and held for ``failed_create_hold``, not
  sent again on every resync. A pool left in ``ERROR`` (GKE keeps one when a create
  fails part way) is held as long, then deleted and created anew: GKE does not mend it.
  ``RUNNING_WITH_ERROR`` is "partially usable": its nodes serve, with the problem said.
- Retry delays are spread (half to all of each step), so the pools of one cluster that
  were refused together do not all ask again at the same moment.
- A running pool whose autoscaling bounds differ from what its services ask for
  (an edit of ``minNodes``/``maxNodes``, a second service with larger ones) gets
  ``setAutoscaling``. Its nodes keep serving meanwhile, so the pool stays ready; a
  refused or failed update is reported on the condition and tried again later.

What the provider remembers between calls (the last operation it started, the
backoff counter, a failed create) is only an optimisation: after an operator
restart it starts from what GKE reports, and still creates nothing twice.

The client: by default a ``ClusterManagerClient`` with Application Default
Credentials (Workload Identity on GKE), built on first use. ``IMAGEGEN_GKE_API_ENDPOINT``
points it elsewhere (see :func:`build_client`).
"""

from __future__ import annotations

import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from imagegen_operator.api import ImageGenService
from imagegen_operator.gke import ZONE_RE
from imagegen_operator.planner import Plan
from imagegen_operator.providers.base import (
    MadePool,
    PoolNotOwned,
    PoolState,
    ProviderError,
    check_pods_room,
)
from imagegen_operator.render.common import MANAGED_BY
from imagegen_operator.render.nodepool import (
    LOCATION_POLICY,
    NodeBounds,
    create_node_pool_request,
    parse_cluster,
    pool_bounds,
    render_gke_nodepool,
)

log = logging.getLogger(__name__)

ENDPOINT_ENV = "IMAGEGEN_GKE_API_ENDPOINT"

# Seconds per API call. The library's defaults retry reads for 20 s and allow a
# create 45 s; the operator's own loop is the retry, so each call fails fast.
CALL_TIMEOUT_S = 30.0
BACKOFF_BASE_S = 15.0
BACKOFF_MAX_S = 300.0
# How long a failed create operation is reported before the pool is tried again:
# GPU stockouts and quota raises take minutes, not seconds.
FAILED_CREATE_HOLD_S = 300.0
_MAX_ATTEMPTS = 16  # caps the backoff exponent

# GKE's wording for "another operation is running on this cluster or pool", and for its
# cap on operations at once ("Too many operations: cluster ... hits the concurrent
# operations quota 5, please try again later.", a 429 that names a quota and passes).
_BUSY = re.compile(
    r"operation \S+ is currently|please wait and try again|incompatible operation"
    r"|cluster is currently being|is currently (creating|deleting|upgrading|updating)"
    r"|too many operations|concurrent operations",
    re.IGNORECASE,
)
# Resource quotas: "Insufficient regional quota to satisfy request: ...",
# "Quota 'NVIDIA_H100_GPUS' exceeded", reason QUOTA_EXCEEDED.
_QUOTA = re.compile(r"quota", re.IGNORECASE)
# API request-rate quotas ("Quota exceeded for quota metric 'Read requests' and
# limit 'Read requests per minute'") pass by themselves: transient, unlike resource quotas.
_RATE_LIMIT = re.compile(r"quota metric|per minute|rate limit", re.IGNORECASE)
# google.rpc.Code numbers found in Operation.error.code.
_RPC_RESOURCE_EXHAUSTED = 8


def build_client(endpoint: str | None = None) -> Any:
    """A ``ClusterManagerClient``.

    - no endpoint (the default, and what production uses): GKE itself, gRPC,
      Application Default Credentials.
    - ``http://HOST:PORT``: a plain-HTTP endpoint with anonymous credentials,
      for local test doubles of the REST API; never GKE.
    - ``https://HOST``: another HTTPS endpoint (a private or regional API
      endpoint), REST, Application Default Credentials.
    """
    from google.cloud import container_v1

    if not endpoint:
        return container_v1.ClusterManagerClient()
    from google.cloud.container_v1.services.cluster_manager.transports.rest import (
        ClusterManagerRestTransport,
    )

    scheme, _, host = endpoint.rpartition("://")
    if scheme == "http":
        from google.auth.credentials import AnonymousCredentials

        transport = ClusterManagerRestTransport(
            host=host, url_scheme="http", credentials=AnonymousCredentials()
        )
    else:
        transport = ClusterManagerRestTransport(host=host)
    return container_v1.ClusterManagerClient(transport=transport)


@dataclass
class _PoolMemory:
    """What the provider remembers about one pool between calls."""

    operation: str | None = None  # full name of the last operation it started
    kind: str | None = None  # "create", "delete" or "autoscaling"
    attempts: int = 0  # consecutive transient failures, for the backoff
    failure: ProviderError | None = None  # a failed create, reported until failed_until
    failed_until: float = 0.0
    retry_at: datetime | None = None  # failed_until, on the wall clock, for messages
    # An autoscaling update GKE refused or failed: its words, and when to try again.
    autoscaling_problem: str | None = None
    autoscaling_after: float = 0.0


class GkeProvider:
    """Creates, reads and deletes GKE node pools; see the module docstring."""

    name = "GKE"

    @staticmethod
    def render(resource: ImageGenService, plan: Plan) -> list[dict[str, Any]]:
        return [render_gke_nodepool(resource, plan)]

    def __init__(
        self,
        client: Any | None = None,
        *,
        timeout: float = CALL_TIMEOUT_S,
        backoff_base: float = BACKOFF_BASE_S,
        backoff_max: float = BACKOFF_MAX_S,
        failed_create_hold: float = FAILED_CREATE_HOLD_S,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[float], float] | None = None,
        count_nodes: Callable[[str], int] | None = None,
    ):
        if not (0 < backoff_base <= backoff_max):
            raise ValueError(
                f"the GKE backoff needs 0 < base <= max seconds, got {backoff_base} and "
                f"{backoff_max}"
            )
        self._client = client
        self.timeout = timeout
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.failed_create_hold = failed_create_hold
        self._clock = clock
        self._jitter = jitter or _spread
        # Ready Nodes of a pool, by its name, as the cluster's API server lists them; without
        # it, the count the pool's bounds and the target allow (GKE's API gives none).
        self._count_nodes = count_nodes
        self._lock = threading.Lock()
        self._memory: dict[str, _PoolMemory] = {}
        self._pool_locks: dict[str, threading.Lock] = {}

    @property
    def client(self) -> Any:
        # Built on first use: importing the library and finding credentials is
        # only worth it once a service asks for a GKE pool.
        if self._client is None:
            try:
                self._client = build_client(os.environ.get(ENDPOINT_ENV))
            except Exception as exc:  # google.auth.exceptions.DefaultCredentialsError, mostly
                raise ProviderError(
                    "CredentialsUnavailable",
                    f"cannot build a GKE API client: {exc}",
                ) from exc
        return self._client

    # --- the interface ---------------------------------------------------------

    def ensure(
        self, resource: ImageGenService, plan: Plan, target_nodes: int,
        bounds: NodeBounds | None = None,
    ) -> PoolState:
        cluster = _cluster_of(resource)
        name = f"{cluster}/nodePools/{plan.nodepool_name}"
        bounds = pool_bounds(resource, bounds)
        with self._pool_lock(name):
            try:
                pool = self._call(name, self.client.get_node_pool, name=name)
            except _NotFound:
                return self._create(resource, plan, cluster, name, bounds)
            _check_claim(name, pool, resource, plan)
            return self._observe(name, plan.nodepool_name, pool, target_nodes, bounds)

    def pools_made(self, cluster: str | None) -> list[MadePool]:
        if not cluster:
            return []
        try:
            answer = self._call(cluster, self.client.list_node_pools, parent=cluster)
        except _NotFound as exc:
            raise ProviderError("ClusterNotFound", str(exc)) from None
        return [MadePool(cluster, pool.name) for pool in answer.node_pools if _made_by_us(pool)]

    def delete(self, resource: ImageGenService, plan: Plan) -> bool:
        cluster = _cluster_of(resource)
        name = f"{cluster}/nodePools/{plan.nodepool_name}"
        with self._pool_lock(name):
            memory = self._memory_of(name)
            try:
                pool = self._call(name, self.client.get_node_pool, name=name)
            except _NotFound:
                operation = self._poll(name, memory) if memory.kind == "create" else None
                if operation is not None:
                    # Our create has begun and the pool is not listed yet: not gone. Looked
                    # at again, and deleted once it is there (one more look once it ended).
                    if _status_name(operation.status) == "DONE":
                        memory.operation = memory.kind = None
                    return False
                self._forget(name)
                return True
            if not _made_by_us(pool):
                self._forget(name)
                raise PoolNotOwned(_not_ours(name))
            if _status_name(pool.status) == "STOPPING":
                # Our delete (or someone's) is running: asking again would only
                # earn a "currently deleting" refusal.
                return False
            if memory.kind == "delete":
                # Not stopping any more, yet still there: did our delete fail?
                self._raise_if_failed(name, memory)
            try:
                operation = self._call(name, self.client.delete_node_pool, name=name)
            except _NotFound:
                self._forget(name)
                return True
            memory.operation, memory.kind = _operation_name(cluster, operation), "delete"
            memory.attempts = 0
            log.info("deleting node pool %s (%s)", name, memory.operation)
            return False

    # --- ensure, step by step ----------------------------------------------------

    def _create(
        self, resource: ImageGenService, plan: Plan, cluster: str, name: str, bounds: NodeBounds
    ) -> PoolState:
        memory = self._memory_of(name)
        if memory.failure is not None:
            if self._clock() < memory.failed_until:
                raise self._still_failed(memory)
            memory.failure = None
        if memory.kind == "create":
            # The pool is not there: maybe our create is still starting, or it
            # failed and GKE rolled the pool back.
            operation = self._poll(name, memory)
            if operation is not None and _status_name(operation.status) != "DONE":
                return _provisioning(plan.nodepool_name, f"GKE is creating node pool {name}.")
            self._raise_if_failed(name, memory, operation)
        # No create of ours under way (or it succeeded and the pool was deleted since).
        memory.operation = memory.kind = None

        try:
            spread = self._spread_over_zones(name, cluster, resource, plan, bounds)
            request = create_node_pool_request(
                render_gke_nodepool(resource, plan, bounds, start_empty=spread))
            operation = self._call(name, self.client.create_node_pool, **request)
        except _AlreadyExists:
            # Another create won the race (another operator replica before the
            # lease moved, or a call whose answer was lost): the pool is there.
            return _provisioning(plan.nodepool_name, f"GKE is creating node pool {name}.")
        except (_NotFound, ProviderError) as exc:
            failure = exc if isinstance(exc, ProviderError) else ProviderError(
                "ClusterNotFound", f"GKE cluster {cluster} not found: {exc.message}")
            if not failure.transient:
                # A quota, a permission, a refused config: held like a failed create
                # operation, not sent again on every resync of every service on the pool.
                self._hold(memory, failure)
            raise failure from None
        memory.operation, memory.kind = _operation_name(cluster, operation), "create"
        memory.attempts = 0
        log.info("creating node pool %s (%s)", name, memory.operation)
        return _provisioning(
            plan.nodepool_name,
            f"GKE is creating node pool {name} (operation {operation.name}).",
        )

    def _spread_over_zones(self, name: str, cluster: str, resource: ImageGenService,
                           plan: Plan, bounds: NodeBounds) -> bool:
        """Whether a zonal cluster's node locations, which a pool without
        ``spec.nodePool.locations`` takes, are more than its zone: GKE starts
        ``initialNodeCount`` nodes in each. Asked only where the answer counts (zones the
        spec names are rendered as such; a regional cluster, a pool of no minimum and a
        Flex-start one start empty anyway)."""
        _, location, _ = parse_cluster(cluster)
        if (plan.locations or not ZONE_RE.match(location) or not bounds[0]
                or resource.spec.node_pool.flex_start):
            return False
        try:
            cluster_found = self._call(name, self.client.get_cluster, name=cluster)
        except ProviderError as exc:
            # The create says whether the cluster can be reached. Not knowing its zones, the
            # pool starts empty, and the autoscaler adds the nodes its pods wait for.
            log.warning("the node locations of cluster %s are unknown (%s): node pool %s "
                        "starts empty", cluster, exc.message, name)
            return True
        return len(cluster_found.locations) > 1

    def _observe(
        self, name: str, short_name: str, pool: Any, target_nodes: int, bounds: NodeBounds
    ) -> PoolState:
        memory = self._memory_of(name)
        status = _status_name(pool.status)
        if status in ("PROVISIONING", "STATUS_UNSPECIFIED"):
            if memory.kind == "create":
                # The pool shows up at once; its create operation tells first if it failed.
                operation = self._poll(name, memory)
                self._raise_if_failed(name, memory, operation)
            return _provisioning(short_name, f"GKE is creating node pool {name}.")
        if status == "STOPPING":
            return PoolState(
                short_name, False, 0, "Deleting",
                f"Node pool {name} is being deleted; it is created again once it is gone.",
            )
        if status == "ERROR":
            return self._replace_broken(name, short_name, memory, pool)
        nodes = (self._count_nodes(short_name) if self._count_nodes is not None
                 else _ready_nodes(pool, target_nodes))
        if memory.kind == "autoscaling":
            operation = self._poll(name, memory)
            if operation is not None and _status_name(operation.status) != "DONE":
                return PoolState(short_name, True, nodes, "Reconciling", _resizing(name, bounds))
            self._note_autoscaling_failure(memory, operation)
        # Settled: whatever was started is over.
        memory.operation = memory.kind = None
        memory.failure = None
        if status == "RECONCILING":
            # An upgrade or resize: the nodes keep serving while GKE works, so
            # a service on them stays Ready.
            return PoolState(
                short_name, True, nodes, "Reconciling",
                f"GKE is updating node pool {name}; its nodes keep serving.",
            )
        # RUNNING, or RUNNING_WITH_ERROR: "partially usable" in GKE's words (some nodes
        # could not start, say); those that did serve, and the bounds are still set.
        if _bounds(pool) != bounds:
            return self._set_autoscaling(name, short_name, memory, nodes, bounds)
        # Settled as asked: a later refusal backs off from the start again. (A read
        # that succeeds is no such success: an update refused between reads must back
        # off longer each time.)
        memory.autoscaling_problem, memory.attempts = None, 0
        if status == "RUNNING_WITH_ERROR":
            return PoolState(
                short_name, True, nodes, "RunningWithError",
                f"Node pool {name} runs, in part: {_pool_problem(pool)}",
            )
        if self._count_nodes is not None and nodes < bounds[0]:
            # RUNNING says nothing of the nodes: after a create, or while GKE cannot get the
            # GPUs (a stockout), fewer than the minimum are ready, and the pods wait.
            return PoolState(
                short_name, True, nodes, "Ready",
                f"Node pool {name} is running with {nodes} of its minimum {bounds[0]} "
                "node(s) ready; GKE is adding the rest (where it cannot, the events of the "
                "serving pods that wait say why).",
            )
        return PoolState(short_name, True, nodes, "Ready", f"Node pool {name} is running.")

    def _replace_broken(
        self, name: str, short_name: str, memory: _PoolMemory, pool: Any
    ) -> PoolState:
        """A pool of ours in ERROR. With nodes that serve, it is reported and left alone: a
        person decides. With none (a create that failed on a stockout or a quota leaves such
        a pool, and GKE does not mend it): report why, hold it as long as a failed create
        is held, then delete it, and the next call creates it anew. The hold counts from
        when the last node stopped serving: one Spot node reclaimed from a pool that served
        for hours does not take the pool with it at once."""
        problem = f"Node pool {name} is in state ERROR: {_pool_problem(pool)}"
        nodes = self._count_nodes(short_name) if self._count_nodes is not None else 0
        if nodes:
            memory.operation = memory.kind = None
            memory.failure, memory.failed_until, memory.retry_at = None, 0.0, None
            return PoolState(short_name, True, nodes, "PoolError",
                             f"{problem}; its {nodes} ready node(s) serve meanwhile")
        if memory.kind == "create":
            self._raise_if_failed(name, memory)  # the create's own error, held
        if memory.kind == "delete":
            try:
                self._raise_if_failed(name, memory)
            except ProviderError as failed:  # held again, not re-sent at once
                self._hold(memory, ProviderError("PoolError", f"{problem}; {failed.message}",
                                                 retry_after=self.failed_create_hold))
                raise self._still_failed(memory) from None
        if memory.failure is None:
            self._hold(memory, ProviderError("PoolError", problem,
                                             retry_after=self.failed_create_hold))
        if self._clock() < memory.failed_until:
            raise self._still_failed(memory)
        try:
            operation = self._call(name, self.client.delete_node_pool, name=name)
        except _NotFound:  # gone since it was read: created again at the next ask
            self._forget(name)
            return PoolState(short_name, False, 0, "Recreating",
                             f"{problem}; it is gone, and is created again.")
        memory.operation = _operation_name(name.split("/nodePools/")[0], operation)
        memory.kind, memory.attempts = "delete", 0
        log.info("deleting node pool %s, in ERROR, to create it again (%s)",
                 name, memory.operation)
        return PoolState(short_name, False, 0, "Recreating",
                         f"{problem}; it is deleted, and then created again.")

    def _set_autoscaling(
        self, name: str, short_name: str, memory: _PoolMemory, nodes: int, bounds: NodeBounds
    ) -> PoolState:
        """Start bringing a running pool to ``bounds``, unless a refusal is still being held."""
        if memory.autoscaling_problem and self._clock() < memory.autoscaling_after:
            return PoolState(short_name, True, nodes, "AutoscalingNotSet",
                             memory.autoscaling_problem)
        from google.cloud import container_v1

        low, high = bounds
        request = container_v1.SetNodePoolAutoscalingRequest(
            name=name,
            autoscaling=container_v1.NodePoolAutoscaling(
                enabled=True, total_min_node_count=low, total_max_node_count=high,
                location_policy=LOCATION_POLICY,
            ),
        )
        try:
            operation = self._call(name, self.client.set_node_pool_autoscaling, request=request)
        except (ProviderError, _NotFound) as exc:
            # The nodes still serve: say why the bounds are not set yet, and try again later.
            delay = getattr(exc, "retry_after", None) or self.failed_create_hold
            memory.autoscaling_problem = (
                f"Setting the autoscaling of node pool {name} to {low}-{high} nodes failed: "
                f"{exc.message}"
            )
            memory.autoscaling_after = self._clock() + delay
            return PoolState(short_name, True, nodes, "AutoscalingNotSet",
                             memory.autoscaling_problem)
        memory.operation = _operation_name(name.split("/nodePools/")[0], operation)
        memory.kind, memory.attempts = "autoscaling", 0
        log.info("setting autoscaling of node pool %s to %d-%d nodes (%s)",
                 name, low, high, memory.operation)
        return PoolState(short_name, True, nodes, "Reconciling", _resizing(name, bounds))

    def _note_autoscaling_failure(self, memory: _PoolMemory, operation: Any | None) -> None:
        """An autoscaling operation that ended in an error is held, like a failed create."""
        if operation is None:
            return
        code, message = operation.error.code, operation.error.message
        if code or message:
            memory.autoscaling_problem = (
                f"GKE could not set the node pool's autoscaling: "
                f"{message or operation.status_message}"
            )
            memory.autoscaling_after = self._clock() + self.failed_create_hold

    # --- operations --------------------------------------------------------------

    def _poll(self, name: str, memory: _PoolMemory) -> Any | None:
        """The remembered operation, or None when GKE no longer knows it."""
        try:
            return self._call(name, self.client.get_operation, name=memory.operation)
        except _NotFound:
            memory.operation = memory.kind = None
            return None

    def _raise_if_failed(
        self, name: str, memory: _PoolMemory, operation: Any | None = None
    ) -> None:
        """Report the remembered operation if it ended in an error."""
        if operation is None and memory.operation:
            operation = self._poll(name, memory)
        if operation is None or _status_name(operation.status) != "DONE":
            return
        # Operation.error is a google.rpc.Status, all defaults when it succeeded.
        code, message = operation.error.code, operation.error.message
        kind = memory.kind
        memory.operation = memory.kind = None
        if not code and not message:
            return
        message = message or operation.status_message
        if kind == "delete":
            raise self._transient(
                name, "DeleteFailed", f"Deleting node pool {name} failed: {message}",
                unanswered=False,
            )
        what = f"Creating node pool {name} failed: {message}"
        if code == _RPC_RESOURCE_EXHAUSTED or _QUOTA.search(message):
            failure = ProviderError("QuotaExceeded", what)
        else:
            # Stockouts of GPUs and transient GCE errors end here: worth another
            # try, but not at once.
            failure = ProviderError("CreateFailed", what, retry_after=self.failed_create_hold)
        self._hold(memory, failure)
        raise failure

    def _hold(self, memory: _PoolMemory, failure: ProviderError) -> None:
        """Report ``failure`` until ``failed_create_hold`` has passed, then try again."""
        memory.failure = failure
        memory.failed_until = self._clock() + self.failed_create_hold
        memory.retry_at = datetime.now(UTC) + timedelta(seconds=self.failed_create_hold)

    def _still_failed(self, memory: _PoolMemory) -> ProviderError:
        failure = memory.failure
        assert failure is not None
        left = max(1.0, memory.failed_until - self._clock())
        if failure.transient:  # the reconciler says when it asks again
            return ProviderError(failure.reason, failure.message, retry_after=left)
        # One sentence for the whole hold, not a countdown that rewrites status each resync.
        at = memory.retry_at.strftime("%H:%M:%SZ") if memory.retry_at else "later"
        return ProviderError(failure.reason, f"{failure.message} (trying again at {at})")

    # --- calls and errors --------------------------------------------------------

    def _call(self, key: str, method: Callable[..., Any], /, **request: Any) -> Any:
        """One API call, fail-fast, with GKE's errors turned into ProviderErrors.

        ``NotFound`` and ``AlreadyExists`` come back as the private exceptions
        callers branch on; everything else is a :class:`ProviderError`.
        """
        from google.api_core import exceptions as gexc

        try:
            return method(**request, retry=None, timeout=self.timeout)
        except gexc.GoogleAPICallError as exc:
            status, message = _error_status(exc), _error_message(exc)
            if status == "NOT_FOUND" or isinstance(exc, gexc.NotFound):
                raise _NotFound(message) from None
            if status == "ALREADY_EXISTS" or isinstance(exc, gexc.AlreadyExists):
                raise _AlreadyExists(message) from None
            raise self._classify(key, exc, status, message) from exc
        except ProviderError:
            raise
        except Exception as exc:
            if _is_transport_error(exc):
                raise self._transient(
                    key, "GkeUnavailable", f"GKE API unreachable: {exc}"
                ) from exc
            raise

    def _classify(self, name: str, exc: Any, status: str, message: str) -> ProviderError:
        code = getattr(exc, "code", None)
        if _BUSY.search(message) or code == 409 or status == "ABORTED":
            return self._transient(
                name, "ClusterBusy", f"another operation is running on the cluster: {message}"
            )
        if code in (403, 429) or status in ("PERMISSION_DENIED", "RESOURCE_EXHAUSTED"):
            if _QUOTA.search(message) or getattr(exc, "reason", None) == "QUOTA_EXCEEDED":
                if _RATE_LIMIT.search(message):
                    return self._transient(name, "RateLimited", message)
                return ProviderError("QuotaExceeded", f"GKE quota exceeded: {message}")
            if code == 429 or status == "RESOURCE_EXHAUSTED":
                return self._transient(name, "RateLimited", message)
        if code in (401, 403) or status in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
            return ProviderError(
                "PermissionDenied",
                f"the operator's Google service account may not manage node pools: {message}",
            )
        if status == "FAILED_PRECONDITION":
            return ProviderError("RequestRejected", f"GKE refused the request: {message}")
        if code == 400 or status in ("INVALID_ARGUMENT", "OUT_OF_RANGE"):
            return ProviderError("InvalidNodePool", f"GKE rejected the node pool: {message}")
        if (code or 0) >= 500 or status in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL"):
            return self._transient(name, "GkeUnavailable", f"GKE API unavailable: {message}")
        return ProviderError("GkeError", f"GKE API error {code or status}: {message}")

    def _transient(self, name: str, reason: str, message: str,
                   unanswered: bool = True) -> ProviderError:
        memory = self._memory_of(name)
        memory.attempts = min(memory.attempts + 1, _MAX_ATTEMPTS)
        delay = min(self.backoff_base * 2 ** (memory.attempts - 1), self.backoff_max)
        return ProviderError(reason, message, retry_after=self._jitter(delay),
                             unanswered=unanswered)

    # --- memory ------------------------------------------------------------------

    def _memory_of(self, name: str) -> _PoolMemory:
        with self._lock:
            return self._memory.setdefault(name, _PoolMemory())

    def _forget(self, name: str) -> None:
        """The pool is gone: drop what was remembered of it (its lock too, once free)."""
        with self._lock:
            self._memory.pop(name, None)
            for other, lock in list(self._pool_locks.items()):
                if other not in self._memory and not lock.locked():
                    del self._pool_locks[other]

    def _pool_lock(self, name: str) -> threading.Lock:
        # One call at a time per pool within this process: two services sharing
        # a pool, reconciled in two worker threads, must not both create it.
        with self._lock:
            return self._pool_locks.setdefault(name, threading.Lock())


class _NotFound(Exception):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class _AlreadyExists(_NotFound):
    pass


def _made_by_us(pool: Any) -> bool:
    """Whether the pool carries the resource label every pool the operator creates has."""
    return dict(pool.config.resource_labels).get("managed-by") == MANAGED_BY


def _not_ours(name: str) -> str:
    return (
        f"node pool {name} exists and was not made by {MANAGED_BY} (it lacks the resource "
        f"label managed-by={MANAGED_BY}); it is left alone. Set spec.nodePool.name to a free "
        "name, or use provider Existing to run on it."
    )


def _accelerator_config(pool: Any) -> dict[str, Any]:
    """What the operator does not change on a running pool: its machines and their GPUs
    (GKE cannot), and its zones."""
    config = pool.config
    gpu = config.accelerators[0] if config.accelerators else None
    sharing = gpu.gpu_sharing_config if gpu else None
    return {
        "machine type": config.machine_type,
        "spot": config.spot,
        "flex start": config.flex_start,
        "GPU": gpu.accelerator_type if gpu else None,
        "GPUs per node": gpu.accelerator_count if gpu else 0,
        "partition size": (gpu.gpu_partition_size or None) if gpu else None,
        "sharing": _status_name(sharing.gpu_sharing_strategy) if sharing else None,
        "clients per GPU": sharing.max_shared_clients_per_gpu if sharing else 0,
        "zones": sorted(pool.locations),
    }


def _check_claim(name: str, pool: Any, resource: ImageGenService, plan: Plan) -> None:
    """Raise unless the pool found under the plan's name is one the operator made, with
    the machines and GPUs the plan asks for.

    A name is all that links a spec to a pool, and ``spec.nodePool.name`` may name any
    pool: the cluster's default pool, another team's, or ours from before an edit of
    the GPU settings that the name does not follow. Resizing or deleting a pool we did
    not make would take nodes from under others; running on one with other GPUs would
    leave the pods Pending under a pool reported ready.
    """
    if not _made_by_us(pool):
        raise PoolNotOwned(_not_ours(name))
    want = _accelerator_config(create_node_pool_request(
        render_gke_nodepool(resource, plan))["node_pool"])
    have = _accelerator_config(pool)
    if resource.spec.node_pool.machine_type is None:
        # Derived, and so free to follow GKE's machine types: an upgrade that derives
        # another one keeps the pools it finds.
        del want["machine type"], have["machine type"]
    if not plan.locations:
        # GKE gives a pool made without zones the cluster's: any are the spec's.
        del want["zones"], have["zones"]
    differ = [k for k in want if want[k] != have[k]]
    if differ:
        changes = ", ".join(f"{k} {have[k]} (the spec asks for {want[k]})" for k in differ)
        raise ProviderError(
            "PoolConfigMismatch",
            f"node pool {name} has {changes}, which the operator does not change on a "
            "running pool. Set "
            "spec.nodePool.name to a free name (or remove it for a name derived from the "
            "GPU settings), and the service moves to a new pool.",
        )
    check_pods_room(name, pool.max_pods_constraint.max_pods_per_node, plan)


def _cluster_of(resource: ImageGenService) -> str:
    cluster = resource.spec.node_pool.cluster
    try:
        parse_cluster(cluster)
    except ValueError as exc:
        raise ProviderError("InvalidCluster", str(exc)) from None
    return cluster


def _operation_name(cluster: str, operation: Any) -> str:
    """``projects/P/locations/L/operations/ID``: GKE answers only the ID in ``name``."""
    if operation.name.startswith("projects/"):
        return operation.name
    project, location, _ = parse_cluster(cluster)
    location = operation.location or location
    return f"projects/{project}/locations/{location}/operations/{operation.name}"


def _spread(delay: float) -> float:
    """A delay between half and all of ``delay``: pools of one cluster refused together
    (GKE runs one operation per cluster) must not all ask again at the same moment."""
    return delay / 2 + random.uniform(0, delay / 2)


def _provisioning(short_name: str, message: str) -> PoolState:
    return PoolState(short_name, False, 0, "Provisioning", message)


def _status_name(status: Any) -> str:
    return getattr(status, "name", None) or str(status)


def _ready_nodes(pool: Any, target_nodes: int) -> int:
    """Without the cluster's Nodes to count: the target, within the pool's bounds (the v1
    NodePool carries no live node count, and the autoscaler, not the operator, sizes it)."""
    bounds = _bounds(pool)
    if bounds is not None:
        low, high = bounds
        return max(low, min(target_nodes, high)) if high else max(low, target_nodes)
    return pool.initial_node_count or target_nodes


def _bounds(pool: Any) -> NodeBounds | None:
    """A pool's autoscaling (min, max) nodes; None when it does not autoscale."""
    autoscaling = pool.autoscaling
    if not (autoscaling and autoscaling.enabled):
        return None
    return (
        autoscaling.total_min_node_count or autoscaling.min_node_count,
        autoscaling.total_max_node_count or autoscaling.max_node_count,
    )


def _resizing(name: str, bounds: NodeBounds) -> str:
    return (
        f"GKE is setting the autoscaling of node pool {name} to {bounds[0]}-{bounds[1]} "
        "nodes; its nodes keep serving."
    )


def _pool_problem(pool: Any) -> str:
    messages = [c.message for c in pool.conditions if c.message]
    return pool.status_message or "; ".join(messages) or "GKE gave no detail"


def _error_status(exc: Any) -> str:
    """The canonical status name (``FAILED_PRECONDITION``...) of an API error."""
    response = getattr(exc, "response", None)
    if response is not None and hasattr(response, "json"):
        try:
            status = response.json().get("error", {}).get("status")
        except Exception:  # not JSON: a proxy's HTML page, say
            status = None
        if status:
            return str(status)
    grpc_code = getattr(exc, "grpc_status_code", None)
    return grpc_code.name if grpc_code is not None else ""


def _error_message(exc: Any) -> str:
    """GKE's own words, without the ``METHOD URL:`` the REST transport puts in front."""
    response = getattr(exc, "response", None)
    if response is not None and hasattr(response, "json"):
        try:
            message = response.json().get("error", {}).get("message")
        except Exception:
            message = None
        if message:
            return str(message)
    return re.sub(r"^[A-Z]+ \S+: ", "", str(getattr(exc, "message", exc)))


def _is_transport_error(exc: Exception) -> bool:
    """Connection refused, resets, timeouts: the API could not be reached at all."""
    from google.api_core import exceptions as gexc
    from google.auth import exceptions as auth_exc

    if isinstance(exc, gexc.RetryError | auth_exc.TransportError | ConnectionError | TimeoutError):
        return True
    try:
        import requests
    except ImportError:  # the gRPC transport alone
        return False
    return isinstance(exc, requests.RequestException)
