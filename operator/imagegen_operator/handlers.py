"""Thin kopf handlers: take the event, call the one reconcile, report.

Every trigger (create, update, resume, a timer, an event on a child such as a
Deployment deleted or scaled by hand) ends in :meth:`Reconciler.reconcile` on
the owning ImageGenService, one at a time per object. Handlers return nothing,
so kopf writes no result stanza into status; its bookkeeping goes into
``imagegen.dev`` annotations, written only when the spec changes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import kopf

from imagegen_operator import conditions as cond
from imagegen_operator import metrics
from imagegen_operator.api import API_VERSION, GROUP, KIND, PLURAL, VERSION
from imagegen_operator.cluster_default import ClusterDefault
from imagegen_operator.kube import (
    CONNECT_TIMEOUT_S,
    CONNECTIONS,
    REQUEST_TIMEOUT_S,
    Kube,
    PermanentKubeError,
    TransientKubeError,
)
from imagegen_operator.providers import build_providers
from imagegen_operator.reconcile import FINALIZER, ORPHAN_GRACE_S, Reconciler, indexed
from imagegen_operator.render import DEFAULT_SERVER_IMAGE, SERVER_IMAGE_ENV
from imagegen_operator.render.common import MANAGED_BY
from imagegen_operator.render.nodepool import node_service_account
from imagegen_operator.sweeper import Sweeper

# The Deployment status fields the service's own status is computed from.
DEPLOYMENT_STATUS_FIELDS = ("observedGeneration", "replicas", "readyReplicas",
                            "updatedReplicas", "availableReplicas")
ALL_SERVICES = "all"
# How often a service whose node pool is on its way looks again: nothing in Kubernetes
# says when a GKE operation ends or simulated nodes turn Ready.
POOL_POLL_SECONDS = 5.0
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
NAMESPACE_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
# (group, version, plural) as kopf takes them; the core group has no name.
CHILD_KINDS = (
    ("apps", "v1", "deployments"),
    ("v1", "services"),
    ("policy", "v1", "poddisruptionbudgets"),
    ("autoscaling", "v2", "horizontalpodautoscalers"),
    ("networking.k8s.io", "v1", "networkpolicies"),
    ("batch", "v1", "jobs"),  # the precompile Job: its end lets the Deployment scale
)
log = logging.getLogger("imagegen_operator")


@dataclass
class OperatorConfig:
    """Settings of the operator process (flags, each also from the environment)."""

    resync_seconds: float = 30.0
    metrics_port: int = 8080
    health_port: int = 8081
    bind_address: str = "0.0.0.0"  # where the metrics and health ports listen
    namespaces: tuple[str, ...] = ()
    peering: str | None = None
    priority: int = 0
    # A reconcile running longer than this turns /healthz unhealthy (the kubelet restarts
    # the pod): every API call has a timeout, so only a hang gets there.
    stuck_seconds: float = 300.0
    # The API server ends each watch after this, and the client gives up on a silent one
    # a little later: a dead connection under a watch is noticed within that time.
    watch_timeout_seconds: float = 120.0
    # The inference server image of services that name none (spec.server.image).
    server_image: str = DEFAULT_SERVER_IMAGE
    # How often the sweep for node pools no service uses runs (0: never), and how long one
    # must have been unused before it is deleted.
    sweep_seconds: float = 300.0
    unused_pool_grace_seconds: float = ORPHAN_GRACE_S


@dataclass
class _Service:
    """What the operator tracks of one service between handler calls."""

    lock: threading.Lock = field(default_factory=threading.Lock)  # one reconcile at a time
    running: bool = False
    dirty: bool = False  # a trigger arrived while running: run once more
    waiting: bool = False  # for its node pool (the pools-in-flight gauge)
    not_before: float = 0.0  # monotonic: timers wait until then (a provider's backoff)
    started: float | None = None  # monotonic start of the reconcile in progress
    named: tuple[str, str] | None = None  # namespace and name: its series in the ready gauge


class Operator:
    """The reconciler plus what makes it safe to call from many handlers at once."""

    def __init__(self, reconciler: Reconciler, clock: Callable[[], float] = time.monotonic):
        self.reconciler = reconciler
        self._clock = clock
        self._guard = threading.Lock()
        self._services: dict[str, _Service] = {}
        self._children: dict[str, str] = {}  # child uid -> what of it we last reacted to
        self._writes_reported = 0

    def _service(self, uid: str) -> _Service:
        with self._guard:
            return self._services.setdefault(uid, _Service())

    def due(self, uid: str) -> bool:
        """Whether a timer may reconcile the service now (no backoff still running)."""
        with self._guard:
            service = self._services.get(uid)
            return service is None or self._clock() >= service.not_before

    def stuck_for(self) -> float:
        """Seconds the oldest reconcile in progress has been running (0: none)."""
        now = self._clock()
        with self._guard:
            starts = [s.started for s in self._services.values() if s.started is not None]
        return max((now - t for t in starts), default=0.0)

    def child_changed(self, event_type: str, child: dict[str, Any]) -> bool:
        """Whether a child's event can change what the owner's reconcile does.

        Children's status moves all the time (a PDB counts healthy pods, an HPA its
        metrics); of it only a Deployment's replica counts and rollout failures and
        whether a Job has finished feed the service's status. Anything else is a
        reconcile that would find nothing to do.
        """
        key = child["metadata"].get("uid", "")
        if event_type == "DELETED":
            with self._guard:
                self._children.pop(key, None)
            return True
        fingerprint = json.dumps(
            [child["metadata"].get("labels"), child.get("spec"), _status_that_counts(child)],
            sort_keys=True, default=str,
        )
        with self._guard:
            if self._children.get(key) == fingerprint:
                return False
            self._children[key] = fingerprint
        return True

    def reconcile(self, body: dict[str, Any], trigger: str, fresh: bool = False,
                  retry: int = 0) -> None:
        """Reconcile one service; triggers that arrive meanwhile fold into one more run.

        A rollout sends a burst of child events; each would otherwise queue a full
        reconcile of the same service behind the running one. Since every run reads
        the live object, one run after the burst sees everything the burst changed.
        """
        service = self._service(body["metadata"]["uid"])
        with self._guard:
            if service.running:
                service.dirty = True
                return
            service.running = True
        finished = False
        try:
            while True:
                try:
                    self._reconcile_once(service, body, trigger, fresh, retry)
                except Exception:
                    with self._guard:
                        again, service.dirty = service.dirty, False
                    if not again:
                        raise
                    # A trigger folded into the failed run is not lost with it: once more
                    # (a child event's handler is not retried by kopf).
                    self._reconcile_once(service, body, "coalesced", False, retry)
                fresh = False
                with self._guard:
                    if not service.dirty:
                        # Let go in the same breath as the last look: a trigger after it
                        # starts a run of its own instead of marking one that is over.
                        service.running, finished = False, True
                        break
                    service.dirty = False
                trigger = "coalesced"
        finally:
            if not finished:  # an error: kopf retries the handler, from the live object
                with self._guard:
                    service.running = service.dirty = False

    def _reconcile_once(
        self, service: _Service, body: dict[str, Any], trigger: str, fresh: bool,
        retry: int = 0,
    ) -> None:
        started = self._clock()
        with service.lock:
            service.started = started
            try:
                # The event's copy may predate our own last status write: start
                # from the live object, or we would write the same status twice.
                uid = body["metadata"]["uid"]
                body = body if fresh else self._fresh(body)
                if body is None:  # gone: nothing of it is managed any more
                    self.forget(uid)
                    return
                outcome = self.reconciler.reconcile(body)
            except TransientKubeError as exc:
                metrics.ERRORS.labels("transient").inc()
                metrics.RECONCILES.labels(trigger, "error").inc()
                # Sooner at first, then less often: an API server in trouble is not asked
                # for every service every 5 s (each retry is also an Event).
                raise kopf.TemporaryError(str(exc), delay=retry_delay(retry)) from exc
            except PermanentKubeError as exc:
                metrics.ERRORS.labels("permanent").inc()
                metrics.RECONCILES.labels(trigger, "error").inc()
                self.reconciler.record_once(body, "Warning", "ReconcileFailed", str(exc))
                raise kopf.PermanentError(str(exc)) from exc
            except Exception as exc:  # a fault of ours: counted, so that the alert fires
                metrics.ERRORS.labels("other").inc()
                metrics.RECONCILES.labels(trigger, "error").inc()
                self.reconciler.record_once(body, "Warning", "ReconcileError", _fault(exc))
                raise
            finally:
                service.started = None
                metrics.RECONCILE_SECONDS.labels(trigger).observe(self._clock() - started)
                self._count_writes()
        metrics.RECONCILES.labels(trigger, outcome.result).inc()
        meta = body["metadata"]
        with self._guard:
            service.not_before = started + (outcome.requeue_after or 0.0)
            service.waiting = outcome.pool_on_its_way
            if self._services.get(meta["uid"]) is service:  # not forgotten meanwhile
                service.named = (meta.get("namespace") or "", meta["name"])
                metrics.SERVICE_READY.labels(*service.named).set(1 if outcome.ready else 0)
            self._update_gauges()

    def stood_down(self) -> None:
        """Another operator acts now: the per-service gauges are its to say. They come back
        with the reconciles of this one should it act again."""
        with self._guard:
            metrics.SERVICE_READY.clear()
            for service in self._services.values():
                service.named = None

    def forget(self, uid: str) -> None:
        """The service is gone: none of it is tracked, nor in the gauges."""
        with self._guard:
            service = self._services.pop(uid, None)
            if service is not None and service.named is not None:
                metrics.SERVICE_READY.remove(*service.named)
            self._update_gauges()

    def _update_gauges(self) -> None:
        metrics.MANAGED.set(len(self._services))
        metrics.POOLS_IN_FLIGHT.set(sum(s.waiting for s in self._services.values()))

    def use_index(self, index: kopf.Index) -> None:
        """Let the reconciler read every service from kopf's index instead of a LIST."""
        if self.reconciler.services is None:
            self.reconciler.services = lambda: list(index.get(ALL_SERVICES, ()))

    def _fresh(self, body: dict[str, Any]) -> dict[str, Any] | None:
        meta = body["metadata"]
        live = self.reconciler.kube.get(API_VERSION, KIND, meta["name"], meta.get("namespace"))
        if live is None or live["metadata"].get("uid") != meta["uid"]:
            return None
        return live

    def finalize(self, body: dict[str, Any], retry: int = 0) -> None:
        uid = body["metadata"]["uid"]
        # A GKE pool takes minutes to go: asked again sooner at first, then every minute,
        # not every 5 s (kopf posts each wait as an Event of its own).
        delay = retry_delay(retry)
        service = self._service(uid)
        with service.lock:
            service.started = self._clock()  # a stuck delete turns /healthz unhealthy too
            try:
                # As a reconcile does: kopf's copy may predate a pool a reconcile that held
                # the lock just named in status, which the delete must not leave behind.
                done = self.reconciler.finalize(self._fresh(body) or body)
            except TransientKubeError as exc:
                metrics.ERRORS.labels("transient").inc()
                raise kopf.TemporaryError(str(exc), delay=delay) from exc
            except Exception as exc:  # retried by kopf all the same: the pool must go
                permanent = isinstance(exc, PermanentKubeError)
                metrics.ERRORS.labels("permanent" if permanent else "other").inc()
                self.reconciler.record_once(body, "Warning", "DeleteFailed",
                          str(exc) if permanent else _fault(exc))
                raise
            finally:
                service.started = None
                self._count_writes()
        if not done:
            self.reconciler.record_once(body, "Normal", "WaitingForNodePool",
                      "the service goes once its node pool is deleted (a GKE pool takes "
                      "minutes)")
            raise kopf.TemporaryError("waiting for the node pool to be deleted", delay=delay)
        self.forget(uid)

    def _count_writes(self) -> None:
        with self._guard:  # read under the guard: a later count reported first is no less
            writes = self.reconciler.kube.writes
            if writes > self._writes_reported:
                metrics.API_WRITES.inc(writes - self._writes_reported)
                self._writes_reported = writes

    def owner_of(self, child: dict[str, Any]) -> dict[str, Any] | None:
        ref = next(
            (
                r
                for r in child["metadata"].get("ownerReferences") or []
                if r.get("controller") and r.get("kind") == KIND
            ),
            None,
        )
        if ref is None:
            return None
        owner = self.reconciler.kube.get(
            API_VERSION, KIND, ref["name"], child["metadata"].get("namespace")
        )
        if owner is None or owner["metadata"].get("uid") != ref.get("uid"):
            return None
        return owner


