"""The operator's own Prometheus metrics, from one registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry()

RECONCILES = Counter(
    "imagegen_operator_reconcile_total",
    "Reconciles of ImageGenServices, by trigger and result.",
    ["trigger", "result"],
    registry=REGISTRY,
)
RECONCILE_SECONDS = Histogram(
    "imagegen_operator_reconcile_duration_seconds",
    "Time one reconcile took.",
    ["trigger"],
    registry=REGISTRY,
    # Up to minutes: one API call may take 30 s, a reconcile that waits on several longer.
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
ERRORS = Counter(
    "imagegen_operator_reconcile_errors_total",
    "Reconciles that failed, by kind of error.",
    ["kind"],
    registry=REGISTRY,
)
MANAGED = Gauge(
    "imagegen_operator_managed_services",
    "ImageGenServices this operator manages.",
    registry=REGISTRY,
)
SERVICE_READY = Gauge(
    "imagegen_operator_service_ready",
    "1 while an ImageGenService's Ready condition is True, else 0. Its labels are not "
    "`namespace`, which a scrape sets to the operator's own: a service whose pods never run "
    "(Pending for a GPU, a pool that is refused) exports no series of its own.",
    ["service_namespace", "service"],
    registry=REGISTRY,
)
POOLS_IN_FLIGHT = Gauge(
    "imagegen_operator_nodepool_operations_in_flight",
    "Services whose node pool is being created or changed.",
    registry=REGISTRY,
)
LEADING = Gauge(
    "imagegen_operator_leading",
    "1 while this operator acts for its peering (kopf's priority rule, or no peering), 0 "
    "while it stands by: a standby's other gauges are those it last set while it acted.",
    registry=REGISTRY,
)
API_WRITES = Counter(
    "imagegen_operator_api_writes_total",
    "Write calls made to the Kubernetes API.",
    registry=REGISTRY,
)
ORPHANS_DELETED = Counter(
    "imagegen_operator_unused_pools_deleted_total",
    "Node pools the operator made, found used by no service and deleted by its sweep.",
    registry=REGISTRY,
)


def serve(port: int, addr: str = "0.0.0.0") -> None:
    start_http_server(port, addr=addr, registry=REGISTRY)
