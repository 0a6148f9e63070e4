"""The status of an ImageGenService, computed from what one reconcile observed.

Pure functions: no API calls, no clock but the condition timestamps. The
reconcile gathers an :class:`Observation`; :func:`compute_status` turns it into
the status document; :func:`events_for` says which transitions are news.
Kept apart so the rules (when is a service Ready, Stalled, Progressing) are
unit-tested in milliseconds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from imagegen_operator import conditions as cond
from imagegen_operator.api import CLOUD_PROVIDERS
from imagegen_operator.planner import Plan
from imagegen_operator.providers.base import PoolState


@dataclass(frozen=True)
class PoolKey:
    """A node pool's identity: who makes it, where, and its name.

    ``scope`` is the GKE cluster for GKE and ConfigConnector pools, empty for pools
    in the operator's own cluster (Local, Existing). ``namespace`` is set for
    ConfigConnector pools only: their object lives in the service's namespace, so
    such a pool is that namespace's. Two services share a pool only when all agree.
    """

    provider: str
    scope: str
    name: str
    namespace: str = ""

    def __str__(self) -> str:
        where = " ".join(w for w in (self.scope, self.namespace and f"({self.namespace})") if w)
        return f"{self.name} ({self.provider} in {where})" if where else self.name

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "provider": self.provider, "cluster": self.scope or None}

    def namesake_of(self, other: PoolKey) -> bool:
        """Whether the two name one GKE node pool through different providers: GKE's API
        and a Config Connector object make and delete the same pool."""
        return (self.provider != other.provider
                and self.provider in CLOUD_PROVIDERS and other.provider in CLOUD_PROVIDERS
                and (self.scope, self.name) == (other.scope, other.name))


@dataclass(frozen=True)
class Precompile:
    """The precompile Job as a reconcile saw it (render/precompile.py)."""

    job: str
    state: str | None  # Running, Suspended, Succeeded or Failed
    message: str = ""  # why it failed; while it runs, why its pod waits for a place
    held: bool = False  # the Deployment kept at 0 meanwhile: nothing served yet


@dataclass(frozen=True)
class Observation:
    """Everything one reconcile saw that status is made of."""

    generation: int | None
    previous: dict[str, Any]  # the stored status
    plan: Plan
    want: int  # spec.replicas
    pool: PoolState  # the pool the spec asks for, as its provider reports it
    target: PoolKey  # that pool
    current: PoolKey  # where the service runs: target, or the pool it is moving from
    deployment: dict[str, Any] | None
    selector: str
    endpoint: str
    rolled_out: bool
    pool_stalled: bool = False  # the provider's error will not pass by waiting
    rejected: tuple[str, ...] = ()  # children not applied: the API server's words, or ours
    unschedulable: str | None = None  # the scheduler's words for a pending pod
    precompile: Precompile | None = None  # None: no precompile Job asked for
    pool_short: str | None = None  # a shared pool too small for what its users must run
    releasing: tuple[PoolKey, ...] = ()  # other pools it left that are not gone yet
    # Per pool: made (a provider reported it), never made (refused for good), None unknown.
    created: Mapping[PoolKey, bool | None] = field(default_factory=dict)
    # None: spec.monitoring asks for no monitor; else why they were not applied (empty: they
    # were).
    monitoring: tuple[str, ...] | None = None

    @property
    def moving(self) -> bool:
        return self.current != self.target


def _precompiled(p: Precompile) -> cond.Observed:
    if p.state == "Succeeded":
        return cond.Observed(cond.PRECOMPILED, True, "JobSucceeded",
                             f"Job {p.job} saved the compiled artifacts on the cache volume")
    if p.state == "Suspended":
        return cond.Observed(cond.PRECOMPILED, False, "JobSuspended",
                             f"Job {p.job} is suspended; the replicas compile for themselves")
    if p.state == "Failed":
        return cond.Observed(
            cond.PRECOMPILED, False, "JobFailed",
            p.message or f"Job {p.job} failed (its pod's log says why); the replicas compile "
            "for themselves",
        )
    meanwhile = "" if p.held else "; the replicas serving meanwhile compiled for themselves"
    doing = f"is waiting for a place: {p.message}" if p.message else "is compiling"
    return cond.Observed(cond.PRECOMPILED, False, "JobRunning", f"Job {p.job} {doing}{meanwhile}")


def compute_status(o: Observation) -> dict[str, Any]:
    """The status document for an observation (conditions merged with the stored ones)."""
    dep_status = (o.deployment or {}).get("status") or {}
    ready_replicas = dep_status.get("readyReplicas") or 0
    serving = f"{ready_replicas}/{o.want} replicas ready"
    where = f"{serving} on pool {o.current.name}"
    if o.moving:
        where += f", moving to pool {o.target.name}"
    progressing = not o.rolled_out or o.moving
    # Fully serving while a rollout or a pool move goes on (the new pool may still be
    # coming up): neither ready nor not, kstatus' InProgress, and no warning.
    serving_meanwhile = progressing and o.want > 0 and ready_replicas >= o.want
    pool_ready: bool | None = o.pool.ready
    if not o.pool.ready and o.moving and serving_meanwhile and not o.pool_stalled:
        pool_ready = None
    observed = [
        cond.Observed(cond.NODE_POOL_READY, pool_ready, o.pool.reason, o.pool.message),
        _available(o.want, ready_replicas),
        cond.Observed(
            cond.PROGRESSING,
            progressing,
            ("MovingPool" if o.moving else "RollingOut") if progressing else "RolloutComplete",
            where,
        ),
    ]
    stalled = False
    if o.rejected:
        stalled = True
        ready = cond.Observed(
            cond.READY, False, "ApplyRejected",
            "not applied: " + "; ".join(o.rejected),
        )
    elif not o.pool.ready and (o.pool_stalled or not serving_meanwhile):
        stalled = o.pool_stalled
        ready = cond.Observed(cond.READY, False, o.pool.reason, o.pool.message)
    elif o.precompile is not None and o.precompile.held:
        ready = cond.Observed(
            cond.READY, False, "Precompiling",
            f"0/{o.want} replicas until Job {o.precompile.job} has compiled the model once"
            + (f"; its pod is waiting for a place: {o.precompile.message}"
               if o.precompile.message else ""),
        )
    elif o.plan.stalling and not o.rolled_out:
        stalled = True
        finding = o.plan.stalling[0]
        ready = cond.Observed(cond.READY, False, finding.reason, f"{serving}; {finding.message}")
    elif o.pool_short and not o.rolled_out:
        stalled = True
        ready = cond.Observed(cond.READY, False, "PoolTooSmall", f"{serving}; {o.pool_short}")
    elif (failure := _rollout_failure(o.deployment)) and not o.rolled_out:
        reason, message, stalled = failure
        ready = cond.Observed(cond.READY, False, reason, f"{serving}; {message}")
    elif serving_meanwhile:
        ready = cond.Observed(cond.READY, None, "Progressing", where)
    elif not o.rolled_out:
        message = f"{serving}; pod {o.unschedulable}" if o.unschedulable else serving
        ready = cond.Observed(cond.READY, False, "ReplicasNotReady", message)
    else:
        ready = cond.Observed(cond.READY, True, "Ready", serving)
    if o.precompile is not None:
        observed.append(_precompiled(o.precompile))
    if o.monitoring:
        observed.append(cond.Observed(cond.MONITORED, False, "MonitoringUnavailable",
                                      "; ".join(o.monitoring)))
    elif o.monitoring is not None:
        observed.append(cond.Observed(cond.MONITORED, True, "MonitorsApplied",
                                      "the Prometheus operator scrapes /metrics"))
    observed += cond.kstatus(ready, stalled)
    return {
        "observedGeneration": o.generation,
        "conditions": cond.merge(o.previous.get("conditions"), [ready, *observed], o.generation),
        "replicas": dep_status.get("replicas") or 0,
        "readyReplicas": ready_replicas,
        "selector": o.selector,
        "sharing": o.plan.sharing,
        # Nulls once moved: a merge patch keeps nested keys it is not told to drop.
        # `created: false`: every ask was refused, so a delete has no pool to wait for.
        "nodePool": {**o.current.status(), "readyNodes": o.pool.ready_nodes,
                     "created": o.created.get(o.current),
                     "movingTo": ({**o.target.status(), "created": o.created.get(o.target)}
                                  if o.moving else None),
                     "releasing": [_released(k, o.created.get(k))
                                   for k in o.releasing] or None},
        "capacity": capacity(o.plan),
        "endpoint": o.endpoint,
        **_precompiled_job(o),
    }


def _rollout_failure(deployment: Mapping[str, Any] | None) -> tuple[str, str, bool] | None:
    """(reason, message, stalled) of a Deployment whose rollout cannot go on by itself.

    ``ReplicaFailure``: its pods cannot be created (a ResourceQuota on GPUs, Pod Security
    refusing MPS's hostIPC), which the pods' own conditions never show, there being no pods.
    ``ProgressDeadlineExceeded``: no progress for the Deployment's progressDeadlineSeconds;
    the controller gives up waiting, and so does the service: Stalled.
    """
    deployment = deployment or {}
    dep_status = deployment.get("status") or {}
    generation = (deployment.get("metadata") or {}).get("generation") or 0
    if (dep_status.get("observedGeneration") or 0) < generation:
        return None  # conditions of the rollout before this spec's
    found = {c.get("type"): c for c in dep_status.get("conditions") or []}
    progress, failure = found.get("Progressing") or {}, found.get("ReplicaFailure") or {}
    failed = failure.get("status") == "True"
    cause = (f"the Deployment cannot create pods: "
             f"{failure.get('message') or failure.get('reason')}") if failed else ""
    if progress.get("status") == "False" and progress.get("reason") == "ProgressDeadlineExceeded":
        return ("ProgressDeadlineExceeded",
                cause or f"the Deployment made no progress within its deadline: "
                f"{progress.get('message')}", True)
    return ("ReplicaFailure", cause, False) if failed else None


def _released(key: PoolKey, created: bool | None) -> dict[str, Any]:
    # A list item is replaced whole: an unknown `created` is left out, not written null.
    return key.status() | ({} if created is None else {"created": created})


def _precompiled_job(o: Observation) -> dict[str, Any]:
    if o.precompile is not None and o.precompile.state == "Succeeded":
        return {"precompiledJob": o.precompile.job}
    remembered = o.previous.get("precompiledJob")
    return {"precompiledJob": remembered} if remembered else {}


# Status fields that record what exists, kept while a spec cannot run as written.
KEPT_WHEN_NOT_PLANNED = ("nodePool", "precompiledJob")


def not_planned_status(
    previous: dict[str, Any],
    generation: int | None,
    reason: str,
    message: str,
    the_plan: Plan | None = None,
    pool_message: str = "the spec cannot run as written",
    deployment: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Status of a spec that cannot run as written: nothing new is made, a person must act.

    What an earlier spec made stays as it was and stays named: ``nodePool`` is the only
    record of a pool the service may still run on, which a later spec retires and a
    delete releases; without it the pool would be orphaned. The ``deployment`` that spec
    made, if live, goes on serving, and status says so: its replicas, and the selector
    an HPA scaling the service finds its pods by.
    """
    kept = {k: previous[k] for k in KEPT_WHEN_NOT_PLANNED if previous.get(k)}
    pool = kept.get("nodePool")
    if pool:
        pool_message += f"; node pool {pool.get('name')} of the last spec that ran is kept"
    else:
        pool_message += "; nothing was created"
    if deployment is not None:
        serving = deployment.get("status") or {}
        ready = serving.get("readyReplicas") or 0
        kept |= {k: previous[k] for k in ("selector", "endpoint") if previous.get(k)}
        kept |= {"replicas": serving.get("replicas") or 0, "readyReplicas": ready}
        base = _available((deployment.get("spec") or {}).get("replicas", 1), ready)
        available = cond.Observed(
            base.type, base.status, base.reason,
            f"{base.message} (the Deployment of the last spec that ran, left as it was)",
        )
    else:
        available = cond.Observed(cond.AVAILABLE, False, reason, "no Deployment was created")
    observed = [
        cond.Observed(cond.READY, False, reason, message),
        cond.Observed(cond.NODE_POOL_READY, False, reason, pool_message),
        available,
    ]
    observed += cond.kstatus(observed[0], stalled=True)
    status = {
        **{k: None for k in previous if k != "conditions"},
        **kept,
        "observedGeneration": generation,
        "conditions": cond.merge(previous.get("conditions"), observed, generation),
    }
    if the_plan is not None:
        status["sharing"] = the_plan.sharing
        status["capacity"] = capacity(the_plan)
    return status


def unchanged(status: dict[str, Any], previous: dict[str, Any]) -> bool:
    return _prune(status) == _prune(previous)


def events_for(before: dict[str, Any], after: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(type, reason, message) of the Events a status change is worth.

    An Event when Ready or NodePoolReady turns True, or turns False after being
    True. A new service is not ready at first and its conditions say why; that
    first False is no news, nor is Ready going Unknown while a rollout serves.
    A warning is also due when a service turns Stalled, which waiting will not fix.
    """
    events = []
    for new in after.get("conditions") or []:
        old = cond.find(before.get("conditions"), new["type"])
        was = (old or {}).get("status")
        if was == new["status"]:
            continue
        if new["type"] == cond.STALLED:
            if new["status"] != "True":
                continue
            type_ = "Warning"
        elif new["type"] not in (cond.READY, cond.NODE_POOL_READY):
            continue
        elif new["status"] == "True":
            type_ = "Normal"
        elif was == "True" and new["status"] == "False":
            type_ = "Warning"
        else:
            continue
        events.append((type_, new["reason"], f"{new['type']}={new['status']}: {new['message']}"))
    return events


def capacity(the_plan: Plan) -> dict[str, int]:
    return {
        "slotsPerGpu": the_plan.slots_per_gpu,
        "gpus": the_plan.nodes_provisioned * the_plan.count_per_node,
        "slots": the_plan.slots,
    }


def rolled_out(deployment: dict[str, Any] | None, want: int) -> bool:
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


def _available(want: int, ready: int) -> cond.Observed:
    if want == 0 or ready > 0:
        return cond.Observed(
            cond.AVAILABLE, True, "MinimumReplicasAvailable", f"{ready} replica(s) serving"
        )
    return cond.Observed(cond.AVAILABLE, False, "NoReplicasAvailable", "no replica is ready yet")


def _prune(value: Any) -> Any:
    """Drop nulls and empties, so a stored status compares equal to a computed one."""
    if isinstance(value, dict):
        out = {k: _prune(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v not in (None, {}, [])}
    if isinstance(value, list):
        return [_prune(v) for v in value]
    return value
