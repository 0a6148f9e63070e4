"""One idempotent reconcile of an ImageGenService, as ordered small steps.

    parse -> plan -> cluster (its default; ForeignCluster) -> workload (Deployment, Service,
          PDB, HPA, monitors)
          -> node pool -> retire the pools left -> observe -> status

Level, not edge: each step compares what should be with what is, so running it
on create, update, resume, a timer or a child's event converges to the same
state, and a run that finds nothing to do writes nothing (status included).
A node pool is known by (provider, cluster, name, and the namespace for
ConfigConnector) and shared by every service whose spec derives the same key;
who uses a pool is read from the cluster each time, never kept in memory, so it
survives operator restarts. What is kept in memory is an optimisation only: one
bounded :class:`Memo` per service, and the backoff of pools whose provider
asked to wait.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any

from imagegen_operator import gke, metrics
from imagegen_operator import status as st
from imagegen_operator.api import (
    API_VERSION,
    CLOUD_PROVIDERS,
    KIND,
    ImageGenService,
    InvalidSpec,
    parse,
)
from imagegen_operator.cluster_default import HOW_TO_SET, foreign_cluster
from imagegen_operator.kube import Kube, MissingKind, PermanentKubeError, TransientKubeError
from imagegen_operator.planner import Plan, plan
from imagegen_operator.providers.base import (
    NodePoolProvider,
    PoolNotOwned,
    PoolState,
    ProviderError,
)
from imagegen_operator.render import DEFAULT_SERVER_IMAGE, job_state, render_workload
from imagegen_operator.render.common import MANAGED_BY, name_of, namespace_of, selector_string
from imagegen_operator.render.deployment import nodeselector, serving_replicas
from imagegen_operator.render.nodepool import NodeBounds
from imagegen_operator.render.server_env import settings_problem
from imagegen_operator.render.service import endpoint
from imagegen_operator.status import Observation, PoolKey, Precompile

log = logging.getLogger(__name__)

# Kinds the operator may have created for a service and must delete when the
# spec stops asking for them (autoscaling or monitoring switched off).
OPTIONAL_CHILDREN = (
    ("batch/v1", "Job"),  # a precompile Job a spec change superseded, or no longer asked for
    ("autoscaling/v2", "HorizontalPodAutoscaler"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
)
# The Prometheus operator's kinds spec.monitoring asks for (the Monitored condition).
MONITOR_KINDS = ("ServiceMonitor", "PodMonitor")
# What the operator puts on every service it serves, and takes off once its pool is seen to.
FINALIZER = "imagegen.dev/node-pool"
# How long a pool the operator made must have had no user before the sweep deletes it:
# longer than any service takes from its create to its status naming the pool.
ORPHAN_GRACE_S = 600.0
# What the kubelet marks the API server's copy of a static pod with.
MIRROR_POD = "kubernetes.io/config.mirror"
# Services remembered at most; a forgotten one costs a re-plan and one GET per child.
MEMO_LIMIT = 10_000
# An Event on what lasts (a pool delete refused for good, a handler failing at each retry)
# is given again this often while it lasts, not at each retry: Events live an hour.
EVENT_REPEAT_S = 1800.0

Recorder = Callable[[dict[str, Any], str, str, str], None]  # body, type, reason, message


def named_for(namespace: str, services: list[str], prefix: str = "") -> str:
    """``namespace/name`` services as a status in ``namespace`` may name them: its own by
    name, the others counted (a namespace's viewers learn nothing of another team's)."""
    own = sorted(s for s in services if s.startswith(f"{namespace}/"))
    others = len(services) - len(own)
    named = [prefix + s for s in own]
    if others:
        named.append(f"{others} service(s) of other namespaces" if len(services) > 1 or own
                     else "a service of another namespace")
    return ", ".join(named)


@dataclass
class Outcome:
    """What one reconcile did: for the handlers' logs, metrics and retries."""

    ready: bool = False
    status_written: bool = False
    result: str = "ok"  # ok | waiting | invalid | error
    stalled: bool = False  # blocked until a person acts (kstatus' Stalled)
    requeue_after: float | None = None  # run again no sooner than this (a provider's backoff)
    pool_short: str | None = None  # why a shared pool cannot hold what its users must run
    pool_on_its_way: bool = False  # its pool is being made or changed (and will be)
    # The monitors spec.monitoring asks for: None when none is, else what kept them from
    # being applied (empty: applied).
    monitoring: list[str] | None = None


@dataclass
class Memo:
    """What the operator remembers of one service between reconciles."""

    generation: int | None = None
    plan: Plan | None = None  # of that generation; None when its spec is invalid
    applied: int | None = None  # generation last applied (apply without reading first)
    cleaned: int | None = None  # generation whose leftover optional children were removed
    owned: set[str] = field(default_factory=set)  # kinds of children it has applied
    warned: set[tuple[str, str]] = field(default_factory=set)  # plan warnings recorded
    # When each Event on what lasts was last given (record_once): (reason, subject) -> time.
    said: dict[tuple[str, str], float] = field(default_factory=dict)


@dataclass
class _Backoff:
    until: float  # monotonic
    state: PoolState  # what to report until then
    deleting: bool = False  # a delete was refused, not a create or resize


def indexed(body: Mapping[str, Any]) -> dict[str, Any]:
    """What the reconciler reads of every other service (``Reconciler.services``): the
    operator keeps this much of each in an index fed by its watch."""
    meta = body["metadata"]
    return {
        "metadata": {k: meta.get(k) for k in ("name", "namespace", "uid", "generation",
                                             "creationTimestamp", "deletionTimestamp")},
        "spec": dict(body.get("spec", {})),
        "status": {"nodePool": dict((body.get("status") or {}).get("nodePool") or {})},
    }


class NotOurs(PermanentKubeError):
    """A child's name is taken by an object no ImageGenService of that name made."""


# How a spec lets go of a child whose name another object holds.
UNCLAIM = {
    "Deployment": "give the ImageGenService another name",
    "Service": "give the ImageGenService another name",
    "PodDisruptionBudget": "give the ImageGenService another name",
    "NetworkPolicy": "remove spec.server.allowFrom",
    "HorizontalPodAutoscaler": "remove spec.autoscaling",
    "ServiceMonitor": "switch spec.monitoring off",
    "PodMonitor": "switch spec.monitoring off",
}


def _owned_by(obj: dict[str, Any], uid: str | None) -> bool:
    return any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or [])


