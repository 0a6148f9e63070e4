"""The storage layer: every call the operator makes to the Kubernetes API.

Children are written with server-side apply under one field manager, and only
when the live object differs from the desired one in a field we own: a
steady-state reconcile reads and never writes. API errors are turned into two
kinds the reconciler acts on: :class:`TransientKubeError` (retry later) and
:class:`PermanentKubeError` (the object we asked for is wrong).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import ResourceNotFoundError
from kubernetes.utils.quantity import parse_quantity

FIELD_MANAGER = "imagegen-operator"
# How long a kind the cluster does not serve (say, no Prometheus operator) is
# believed missing before discovery is asked again.
MISSING_KIND_TTL_S = 60.0
# Objects whose last applied version is remembered (to skip the echo of our own write).
APPLIED_LIMIT = 50_000
# Handler threads (kopf's executor) and HTTP connections to the API server.
CONNECTIONS = 32
# Seconds to connect, and to wait for each answer, of every API call: a dead
# connection (a frozen proxy, a lost NAT entry) becomes a transient error instead
# of a reconcile that never ends.
CONNECT_TIMEOUT_S = 10.0
REQUEST_TIMEOUT_S = float(os.environ.get("IMAGEGEN_OPERATOR_API_TIMEOUT_S", "30"))
log = logging.getLogger(__name__)


class TransientKubeError(Exception):
    """The API server could not do it now (conflict, timeout, 5xx): try again."""


class PermanentKubeError(Exception):
    """The API server refused the object itself (invalid, forbidden)."""


def _timeout() -> tuple[float, float]:
    return (min(CONNECT_TIMEOUT_S, REQUEST_TIMEOUT_S), REQUEST_TIMEOUT_S)


def _unreachable(exc: Exception) -> bool:
    """Connection refused, reset or timed out: the API server could not be reached."""
    return isinstance(exc, urllib3.exceptions.HTTPError | OSError)


class MissingKind(PermanentKubeError):
    """The cluster does not serve this kind (a CRD that is not installed)."""


class Forbidden(PermanentKubeError):
    """The operator's account may not do it (RBAC): a 403."""


def new_api_client() -> client.ApiClient:
    """In-cluster credentials when running in a pod, else the kubeconfig."""
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)
    # One connection per handler thread, so none waits for another's socket.
    configuration.connection_pool_maxsize = CONNECTIONS
    return with_default_timeout(client.ApiClient(configuration))


def with_default_timeout(api_client: client.ApiClient) -> client.ApiClient:
    """Every request of ``api_client`` bounded in time, those that name no timeout too: the
    dynamic client's discovery names none, and a discovery that hangs on a dead connection
    would hold every reconcile waiting for the discovery lock."""
    rest = api_client.rest_client
    request = rest.request

    def bounded(method, url, headers=None, body=None, post_params=None,
                _request_timeout=None):
        return request(method, url, headers=headers, body=body, post_params=post_params,
                       _request_timeout=_request_timeout or _timeout())

    rest.request = bounded
    return api_client


def _error(exc: ApiException, what: str) -> Exception:
    text = f"{what}: {exc.status} {exc.reason}: {_message(exc)}"
    if exc.status in (409, 429) or exc.status >= 500:
        return TransientKubeError(text)
    return Forbidden(text) if exc.status == 403 else PermanentKubeError(text)


def _message(exc: ApiException) -> str:
    try:
        return json.loads(exc.body).get("message", exc.body)
    except (TypeError, ValueError, AttributeError):
        return str(exc.body)


def _json(response: Any) -> dict[str, Any]:
    # Plain JSON, not the dynamic client's ResourceInstance wrappers: several
    # times faster on lists of hundreds of objects.
    return json.loads(response.data)


def _same_scalar(want: Any, have: Any) -> bool:
    if want == have or str(want) == str(have):
        return True
    # The API server rewrites quantities in canonical form ("1024Mi" -> "1Gi").
    try:
        return parse_quantity(want) == parse_quantity(have)
    except (ValueError, TypeError):
        return False