def retry_delay(retry: int) -> float:
    """Seconds before a handler is tried again (a delete waiting on its node pool, a
    transient API error): 5, 7.5, 11... 60."""
    return min(5 * 1.5 ** min(retry, 16), 60.0)


def _fault(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc} (the operator's log has the trace); retried"


def _record(body: dict[str, Any], type_: str, reason: str, message: str) -> None:
    try:
        kopf.event(body, type=type_, reason=reason, message=message)
    except LookupError:
        # A thread of the operator's own (the sweep's), which kopf's poster does not serve:
        # it finishes the deletes of services whose namespace is going, where no Event could
        # be made anyway. Logged instead.
        meta = body["metadata"]
        log.info("%s/%s: %s: %s", meta.get("namespace"), meta.get("name"), reason, message)


def register(registry: kopf.OperatorRegistry, operator: Operator, config: OperatorConfig) -> None:
    """Attach the handlers to ``registry``."""

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = FINALIZER
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=GROUP, key="last-handled-configuration"
        )
        # After kopf stores that a change was handled, it waits for its own patch to
        # come back through the watch before it runs change handlers on the object
        # again. Under load (hundreds of services created at once) the stream ran more
        # than the default 5 s behind, and kopf took an older copy for a new change
        # and ran the create handler a second time. The watch is ordered, so the echo
        # normally arrives before any later edit and nothing waits; only an echo that
        # never comes (a relist that skips it) holds a later edit for the whole
        # timeout. Timers and child events are not held either way.
        settings.persistence.consistency_timeout = 30.0
        # Our own events say what happened; kopf's per-handler ones would only add noise.
        settings.posting.level = logging.WARNING
        # Reconciles mostly wait on the API server: more threads than cores pay off.
        settings.execution.max_workers = CONNECTIONS
        # No wait without an end: kopf's own calls and its watches time out too.
        settings.networking.request_timeout = REQUEST_TIMEOUT_S
        settings.networking.connect_timeout = CONNECT_TIMEOUT_S
        settings.watching.connect_timeout = CONNECT_TIMEOUT_S
        settings.watching.server_timeout = int(config.watch_timeout_seconds)  # whole seconds
        settings.watching.client_timeout = config.watch_timeout_seconds + 30
        if config.peering:
            settings.peering.name = config.peering
            settings.peering.priority = config.priority
            settings.peering.mandatory = True
            settings.peering.clusterwide = not config.namespaces

    @kopf.on.probe(registry=registry, id="reconcile_progress")
    def reconcile_progress(**_: Any) -> float:
        # /healthz answers 500 when a probe fails: a reconcile stuck past the limit
        # means a hang no timeout caught, and a restart is the way out.
        stuck = operator.stuck_for()
        if stuck > config.stuck_seconds:
            raise kopf.PermanentError(
                f"a reconcile has been running for {stuck:.0f}s (limit {config.stuck_seconds:.0f}s)")
        return round(stuck, 1)

    @kopf.index(GROUP, VERSION, PLURAL, registry=registry, id="services_index")
    def services_index(body: kopf.Body, **_: Any) -> dict[str, dict[str, Any]]:
        # What pool sizing needs of every service, kept current by the watch kopf
        # already has: no LIST per reconcile. kopf fills it before any handler runs.
        return {ALL_SERVICES: indexed(body)}

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # The same credentials as the Kubernetes client (in-cluster or kubeconfig).
        return kopf.login_via_client(**kwargs)

    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)
    @kopf.on.update(GROUP, VERSION, PLURAL, registry=registry)
    @kopf.on.resume(GROUP, VERSION, PLURAL, registry=registry)
    def on_change(body: kopf.Body, reason: str, retry: int, services_index: kopf.Index,
                  **_: Any) -> None:
        operator.use_index(services_index)
        # kopf hands a creation over once its own finalizer patch has come back, and
        # before that nothing of ours touched the object: no need to read it again.
        # (Should kopf give up waiting for that echo, a stale copy costs one status
        # rewrite with new transition times, nothing more.)
        operator.reconcile(_plain(body), trigger=str(reason), fresh=reason == "create",
                           retry=retry)

    @kopf.timer(
        GROUP,
        VERSION,
        PLURAL,
        interval=config.resync_seconds,
        initial_delay=config.resync_seconds,
        registry=registry,
        when=lambda body, **_: not body["metadata"].get("deletionTimestamp"),
    )
    def on_timer(body: kopf.Body, retry: int, services_index: kopf.Index, **_: Any) -> None:
        operator.use_index(services_index)
        if not operator.due(body["metadata"]["uid"]):
            return  # a provider asked to wait; edits and child events still reconcile
        operator.reconcile(_plain(body), trigger="timer", retry=retry)

    @kopf.timer(
        GROUP,
        VERSION,
        PLURAL,
        id="pool_poll",
        interval=min(POOL_POLL_SECONDS, config.resync_seconds),
        initial_delay=min(POOL_POLL_SECONDS, config.resync_seconds),
        registry=registry,
        when=lambda body, **_: waiting_for_pool(body),
    )
    def on_pool_poll(body: kopf.Body, retry: int, services_index: kopf.Index,
                     **_: Any) -> None:
        # kopf starts and stops this timer as the status changes, and pauses it with
        # every other handler when a peer takes over.
        operator.use_index(services_index)
        if not operator.due(body["metadata"]["uid"]):
            return
        operator.reconcile(_plain(body), trigger="pool-poll", retry=retry)

    @kopf.on.delete(GROUP, VERSION, PLURAL, registry=registry)
    def on_delete(body: kopf.Body, retry: int, **_: Any) -> None:
        operator.finalize(_plain(body), retry)

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry, id="gone")
    def on_gone(type: str | None, body: kopf.Body, **_: Any) -> None:  # noqa: A002
        # One whose finalizer was taken off by hand goes with no delete handler run.
        if type == "DELETED":
            operator.forget(body["metadata"]["uid"])

    for child in CHILD_KINDS:

        @kopf.on.event(
            *child,
            registry=registry,
            id=f"child-{child[-1]}",
            labels={"app.kubernetes.io/managed-by": MANAGED_BY},
        )
        def on_child(body: kopf.Body, type: str | None, services_index: kopf.Index,  # noqa: A002
                     **_: Any) -> None:
            operator.use_index(services_index)
            # A child changed or vanished: reconcile its owner, which restores
            # what was edited by hand (and is a no-op for our own writes).
            if type is None:
                return  # the initial listing; resume covers it
            child = _plain(body)
            if not operator.child_changed(type, child):
                return  # only its status moved, in a way the service's status ignores
            if type != "DELETED" and operator.reconciler.kube.own_write(child):
                return  # the echo of our own apply: the reconcile that made it saw it
            owner = operator.owner_of(_plain(body))
            if owner is not None and not owner["metadata"].get("deletionTimestamp"):
                # Not fresh: the owner was read before the service's lock, and a finalizer
                # holding it may have finished meanwhile; read again under the lock.
                operator.reconcile(owner, trigger="child", fresh=False)


