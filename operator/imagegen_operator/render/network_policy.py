"""The NetworkPolicy of spec.server.allowFrom: only the sources it lists reach the server.

Ingress only, on the server's port (its API and /metrics): the pods still fetch their
model (a bucket, the Hugging Face Hub), so egress is left as the cluster has it. The
kubelet's probes come from the node, which GKE's NetworkPolicy enforcement lets through.
"""

from __future__ import annotations

from typing import Any

from imagegen_operator.api import ImageGenService, TrafficSource
from imagegen_operator.render.common import object_meta, selector_labels, server_port


def render_network_policy(resource: ImageGenService) -> dict[str, Any] | None:
    """None without spec.server.allowFrom: then no policy selects the pods."""
    sources = resource.spec.server.allow_from
    if not sources:
        return None
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": object_meta(resource),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(resource)},
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [_peer(source) for source in sources],
                "ports": [{"protocol": "TCP", "port": server_port(resource)}],
            }],
        },
    }


def _peer(source: TrafficSource) -> dict[str, Any]:
    if source.ip_block is not None:
        return {"ipBlock": {"cidr": source.ip_block.cidr}}
    peer: dict[str, Any] = {}
    for field, selector in (("namespaceSelector", source.namespace_selector),
                            ("podSelector", source.pod_selector)):
        if selector is None:
            continue
        peer[field] = {}
        if selector.match_labels:
            peer[field]["matchLabels"] = dict(selector.match_labels)
        if selector.match_expressions:
            peer[field]["matchExpressions"] = [
                {"key": r.key, "operator": r.operator, **({"values": r.values} if r.values else {})}
                for r in selector.match_expressions]
    return peer
