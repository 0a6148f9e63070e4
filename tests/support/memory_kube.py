"""FAKE: an in-memory stand-in for :class:`imagegen_operator.kube.Kube`, for fast unit tests.

Not a Kubernetes API: no validation, no defaulting, no controllers, no watch.
Objects are dicts keyed by (apiVersion, kind, namespace, name); an apply
replaces what it names and keeps status, a status patch is a JSON merge patch.
Tests set children's status themselves (what the Deployment controller and
KWOK do in the real-cluster tests, which stay the reference).
"""

from __future__ import annotations

import copy
import itertools
import time
import uuid
from typing import Any

from imagegen_operator.kube import MissingKind, PermanentKubeError, is_subset, stamped

CLUSTER_SCOPED = {"Node", "Namespace"}


class InMemoryKube:
    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str | None, str], dict[str, Any]] = {}
        self.writes = 0
        self.log: list[tuple[str, str, str]] = []  # (verb, kind, name) of every write
        self.refusals: dict[str, str] = {}  # kind -> message for a 422
        self.missing_kinds: set[str] = {"ServiceMonitor", "PodMonitor"}
        self._versions = itertools.count(1)

    # --- test knobs ------------------------------------------------------------

    def refuse(self, kind: str, message: str) -> None:
        """Every apply of ``kind`` fails as the API server's 422 would."""
        self.refusals[kind] = message

    def accept(self, kind: str) -> None:
        self.refusals.pop(kind, None)

    def put(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Store an object as it is (a user's create), with uid and generation."""
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("generation", 1)
        version = next(self._versions)
        meta["resourceVersion"] = str(version)
        # Set once, on create, as the API server does; one second apart keeps them in order.
        meta.setdefault("creationTimestamp", time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime(1_767_225_600 + version)))
        self.objects[self._key(obj)] = obj
        return copy.deepcopy(obj)

    def writes_of(self, kind: str) -> list[tuple[str, str, str]]:
        return [w for w in self.log if w[1] == kind]

    # --- Kube's interface ------------------------------------------------------

    def _key(self, obj: dict[str, Any]) -> tuple[str, str, str | None, str]:
        meta = obj["metadata"]
        namespace = None if obj["kind"] in CLUSTER_SCOPED else meta.get("namespace") or "default"
        return (obj["apiVersion"], obj["kind"], namespace, meta["name"])

    def _check_kind(self, kind: str) -> None:
        if kind in self.missing_kinds:
            raise MissingKind(f"the cluster does not serve {kind}")

    def get(self, api_version: str, kind: str, name: str, namespace: str | None = None):
        self._check_kind(kind)
        ns = None if kind in CLUSTER_SCOPED else namespace or "default"
        found = self.objects.get((api_version, kind, ns, name))
        return copy.deepcopy(found) if found is not None else None

    def list(self, api_version: str, kind: str, namespace: str | None = None,
             label_selector: str | None = None) -> list[dict[str, Any]]:
        self._check_kind(kind)
        parts = [part for part in (label_selector or "").split(",") if part]
        wanted = dict(part.split("=", 1) for part in parts if "=" in part)
        present = [part for part in parts if "=" not in part]  # "key": the label is there
        out = []
        for (av, k, ns, _), obj in self.objects.items():
            if av != api_version or k != kind or (namespace and ns != namespace):
                continue
            labels = obj["metadata"].get("labels") or {}
            if (all(labels.get(key) == value for key, value in wanted.items())
                    and all(key in labels for key in present)):
                out.append(copy.deepcopy(obj))
        return out

    def apply(self, obj: dict[str, Any], live: dict[str, Any] | None = None,
              read_first: bool = True, digest: bool = False) -> dict[str, Any]:
        self._check_kind(obj["kind"])
        if digest:
            obj = stamped(obj)
        meta = obj["metadata"]
        if live is None and read_first:
            live = self.get(obj["apiVersion"], obj["kind"], meta["name"], meta.get("namespace"))
        if live is not None and is_subset(obj, live):
            return live
        self.writes += 1
        if obj["kind"] in self.refusals:
            raise PermanentKubeError(
                f"apply {obj['kind']} {meta['name']}: 422 Unprocessable Entity: "
                f"{self.refusals[obj['kind']]}")
        key = self._key(obj)
        stored = self.objects.get(key)
        new = copy.deepcopy(obj)
        if stored is not None:
            new["metadata"] = {**stored["metadata"], **new["metadata"]}
            if "status" in stored and "status" not in obj:
                new["status"] = stored["status"]
            if stored.get("spec") != new.get("spec"):
                new["metadata"]["generation"] = stored["metadata"].get("generation", 1) + 1
        else:
            new["metadata"].setdefault("uid", str(uuid.uuid4()))
            new["metadata"]["generation"] = 1
        new["metadata"]["resourceVersion"] = str(next(self._versions))
        self.objects[key] = new
        self.log.append(("apply", obj["kind"], meta["name"]))
        return copy.deepcopy(new)

    def delete(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> bool:
        self._check_kind(kind)
        self.writes += 1
        ns = None if kind in CLUSTER_SCOPED else namespace or "default"
        gone = self.objects.pop((api_version, kind, ns, name), None) is None
        self.log.append(("delete", kind, name))
        # No finalizers here: deleted at once; True only when it was already gone.
        return gone

    def remove_finalizer(self, obj: dict[str, Any], finalizer: str) -> None:
        """As the API server does: the object goes once it is being deleted and its last
        finalizer is off."""
        self.writes += 1
        key = self._key(obj)
        live = self.objects.get(key)
        if live is None or finalizer not in (live["metadata"].get("finalizers") or []):
            return
        live["metadata"]["finalizers"].remove(finalizer)
        self.log.append(("unfinalize", obj["kind"], obj["metadata"]["name"]))
        if live["metadata"].get("deletionTimestamp") and not live["metadata"]["finalizers"]:
            self.objects.pop(key)

    def patch_status(self, api_version: str, kind: str, name: str, namespace: str | None,
                     status: dict[str, Any]) -> None:
        self.writes += 1
        key = (api_version, kind, namespace or "default", name)
        obj = self.objects[key]
        obj["status"] = _merge(obj.get("status") or {}, status)
        obj["metadata"]["resourceVersion"] = str(next(self._versions))
        self.log.append(("status", kind, name))

    def own_write(self, obj: dict[str, Any]) -> bool:
        return False


def _merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """RFC 7386 JSON merge patch."""
    out = dict(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