def _status_that_counts(child: dict[str, Any]) -> Any:
    status = child.get("status") or {}
    if child.get("kind") == "Deployment":
        # And the conditions status repeats: pods that cannot be created, a deadline passed.
        failing = [(c.get("type"), c.get("status"), c.get("reason"))
                   for c in status.get("conditions") or []
                   if c.get("type") in ("ReplicaFailure", "Progressing")]
        return [{k: status.get(k) for k in DEPLOYMENT_STATUS_FIELDS}, failing]
    if child.get("kind") == "Job":  # whether it finished, and how
        return [(c.get("type"), c.get("status")) for c in status.get("conditions") or []]
    return None


def waiting_for_pool(body: Any) -> bool:
    """Planned, its node pool not Ready yet or a move off old ones under way (pools left
    that are not gone yet), and not stuck on something only a person fixes."""
    status = body.get("status") or {}
    conditions = status.get("conditions")
    moving = cond.find(conditions, cond.PROGRESSING) or {}
    return bool(
        conditions
        and not body["metadata"].get("deletionTimestamp")
        and (not cond.is_true(conditions, cond.NODE_POOL_READY)
             or (moving.get("status") == "True" and moving.get("reason") == "MovingPool")
             or (status.get("nodePool") or {}).get("releasing"))
        and not cond.is_true(conditions, cond.STALLED)
    )


