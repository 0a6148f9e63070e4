"""The ClusterIP Service in front of the serving pods."""

from __future__ import annotations

from typing import Any

from imagegen_operator.api import ImageGenService
from imagegen_operator.render.common import (
    HTTP_PORT_NAME,
    name_of,
    namespace_of,
    object_meta,
    selector_labels,
    server_port,
)


def render_service(resource: ImageGenService) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_meta(resource),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(resource),
            "ports": [
                {
                    "name": HTTP_PORT_NAME,
                    "port": server_port(resource),
                    "targetPort": HTTP_PORT_NAME,
                    "protocol": "TCP",
                    "appProtocol": "http",
                }
            ],
        },
    }


def endpoint(resource: ImageGenService) -> str:
    """status.endpoint: the Service's in-cluster URL."""
    return (
        f"http://{name_of(resource)}.{namespace_of(resource)}.svc.cluster.local:"
        f"{server_port(resource)}"
    )
