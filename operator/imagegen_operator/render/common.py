"""What every rendered object shares: names, labels, owner references.

Renderers take the parsed resource (api.py's ImageGenService, every default applied).
"""

from __future__ import annotations

from typing import Any

from imagegen_operator.api import API_VERSION, GROUP, KIND, VERSION, ImageGenService

__all__ = ["API_VERSION", "GROUP", "KIND", "VERSION"]  # re-exported for the renderers

APP_NAME = "imagegen-server"
MANAGED_BY = "imagegen-operator"
PART_OF = "imagegen"
COMPONENT = "inference"

SERVER_CONTAINER = "server"
HTTP_PORT_NAME = "http"
DEFAULT_PORT = 8080


def value(x: Any) -> Any:
    """An enum member's value, or the thing itself (the API may use str enums)."""
    return getattr(x, "value", x)


def _meta_field(resource: ImageGenService, key: str) -> Any:
    return getattr(resource.metadata, key, None)


def name_of(resource: ImageGenService) -> str:
    return _meta_field(resource, "name")


def namespace_of(resource: ImageGenService) -> str:
    return _meta_field(resource, "namespace") or "default"


def selector_labels(resource: ImageGenService) -> dict[str, str]:
    """The labels that pick this service's pods; immutable once a Deployment exists."""
    return {
        "app.kubernetes.io/name": APP_NAME,
        "app.kubernetes.io/instance": name_of(resource),
    }


def common_labels(resource: ImageGenService) -> dict[str, str]:
    return {
        **selector_labels(resource),
        "app.kubernetes.io/component": COMPONENT,
        "app.kubernetes.io/part-of": PART_OF,
        "app.kubernetes.io/managed-by": MANAGED_BY,
    }


def selector_string(resource: ImageGenService) -> str:
    """status.selector for the scale subresource (what an HPA uses to find the pods)."""
    return ",".join(f"{k}={v}" for k, v in sorted(selector_labels(resource).items()))


def owner_references(resource: ImageGenService) -> list[dict[str, Any]]:
    """A controller reference to the ImageGenService; none offline, where there is no uid."""
    uid = _meta_field(resource, "uid")
    if not uid:
        return []
    return [
        {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": name_of(resource),
            "uid": uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]


def object_meta(resource: ImageGenService, name: str | None = None, **extra: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name or name_of(resource),
        "namespace": namespace_of(resource),
        "labels": common_labels(resource),
    }
    owners = owner_references(resource)
    if owners:
        meta["ownerReferences"] = owners
    meta.update(extra)
    return meta


def server_port(resource: ImageGenService) -> int:
    server = getattr(resource.spec, "server", None)
    return getattr(server, "port", None) or DEFAULT_PORT
