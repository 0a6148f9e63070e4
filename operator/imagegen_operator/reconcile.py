"""One idempotent reconcile of an ImageGenService, as ordered small steps.

    validate/plan -> workload (Deployment, Service, PDB, HPA, monitors) -> node pool
                  -> retire the previous pool -> status

Level, not edge: each step compares what should be with what is, so running it
on create, update, resume, a timer or a child's event converges to the same
state, and a run that finds nothing to do writes nothing (status included).
The node pool is shared by every service whose GPU config derives the same pool
name; who uses a pool is read from the cluster each time, never kept in memory,
so it survives operator restarts.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from imagegen_operator import conditions as cond
from imagegen_operator.api import InvalidSpec, parse
from imagegen_operator.kube import Kube, MissingKind
from imagegen_operator.planner import Plan, plan
from imagegen_operator.providers.base import NodePoolProvider, PoolState, ProviderError
from imagegen_operator.render import render_workload
from imagegen_operator.render.common import (
    API_VERSION,
    KIND,
    MANAGED_BY,
    name_of,
    namespace_of,
    selector_string,
)
from imagegen_operator.render.service import endpoint

log = logging.getLogger(__name__)

# Kinds the operator may have created for a service and must delete when the
# spec stops asking for them (autoscaling or monitoring switched off).
OPTIONAL_CHILDREN = (
    ("autoscaling/v2", "HorizontalPodAutoscaler"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
)

Recorder = Callable[[dict[str, Any], str, str, str], None]  # body, type, reason, message


@dataclass
class Outcome:
    """What one reconcile did: for the handlers' logs, metrics and retries."""

    ready: bool = False
    status_written: bool = False
    result: str = "ok"  # ok | waiting | invalid | error
    stalled: bool = False  # blocked until a person acts (kstatus' Stalled)
    notes: list[str] = field(default_factory=list)