def _plain(body: kopf.Body) -> dict[str, Any]:
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": dict(body.get("metadata", {})),
        "spec": dict(body.get("spec", {})),
        "status": dict(body.get("status", {})),
    }


def _seconds_or_off(text: str) -> float:
    """A number of seconds, or 0 for off."""
    try:
        if float(text) == 0:
            return 0.0
    except ValueError:
        pass
    return _positive_seconds(text)


def _positive_seconds(text: str) -> float:
    """A period in seconds: 0 would make every timer a busy loop."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, not {text!r}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 0..65535, not {text!r}")
    return value


def _log_format(text: str) -> str:
    # A type, not choices: argparse checks a string default with its type only.
    if text not in ("text", "json"):
        raise argparse.ArgumentTypeError(f"must be text or json, not {text!r}")
    return text


def _cloud_logging_severity(record: logging.LogRecord) -> bool:
    """Give a JSON line Cloud Logging's own severity name (WARNING, not kopf's "warn"), as
    the inference server's lines have: kopf's formatter keeps a severity the record has."""
    record.severity = record.levelname
    return True


def parse_args(argv: Sequence[str]) -> OperatorConfig:
    env = os.environ.get
    p = argparse.ArgumentParser(
        prog="imagegen-operator run",
        description="Run the ImageGenService operator. Each option's default comes from the "
        "IMAGEGEN_OPERATOR_* variable named in its help, checked as the option is.",
    )

    def option(flag: str, default: str | None, help: str, **kwargs: Any) -> None:
        # The variable is named for the flag. A string default: argparse checks it with
        # `type` as it does the command line, so a bad variable is refused by name.
        variable = "IMAGEGEN_OPERATOR_" + flag.removeprefix("--").replace("-", "_").upper()
        p.add_argument(flag, default=env(variable, default), help=f"{help} ({variable})",
                       **kwargs)

    option("--resync-seconds", "30", "reconcile every service at least this often",
           type=_positive_seconds)
    option("--metrics-port", "8080", "serve Prometheus /metrics here, 0: off", type=_port)
    option("--health-port", "8081", "serve /healthz here, 0: off", type=_port)
    option("--bind-address", "0.0.0.0",
           "address the metrics and health ports listen on, 127.0.0.1: this host only")
    p.add_argument(
        "--namespace",
        action="append",
        default=None,
        help="watch only this namespace (repeatable); default: all "
        "(IMAGEGEN_OPERATOR_NAMESPACES, comma-separated)",
    )
    option("--peering", None,
           "kopf peering name: only one operator of the peering acts at a time")
    option("--priority", "0", "kopf peering priority", type=int)
    option("--stuck-seconds", "300", "/healthz fails while a reconcile has run longer than this",
           type=_positive_seconds)
    option("--watch-timeout-seconds", "120",
           "the API server ends each watch after this; a silent one is dropped 30 s later",
           type=_positive_seconds)
    p.add_argument(
        "--server-image",
        default=env(SERVER_IMAGE_ENV) or DEFAULT_SERVER_IMAGE,
        help="the inference server image of services whose spec.server.image is unset "
        f"({SERVER_IMAGE_ENV})",
    )
    option("--sweep-seconds", "300",
           "look for node pools the operator made that no service uses this often, 0: never",
           type=_seconds_or_off)
    option("--unused-pool-grace-seconds", f"{ORPHAN_GRACE_S:g}",
           "delete such a pool once it has been unused this long", type=_positive_seconds)
    option("--log-format", "text", "one line of text or one JSON object per message",
           type=_log_format)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(list(argv))
    namespaces = tuple(
        args.namespace or [n for n in env("IMAGEGEN_OPERATOR_NAMESPACES", "").split(",") if n]
    )
    if patterns := [n for n in namespaces if not NAMESPACE_NAME.fullmatch(n)]:
        # kopf would take a glob; which services a pool's users are is read by name.
        p.error(f"namespaces are names, not patterns: {', '.join(patterns)}")
    # kopf's formatter: the object of each message as "[namespace/name]" before it in
    # text, as an "object" field in JSON.
    json_logs = args.log_format == "json"
    kopf.configure(
        verbose=args.verbose,
        log_format=kopf.LogFormat.JSON if json_logs else LOG_FORMAT,
        log_prefix=not json_logs,
    )
    if json_logs:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_cloud_logging_severity)
    return OperatorConfig(
        resync_seconds=args.resync_seconds,
        metrics_port=args.metrics_port,
        health_port=args.health_port,
        bind_address=args.bind_address,
        namespaces=namespaces,
        peering=args.peering,
        priority=args.priority,
        stuck_seconds=args.stuck_seconds,
        watch_timeout_seconds=args.watch_timeout_seconds,
        server_image=args.server_image,
        sweep_seconds=args.sweep_seconds,
        unused_pool_grace_seconds=args.unused_pool_grace_seconds,
    )


def _host(address: str) -> str:
    """An address as a URL's host: IPv6 in brackets."""
    return f"[{address}]" if ":" in address and not address.startswith("[") else address


def run(argv: Sequence[str]) -> int:
    config = parse_args(argv)
    try:
        default_cluster = ClusterDefault()
        node_service_account()  # checked at start, not at the first pool's create
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    kube = Kube()
    reconciler = Reconciler(kube, build_providers(kube), recorder=_record,
                            default_cluster=default_cluster, namespaces=config.namespaces,
                            server_image=config.server_image,
                            orphan_grace_s=config.unused_pool_grace_seconds)
    operator = Operator(reconciler)
    registry = kopf.OperatorRegistry()
    register(registry, operator, config)
    if config.metrics_port:
        metrics.serve(config.metrics_port, config.bind_address)
    Sweeper(reconciler, kube, config.sweep_seconds, peering=config.peering,
            priority=config.priority, namespaces=config.namespaces,
            finalized=operator.forget, stood_down=operator.stood_down).start()
    kopf.run(
        registry=registry,
        clusterwide=not config.namespaces,
        namespaces=config.namespaces,
        standalone=not config.peering,
        priority=config.priority,
        peering_name=config.peering,
        liveness_endpoint=(
            f"http://{_host(config.bind_address)}:{config.health_port}/healthz"
            if config.health_port
            else None
        ),
    )
    return 0
