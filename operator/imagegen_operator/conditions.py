"""Status conditions the way Kubernetes' own controllers keep them.

Each condition carries type, status, reason, message, observedGeneration and
lastTransitionTime; the time moves only when the status flips, so a reconcile
that observes nothing new computes a status identical to the stored one (and
writes nothing).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

READY = "Ready"
NODE_POOL_READY = "NodePoolReady"
AVAILABLE = "Available"
PROGRESSING = "Progressing"
# Only with spec.pipeline.compile.precompileJob: the Job that compiles once for all replicas.
PRECOMPILED = "Precompiled"
# Only with spec.monitoring: whether its ServiceMonitor or PodMonitor could be applied.
MONITORED = "Monitored"
# kstatus' "abnormal-true" pair, read by kpt, Config Sync and Flux's default checks.
RECONCILING = "Reconciling"
STALLED = "Stalled"

# Ready first: it is the one `kubectl wait` and GitOps tools read.
ORDER = (READY, NODE_POOL_READY, AVAILABLE, PROGRESSING, PRECOMPILED, MONITORED, RECONCILING,
         STALLED)


@dataclass(frozen=True)
class Observed:
    """One condition as the reconciler sees it now."""

    type: str
    status: bool | None  # None: Unknown
    reason: str
    message: str = ""

    @property
    def status_text(self) -> str:
        return {True: "True", False: "False", None: "Unknown"}[self.status]


def kstatus(ready: Observed, stalled: bool) -> list[Observed]:
    """Reconciling and Stalled, derived from Ready (kstatus conventions).

    Not ready and still on its way: Reconciling=True (InProgress). Not ready and
    waiting for a person (a spec that cannot run, a quota): Stalled=True (Failed).
    """
    if ready.status:
        return [Observed(RECONCILING, False, "Ready"), Observed(STALLED, False, "Ready")]
    if stalled:
        return [Observed(RECONCILING, False, "Stalled", ready.message),
                Observed(STALLED, True, ready.reason, ready.message)]
    return [Observed(RECONCILING, True, ready.reason, ready.message),
            Observed(STALLED, False, "Reconciling")]


def now() -> str:
    return datetime.now(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge(
    previous: list[dict[str, Any]] | None,
    observed: list[Observed],
    generation: int | None,
    timestamp: str | None = None,
) -> list[dict[str, Any]]:
    """The new conditions list: ``observed`` with transition times kept where unchanged."""
    before = {c.get("type"): c for c in previous or []}
    stamp = timestamp or now()
    out = []
    for cond in sorted(observed, key=lambda c: ORDER.index(c.type) if c.type in ORDER else 99):
        old = before.get(cond.type)
        flipped = old is None or old.get("status") != cond.status_text
        out.append(
            {
                "type": cond.type,
                "status": cond.status_text,
                "reason": cond.reason,
                "message": cond.message,
                "observedGeneration": generation,
                "lastTransitionTime": stamp if flipped else old.get("lastTransitionTime", stamp),
            }
        )
    return out


def find(conditions: list[dict[str, Any]] | None, type_: str) -> dict[str, Any] | None:
    return next((c for c in conditions or [] if c.get("type") == type_), None)


def is_true(conditions: list[dict[str, Any]] | None, type_: str) -> bool:
    cond = find(conditions, type_)
    return bool(cond and cond.get("status") == "True")