class Reconciler:
    def __init__(
        self,
        kube: Kube,
        providers: Mapping[str, NodePoolProvider],
        recorder: Recorder | None = None,
        services: Callable[[], Iterable[dict[str, Any]]] | None = None,
    ):
        self.kube = kube
        self.services = services
        self.providers = providers
        self.record = recorder or (lambda body, type_, reason, message: None)
        # uid -> (generation, plan): sharing a pool means planning every service
        # on each reconcile, and a spec only changes with its generation.
        self._plans: dict[str, tuple[int | None, Plan | None]] = {}
        self._cleaned: dict[str, int | None] = {}  # uid -> generation last cleaned up
        self._applied_generation: dict[str, int | None] = {}  # uid -> generation last applied unread

    # --- the entry points ---------------------------------------------------

    def reconcile(self, body: dict[str, Any]) -> Outcome:
        outcome = Outcome()
        generation = body["metadata"].get("generation")
        try:
            resource = parse(body)
        except InvalidSpec as exc:
            outcome.result = "invalid"
            self._write_status(
                body, self._not_planned_status(body, "InvalidSpec", str(exc)), outcome
            )
            return outcome
        the_plan = plan(resource.spec)
        if the_plan.blocking:
            outcome.result = "invalid"
            finding = the_plan.blocking[0]
            message = "; ".join(f.message for f in the_plan.blocking)
            status = self._not_planned_status(body, finding.reason, message, the_plan)
            self._write_status(body, status, outcome)
            return outcome

        # The workload first: its pods wait (Pending) for the pool's nodes anyway,
        # and on GKE their pending is what the cluster autoscaler scales up for.
        observed = (body.get("status") or {}).get("observedGeneration")
        deployment = self._apply_workload(
            resource, the_plan, outcome,
            spec_changed=observed != generation
            and self._applied_generation.get(body["metadata"].get("uid")) != generation,
        )
        pool = self._ensure_pool(resource, the_plan, outcome)
        rolled_out = _rolled_out(deployment, resource.spec.replicas)
        current_pool = self._current_pool(body, the_plan, pool, rolled_out)
        status = self._status(
            body, resource, the_plan, pool, deployment, rolled_out, current_pool, generation,
            stalled=outcome.stalled,
        )
        outcome.ready = cond.is_true(status["conditions"], cond.READY)
        if not outcome.ready:
            outcome.result = "waiting"
        self._write_status(body, status, outcome)
        return outcome

    def finalize(self, body: dict[str, Any]) -> bool:
        """On deletion: release every pool this service used if nobody else uses it.

        Returns True when done (the finalizer may go). Children go with their
        owner through Kubernetes' garbage collector.
        """
        uid = body["metadata"].get("uid")
        self._plans.pop(uid, None)
        self._cleaned.pop(uid, None)
        self._applied_generation.pop(uid, None)
        try:
            resource = parse(body)
        except InvalidSpec:
            return True  # never planned, so it never made a pool
        the_plan = plan(resource.spec)
        if the_plan.blocking:
            return True
        provider = self.providers[resource.spec.node_pool.provider]
        done = True
        for pool_name in self._pools_of(body, the_plan):
            users = self.pool_users(pool_name, exclude_uid=body["metadata"].get("uid"))
            if users:
                log.info("pool %s still used by %s; keeping it", pool_name, ", ".join(users))
                continue
            pool_plan = dataclasses.replace(the_plan, nodepool_name=pool_name)
            gone = provider.delete(resource, pool_plan)
            if gone:
                self.record(
                    body,
                    "Normal",
                    "NodePoolDeleted",
                    f"node pool {pool_name} deleted: no service uses it any more",
                )
            done = done and gone
        return done

    # --- who uses which pool (read from the cluster, every time) -------------

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

    @staticmethod
    def _pools_of(body: dict[str, Any], the_plan: Plan | None) -> set[str]:
        pools = set()
        if the_plan is not None:
            pools.add(the_plan.nodepool_name)
        previous = ((body.get("status") or {}).get("nodePool") or {}).get("name")
        if previous:
            pools.add(previous)
        return pools

    def pool_users(self, pool_name: str, exclude_uid: str | None = None) -> list[str]:
        """namespace/name of every live service that runs on or is moving to ``pool_name``."""
        users = []
        for body in self._all_services(fresh=True):
            meta = body["metadata"]
            if meta.get("uid") == exclude_uid or meta.get("deletionTimestamp"):
                continue
            if pool_name in self._pools_of(body, self._plan_of(body)):
                users.append(f"{meta.get('namespace')}/{meta['name']}")
        return users

    def _plan_of(self, body: dict[str, Any]) -> Plan | None:
        """The plan of another service's body (None when its spec is invalid), memoized."""
        meta = body["metadata"]
        key, generation = meta.get("uid", ""), meta.get("generation")
        cached = self._plans.get(key)
        if cached is not None and cached[0] == generation:
            return cached[1]
        try:
            the_plan = plan(parse(body).spec)
        except InvalidSpec:
            the_plan = None
        if len(self._plans) > 10_000:
            self._plans.clear()  # deleted services' entries; cheap to rebuild
        self._plans[key] = (generation, the_plan)
        return the_plan

    def _target_nodes(self, resource: Any, the_plan: Plan) -> int:
        """Nodes every service sharing this pool needs together, within min/max nodes."""
        replicas = 0
        for body in self._all_services():
            if body["metadata"].get("deletionTimestamp"):
                continue
            other = self._plan_of(body)
            if other and other.nodepool_name == the_plan.nodepool_name and other.workable:
                replicas += other.target_replicas
        pool = resource.spec.node_pool
        needed = math.ceil(replicas / the_plan.slots_per_node) if the_plan.slots_per_node else 0
        return max(pool.min_nodes, min(needed, pool.max_nodes))

    # --- the steps ------------------------------------------------------------

    def _ensure_pool(self, resource: Any, the_plan: Plan, outcome: Outcome) -> PoolState:
        provider = self.providers[resource.spec.node_pool.provider]
        try:
            return provider.ensure(resource, the_plan, self._target_nodes(resource, the_plan))
        except ProviderError as exc:
            if not exc.transient:
                outcome.stalled = True  # quota, permissions: waiting will not help
            return PoolState(the_plan.nodepool_name, False, 0, exc.reason, exc.message)

    def _apply_workload(
        self, resource: Any, the_plan: Plan, outcome: Outcome, spec_changed: bool
    ) -> dict[str, Any] | None:
        """Apply the children; return the Deployment as it now is.

        A spec not yet acted on (a new service, an edit) nearly always means
        writes: apply straight away (server-side apply creates or updates alike)
        instead of reading each child first. Otherwise read, and write only what
        drifted, so a steady-state reconcile writes nothing.
        """
        desired = render_workload(resource, the_plan)
        wanted = {(o["apiVersion"], o["kind"], o["metadata"]["name"]) for o in desired}
        deployment = None
        uid, generation = resource.metadata.uid, resource.metadata.generation
        for obj in desired:
            try:
                current = self.kube.apply(obj, read_first=not spec_changed)
            except MissingKind as exc:
                # A monitor asked for on a cluster without the Prometheus operator.
                outcome.notes.append(str(exc))
                log.warning("%s: %s", name_of(resource), exc)
                continue
            if obj["kind"] == "Deployment":
                deployment = current
        # Once per generation: should the status write that records it fail, the
        # next reconcile reads before it writes.
        self._applied_generation[uid] = generation
        # Optional children only go away when the spec changes (its generation):
        # look for leftovers once per generation, not on every reconcile.
        if self._cleaned.get(uid) != generation:
            self._delete_unwanted(resource, wanted)
            self._cleaned[uid] = generation
        return deployment

    def _delete_unwanted(self, resource: Any, wanted: set[tuple[str, str, str]]) -> None:
        selector = f"app.kubernetes.io/instance={name_of(resource)},"
        selector += f"app.kubernetes.io/managed-by={MANAGED_BY}"
        uid = resource.metadata.uid
        for api_version, kind in OPTIONAL_CHILDREN:
            try:
                live = self.kube.list(api_version, kind, namespace_of(resource), selector)
            except MissingKind:
                continue
            for obj in live:
                owned = any(
                    ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or []
                )
                key = (api_version, kind, obj["metadata"]["name"])
                if owned and key not in wanted:
                    self.kube.delete(api_version, kind, key[2], namespace_of(resource))

    def _current_pool(
        self, body: dict[str, Any], the_plan: Plan, pool: PoolState, rolled_out: bool
    ) -> str:
        """The pool the service runs on; a new one takes over once the rollout is done.

        GKE cannot change a pool's accelerator settings, so a new sharing config
        means a new pool: the Deployment moves (surge first, nothing taken away),
        and only then is the old pool released, if no other service uses it.
        """
        previous = ((body.get("status") or {}).get("nodePool") or {}).get("name")
        if not previous or previous == the_plan.nodepool_name:
            return the_plan.nodepool_name
        if not (pool.ready and rolled_out):
            return previous
        users = self.pool_users(previous, exclude_uid=body["metadata"].get("uid"))
        if not users:
            resource = parse(body)
            provider = self.providers[resource.spec.node_pool.provider]
            gone = provider.delete(resource, dataclasses.replace(the_plan, nodepool_name=previous))
            if not gone:
                # Still named in status until it is gone, so a later reconcile (or
                # an operator restart) finishes the deletion instead of orphaning it.
                return previous
            self.record(
                body,
                "Normal",
                "NodePoolRetired",
                f"moved to node pool {the_plan.nodepool_name}; deleted {previous}",
            )
        return the_plan.nodepool_name

    # --- status ---------------------------------------------------------------

    def _status(
        self,
        body: dict[str, Any],
        resource: Any,
        the_plan: Plan,
        pool: PoolState,
        deployment: dict[str, Any] | None,
        rolled_out: bool,
        current_pool: str,
        generation: int | None,
        stalled: bool,
    ) -> dict[str, Any]:
        dep_status = (deployment or {}).get("status") or {}
        want = resource.spec.replicas
        ready_replicas = dep_status.get("readyReplicas") or 0
        observed = [
            cond.Observed(cond.NODE_POOL_READY, pool.ready, pool.reason, pool.message),
            _available(want, ready_replicas),
            cond.Observed(
                cond.PROGRESSING,
                not rolled_out,
                "RolloutComplete" if rolled_out else "RollingOut",
                f"{ready_replicas}/{want} replicas ready on pool {current_pool}",
            ),
        ]
        if not pool.ready:
            ready = cond.Observed(cond.READY, False, pool.reason, pool.message)
        elif not rolled_out:
            ready = cond.Observed(
                cond.READY,
                False,
                "ReplicasNotReady",
                self._why_not_ready(resource, ready_replicas, want),
            )
        else:
            ready = cond.Observed(
                cond.READY, True, "Ready", f"{ready_replicas}/{want} replicas ready"
            )
        previous = body.get("status") or {}
        observed += cond.kstatus(ready, stalled)
        conditions = cond.merge(previous.get("conditions"), [ready, *observed], generation)
        return {
            "observedGeneration": generation,
            "conditions": conditions,
            "replicas": dep_status.get("replicas") or 0,
            "readyReplicas": ready_replicas,
            "selector": selector_string(resource),
            "sharing": the_plan.sharing,
            "nodePool": {
                "name": current_pool,
                "provider": resource.spec.node_pool.provider,
                "readyNodes": pool.ready_nodes,
            },
            "capacity": _capacity(the_plan),
            "endpoint": endpoint(resource),
        }

    def _why_not_ready(self, resource: Any, ready: int, want: int) -> str:
        """The replica count, and the scheduler's own words when a pod cannot be placed."""
        message = f"{ready}/{want} replicas ready"
        pods = self.kube.list("v1", "Pod", namespace_of(resource), selector_string(resource))
        for pod in pods:
            for c in (pod.get("status") or {}).get("conditions") or []:
                if c.get("type") == "PodScheduled" and c.get("reason") == "Unschedulable":
                    return f"{message}; pod {pod['metadata']['name']}: {c.get('message')}"
        return message

    def _not_planned_status(
        self, body: dict[str, Any], reason: str, message: str, the_plan: Plan | None = None
    ) -> dict[str, Any]:
        generation = body["metadata"].get("generation")
        previous = body.get("status") or {}
        observed = [
            cond.Observed(cond.READY, False, reason, message),
            cond.Observed(
                cond.NODE_POOL_READY,
                False,
                reason,
                "nothing was created: the spec cannot run as written",
            ),
            cond.Observed(cond.AVAILABLE, False, reason, "no Deployment was created"),
        ]
        observed += cond.kstatus(observed[0], stalled=True)
        status = {
            **{k: None for k in previous if k != "conditions"},
            "observedGeneration": generation,
            "conditions": cond.merge(previous.get("conditions"), observed, generation),
        }
        if the_plan is not None:
            status["sharing"] = the_plan.sharing
            status["capacity"] = _capacity(the_plan)
        return status

    def _write_status(self, body: dict[str, Any], status: dict[str, Any], outcome: Outcome) -> None:
        previous = body.get("status") or {}
        if _prune(status) == _prune(previous):
            return
        meta = body["metadata"]
        # Keys we no longer report are removed (a merge patch deletes on null).
        patch = {**{k: None for k in previous}, **status}
        self.kube.patch_status(API_VERSION, KIND, meta["name"], meta.get("namespace"), patch)
        outcome.status_written = True
        self._record_transitions(body, previous, status)

    def _record_transitions(
        self, body: dict[str, Any], before: dict[str, Any], after: dict[str, Any]
    ) -> None:
        """An Event when Ready or NodePoolReady turns True, or turns False for a reason.

        A new service is not ready at first and its conditions say why; that first
        False is no news. A warning is for a condition that was True and no longer
        is, and for a service that turns Stalled, which waiting will not fix.
        """
        for new in after.get("conditions") or []:
            old = cond.find(before.get("conditions"), new["type"])
            was = (old or {}).get("status")
            if was == new["status"]:
                continue
            if new["type"] == cond.STALLED:
                # Stuck, also when Ready was already False: the one warning for it.
                if new["status"] != "True":
                    continue
                type_ = "Warning"
            elif new["type"] not in (cond.READY, cond.NODE_POOL_READY):
                continue
            elif new["status"] == "True":
                type_ = "Normal"
            elif was == "True":
                type_ = "Warning"
            else:
                continue  # not ready yet: the conditions say why, and Stalled if it is stuck
            self.record(
                body, type_, new["reason"], f"{new['type']}={new['status']}: {new['message']}"
            )


