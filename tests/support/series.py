"""The Prometheus series the operator and the inference server export, by metric family, as
their registries declare them (what dashboards and alerts may read)."""

from __future__ import annotations

import re

# A series name in PromQL (every one of the project's starts so).
SERIES = re.compile(r"\bimagegen_[a-z_]+\b")
# What each kind of metric family exports, as prometheus_client names its samples.
SAMPLES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count"),
           "info": ("_info",)}


def exported() -> dict[str, set[str]]:
    """Each metric family the operator and the server export: the names of its series."""
    from imagegen_operator.metrics import REGISTRY
    from imagegen_server.metrics import ServerMetrics

    return {family.name: {family.name + suffix for suffix in SAMPLES[family.type]}
            for registry in (REGISTRY, ServerMetrics().registry)
            for family in registry.collect()}


def read_by(expressions: list[str]) -> set[str]:
    """The project's series the PromQL ``expressions`` read."""
    return {name for expr in expressions for name in SERIES.findall(expr)}