def _asking(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A provider call. The API server refusing the objects a ConfigConnector or Local pool is
    made of (invalid, or forbidden where the chart left that provider off) is the pool's
    failure, reported in its condition, not one that stops the reconcile or a delete."""
    try:
        return call(*args, **kwargs)
    except PermanentKubeError as exc:
        raise ProviderError(
            "RequestRejected", f"the API server refused the node pool's objects: {exc}"
        ) from exc


class Reconciler:
    def __init__(
        self,
        kube: Kube,
        providers: Mapping[str, NodePoolProvider],
        recorder: Recorder | None = None,
        services: Callable[[], Iterable[dict[str, Any]]] | None = None,
        default_cluster: Callable[[], str | None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
        server_image: str = DEFAULT_SERVER_IMAGE,
        namespaces: tuple[str, ...] = (),
        orphan_grace_s: float = ORPHAN_GRACE_S,
    ):
        self.kube = kube
        self.namespaces = namespaces  # those this operator serves; empty: every one
        self.orphan_grace_s = orphan_grace_s
        # Pools made and used by no service, since when the sweep has found them so, and
        # those whose delete it has started.
        self._orphans: dict[PoolKey, float] = {}
        self._sweeping: set[PoolKey] = set()
        self.server_image = server_image  # of services whose spec names none
        self.services = services
        self.providers = providers
        self.record = recorder or (lambda body, type_, reason, message: None)
        self.default_cluster = default_cluster
        self._clock = clock
        self._lock = threading.Lock()
        self._memos: OrderedDict[str, Memo] = OrderedDict()
        self._backoff: dict[PoolKey, _Backoff] = {}
        # The last state each pool's provider reported, for when a read of it fails.
        self._last_seen: dict[PoolKey, PoolState] = {}
        self._pool_locks: dict[PoolKey | tuple[str, str], threading.Lock] = {}

    # --- the entry points ---------------------------------------------------

    def reconcile(self, body: dict[str, Any]) -> Outcome:
        outcome = Outcome()
        if body["metadata"].get("deletionTimestamp"):
            # Being deleted: the finalizer's. A reconcile now could make again the pool
            # finalize has just deleted, and nothing would delete it after.
            return outcome
        generation = body["metadata"].get("generation")
        previous = body.get("status") or {}
        try:
            resource = parse(body)
        except InvalidSpec as exc:
            return self._not_planned(body, outcome, "InvalidSpec", str(exc))
        the_plan = self._plan_of(body, resource)
        assert the_plan is not None
        if the_plan.blocking:
            finding = the_plan.blocking[0]
            message = "; ".join(f.message for f in the_plan.blocking)
            return self._not_planned(body, outcome, finding.reason, message, the_plan)
        if (problem := settings_problem(resource)) is not None:
            return self._not_planned(body, outcome, "InvalidSpec", problem, the_plan)
        resolved = self._with_cluster(resource)
        if resolved is None:
            return self._not_planned(body, outcome, "ClusterUnknown", HOW_TO_SET, the_plan,
                                     pool_message=HOW_TO_SET)
        if (refused := self._foreign(resolved) or _zones_refused(resolved)) is not None:
            reason, message = refused
            return self._not_planned(body, outcome, reason, message, the_plan,
                                     pool_message=message)
        resource = resolved

        # The workload first: its pods wait (Pending) for the pool's nodes anyway,
        # and on GKE their pending is what the cluster autoscaler scales up for.
        target = self.pool_key(resource, the_plan)
        recorded = self.recorded_pools(body)
        # Under the pool's lock (one for a GKE pool whichever provider names it), from the
        # look at who has the pool to this service's name on it: two services asking for one
        # pool through both providers at once see each other.
        with self._pool_lock(target):
            if (claim := self._namesake_claim(body, target)) is not None:
                message = (
                    f"node pool {target.name} of cluster {target.scope} is already managed "
                    f"through provider {claim[1]} by "
                    f"{named_for(namespace_of(resource), [claim[0]], 'service ')}; through provider "
                    f"{target.provider} too, the two would change and delete it under each "
                    f"other. Set spec.nodePool.name to another name, or use provider {claim[1]}."
                )
                return self._not_planned(body, outcome, "PoolClaimed", message, the_plan,
                                         pool_message=message)
            named_now = target not in recorded
            if named_now:
                self._name_pool_first(body, target)
        deployment, rejected, precompile = self._apply_workload(
            resource, the_plan, outcome,
            spec_changed=previous.get("observedGeneration") != generation, previous=previous,
            moving=bool(recorded) and recorded[0] != target,
        )
        if named_now:
            # Asked for the first time now: from here it may exist, whatever happens to
            # this reconcile before its status write.
            self._name_pool_first(body, target, asking=True)
        pool, pool_stalled, answered = self._ensure_pool(resource, the_plan, target, outcome)
        outcome.pool_on_its_way = not pool.ready and not pool_stalled
        created = self.created_records(body)
        # Known made once the provider answers; never made while every ask was refused for
        # good, starting with the first (unknown while it is asked: an operator stopped
        # between a create GKE took and this write leaves a pool that may exist, and its
        # delete must wait for it). After an error that passes (a create GKE may have taken
        # before its answer was lost) it is unknown for good, and a delete waits for it.
        before = created.get(target)
        if answered:
            created[target] = True
        elif answered is None:
            created[target] = True if before else None
        else:
            created[target] = False if named_now else before
        want = serving_replicas(resource.spec)  # what the Deployment is given
        rolled_out = st.rolled_out(deployment, want)
        # The pools left behind go once the pods run on the new one: a Deployment whose
        # change the API server refused still selects the old pool, and runs there. Their
        # locks are held until the status write below has dropped them (see there).
        with contextlib.ExitStack() as held:
            current, releasing = self._retire_previous_pools(
                body, resource, the_plan, target,
                pool.ready and rolled_out and _selects_pool(deployment, resource, the_plan),
                held)
            observation = Observation(
                generation=generation,
                previous=previous,
                plan=the_plan,
                want=want,
                pool=pool,
                target=target,
                current=current,
                releasing=tuple(releasing),
                deployment=deployment,
                selector=selector_string(resource),
                endpoint=endpoint(resource),
                rolled_out=rolled_out,
                pool_stalled=pool_stalled,
                rejected=tuple(rejected),
                unschedulable=None if rolled_out else self._unschedulable(resource),
                pool_short=outcome.pool_short,
                precompile=precompile,
                created=created,
                monitoring=None if outcome.monitoring is None else tuple(outcome.monitoring),
            )
            status = st.compute_status(observation)
            ready = next(c for c in status["conditions"] if c["type"] == "Ready")
            outcome.ready = ready["status"] == "True"
            outcome.stalled = any(
                c["type"] == "Stalled" and c["status"] == "True" for c in status["conditions"]
            )
            if not outcome.ready:
                outcome.result = "waiting"
            self._warn(body, the_plan)
            self._write_status(body, status, outcome)
        return outcome

    def _warn(self, body: dict[str, Any], the_plan: Plan) -> None:
        """A Warning Event for each of the plan's warnings (a model that barely fits its
        slot, a port any pod may call, ...) when it is new: they do not stop the service,
        so no condition carries them, and ``kubectl describe`` is where a person looks.
        New to this process: one that started since says them again, once."""
        memo = self._memo(body["metadata"].get("uid", ""))
        found = {(f.reason, f"{', '.join(f.fields)}: {f.message}") for f in the_plan.warnings}
        for reason, message in sorted(found - memo.warned):
            self.record(body, "Warning", reason, message)
        memo.warned = found

    def finalize(self, body: dict[str, Any], namespace_ending: bool = False) -> bool:
        """On deletion: release every pool this service used if nobody else uses it.

        Returns True when done (the finalizer may go). Children go with their
        owner through Kubernetes' garbage collector. With ``namespace_ending``, a Config
        Connector object in the service's namespace is left to the namespace controller,
        which deletes it with the namespace (and Config Connector the pool).
        """
        invalid = False
        try:
            resource = parse(body)
        except InvalidSpec:
            # Invalid now (under an older schema), maybe not when it ran: a stand-in
            # carries what deleting the recorded pools needs; their keys carry the rest.
            resource, invalid = _stand_in(body), True
        the_plan = plan(resource.spec)
        resolved = self._with_cluster(resource)
        if (invalid or the_plan.blocking or resolved is None
                or self._foreign(resolved) is not None or _zones_refused(resolved)):
            # Not planned now, or no cluster to make a pool in (or one refused: a pool
            # there of that name is another cluster's operator's): only the pools recorded
            # in status can exist.
            keys = set(self.recorded_pools(body))
        else:
            keys = self._pools_of(body, resolved, the_plan)
        never_made = self.never_made(body)
        done = True
        for key in keys:
            if (namespace_ending and key.provider == "ConfigConnector"
                    and key.namespace == body["metadata"].get("namespace")):
                continue
            # Held from the look at its users to the delete: a service starting on the
            # pool meanwhile asks for it after, not between.
            with self._pool_lock(key):
                gone = self._release(body, resource, the_plan, key, never_made)
            done = done and gone is not False
        if done:
            with self._lock:
                self._memos.pop(body["metadata"].get("uid"), None)
        return done

    def _release(self, body: dict[str, Any], resource: ImageGenService, the_plan: Plan,
                 key: PoolKey, never_made: set[PoolKey],
                 moved_to: PoolKey | None = None) -> bool | None:
        """A pool the service no longer runs on (deleted, or ``moved_to`` another): kept
        while others use it, let go of while it is the same GKE pool through the other
        cloud provider (``moved_to``'s, or others'), else deleted; ``_delete_pool``'s
        answer (True once nothing is left to do). Called under the pool's lock."""
        if self._waiting_on(key, deleting=True):
            return False  # its delete was refused a moment ago: no LIST of users till then
        uid = body["metadata"].get("uid")
        if users := self.pool_users(key, exclude_uid=uid):
            log.info("pool %s still used by %s; keeping it", key, ", ".join(users))
            return True
        if (moved_to is not None and key.provider in CLOUD_PROVIDERS
                and _rides(resource) == key.name):
            # Moved to Existing, naming the pool it ran on: the same nodes, now kept by
            # hand. Its pods run there still; the sweep deletes it once none rides it.
            log.info("pool %s is the one the service now names as Existing; keeping it", key)
            return True
        namesake = moved_to is not None and key.namesake_of(moved_to)
        if namesake or self.pool_users(key, exclude_uid=uid, namesakes=True):
            gone = self._delete_pool(resource, the_plan, key, body=body, keep_pool=True)
            if gone and namesake:
                self.record(body, "Normal", "NodePoolHandedOver",
                            f"node pool {key.name} is managed through provider "
                            f"{moved_to.provider} now; {key} let go of it")
            return gone
        gone = self._delete_pool(resource, the_plan, key, body=body, made=key not in never_made)
        if gone and moved_to is not None:
            self.record(body, "Normal", "NodePoolRetired", f"moved to node pool {moved_to}; "
                        f"deleted {key}")
        elif gone:
            self.record(body, "Normal", "NodePoolDeleted",
                        f"node pool {key} deleted: no service uses it any more")
        return gone

    def ended_namespaces(self) -> list[str]:
        """The namespaces served that are being deleted (none for an operator of all)."""
        if not self.namespaces:
            return []
        return [n["metadata"]["name"] for n in self.kube.list("v1", "Namespace")
                if n["metadata"]["name"] in self.namespaces
                and n["metadata"].get("deletionTimestamp")]

    def finish_deletes_in_ended_namespaces(self) -> list[dict[str, Any]]:
        """Finalize the services of a served namespace that is being deleted itself, and take
        their finalizer off; returns those done. Their deletes may reach no handler: the
        namespace's Role, which kopf's watch there needs, goes at once, and kopf counts the
        namespace as deleted from the first status the namespace controller writes. Should
        kopf's handler finish one first, this finds nothing left to do. An operator of every
        namespace follows them all."""
        done: list[dict[str, Any]] = []
        try:
            ending = self.ended_namespaces()
            services = [b for ns in ending for b in self.kube.list(API_VERSION, KIND, ns)]
        except (PermanentKubeError, TransientKubeError) as exc:
            log.warning("looking for services of namespaces being deleted: %s", exc)
            return done
        for body in services:
            meta = body["metadata"]
            namespace = meta.get("namespace")
            if not (meta.get("deletionTimestamp")
                    and FINALIZER in (meta.get("finalizers") or ())):
                continue
            try:
                if not self.finalize(body, namespace_ending=True):
                    continue  # its pool is on its way out: the next round looks again
                self.kube.remove_finalizer(body, FINALIZER)
            except (PermanentKubeError, TransientKubeError) as exc:
                log.warning("finishing the delete of %s/%s: %s", namespace, meta["name"], exc)
                continue
            log.info("%s/%s finalized: its namespace is being deleted", namespace, meta["name"])
            done.append(body)
        return done

    def sweep(self, acting: Callable[[], bool] = lambda: True) -> list[PoolKey]:
        """Delete the pools the operator made that no service it or another operator serves
        uses under any of the pool's keys (``_unwanted``): what a service leaves when its
        finalizer was taken off by hand, or its status lost. A pool goes once it has been
        found so for ``orphan_grace_s``, only after its users are read again under its lock,
        and only while this operator is still the one ``acting``. Returns those whose
        delete it started or finished."""
        cluster = self.default_cluster()
        made: set[PoolKey] = set()
        for name, provider in self.providers.items():
            try:
                found = provider.pools_made(cluster)
            except (ProviderError, PermanentKubeError, TransientKubeError) as exc:
                log.warning("looking for %s pools no service uses: %s", name,
                            getattr(exc, "message", exc))
                continue
            made |= {PoolKey(name, p.scope, p.name, p.namespace) for p in found}
        now = self._clock()
        orphans = _unwanted(made, self._wanted())
        with self._lock:
            self._orphans = {key: self._orphans.get(key, now) for key in orphans}
            due = [k for k, since in self._orphans.items() if now - since >= self.orphan_grace_s]
        # A GKE pool a Config Connector object stands for goes with that object, not
        # through GKE's API under it (Config Connector would make it again).
        objects = {(k.scope, k.name) for k in made if k.provider == "ConfigConnector"}
        started = []
        for key in due:
            if key.provider == "GKE" and (key.scope, key.name) in objects:
                continue
            if self.namespaces and key.namespace and key.namespace not in self.namespaces:
                continue  # a Config Connector object where this operator writes nothing
            if not acting():
                break  # another operator acts now, with its own view of the pools
            with self._pool_lock(key):
                if not _unwanted({key}, self._wanted()):
                    continue  # a service asked for it meanwhile
                if pods := self._pods_on(key):
                    # Records say unused, pods say otherwise (a status lost while they
                    # served): the pods win.
                    log.warning("node pool %s: used by no service, but pods run on it (%s); "
                                "kept", key, ", ".join(pods[:5]))
                    continue
                stand_in = _stand_in({"metadata": {"name": "unused-pool",
                                                   "namespace": key.namespace or "default"}})
                gone = self._delete_pool(stand_in, plan(stand_in.spec), key)
            if gone is None:
                continue
            started.append(key)
            with self._lock:
                unused_for = now - self._orphans[key]
                first = key not in self._sweeping
                self._sweeping.add(key)
                if gone:
                    self._orphans.pop(key, None)
                    self._sweeping.discard(key)
            if first:
                log.warning("node pool %s: made by the operator, used by no service for %.0fs "
                            "(a finalizer taken off by hand?); deleting it", key, unused_for)
            if gone:
                log.info("node pool %s deleted: no service used it", key)
                metrics.ORPHANS_DELETED.inc()
        return started

    def _pods_on(self, key: PoolKey) -> list[str]:
        """namespace/name of the pods that run on the pool's nodes (of the namespaces it
        serves, for an operator of some), but for those every node runs: DaemonSets' and
        static ones (GKE's kube-proxy, where Dataplane V2 is off), which their Node owns."""
        nodes = {n["metadata"]["name"] for n in self.kube.list(
            "v1", "Node", label_selector=f"{gke.LABEL_NODEPOOL}={key.name}")}
        if not nodes:
            return []
        pods = [p for ns in self.namespaces or (None,) for p in self.kube.list("v1", "Pod", ns)]
        return [f"{p['metadata'].get('namespace')}/{p['metadata']['name']}" for p in pods
                if (p.get("spec") or {}).get("nodeName") in nodes
                and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
                and not any(o.get("kind") in ("DaemonSet", "Node")
                            for o in p["metadata"].get("ownerReferences") or [])
                and MIRROR_POD not in (p["metadata"].get("annotations") or {})]

    def _wanted(self) -> set[PoolKey]:
        """Every pool a service that an operator serves runs on, moves to, lets go of or
        asks for, read from the API server itself."""
        wanted: set[PoolKey] = set()
        for body in self._all_services(fresh=True):
            if self._served(body):
                resource, the_plan = self._parsed_plan(body)
                # An Existing service's key stands for a pool only where it names one.
                wanted |= {k for k in self._pools_of(body, resource, the_plan)
                           if k.provider != "Existing"}
                if resource is not None and (name := _rides(resource)):
                    wanted.add(PoolKey("Existing", "", name))
        return wanted

    # --- identity: which pool, and who uses it --------------------------------

    def _with_cluster(self, resource: ImageGenService) -> ImageGenService | None:
        """The resource with spec.nodePool.cluster set where its provider needs one.

        None when it needs one, names none and the operator knows no default.
        """
        pool = resource.spec.node_pool
        if pool.provider not in CLOUD_PROVIDERS or pool.cluster:
            return resource
        cluster = self.default_cluster()
        if cluster is None:
            return None
        spec = resource.spec.model_copy(
            update={"node_pool": pool.model_copy(update={"cluster": cluster})})
        return resource.model_copy(update={"spec": spec})

    def _foreign(self, resource: ImageGenService) -> tuple[str, str] | None:
        """Why the cluster the spec names is refused (reason, message), or None: not the
        operator's own, or not known yet to be (on GKE, while its metadata server fails)."""
        named = resource.spec.node_pool.cluster
        if resource.spec.node_pool.provider not in CLOUD_PROVIDERS or not named:
            return None
        own = self.default_cluster()
        if own is None and getattr(self.default_cluster, "pending", False):
            return "ClusterUnknown", (
                f"spec.nodePool.cluster names {named}, and the operator cannot tell yet "
                "whether that is the cluster it runs in (GKE's metadata server does not answer, "
                "or answers with errors); it waits until it can, or install it with "
                "--set gke.cluster=...")
        if own is None or named == own:
            return None
        return "ForeignCluster", foreign_cluster(named, own)

    def recorded_pools(self, body: dict[str, Any]) -> list[PoolKey]:
        """Every pool status records: the one it runs on, the one it is moving to, and
        those it has left that are not gone yet; in that order, each once."""
        return list(self.created_records(body))

    def created_records(self, body: dict[str, Any]) -> dict[PoolKey, bool | None]:
        """What status records of each pool it names: ``created`` true (its provider once
        reported it made or being made), false (every ask was refused for good), or None
        (not known: an error that passes, or a status written before the field)."""
        pool = (body.get("status") or {}).get("nodePool") or {}
        refs = [pool, pool.get("movingTo") or {}, *(pool.get("releasing") or [])]
        records: dict[PoolKey, bool | None] = {}
        for ref in refs:
            key = self._recorded_key(body, ref)
            if key is not None and key not in records:
                records[key] = ref.get("created")
        return records

    def never_made(self, body: dict[str, Any]) -> set[PoolKey]:
        """The recorded pools that cannot exist: refused at every ask (``created: false``)."""
        return {k for k, created in self.created_records(body).items() if created is False}

    def _recorded_key(self, body: dict[str, Any], recorded: dict[str, Any]) -> PoolKey | None:
        if not recorded.get("name"):
            return None
        spec_pool = (body.get("spec") or {}).get("nodePool") or {}
        provider = recorded.get("provider") or spec_pool.get("provider") or "GKE"
        scope = ""
        if provider in CLOUD_PROVIDERS:
            # Older statuses name no cluster: the spec's, or the default, was it.
            scope = (recorded.get("cluster") or spec_pool.get("cluster")
                     or self.default_cluster() or "")
        return PoolKey(provider, scope, recorded["name"],
                       _pool_namespace(provider, body["metadata"].get("namespace")))

    @staticmethod
    def pool_key(resource: ImageGenService, the_plan: Plan) -> PoolKey:
        pool = resource.spec.node_pool
        scope = (pool.cluster or "") if pool.provider in CLOUD_PROVIDERS else ""
        return PoolKey(pool.provider, scope, the_plan.nodepool_name,
                       _pool_namespace(pool.provider, namespace_of(resource)))

    def _pools_of(self, body: dict[str, Any], resource: ImageGenService | None,
                  the_plan: Plan | None) -> set[PoolKey]:
        """The pool a service's spec asks for and those its status records. A spec
        refused for its cluster asks for none: a pool of that name there is not ours."""
        keys = set(self.recorded_pools(body))
        if (resource is not None and the_plan is not None and the_plan.workable
                and self._foreign(resource) is None):
            keys.add(self.pool_key(resource, the_plan))
        return keys

    def pool_users(self, key: PoolKey, exclude_uid: str | None = None,
                   namesakes: bool = False) -> list[str]:
        """namespace/name of every live service that runs on or is moving to pool ``key``;
        with ``namesakes``, also those that have the same GKE pool through the other cloud
        provider: recorded in their status, not refused at every ask. One that only asks
        for it is not using it (refused as PoolClaimed, it never will: its delete would
        not delete the pool, which kept for it would be left behind)."""
        users = []
        for body in self._all_services(fresh=True):
            meta = body["metadata"]
            if (meta.get("uid") == exclude_uid or meta.get("deletionTimestamp")
                    or not self._served(body)):
                continue
            resource, the_plan = self._parsed_plan(body)
            pools = self._pools_of(body, resource, the_plan)
            records = self.created_records(body)
            has_namesake = namesakes and any(
                k.namesake_of(key) and created is not False for k, created in records.items())
            rides = (key.provider in CLOUD_PROVIDERS and resource is not None
                     and _rides(resource) == key.name)
            if key in pools or has_namesake or rides:
                users.append(f"{meta.get('namespace')}/{meta['name']}")
        return users

    def _served(self, body: dict[str, Any]) -> bool:
        """Whether an operator serves the service: this one (one of its namespaces, or it
        serves every one), or another, whose finalizer the service carries. One that none
        serves is given no pool, and keeps none from its last user's delete."""
        meta = body["metadata"]
        return (not self.namespaces or meta.get("namespace") in self.namespaces
                or FINALIZER in (meta.get("finalizers") or ()))

    def _namesake_claim(self, body: dict[str, Any], target: PoolKey) -> tuple[str, str] | None:
        """(namespace/name, provider) of another service that has the GKE pool ``target``
        names, through the other cloud provider.

        GKE's API and a Config Connector object would both manage that one pool: each would
        set its bounds, and deleting either service would delete it under the other. A
        service that does not have its pool yet is refused while another runs on it or moves
        to it (made or still asked for) through the other provider, before anything is
        asked. Of two that have it already (made by an earlier version), the one made first
        keeps it.
        """
        if target.provider not in CLOUD_PROVIDERS:
            return None
        meta = body["metadata"]
        mine = self.created_records(body)
        has_it = target in mine and mine[target] is not False

        def first(m: dict[str, Any]) -> tuple[str, str, str]:
            return (m.get("creationTimestamp") or "", m.get("namespace") or "", m["name"])

        # A first ask reads the API server itself: a namesake named a moment ago counts.
        for other in self._all_services(fresh=not has_it):
            theirs = other["metadata"]
            if theirs.get("uid") == meta.get("uid") or theirs.get("deletionTimestamp"):
                continue
            records = self.created_records(other)
            for key in self._wanted_pools(other):
                if not key.namesake_of(target):
                    continue
                if not has_it or (records[key] is not False and first(theirs) < first(meta)):
                    return f"{theirs.get('namespace')}/{theirs['name']}", key.provider
        return None

    def _wanted_pools(self, body: dict[str, Any]) -> list[PoolKey]:
        """The pool a service's status says it runs on, and the one it moves to."""
        pool = (body.get("status") or {}).get("nodePool") or {}
        keys = (self._recorded_key(body, ref) for ref in (pool, pool.get("movingTo") or {}))
        return [key for key in keys if key is not None]

    def _all_services(self, fresh: bool = False) -> Iterable[dict[str, Any]]:
        """Every ImageGenService: from the watch-fed cache when there is one.

        Sizing a shared pool reads every service on every reconcile, which as a
        LIST would cost O(services) per reconcile. Deciding to delete a pool reads
        the API server itself (``fresh``): a cache a few milliseconds behind must
        not delete a pool a new service has just started to use.
        """
        if self.services is not None and not fresh:
            return list(self.services())
        return self.kube.list(API_VERSION, KIND)

    def _parsed_plan(self, body: dict[str, Any]) -> tuple[ImageGenService | None, Plan | None]:
        """Another service's resource (its cluster resolved) and plan; Nones when invalid,
        no plan when its zones are refused (it asks for no pool, as one refused for its
        cluster: it neither sizes nor keeps one)."""
        try:
            resource = parse(body)
        except InvalidSpec:
            return None, None
        resolved = self._with_cluster(resource)
        if resolved is not None and _zones_refused(resolved):
            return resolved, None
        return resolved, self._plan_of(body, resource)

    def _memo(self, uid: str) -> Memo:
        with self._lock:
            memo = self._memos.pop(uid, None) or Memo()
            self._memos[uid] = memo  # most recently used last
            while len(self._memos) > MEMO_LIMIT:
                self._memos.popitem(last=False)
            return memo

    def _plan_of(self, body: dict[str, Any], resource: ImageGenService) -> Plan | None:
        """The plan of a service's spec, memoized per generation (sharing a pool means
        planning every service on each reconcile, and a spec changes with its generation)."""
        meta = body["metadata"]
        memo = self._memo(meta.get("uid", ""))
        if memo.plan is None or memo.generation != meta.get("generation"):
            memo.generation, memo.plan = meta.get("generation"), plan(resource.spec)
        return memo.plan

    def _pool_size(
        self, resource: ImageGenService, key: PoolKey, the_plan: Plan
    ) -> tuple[int, NodeBounds, str | None]:
        """Nodes every service sharing this pool needs together, the bounds they have
        within (the largest min and max nodes any of them allows), and why the pool is
        too small for what they must run together (None when it is not). Whichever of
        them reconciles, the pool gets one size and one pair of autoscaling bounds."""
        pool = resource.spec.node_pool
        min_nodes, max_nodes = pool.min_nodes, pool.max_nodes
        # In nodes, as each service's own pods fill one: their CPU, memory and disk
        # requests, which the pool's key does not hold, may differ.
        nodes, floor_nodes = Fraction(0), Fraction(0)
        floor, users = 0, []
        for other, other_plan in self._services_on(key):
            if other_plan.pods_per_node:
                nodes += Fraction(other_plan.target_replicas, other_plan.pods_per_node)
                floor_nodes += Fraction(other_plan.floor_replicas, other_plan.pods_per_node)
            floor += other_plan.floor_replicas
            users.append(f"{namespace_of(other)}/{name_of(other)}")
            min_nodes = max(min_nodes, other.spec.node_pool.min_nodes)
            max_nodes = max(max_nodes, other.spec.node_pool.max_nodes)
        needed, floor_needed = math.ceil(nodes), math.ceil(floor_nodes)
        short = None
        # An Existing pool's size is its own: no maxNodes of a spec bounds it.
        if len(users) > 1 and key.provider != "Existing" and floor_needed > max_nodes:
            short = (
                f"the {len(users)} services on node pool {key.name} "
                f"({named_for(namespace_of(resource), users)}) "
                f"must run {floor} replicas together, on {floor_needed} nodes, but its largest "
                f"spec.nodePool.maxNodes is {max_nodes}; raise spec.nodePool.maxNodes to "
                f"{floor_needed} on any of them, or lower their spec.replicas "
                "(spec.autoscaling.minReplicas where they autoscale)"
            )
        return max(min_nodes, min(needed, max_nodes)), (min_nodes, max_nodes), short

    def _services_on(self, key: PoolKey) -> Iterator[tuple[ImageGenService, Plan]]:
        """Every live service whose workable plan runs on the pool ``key``."""
        for body in self._all_services():
            if body["metadata"].get("deletionTimestamp"):
                continue
            other, other_plan = self._parsed_plan(body)
            if other is None or other_plan is None or not other_plan.workable:
                continue
            if self.pool_key(other, other_plan) == key:
                yield other, other_plan

    def _rollout_room(self, resource: ImageGenService, the_plan: Plan) -> tuple[Fraction,
                                                                                 int | None]:
        """For whether a rollout may surge into the pool (deployment.rolling_update): the
        pods the other services on it run (spec.replicas, which their autoscalers write, at
        least their minimum), in pods of this service, as each fills a node its own way; and
        the pods of this service the pool holds, at the largest maxNodes of its services (a
        Local pool: at the nodes it makes). None where that is not known (Existing)."""
        key = self.pool_key(resource, the_plan)
        mine = the_plan.pods_per_node
        neighbours, max_nodes = Fraction(0), resource.spec.node_pool.max_nodes
        for other, other_plan in self._services_on(key):
            max_nodes = max(max_nodes, other.spec.node_pool.max_nodes)
            if other.metadata.uid != resource.metadata.uid and other_plan.pods_per_node:
                neighbours += Fraction(serving_replicas(other.spec) * mine,
                                       other_plan.pods_per_node)
        if key.provider == "Existing":
            return neighbours, None
        nodes = (self._pool_size(resource, key, the_plan)[0] if key.provider == "Local"
                 else max_nodes)
        return neighbours, nodes * mine

    # --- the steps ------------------------------------------------------------

    def _apply_workload(
        self, resource: ImageGenService, the_plan: Plan, outcome: Outcome, spec_changed: bool,
        previous: dict[str, Any], moving: bool,
    ) -> tuple[dict[str, Any] | None, list[str], Precompile | None]:
        """Apply the children; return the Deployment as it now is, what was refused, and the
        precompile Job's state (None: none asked for).

        A spec not yet acted on (a new service, an edit) nearly always means
        writes: apply straight away (server-side apply creates or updates alike)
        instead of reading each child first. Otherwise read, and write only what
        drifted, so a steady-state reconcile writes nothing. A child the API
        server refuses (403, 422) is reported in status, not raised: the rest
        still converges, and fixing the spec recovers on the next reconcile.
        The precompile Job goes first: while it runs, the Deployment is held at 0.
        """
        memo = self._memo(resource.metadata.uid or "")
        generation = resource.metadata.generation
        blind = spec_changed and memo.applied != generation
        rejected: list[str] = []
        neighbours, holds = self._rollout_room(resource, the_plan)
        desired = render_workload(resource, the_plan, self.server_image, moving=moving,
                                  neighbours=neighbours, holds=holds)
        job = next((o for o in desired if o["kind"] == "Job"), None)
        precompile = self._precompile(resource, job, previous, rejected)
        if precompile is not None and precompile.held:
            # Only while a new service's Job runs: the Deployment again, at 0 replicas.
            desired = render_workload(resource, the_plan, self.server_image, held=True,
                                      moving=moving, neighbours=neighbours, holds=holds)
        wanted = {(o["apiVersion"], o["kind"], o["metadata"]["name"]) for o in desired}
        deployment, unfenced = None, False
        for obj in desired:
            if obj["kind"] == "Job":
                continue  # applied above
            if obj["kind"] in MONITOR_KINDS and outcome.monitoring is None:
                outcome.monitoring = []
            if obj["kind"] == "Deployment" and unfenced:
                # Its NetworkPolicy was refused: no new pods serve unfenced; what an
                # earlier spec runs goes on, and status says why.
                live = self.kube.get(obj["apiVersion"], obj["kind"],
                                     obj["metadata"]["name"], namespace_of(resource))
                deployment = live if live and _owned_by(live, resource.metadata.uid) else None
                continue
            try:
                if blind and obj["kind"] in memo.owned:
                    # Applied by this process before: ours. A spec change writes anyway.
                    current = self.kube.apply(obj, read_first=False, digest=True)
                else:
                    live = self._own_child(obj, resource)
                    current = self.kube.apply(obj, live=live, read_first=False, digest=True)
                memo.owned.add(obj["kind"])
            except MissingKind as exc:
                if obj["kind"] == "NetworkPolicy":  # a cluster without them: no fence
                    rejected.append(str(exc))
                    unfenced = True
                    continue
                # A monitor asked for on a cluster without the Prometheus operator.
                outcome.monitoring = [*(outcome.monitoring or []), f"{exc}: install the "
                                      "Prometheus operator's CRDs, or switch spec.monitoring off"]
                log.warning("%s: %s", name_of(resource), exc)
                continue
            except PermanentKubeError as exc:
                log.warning("%s: %s", name_of(resource), exc)
                unfenced = unfenced or obj["kind"] == "NetworkPolicy"
                if obj["kind"] in MONITOR_KINDS:
                    # Said by Monitored alone: serving does not wait on monitoring.
                    outcome.monitoring = [*(outcome.monitoring or []), str(exc)]
                    continue
                rejected.append(str(exc))
                if obj["kind"] == "Deployment" and not isinstance(exc, NotOurs):
                    current = self.kube.get(obj["apiVersion"], obj["kind"],  # what still runs
                                            obj["metadata"]["name"], namespace_of(resource))
                else:
                    continue
            if obj["kind"] == "Deployment":
                deployment = current
        # Optional children only go away when the spec changes (its generation):
        # look for leftovers once per generation, not on every reconcile. Also where a
        # child was refused: an autoscaler the spec dropped would go on setting replicas,
        # a superseded Job hold its GPU, until the refusal is fixed.
        if memo.cleaned != generation:
            self._delete_unwanted(resource, wanted)
            memo.cleaned = generation
        if rejected:
            return deployment, rejected, precompile
        # Once per generation: should the status write that records it fail, the
        # next reconcile reads before it writes.
        memo.applied = generation
        return deployment, rejected, precompile

    def _own_child(self, obj: dict[str, Any], resource: ImageGenService
                   ) -> dict[str, Any] | None:
        """The live child of that kind and name, None when there is none; refused when no
        ImageGenService of this name made it (another app's Service, a policy a person
        wrote): it is neither rewritten nor, later, deleted with the service, and a
        namespace's editors cannot take over through a service's name what they may not
        edit. One of an earlier service of the name, which the garbage collector has yet
        to remove, is taken over."""
        meta = obj["metadata"]
        live = self.kube.get(obj["apiVersion"], obj["kind"], meta["name"], meta["namespace"])
        if live is not None and not any(
                ref.get("kind") == KIND and ref.get("name") == name_of(resource)
                for ref in live["metadata"].get("ownerReferences") or []):
            raise NotOurs(
                f"{obj['kind']} {meta['name']}, which no ImageGenService made, is left as it "
                f"is: delete or rename it, or {UNCLAIM[obj['kind']]}")
        return live

    def _precompile(self, resource: ImageGenService, job: dict[str, Any] | None,
                    previous: dict[str, Any], rejected: list[str]) -> Precompile | None:
        """The precompile Job (rendered, or None), created when missing and never re-applied
        (a Job's template cannot change; its name stands for it). The Deployment is held only
        while the Job runs and it has never been let go: it is not there yet, or still at 0
        replicas with none ready. Once released (the Job done, failed or suspended) or
        serving, it is not held again, whatever its ready count (a Spot node taken, a Job
        admitted by a queue after all, a Job of a new spec)."""
        if job is None:
            return None
        name, ns = job["metadata"]["name"], namespace_of(resource)
        if previous.get("precompiledJob") == name:
            return Precompile(name, "Succeeded")  # done before, even if the Job is gone
        try:
            live = self.kube.get("batch/v1", "Job", name, ns)
            if serving_replicas(resource.spec) == 0:
                # Scaled to zero: no GPU spent compiling for nothing (a running Job goes; one
                # that finished stays, for when the service scales up again). Scaled up, the
                # Job runs and the replicas, at 0, wait for it as a new service's do.
                if live is not None and job_state(live) == "Running":
                    self.kube.delete("batch/v1", "Job", name, ns)
                    live = None
                return None if live is None else Precompile(name, job_state(live))
            live = live or self.kube.apply(job, read_first=False)
        except PermanentKubeError as exc:
            log.warning("%s: %s", name_of(resource), exc)
            rejected.append(str(exc))
            return Precompile(name, "Failed", str(exc))
        state = job_state(live)
        if state == "Failed":
            # The Job controller's own words: a pod that never ran has no log to read.
            failed = next((c for c in (live.get("status") or {}).get("conditions") or []
                           if c.get("type") == "Failed" and c.get("status") == "True"), {})
            why = ": ".join(w for w in (failed.get("reason"), failed.get("message")) if w)
            return Precompile(name, state, f"Job {name} failed ({why}); the replicas compile "
                              "for themselves" if why else "")
        if state != "Running":
            return Precompile(name, state)
        # Its pod waiting for a place (a claim missing, the pool full) says why: else a held
        # service would say only "compiling" until the Job's deadline.
        waiting = self._unschedulable_pod(ns, f"batch.kubernetes.io/job-name={name}") or ""
        serving = self.kube.get("apps/v1", "Deployment", name_of(resource), ns)
        if serving is None:
            return Precompile(name, state, waiting, held=True)
        replicas = (serving.get("spec") or {}).get("replicas") or 0
        ready = (serving.get("status") or {}).get("readyReplicas") or 0
        return Precompile(name, state, waiting, held=replicas == 0 and ready == 0)

    def _delete_unwanted(self, resource: ImageGenService, wanted: set[tuple[str, str, str]]) -> None:
        selector = f"app.kubernetes.io/instance={name_of(resource)},"
        selector += f"app.kubernetes.io/managed-by={MANAGED_BY}"
        uid = resource.metadata.uid
        for api_version, kind in OPTIONAL_CHILDREN:
            try:
                live = self.kube.list(api_version, kind, namespace_of(resource), selector)
            except MissingKind:
                continue
            for obj in live:
                key = (api_version, kind, obj["metadata"]["name"])
                if _owned_by(obj, uid) and key not in wanted:
                    self.kube.delete(api_version, kind, key[2], namespace_of(resource))

    def _not_planned(self, body: dict[str, Any], outcome: Outcome, reason: str, message: str,
                     the_plan: Plan | None = None, **kwargs: Any) -> Outcome:
        """Write the status of a spec that cannot run as written (stalled: a person must
        act); the Deployment an earlier spec made, if live, goes on serving and status
        says so."""
        outcome.result, outcome.stalled = "invalid", True
        meta = body["metadata"]
        live = self.kube.get("apps/v1", "Deployment", meta["name"], meta.get("namespace"))
        serving = live if live is not None and _owned_by(live, meta.get("uid")) else None
        previous = body.get("status") or {}
        status = st.not_planned_status(previous, meta.get("generation"), reason, message,
                                       the_plan, deployment=serving, **kwargs)
        self._write_status(body, status, outcome)
        return outcome

    def _ensure_pool(
        self, resource: ImageGenService, the_plan: Plan, key: PoolKey, outcome: Outcome
    ) -> tuple[PoolState, bool, bool | None]:
        """The pool's state, whether it is stuck until a person acts, and whether the
        provider answered with the pool's state (True: it is made, or being made), refused
        for good (False), or failed in a way that passes (None: nothing known).

        A provider that failed in a way that passes (GKE busy, rate-limited,
        unreachable) named a delay: until it ends the provider is not asked again,
        by this service or any other on the same pool, and status keeps the one
        message (with the time of the next try) instead of a countdown.
        """
        with self._pool_lock(key):  # the pool's users ask one at a time, and see the backoff
            with self._lock:
                backoff = self._backoff.get(key)
            now = self._clock()
            if backoff is not None and now < backoff.until:
                outcome.requeue_after = backoff.until - now
                return backoff.state, False, None
            provider = self.providers[key.provider]
            target_nodes, bounds, outcome.pool_short = self._pool_size(resource, key, the_plan)
            try:
                state = _asking(provider.ensure, resource, the_plan, target_nodes, bounds)
            except ProviderError as exc:
                if exc.retry_after is None:
                    state = PoolState(the_plan.nodepool_name, False, 0, exc.reason, exc.message)
                    return state, True, False
                at = datetime.now(UTC) + timedelta(seconds=exc.retry_after)
                message = f"{exc.message} (next try at {at.strftime('%H:%M:%SZ')})"
                with self._lock:
                    seen = self._last_seen.get(key)
                if seen is not None and seen.ready and exc.unanswered:
                    # The provider could not be asked (GKE busy or unreachable), which says
                    # nothing of the nodes: those that served when last seen serve on.
                    state = PoolState(seen.name, True, seen.ready_nodes, exc.reason,
                                      f"{message}; its nodes were serving when last seen")
                else:
                    state = PoolState(the_plan.nodepool_name, False, 0, exc.reason, message)
                with self._lock:
                    self._backoff[key] = _Backoff(now + exc.retry_after, state)
                outcome.requeue_after = exc.retry_after
                return state, False, None
            with self._lock:
                self._backoff.pop(key, None)
                self._last_seen[key] = state
                if len(self._last_seen) > MEMO_LIMIT:
                    self._last_seen.pop(next(iter(self._last_seen)))
            return state, False, True

    @staticmethod
    def _lock_id(key: PoolKey) -> Any:
        # One lock for a GKE pool, whichever cloud provider and namespace name it.
        return (key.scope, key.name) if key.provider in CLOUD_PROVIDERS else key

    @contextlib.contextmanager
    def _pool_lock(self, key: PoolKey) -> Iterator[None]:
        """Hold the pool's lock. Locks of pools long gone are dropped, those held never:
        one dropped while a caller waited on it is let go of, and the one in use taken."""
        lock_id = self._lock_id(key)
        while True:
            with self._lock:
                lock = self._pool_locks.get(lock_id)
                if lock is None:
                    if len(self._pool_locks) > MEMO_LIMIT:
                        self._pool_locks = {k: v for k, v in self._pool_locks.items()
                                            if v.locked()}
                    lock = self._pool_locks[lock_id] = threading.Lock()
            lock.acquire()
            with self._lock:
                if self._pool_locks.get(lock_id) is lock:
                    break
            lock.release()
        try:
            yield
        finally:
            lock.release()

    def _delete_pool(self, resource: ImageGenService, the_plan: Plan, key: PoolKey,
                     body: dict[str, Any] | None = None, made: bool = True,
                     keep_pool: bool = False) -> bool | None:
        """Ask the pool's provider to delete it; True once gone, None when there is nothing
        of ours to delete (left alone), False while it goes. Honours the provider's backoff.

        A provider that refuses for good (no credentials, forbidden) leaves a pool that may
        exist in place, and the delete waits: the event on ``body`` says why. One never
        ``made`` (refused at every ask) cannot exist, and nothing waits for it.
        ``keep_pool``: let go of a GKE pool the other cloud provider manages now; GKE's API
        has nothing to let go of, a Config Connector object is deleted abandoning the pool.
        """
        if keep_pool and key.provider != "ConfigConnector":
            return True
        if self._waiting_on(key):
            return False
        pool = resource.spec.node_pool.model_copy(
            update={"provider": key.provider, "cluster": key.scope or None})
        owner = resource.model_copy(
            update={"spec": resource.spec.model_copy(update={"node_pool": pool})})
        try:
            kwargs = {"keep_pool": True} if keep_pool else {}
            gone = _asking(self.providers[key.provider].delete,
                           owner, dataclasses.replace(the_plan, nodepool_name=key.name), **kwargs)
        except PoolNotOwned as exc:
            log.info("leaving pool %s alone: %s", key, exc.message)
            return None
        except ProviderError as exc:
            if not exc.transient and not made:
                log.info("pool %s was never made (its provider refused every ask), nothing "
                         "to delete: %s", key, exc.message)
                return None
            log.warning("deleting pool %s: %s", key, exc.message)
            # A refusal, or a delete GKE took and then failed (asked again, but it may fail
            # for as long): said, where a busy answer is only waited out.
            if (not exc.transient or exc.reason == "DeleteFailed") and body is not None:
                then = ("It is asked again." if exc.transient
                        else "The delete waits until the operator may delete it.")
                self.record_once(body, "Warning", "NodePoolNotDeleted",
                                 f"node pool {key} cannot be deleted ({exc.reason}): "
                                 f"{exc.message.rstrip('.')}. {then}",
                                 subject=f"{key} {exc.reason}")
            delay = exc.retry_after if exc.retry_after is not None else 60.0
            state = PoolState(key.name, False, 0, exc.reason, exc.message)
            with self._lock:
                self._backoff[key] = _Backoff(self._clock() + delay, state, deleting=True)
            return False
        if gone:
            with self._lock:
                self._backoff.pop(key, None)
                self._last_seen.pop(key, None)
        return gone

    def record_once(self, body: dict[str, Any], type_: str, reason: str, message: str,
                    subject: str | None = None) -> None:
        """An Event on what lasts (a refused delete, a handler failing at each retry): once,
        and again every half hour while it lasts (Events live an hour), not at each retry:
        kopf names each Event anew, so the API server never folds them into one. The same
        ``reason`` and ``subject`` (by default the message) is the same Event."""
        memo = self._memo(body["metadata"].get("uid", ""))
        now, seen = self._clock(), (reason, message if subject is None else subject)
        with self._lock:
            if now < memo.said.get(seen, -math.inf) + EVENT_REPEAT_S:
                return
            memo.said[seen] = now
        self.record(body, type_, reason, message)

    def _waiting_on(self, key: PoolKey, deleting: bool = False) -> bool:
        """Whether the pool's provider asked for time before it is asked again (to delete
        it, with ``deleting``)."""
        with self._lock:
            backoff = self._backoff.get(key)
        return (backoff is not None and self._clock() < backoff.until
                and (backoff.deleting or not deleting))

    def _retire_previous_pools(
        self, body: dict[str, Any], resource: ImageGenService, the_plan: Plan, target: PoolKey,
        moved: bool, held: contextlib.ExitStack,
    ) -> tuple[PoolKey, list[PoolKey]]:
        """The pool the service runs on, and those it left that are not gone yet.

        GKE cannot change a pool's accelerator settings, so a new sharing config
        means a new pool: the Deployment moves (surge first, nothing taken away),
        and only then are the old pools released, those no other service uses.
        Until gone, the pool it ran on stays named in status and the others it left
        (a move that an edit turned elsewhere) stay listed, so a later reconcile (or
        an operator restart) finishes the deletion instead of orphaning a pool.
        """
        recorded = self.recorded_pools(body)
        previous = recorded[0] if recorded else target
        current = previous if not moved else target
        left = [k for k in recorded if k not in (target, current)]
        if not moved:
            return current, left
        never_made = self.never_made(body)
        releasing = []
        # As in finalize, each pool's lock is held from the look at its users to the
        # delete; and on, into ``held``, until the caller's status write no longer names
        # the pools kept for others. Another service leaving the same pool meanwhile then
        # finds this one gone from it: else each could keep it for the other, and neither
        # delete it. Taken in one order, so two services leaving the same pools never wait
        # on each other.
        one_per_lock = {self._lock_id(key): key for key in left}
        for lock_id in sorted(one_per_lock, key=repr):
            held.enter_context(self._pool_lock(one_per_lock[lock_id]))
        for key in left:
            gone = self._release(body, resource, the_plan, key, never_made, moved_to=target)
            if gone is False:
                releasing.append(key)
        if previous in releasing:  # named until it is gone
            releasing.remove(previous)
            return previous, releasing
        return target, releasing

    def _unschedulable(self, resource: ImageGenService) -> str | None:
        """The scheduler's own words when a serving pod cannot be placed."""
        return self._unschedulable_pod(namespace_of(resource), selector_string(resource))

    def _unschedulable_pod(self, namespace: str, selector: str) -> str | None:
        """The scheduler's own words when a pod of ``selector`` cannot be placed."""
        pods = self.kube.list("v1", "Pod", namespace, selector)
        for pod in pods:
            for c in (pod.get("status") or {}).get("conditions") or []:
                if c.get("type") == "PodScheduled" and c.get("reason") == "Unschedulable":
                    return f"{pod['metadata']['name']}: {c.get('message')}"
        return None

    # --- status ---------------------------------------------------------------

    def _name_pool_first(self, body: dict[str, Any], target: PoolKey,
                         asking: bool = False) -> None:
        """Name a pool in status before its provider is asked to make it: as never made
        (``created: false``), then, ``asking``, as not known to be, just before the ask.

        Otherwise an operator stopped between the provider's create and the status write,
        and a spec edited meanwhile, would leave a pool nothing names and nothing deletes;
        and one stopped before the ask would leave a pool that can never have been made
        waited for at the service's delete. A move already under way to another pool is
        kept, as one to release.
        """
        status = body.setdefault("status", {})
        recorded = status.get("nodePool") or {}
        # A merge patch: None deletes the key (a move's earlier target may have left one).
        named = {**target.status(), "created": None if asking else False}
        if asking:
            where = "nodePool" if self._recorded_key(body, recorded) == target else "movingTo"
            patch = named if where == "nodePool" else {"movingTo": named}
        elif not recorded.get("name"):
            patch = named
        else:
            releasing = list(recorded.get("releasing") or [])
            listed = {self._recorded_key(body, ref) for ref in releasing}
            # A pool never asked for, or refused at every ask, cannot exist: nothing to
            # release. Listed once: edits that go back and forth do not fill the list.
            if ((moving := recorded.get("movingTo")) and moving.get("name")
                    and moving.get("created") is not False
                    and self._recorded_key(body, moving) not in listed):
                releasing.append(moving)
            patch = {"movingTo": named, "releasing": releasing or None}
        meta = body["metadata"]
        self.kube.patch_status(API_VERSION, KIND, meta["name"], meta.get("namespace"),
                               {"nodePool": patch})
        # What the rest of this reconcile reads is what was written.
        status["nodePool"] = {k: v for k, v in {**recorded, **patch}.items() if v is not None}

    def _write_status(self, body: dict[str, Any], status: dict[str, Any], outcome: Outcome
                      ) -> None:
        """Patch status when it changed, and record the Events the change is worth."""
        previous = body.get("status") or {}
        if st.unchanged(status, previous):
            return
        meta = body["metadata"]
        # Keys we no longer report are removed (a merge patch deletes on null).
        patch = {**{k: None for k in previous}, **status}
        self.kube.patch_status(API_VERSION, KIND, meta["name"], meta.get("namespace"), patch)
        outcome.status_written = True
        for type_, reason, message in st.events_for(previous, status):
            self.record(body, type_, reason, message)