def _available(want: int, ready: int) -> cond.Observed:
    if want == 0 or ready > 0:
        return cond.Observed(
            cond.AVAILABLE, True, "MinimumReplicasAvailable", f"{ready} replica(s) serving"
        )
    return cond.Observed(cond.AVAILABLE, False, "NoReplicasAvailable", "no replica is ready yet")


def _rolled_out(deployment: dict[str, Any] | None, want: int) -> bool:
    """The Deployment has caught up with its spec and every wanted replica is ready."""
    if deployment is None:
        return False
    status = deployment.get("status") or {}
    meta = deployment["metadata"]
    return (
        (status.get("observedGeneration") or 0) >= (meta.get("generation") or 0)
        and (status.get("updatedReplicas") or 0) == want
        and (status.get("readyReplicas") or 0) == want
        and (status.get("replicas") or 0) == want
    )


def _capacity(the_plan: Plan) -> dict[str, int]:
    return {
        "slotsPerGpu": the_plan.slots_per_gpu,
        "gpus": the_plan.nodes_needed * the_plan.count_per_node,
        "slots": the_plan.slots,
    }


def _prune(value: Any) -> Any:
    """Drop nulls and empties, so a stored status compares equal to a computed one."""
    if isinstance(value, dict):
        out = {k: _prune(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v not in (None, {}, [])}
    if isinstance(value, list):
        return [_prune(v) for v in value]
    return value
