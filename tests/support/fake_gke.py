"""A TEST DOUBLE of the node-pool part of GKE's REST API (container.googleapis.com v1).

This is not GKE and talks to nothing outside the test process: a small
``http.server`` on 127.0.0.1 that answers the six calls the GKE provider makes,
the way the documented v1 REST contract says GKE answers them, so the provider
can be tested with the real ``google-cloud-container`` client and its REST
transport (URL building, proto3 JSON, error conversion) instead of mocks.

The contract it follows (the ``google.api.http`` annotations of
``google/container/v1/cluster_service.proto``, which the installed client's
``transports/rest_base.py`` is generated from):

- ``POST   /v1/{parent=projects/*/locations/*/clusters/*}/nodePools``, body
  ``{"nodePool": NodePool}`` (``body: "*"``, less the fields bound in the path)
  -> ``Operation`` (CREATE_NODE_POOL)
- ``GET    /v1/{name=projects/*/locations/*/clusters/*}`` -> ``Cluster`` (its name,
  location, ``locations`` and status only)
- ``GET    /v1/{name=projects/*/locations/*/clusters/*/nodePools/*}`` -> ``NodePool``
- ``DELETE /v1/{name=projects/*/locations/*/clusters/*/nodePools/*}`` -> ``Operation``
  (DELETE_NODE_POOL)
- ``GET    /v1/{name=projects/*/locations/*/operations/*}`` -> ``Operation``
- ``POST   /v1/{name=projects/*/locations/*/clusters/*/nodePools/*}:setAutoscaling``,
  body ``{"autoscaling": NodePoolAutoscaling}`` -> ``Operation``; the pool is
  ``RECONCILING`` until the operation is done, then has the new bounds

A pool's ``locations`` (its zones) are the ones asked for, each in the cluster's
region (else ``400 INVALID_ARGUMENT``); unset, the cluster's: its zone, or for a
regional cluster three zones of its region (the double's choice: ``-a``, ``-b``, ``-c``);
:meth:`~GkeApiTestDouble.set_cluster_zones` gives a cluster other node locations (a zonal
cluster with more zones than its own).

Bodies are proto3 JSON (camelCase; int64 as strings). The client asks with
``$alt=json;enum-encoding=int``, and then enums are answered as numbers, as
GKE does; without it, as names.

Errors use Google's JSON error format (AIP-193):
``{"error": {"code": 400, "message": "...", "status": "FAILED_PRECONDITION"}}``.
The messages copy the wording GKE is known to use (as seen in public bug
reports), because callers classify errors by it: a concurrent operation is
``400 FAILED_PRECONDITION "Operation operation-... is currently creating a node
pool for cluster C. Please wait and try again once it is done."``; a resource
quota is ``403 PERMISSION_DENIED "Insufficient regional quota to satisfy
request: ..."``.

Time is counted in polls, not seconds, so tests are fast and deterministic: an
operation finishes after ``polls_to_done`` reads of it or of its pool.

Knobs for tests: :meth:`GkeApiTestDouble.busy_next`,
:meth:`~GkeApiTestDouble.quota_error_next`,
:meth:`~GkeApiTestDouble.error_next_create`,
:meth:`~GkeApiTestDouble.fail_next_operation`,
:meth:`~GkeApiTestDouble.seed_pool`,
:meth:`~GkeApiTestDouble.set_cluster_zones`,
:meth:`~GkeApiTestDouble.error_next_cluster_get`; every request is recorded in
:attr:`~GkeApiTestDouble.requests`.

Usage::

    with GkeApiTestDouble() as double:
        client = double.client()          # a real ClusterManagerClient
        ...
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

_POOLS = re.compile(r"^/v1/(projects/[^/]+/locations/[^/]+/clusters/[^/]+)/nodePools$")
_CLUSTER = re.compile(r"^/v1/(projects/[^/]+/locations/([^/]+)/clusters/[^/:]+)$")
_POOL = re.compile(r"^/v1/(projects/[^/]+/locations/[^/]+/clusters/[^/]+)/nodePools/([^/:]+)$")
_SET_AUTOSCALING = re.compile(
    r"^/v1/(projects/[^/]+/locations/[^/]+/clusters/[^/]+/nodePools/[^/:]+):setAutoscaling$"
)
_OPERATION = re.compile(r"^/v1/(projects/[^/]+/locations/([^/]+))/operations/([^/:]+)$")

# google.rpc.Code values, for Operation.error (a google.rpc.Status).
RPC_CODES = {
    "INVALID_ARGUMENT": 3,
    "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6,
    "PERMISSION_DENIED": 7,
    "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9,
    "INTERNAL": 13,
}
# Enum numbers from cluster_service.proto, for answers to ``enum-encoding=int``.
POOL_STATUS_NUMBERS = {
    "PROVISIONING": 1,
    "RUNNING": 2,
    "RUNNING_WITH_ERROR": 3,
    "RECONCILING": 4,
    "STOPPING": 5,
    "ERROR": 6,
}
OPERATION_STATUS_NUMBERS = {"PENDING": 1, "RUNNING": 2, "DONE": 3, "ABORTING": 4}
OPERATION_TYPE_NUMBERS = {"UPDATE_CLUSTER": 6, "CREATE_NODE_POOL": 7, "DELETE_NODE_POOL": 8}
HTTP_FOR_STATUS = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "ABORTED": 409,
    "RESOURCE_EXHAUSTED": 429,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
}

DEFAULT_QUOTA_MESSAGE = (
    "Insufficient regional quota to satisfy request: resource \"NVIDIA_H100_GPUS\": "
    "request requires '8.0' and is short '8.0'. project has a quota of '0.0' with "
    "'0.0' available. View and manage quotas at "
    "https://console.cloud.google.com/iam-admin/quotas?usage=USED&project={project}."
)


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    body: dict[str, Any] | None
    at: float = field(default_factory=time.monotonic)  # when it arrived


@dataclass
class _Operation:
    name: str
    location: str
    operation_type: str  # CREATE_NODE_POOL | DELETE_NODE_POOL | UPDATE_CLUSTER
    target: str  # the pool's full name
    polls_left: int
    autoscaling: dict[str, Any] | None = None  # what an autoscaling update sets when done
    fail: tuple[str, str] | None = None  # (google.rpc status name, message) when it fails
    pool_after_failure: str = "ERROR"  # ERROR: the pool stays, broken; DELETED: it is gone
    status: str = "RUNNING"
    error: dict[str, Any] | None = None
    start_time: str = field(default_factory=lambda: _now())
    end_time: str | None = None


def _region(location: str) -> str:
    return location.rsplit("-", 1)[0] if re.fullmatch(r"[a-z]+-[a-z]+\d+-[a-z]", location) \
        else location


def _cluster_zones(cluster_location: str) -> list[str]:
    """A cluster's node locations unless set: its zone, or three of its region."""
    region = _region(cluster_location)
    if region != cluster_location:
        return [cluster_location]
    return [f"{region}-{letter}" for letter in "abc"]