def _pool_namespace(provider: str, namespace: str | None) -> str:
    """The namespace a pool belongs to: a ConfigConnector pool's object lives in its
    service's; every other pool is the cluster's."""
    return (namespace or "") if provider == "ConfigConnector" else ""


def _selects_pool(deployment: dict[str, Any] | None, resource: ImageGenService,
                  the_plan: Plan) -> bool:
    """Whether the live Deployment's pods select the nodes of the pool ``the_plan`` names:
    every label the operator would select them by (labels others add do not matter), and
    no other pool by name."""
    pool = resource.spec.node_pool
    wanted = nodeselector(the_plan, pool.provider, pool.name is not None)
    live = ((((deployment or {}).get("spec") or {}).get("template") or {}).get("spec")
            or {}).get("nodeSelector") or {}
    return (all(live.get(k) == v for k, v in wanted.items())
            and live.get(gke.LABEL_NODEPOOL) == wanted.get(gke.LABEL_NODEPOOL))


def _rides(resource: ImageGenService) -> str | None:
    """The pool an Existing service names (spec.nodePool.name): its pods may share the
    nodes of one the operator made for others, which is then theirs too."""
    pool = resource.spec.node_pool
    return pool.name if pool.provider == "Existing" else None


def _unwanted(made: set[PoolKey], wanted: set[PoolKey]) -> set[PoolKey]:
    """Of the pools ``made``, those no service uses under any key of the same pool: the
    key itself; for a GKE pool, its cluster and name through either cloud provider, or in
    another namespace's Config Connector object (a pool handed over from GKE's API to an
    object is used under its other key); any pool of the name an Existing service names
    (``_rides``; one the operator made is in its own cluster)."""
    on_existing = {w.name for w in wanted if w.provider == "Existing"}
    in_cloud = {(w.scope, w.name) for w in wanted if w.provider in CLOUD_PROVIDERS}
    return {key for key in made
            if key not in wanted and key.name not in on_existing
            and not (key.provider in CLOUD_PROVIDERS and (key.scope, key.name) in in_cloud)}


def _stand_in(body: dict[str, Any]) -> ImageGenService:
    """A valid service of this one's name and namespace, standing in for a spec that no
    longer parses: enough to delete the pools its status records by their keys."""
    meta = body["metadata"]
    return parse({
        "apiVersion": API_VERSION, "kind": KIND,
        "metadata": {k: meta.get(k) for k in ("name", "namespace", "uid", "generation")},
        "spec": {"model": {"uri": "gs://stand-in/model"}, "gpu": {"type": "nvidia-l4"},
                 "nodePool": {"provider": "Local"}},
    })


def _zones_refused(resource: ImageGenService) -> tuple[str, str] | None:
    """Why ``spec.nodePool.locations`` cannot be the pool's zones (reason, message), or
    None. The schema compares them with a cluster the spec names; this, with the one the
    operator filled in."""
    pool = resource.spec.node_pool
    if pool.provider not in CLOUD_PROVIDERS or not pool.cluster or not pool.locations:
        return None
    if outside := gke.zones_outside(pool.cluster, pool.locations):
        return "LocationsOutsideCluster", (
            f"spec.nodePool.locations names {', '.join(outside)}, outside the region of "
            f"the cluster {pool.cluster}: a node pool's zones are its cluster's region's")
    return None