def is_subset(want: Any, have: Any) -> bool:
    """True when every field of ``want`` is already so in ``have``.

    The server adds defaults and other managers add fields; neither counts as a
    difference. Lists are compared item by item (same length): we own them whole.
    """
    if isinstance(want, dict):
        if not isinstance(have, dict):
            return not want
        return all(
            is_subset(v, have.get(k)) if k in have else v in (None, {}, []) for k, v in want.items()
        )
    if isinstance(want, list):
        if not isinstance(have, list):
            return not want
        return len(want) == len(have) and all(
            is_subset(w, h) for w, h in zip(want, have, strict=True)
        )
    if want is None:
        return True
    return _same_scalar(want, have)


# On each child of one service (apply's ``digest``): a digest of what was applied. A field
# the operator stops rendering (a limit taken out of the spec, or left out by a newer
# release) leaves the live object a superset of the new render, which the comparison alone
# would take as done: the digest differs, so the apply is written, and server-side apply
# drops the field. Not on objects services share (a pool, its nodes): each service renders
# its own view of them, any of which the live object may satisfy, and digests of different
# views would have them overwrite each other at every resync.
APPLIED_DIGEST = "imagegen.dev/applied-digest"


def stamped(obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` with the digest of itself in APPLIED_DIGEST (``obj`` is left as it is)."""
    meta = dict(obj["metadata"])
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items()
                   if k != APPLIED_DIGEST}
    meta["annotations"] = annotations
    body = json.dumps({**obj, "metadata": meta}, sort_keys=True, separators=(",", ":"),
                      default=str)
    digest = hashlib.sha256(body.encode()).hexdigest()[:20]
    return {**obj, "metadata": {**meta, "annotations": {**annotations, APPLIED_DIGEST: digest}}}


# Where in each kind the operator owns every field, as a path of field-set keys. Server-side
# apply never removes a field another manager owns (a nodeSelector key added with kubectl
# edit), so such a field would stay for good. A key added to a selector is the worst of
# them: it moves the NetworkPolicy's fence, the budget's or the Service's reach, off the
# server's pods.
OWNED_WHOLE: dict[str, tuple[str, ...]] = {
    "Deployment": ("f:spec", "f:template"),
    "NetworkPolicy": ("f:spec",),
    "PodDisruptionBudget": ("f:spec",),
    "Service": ("f:spec", "f:selector"),
}
# What a person may still change by hand in a pod template the operator owns:
# `kubectl rollout restart` stamps this annotation to roll the pods.
HAND_EDITS_KEPT = ("kubectl.kubernetes.io/restartedAt",)
_KEPT_FIELDS = {f"f:{key}" for key in HAND_EDITS_KEPT}


def foreign_managers(obj: dict[str, Any]) -> list[str]:
    """Field managers other than ours that own something where ``obj``'s kind is ours whole
    (OWNED_WHOLE), kept hand edits aside."""
    path = OWNED_WHOLE.get(obj.get("kind", ""))
    if path is None:
        return []
    managers = []
    for entry in (obj.get("metadata") or {}).get("managedFields") or []:
        if entry.get("manager") == FIELD_MANAGER:
            continue
        fields = _at(entry.get("fieldsV1") or {}, path)
        if fields == {} or (fields and _owns_more_than_kept(fields)):
            managers.append(entry.get("manager") or "?")
    return managers


def _at(fields: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any] | None:
    """The field set at ``path``; ``{}`` where the whole of an atomic map is owned (a
    Service's selector), None where nothing there is."""
    for key in path:
        if not isinstance(fields, dict) or key not in fields:
            return None
        fields = fields[key]
    return fields


def _take(fields: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any] | None:
    """Remove and return the field set at ``path`` (as _at), pruning the maps it leaves
    empty."""
    head, *rest = path
    if head not in fields:
        return None
    if not rest:
        return fields.pop(head)
    taken = _take(fields[head], tuple(rest))
    if not fields[head]:
        del fields[head]
    return taken


def _split_kept(template: dict[str, Any]) -> dict[str, Any]:
    """Remove the kept hand edits from a template field set; return them as one.

    In a field set ``{}`` means "owns this field", so a map emptied here is
    removed, not left behind as a claim on the whole map.
    """
    metadata = template.get("f:metadata") or {}
    annotations = metadata.get("f:annotations") or {}
    kept = {k: annotations.pop(k) for k in list(annotations) if k in _KEPT_FIELDS}
    if kept and not [k for k in annotations if k != "."]:
        metadata.pop("f:annotations", None)
        if not [k for k in metadata if k != "."]:
            template.pop("f:metadata", None)
    return {"f:metadata": {"f:annotations": kept}} if kept else {}


def _merge_fields(into: dict[str, Any], more: dict[str, Any]) -> None:
    for key, value in more.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge_fields(into[key], value)
        else:
            into[key] = value


def _nested(path: tuple[str, ...], fields: dict[str, Any]) -> dict[str, Any]:
    for key in reversed(path):
        fields = {key: fields}
    return fields


def _owns_more_than_kept(template: dict[str, Any]) -> bool:
    rest = {k: v for k, v in template.items() if k not in (".", "f:metadata")}
    metadata = {k: v for k, v in (template.get("f:metadata") or {}).items() if k != "."}
    annotations = {k: v for k, v in (metadata.pop("f:annotations", None) or {}).items()
                   if k != "." and k not in _KEPT_FIELDS}
    return bool(rest or metadata or annotations)


class Kube:
    """Thin, typed-error access to the API through the dynamic client.

    ``writes`` counts the write calls this process made (for /metrics).
    :meth:`own_write` tells a watch event that echoes one of our own applies
    from one that carries someone else's change.
    """

    def __init__(self, api_client: client.ApiClient | None = None):
        self.api_client = api_client or new_api_client()
        self._dynamic: DynamicClient | None = None
        self._lock = threading.Lock()
        self._resources: dict[tuple[str, str], Any] = {}
        self._missing: dict[tuple[str, str], float] = {}  # kind -> when found missing
        self.writes = 0
        # uid -> resourceVersion of the objects we last applied (bounded: see _remember);
        # its own lock, so child events never wait behind discovery.
        self._applied: dict[str, str] = {}
        self._applied_lock = threading.Lock()

    def own_write(self, obj: dict[str, Any]) -> bool:
        """Whether ``obj`` (from a watch event) is exactly the version our last apply made.

        The reconcile that applied it already read that version back, so the echo
        needs no reconcile of its own. Anything newer (a controller's status update,
        an edit by hand) carries another resourceVersion.
        """
        meta = obj.get("metadata") or {}
        with self._applied_lock:
            return bool(meta.get("uid")) and self._applied.get(meta["uid"]) == meta.get(
                "resourceVersion")

    def _remember(self, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        uid = meta.get("uid", "")
        with self._applied_lock:
            self._applied.pop(uid, None)
            self._applied[uid] = meta.get("resourceVersion", "")
            while len(self._applied) > APPLIED_LIMIT:
                # The oldest entry: most likely a deleted object's; forgetting a live one
                # costs one reconcile of its echo.
                self._applied.pop(next(iter(self._applied)))

    @property
    def dynamic(self) -> DynamicClient:
        if self._dynamic is None:
            self._dynamic = DynamicClient(self.api_client)
        return self._dynamic

    def _resource(self, api_version: str, kind: str):
        with self._calling(f"discover {kind}"):
            return self._discover(api_version, kind)

    def _discover(self, api_version: str, kind: str):
        # The dynamic client's discovery cache is not thread-safe, and handlers
        # run in several threads: look kinds up one at a time, and once.
        key = (api_version, kind)
        with self._lock:
            if key in self._resources:
                return self._resources[key]
            missing_since = self._missing.get(key)
            if missing_since is not None and time.monotonic() - missing_since < MISSING_KIND_TTL_S:
                raise MissingKind(f"the cluster does not serve {kind} ({api_version})")
            try:
                res = self.dynamic.resources.get(api_version=api_version, kind=kind)
            except ResourceNotFoundError:
                # Discovery is cached: look again in case the CRD was just installed,
                # but not on every call (a full discovery is dozens of requests).
                self.dynamic.resources.invalidate_cache()
                try:
                    res = self.dynamic.resources.get(api_version=api_version, kind=kind)
                except ResourceNotFoundError as exc:
                    self._missing[key] = time.monotonic()
                    raise MissingKind(
                        f"the cluster does not serve {kind} ({api_version})") from exc
            self._missing.pop(key, None)
            self._resources[key] = res
            return res

    @contextmanager
    def _calling(self, what: str) -> Iterator[None]:
        try:
            yield
        except ApiException as exc:
            raise _error(exc, what) from exc
        except Exception as exc:
            if _unreachable(exc):
                raise TransientKubeError(f"{what}: API server unreachable: {exc}") from exc
            raise

    def get(
        self, api_version: str, kind: str, name: str, namespace: str | None = None
    ) -> dict[str, Any] | None:
        res = self._resource(api_version, kind)
        with self._calling(f"get {kind} {name}"):
            try:
                return _json(res.get(name=name, namespace=namespace, serialize=False,
                                     _request_timeout=_timeout()))
            except ApiException as exc:
                if exc.status == 404:
                    return None
                raise

    def list(
        self,
        api_version: str,
        kind: str,
        namespace: str | None = None,
        label_selector: str | None = None,
    ) -> list[dict[str, Any]]:
        res = self._resource(api_version, kind)
        with self._calling(f"list {kind}"):
            out = _json(res.get(namespace=namespace, label_selector=label_selector,
                                serialize=False, _request_timeout=_timeout()))
        # List items carry no apiVersion/kind of their own.
        return [{"apiVersion": api_version, "kind": kind, **item} for item in out["items"]]

    def apply(
        self, obj: dict[str, Any], live: dict[str, Any] | None = None, read_first: bool = True,
        digest: bool = False,
    ) -> dict[str, Any]:
        """Server-side apply ``obj`` unless the live object already matches it.

        Returns the object as it now is in the cluster (the live one when nothing
        was written), so callers need not read it again. ``read_first=False``
        skips the comparison (one GET) where a write is expected anyway. With
        ``digest`` the object goes out ``stamped``: a live object applied from
        another render is written again, whatever it holds beside.
        """
        if digest:
            obj = stamped(obj)
        meta = obj["metadata"]
        if live is None and read_first:
            live = self.get(obj["apiVersion"], obj["kind"], meta["name"], meta.get("namespace"))
        managers = foreign_managers(live) if live else []
        if managers:
            live = self._reclaim(obj, live, managers)
        if live and is_subset(obj, live):
            return live
        res = self._resource(obj["apiVersion"], obj["kind"])
        with self._calling(f"apply {obj['kind']} {meta['name']}"):
            self.writes += 1
            applied = res.server_side_apply(
                body=obj,
                name=meta["name"],
                namespace=meta.get("namespace"),
                field_manager=FIELD_MANAGER,
                force_conflicts=True,
                serialize=False,
                _request_timeout=_timeout(),
            )
        log.info("applied %s %s", obj["kind"], meta["name"])
        applied = _json(applied)
        self._remember(applied)
        return applied

    def _reclaim(
        self, obj: dict[str, Any], live: dict[str, Any], managers: list[str]
    ) -> dict[str, Any]:
        """Take over what other managers own where the kind is ours whole, then apply
        without it.

        Server-side apply removes a field only when its last owner stops applying
        it: move the other managers' fields there into our own entry of
        managedFields (one patch), and our next apply, which omits them, drops them.
        Kept hand edits (HAND_EDITS_KEPT) stay theirs.
        """
        meta = obj["metadata"]
        path = OWNED_WHOLE[obj["kind"]]
        entries = json.loads(json.dumps(live["metadata"].get("managedFields") or []))
        ours = next((e for e in entries
                     if e.get("manager") == FIELD_MANAGER and e.get("operation") == "Apply"), None)
        if ours is None:
            # Never applied by us: apply once, which makes our entry; the next reconcile
            # takes the rest over into it.
            return {}
        taken: dict[str, Any] = {}
        for entry in entries:
            if entry.get("manager") == FIELD_MANAGER:
                continue
            fields = entry.get("fieldsV1") or {}
            theirs = _take(fields, path)
            if theirs is None:
                continue
            kept = _split_kept(theirs)
            _merge_fields(taken, theirs)
            if kept:
                _merge_fields(fields, _nested(path, kept))
        _merge_fields(ours.setdefault("fieldsV1", {}), _nested(path, taken))
        # An entry left owning nothing goes (the API server refuses empty field sets).
        entries = [e for e in entries if e.get("fieldsV1")]
        res = self._resource(obj["apiVersion"], obj["kind"])
        what = f"take over {'.'.join(k[2:] for k in path)} of {obj['kind']} {meta['name']}"
        with self._calling(what):
            self.writes += 1
            res.patch(
                body={"metadata": {"managedFields": entries,
                                   "resourceVersion": live["metadata"]["resourceVersion"]}},
                name=meta["name"], namespace=meta.get("namespace"),
                content_type="application/merge-patch+json", _request_timeout=_timeout())
        log.info("%s %s: undoing what %s changed in its %s", obj["kind"], meta["name"],
                 ", ".join(sorted(set(managers))), ".".join(k[2:] for k in path))
        return {}  # differs from anything: the caller applies

    def delete(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> bool:
        """Ask for deletion; True when it is already gone."""
        res = self._resource(api_version, kind)
        with self._calling(f"delete {kind} {name}"):
            try:
                self.writes += 1
                # Background: a Job's pods go with it (batch/v1 would orphan them by default).
                res.delete(name=name, namespace=namespace, body={"propagationPolicy": "Background"},
                           _request_timeout=_timeout())
            except ApiException as exc:
                if exc.status == 404:
                    return True
                raise
        return False

    def remove_finalizer(self, obj: dict[str, Any], finalizer: str) -> None:
        """Take ``finalizer`` off ``obj`` as read: refused (a 422) if the object's finalizers
        changed since, so no other's is lost. Nothing to do once it is gone."""
        meta = obj["metadata"]
        finalizers = meta.get("finalizers") or []
        if finalizer not in finalizers:
            return
        at = f"/metadata/finalizers/{finalizers.index(finalizer)}"
        res = self._resource(obj["apiVersion"], obj["kind"])
        with self._calling(f"remove finalizer {finalizer} of {obj['kind']} {meta['name']}"):
            try:
                self.writes += 1
                res.patch(body=[{"op": "test", "path": at, "value": finalizer},
                                {"op": "remove", "path": at}],
                          name=meta["name"], namespace=meta.get("namespace"),
                          content_type="application/json-patch+json",
                          _request_timeout=_timeout())
            except ApiException as exc:
                if exc.status != 404:
                    raise

    def patch_status(
        self, api_version: str, kind: str, name: str, namespace: str | None, status: dict[str, Any]
    ) -> None:
        """Replace ``status`` through the status subresource (a merge patch)."""
        res = self._resource(api_version, kind)
        with self._calling(f"patch status of {kind} {name}"):
            self.writes += 1
            res.status.patch(
                body={"status": status},
                name=name,
                namespace=namespace,
                content_type="application/merge-patch+json",
                field_manager=FIELD_MANAGER,
                _request_timeout=_timeout(),
            )