def _pool_zones(cluster_location: str, asked: list[str] | None,
                cluster_zones: list[str] | None = None) -> list[str]:
    """The zones a new pool gets (see the module docstring)."""
    region = _region(cluster_location)
    if not asked:
        return list(cluster_zones or _cluster_zones(cluster_location))
    if outside := [zone for zone in asked if _region(zone) != region]:
        raise ApiError("INVALID_ARGUMENT", f"Invalid locations {outside}: the node pool's "
                       f"locations must be zones of region {region}.")
    return list(asked)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ApiError(Exception):
    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status
        self.message = message

    def payload(self) -> dict[str, Any]:
        return {
            "error": {
                "code": HTTP_FOR_STATUS[self.status],
                "message": self.message,
                "status": self.status,
            }
        }


class GkeApiTestDouble:
    """In-process HTTP test double of GKE's node-pool REST API; see the module docstring."""

    def __init__(self, polls_to_done: int = 2, latency_s: float = 0.0):
        self.polls_to_done = polls_to_done
        # Seconds each request waits before it is handled: widens the window in
        # which concurrent callers can race each other.
        self.latency_s = latency_s
        self.requests: list[RecordedRequest] = []
        self.pools: dict[str, dict[str, Any]] = {}  # full name -> NodePool JSON
        self.operations: dict[str, _Operation] = {}  # full name -> operation
        self.cluster_zones: dict[str, list[str]] = {}  # full name -> node locations
        self.missing_clusters: set[str] = set()  # full names answered 404
        self._cluster_get_errors: list[ApiError] = []
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._busy: list[str] = []  # what the running operation "is currently" doing, per call
        self._create_errors: list[ApiError] = []
        self._next_failure: tuple[str, str, str] | None = None
        self._next_update_failure: str | None = None
        self._next_delete_failure: str | None = None
        self._outage: ApiError | None = None
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------

    def start(self) -> GkeApiTestDouble:
        double = self

        class Handler(_Handler):
            owner = double

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            # A short poll interval: stop() waits for it, once per test.
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
            name="gke-api-test-double", daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
        if self._thread:
            self._thread.join(timeout=5)

    def __enter__(self) -> GkeApiTestDouble:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, what the REST transport takes as ``host``."""
        assert self._server, "start() the double first"
        return f"127.0.0.1:{self._server.server_address[1]}"

    def client(self) -> Any:
        """A real ``ClusterManagerClient`` whose REST transport points at this double."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import container_v1
        from google.cloud.container_v1.services.cluster_manager.transports.rest import (
            ClusterManagerRestTransport,
        )

        transport = ClusterManagerRestTransport(
            host=self.host, url_scheme="http", credentials=AnonymousCredentials()
        )
        return container_v1.ClusterManagerClient(transport=transport)

    # --- knobs -------------------------------------------------------------

    def set_cluster_zones(self, cluster: str, zones: list[str]) -> None:
        """The cluster's node locations, which its pools take unless they ask for others."""
        with self._lock:
            self.cluster_zones[cluster] = list(zones)

    def error_next_cluster_get(self, status: str = "UNAVAILABLE",
                               message: str = "The service is currently unavailable.") -> None:
        """The next read of a cluster fails with ``status``."""
        with self._lock:
            self._cluster_get_errors.append(ApiError(status, message))

    def busy_next(self, count: int, doing: str = "upgrading cluster") -> None:
        """The next ``count`` mutating calls fail as GKE does while another operation runs."""
        with self._lock:
            self._busy.extend([doing] * count)

    def quota_error_next(self, message: str | None = None) -> None:
        """The next create fails at once with GKE's 403 resource-quota error."""
        with self._lock:
            self._create_errors.append(
                ApiError("PERMISSION_DENIED", message or DEFAULT_QUOTA_MESSAGE)
            )

    def error_next_create(self, status: str, message: str) -> None:
        """The next create fails at once with any Google API error status."""
        with self._lock:
            self._create_errors.append(ApiError(status, message))

    def fail_next_operation(
        self,
        message: str = "Internal error while creating the node pool.",
        status: str = "INTERNAL",
        pool_after_failure: str = "DELETED",
    ) -> None:
        """The next create's operation ends DONE with ``error``.

        ``pool_after_failure``: ``DELETED`` (GKE rolled the pool back) or
        ``ERROR`` (the pool stays, in status ERROR with the message).
        """
        with self._lock:
            self._next_failure = (status, message, pool_after_failure)

    def fail_next_update(self, message: str = "Internal error while updating the node pool.") -> None:
        """The next autoscaling update's operation ends DONE with ``error``; the pool keeps
        its old bounds."""
        with self._lock:
            self._next_update_failure = message

    def fail_next_delete(self, message: str = "Internal error while deleting the node pool."
                         ) -> None:
        """The next delete's operation ends DONE with ``error``; the pool stays, RUNNING."""
        with self._lock:
            self._next_delete_failure = message

    def outage(self, status: str | None = "UNAVAILABLE",
               message: str = "The service is currently unavailable.") -> None:
        """Every request fails with ``status`` (UNAVAILABLE: 503, RESOURCE_EXHAUSTED: 429)
        until ``outage(None)``."""
        with self._lock:
            self._outage = ApiError(status, message) if status else None

    def seed_pool(self, name: str, status: str = "RUNNING", **fields: Any) -> None:
        """Put a pool in place, as if made earlier (``name``: its full resource name)."""
        fields.setdefault("locations", _pool_zones(name.split("/")[3], None))
        with self._lock:
            self.pools[name] = {"name": name.rsplit("/", 1)[-1], "status": status, **fields}

    def requests_to(self, method: str, suffix: str = "") -> list[RecordedRequest]:
        """Recorded requests with this method whose path ends with ``suffix``."""
        with self._lock:
            return [r for r in self.requests if r.method == method and r.path.endswith(suffix)]

    # --- the API -----------------------------------------------------------

    def handle(self, method: str, path: str, query: dict[str, list[str]],
               body: dict[str, Any] | None) -> dict[str, Any]:
        if self.latency_s:
            time.sleep(self.latency_s)
        with self._lock:
            self.requests.append(RecordedRequest(method, path, query, body))
            if self._outage is not None:
                raise self._outage
            answer = self._route(method, path, body)
            if "enum-encoding=int" in ";".join(query.get("$alt", [])):
                answer = _enums_as_numbers(answer)
            return answer

    def _route(self, method: str, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        if method == "POST" and (m := _POOLS.match(path)):
            return self._create_pool(m.group(1), body or {})
        if method == "GET" and (m := _POOLS.match(path)):
            for name in list(self.pools):
                self._tick(name)
            return {"nodePools": [p for n, p in self.pools.items()
                                  if n.startswith(f"{m.group(1)}/nodePools/")]}
        if method == "GET" and (m := _CLUSTER.match(path)):
            name, location = m.group(1), m.group(2)
            if name in self.missing_clusters:
                raise ApiError("NOT_FOUND", f"Not found: {name}.")
            if self._cluster_get_errors:
                raise self._cluster_get_errors.pop(0)
            return {"name": name.rsplit("/", 1)[1], "location": location, "status": "RUNNING",
                    "locations": self.cluster_zones.get(name) or _cluster_zones(location)}
        if (m := _POOL.match(path)) and method in ("GET", "DELETE"):
            name = f"{m.group(1)}/nodePools/{m.group(2)}"
            if method == "GET":
                return self._get_pool(name)
            return self._delete_pool(name)
        if method == "POST" and (m := _SET_AUTOSCALING.match(path)):
            return self._set_autoscaling(m.group(1), body or {})
        if method == "GET" and (m := _OPERATION.match(path)):
            return self._get_operation(f"{m.group(1)}/operations/{m.group(3)}")
        raise ApiError("NOT_FOUND", f"Method or path not served by the test double: {path}")

    def _check_busy(self, cluster: str) -> None:
        if self._busy:
            doing = self._busy.pop(0)
            # Same id shape as GKE's: operation-<millis>-<hex>.
            raise ApiError(
                "FAILED_PRECONDITION",
                f"Operation operation-1764150000000-{next(self._ids):08x} is currently "
                f"{doing} {cluster.rsplit('/', 1)[-1]}. Please wait and try again once it "
                "is done.",
            )

    def _check_cluster_free(self, cluster: str, pool: str) -> None:
        """GKE runs one node-pool operation at a time per cluster and refuses another
        meanwhile, on that pool or any other."""
        running = next((o for o in self.operations.values() if o.status != "DONE"
                        and o.target.startswith(f"{cluster}/nodePools/")), None)
        if running is not None and running.target != pool:
            # Time passes for another pool's operation that nobody polls, too: each refusal
            # it causes counts as a poll of it.
            self._tick(running.target)
        if running is not None and running.status != "DONE":
            raise ApiError(
                "FAILED_PRECONDITION",
                f"Operation {running.name.rsplit('/', 1)[-1]} is currently operating on node "
                f"pool {running.target.rsplit('/', 1)[-1]}. Please wait and try again once it "
                "is done.",
            )

    def _new_operation(self, location: str, op_type: str, target: str) -> _Operation:
        op_id = f"operation-1764150000000-{next(self._ids):08x}"
        project = target.split("/")[1]
        op = _Operation(
            name=f"projects/{project}/locations/{location}/operations/{op_id}",
            location=location,
            operation_type=op_type,
            target=target,
            polls_left=self.polls_to_done,
        )
        self.operations[op.name] = op
        return op

    def _create_pool(self, parent: str, body: dict[str, Any]) -> dict[str, Any]:
        if parent in self.missing_clusters:
            raise ApiError("NOT_FOUND", f"Not found: {parent}.")
        self._check_busy(parent)
        if self._create_errors:
            error = self._create_errors.pop(0)
            error.message = error.message.replace("{project}", parent.split("/")[1])
            raise error
        pool = body.get("nodePool")
        if not isinstance(pool, dict) or not pool.get("name"):
            raise ApiError("INVALID_ARGUMENT", "Node_pool.name must be specified.")
        if not re.fullmatch(r"[a-z]([-a-z0-9]{0,38}[a-z0-9])?", pool["name"]):
            raise ApiError("INVALID_ARGUMENT", f"Invalid node pool name \"{pool['name']}\": "
                           "up to 40 lowercase letters, digits and hyphens, starting with a "
                           "letter and not ending with a hyphen.")
        name = f"{parent}/nodePools/{pool['name']}"
        if name in self.pools:
            raise ApiError("ALREADY_EXISTS", f"Already exists: {name}.")
        self._check_cluster_free(parent, name)
        max_pods = int((pool.get("maxPodsConstraint") or {}).get("maxPodsPerNode") or 110)
        if not 8 <= max_pods <= 256:
            raise ApiError("INVALID_ARGUMENT", "Max pods per node must be between 8 and 256.")
        location = parent.split("/")[3]
        # As GKE answers: the cluster's default maximum (110 here) where none was asked for.
        pool = {**pool, "locations": _pool_zones(location, pool.get("locations"),
                                                 self.cluster_zones.get(parent)),
                "maxPodsConstraint": {"maxPodsPerNode": str(max_pods)}}
        op = self._new_operation(location, "CREATE_NODE_POOL", name)
        if self._next_failure:
            status, message, after = self._next_failure
            op.fail, op.pool_after_failure = (status, message), after
            self._next_failure = None
        self.pools[name] = {
            **pool,
            "selfLink": f"https://container.googleapis.com/v1/{name}",
            "status": "PROVISIONING",
        }
        return self._operation_json(op)

    def _get_pool(self, name: str) -> dict[str, Any]:
        self._tick(name)
        if name not in self.pools:
            raise ApiError("NOT_FOUND", f"Not found: {name}.")
        return self.pools[name]

    def _delete_pool(self, name: str) -> dict[str, Any]:
        if name not in self.pools:
            raise ApiError("NOT_FOUND", f"Not found: {name}.")
        self._check_busy(name.split("/nodePools/")[0])
        self._check_cluster_free(name.split("/nodePools/")[0], name)
        op = self._new_operation(name.split("/")[3], "DELETE_NODE_POOL", name)
        if self._next_delete_failure:
            op.fail, self._next_delete_failure = ("INTERNAL", self._next_delete_failure), None
        self.pools[name]["status"] = "STOPPING"
        return self._operation_json(op)

    def _set_autoscaling(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        if name not in self.pools:
            raise ApiError("NOT_FOUND", f"Not found: {name}.")
        self._check_busy(name.split("/nodePools/")[0])
        self._check_cluster_free(name.split("/nodePools/")[0], name)
        autoscaling = body.get("autoscaling")
        if not isinstance(autoscaling, dict):
            raise ApiError("INVALID_ARGUMENT", "Autoscaling must be specified.")
        low = int(autoscaling.get("totalMinNodeCount", 0))
        high = int(autoscaling.get("totalMaxNodeCount", 0))
        if low > high:
            raise ApiError(
                "INVALID_ARGUMENT",
                f"Total min node count {low} must not exceed total max node count {high}.",
            )
        op = self._new_operation(name.split("/")[3], "UPDATE_CLUSTER", name)
        op.autoscaling = autoscaling
        if self._next_update_failure:
            op.fail, self._next_update_failure = ("INTERNAL", self._next_update_failure), None
        self.pools[name]["status"] = "RECONCILING"
        return self._operation_json(op)

    def _get_operation(self, name: str) -> dict[str, Any]:
        op = self.operations.get(name)
        if op is None:
            raise ApiError("NOT_FOUND", f"Not found: {name}.")
        self._tick(op.target)
        return self._operation_json(op)

    def _running_operation(self, target: str) -> _Operation | None:
        return next(
            (o for o in self.operations.values() if o.target == target and o.status != "DONE"),
            None,
        )

    def _tick(self, target: str) -> None:
        """One poll of a pool or its operation: the running operation moves one step."""
        op = self._running_operation(target)
        if op is None:
            return
        op.polls_left -= 1
        if op.polls_left > 0:
            return
        op.status, op.end_time = "DONE", _now()
        if op.operation_type == "DELETE_NODE_POOL":
            if op.fail:
                op.error = {"code": RPC_CODES[op.fail[0]], "message": op.fail[1]}
                self.pools[target]["status"] = "RUNNING"
            else:
                self.pools.pop(target, None)
        elif op.operation_type == "UPDATE_CLUSTER":
            if op.fail:
                op.error = {"code": RPC_CODES[op.fail[0]], "message": op.fail[1]}
            else:
                self.pools[target]["autoscaling"] = op.autoscaling
            self.pools[target]["status"] = "RUNNING"
        elif op.fail:
            status, message = op.fail
            op.error = {"code": RPC_CODES.get(status, 2), "message": message}
            if op.pool_after_failure == "DELETED":
                self.pools.pop(target, None)
            else:
                self.pools[target].update(status="ERROR", statusMessage=message)
        else:
            self.pools[target]["status"] = "RUNNING"

    def _operation_json(self, op: _Operation) -> dict[str, Any]:
        short = op.name.rsplit("/", 1)[-1]
        project = op.name.split("/")[1]
        out: dict[str, Any] = {
            # GKE answers the short id in ``name``; the full name is in selfLink.
            "name": short,
            "zone": op.location,
            "location": op.location,
            "operationType": op.operation_type,
            "status": op.status,
            "selfLink": (
                f"https://container.googleapis.com/v1/projects/{project}/locations/"
                f"{op.location}/operations/{short}"
            ),
            "targetLink": f"https://container.googleapis.com/v1/{op.target}",
            "startTime": op.start_time,
        }
        if op.end_time:
            out["endTime"] = op.end_time
        if op.error:
            out["error"] = op.error
            out["statusMessage"] = op.error["message"]
        return out


def _enums_as_numbers(answer: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(answer))  # a copy: stored pools keep their names
    if "operationType" in out:
        out["operationType"] = OPERATION_TYPE_NUMBERS[out["operationType"]]
        out["status"] = OPERATION_STATUS_NUMBERS[out["status"]]
    elif "status" in out:
        out["status"] = POOL_STATUS_NUMBERS[out["status"]]
    return out


class _Handler(BaseHTTPRequestHandler):
    owner: GkeApiTestDouble

    def _serve(self, method: str) -> None:
        url = urlsplit(self.path)
        body = None
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            body = json.loads(self.rfile.read(length))
        try:
            status, payload = HTTPStatus.OK, self.owner.handle(
                method, url.path, parse_qs(url.query), body
            )
        except ApiError as error:
            status, payload = HTTP_FOR_STATUS[error.status], error.payload()
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._serve("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._serve("POST")

    def do_DELETE(self) -> None:  # noqa: N802
        self._serve("DELETE")

    def log_message(self, format: str, *args: Any) -> None:
        # Quiet: the recorded requests are what tests look at.
        pass
