"""Prometheus operator monitors (monitoring.coreos.com/v1) for the server's /metrics.

Rendered only when the spec asks for them (``spec.monitoring``, when the API
has it): a ServiceMonitor scrapes through the Service, a PodMonitor scrapes
every pod directly (useful when replicas should be told apart by pod).
"""

from __future__ import annotations

from typing import Any

from imagegen_operator.api import ImageGenService
from imagegen_operator.render.common import (
    HTTP_PORT_NAME,
    namespace_of,
    object_meta,
    selector_labels,
    value,
)

MONITOR_KINDS = ("ServiceMonitor", "PodMonitor")
DEFAULT_INTERVAL = "30s"


def _endpoint(interval: str) -> dict[str, Any]:
    return {"port": HTTP_PORT_NAME, "path": "/metrics", "interval": interval, "scheme": "http"}


def render_monitor(
    resource: ImageGenService,
    kind: str,
    interval: str = DEFAULT_INTERVAL,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """``labels`` go on the monitor itself: Prometheus selects monitors by label."""
    if kind not in MONITOR_KINDS:
        raise ValueError(f"monitor kind must be one of {MONITOR_KINDS}, not {kind!r}")
    endpoints_key = "endpoints" if kind == "ServiceMonitor" else "podMetricsEndpoints"
    meta = object_meta(resource)
    meta["labels"] = {**(labels or {}), **meta["labels"]}
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": kind,
        "metadata": meta,
        "spec": {
            "selector": {"matchLabels": selector_labels(resource)},
            "namespaceSelector": {"matchNames": [namespace_of(resource)]},
            endpoints_key: [_endpoint(interval)],
        },
    }


def requested_monitors(resource: ImageGenService) -> list[dict[str, Any]]:
    """The monitors spec.monitoring asks for; none when the API has no such field or it is off.

    Reads ``monitoring.kind`` (ServiceMonitor | PodMonitor), ``monitoring.enabled``
    (default true when the block is present), ``monitoring.interval`` and
    ``monitoring.labels``.
    """
    monitoring = getattr(resource.spec, "monitoring", None)
    if monitoring is None or getattr(monitoring, "enabled", True) is False:
        return []
    kind = value(getattr(monitoring, "kind", None)) or "ServiceMonitor"
    interval = getattr(monitoring, "interval", None) or DEFAULT_INTERVAL
    labels = getattr(monitoring, "labels", None) or {}
    return [render_monitor(resource, kind, interval, dict(labels))]
