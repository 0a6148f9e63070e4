"""The sweep for node pools no service uses, in the background of the operator process.

A service's finalizer is what deletes its pool; one taken off by hand (`kubectl patch` on
a service stuck in deletion) leaves the pool, GPUs and all, with no service to delete it.
Every ``every_s`` the operator that acts (the one kopf's peering lets act) looks for
such pools and deletes those unused long enough (``Reconciler.sweep``). More often, every
``lead_check_s``, it says whether it acts (``imagegen_operator_leading``): a standby keeps
the gauges it last set while it acted, which a dashboard weighs by this one. And then an
operator of some namespaces finishes the deletes of services in one of them that is being
deleted, which kopf may no longer follow (``Reconciler.finish_deletes_in_ended_namespaces``).
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from imagegen_operator import metrics
from imagegen_operator.kube import Kube, PermanentKubeError, TransientKubeError
from imagegen_operator.reconcile import Reconciler

log = logging.getLogger(__name__)
PEERING_API_VERSION = "kopf.dev/v1"


LEAD_CHECK_S = 15.0


class Sweeper:
    def __init__(self, reconciler: Reconciler, kube: Kube, every_s: float,
                 peering: str | None = None, priority: int = 0,
                 namespaces: tuple[str, ...] = (), lead_check_s: float = LEAD_CHECK_S,
                 finalized: Callable[[str], None] = lambda uid: None,
                 stood_down: Callable[[], None] = lambda: None):
        self.reconciler = reconciler
        self.finalized = finalized  # told the uid of each service it finalized
        # Told when this process stops acting: its per-service gauges would go stale (a
        # service deleted meanwhile is never forgotten), and be heard again if it leads.
        self.stood_down = stood_down
        self._led = False
        self.kube = kube
        self.every_s = every_s  # 0: no sweep, the leadership gauge only
        self.lead_check_s = lead_check_s
        self._unread = False  # the peering could not be read at the last try
        self.peering = peering
        self.priority = priority
        self.namespaces = namespaces
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pool-sweep", daemon=True)

    def start(self) -> Sweeper:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the thread to end and wait for it (a sweep under way finishes first)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        tick = min(self.every_s, self.lead_check_s) if self.every_s else self.lead_check_s
        next_sweep = time.monotonic() + self.every_s
        while True:
            says = None
            try:  # nothing may end the thread: the sweep and the gauge would stop with it
                says = self._peering_says()
                if says is not None:  # unknown (peering unread): the gauge stays
                    metrics.LEADING.set(1 if says else 0)
                    if self._led and not says:
                        self.stood_down()
                    self._led = says
                if self.every_s and time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + self.every_s
                    if says:
                        self.reconciler.sweep(acting=self.leading)
            except Exception:  # the next round tries again; the operator goes on
                log.exception("the sweep for node pools no service uses failed")
            if says:
                try:
                    for body in self.reconciler.finish_deletes_in_ended_namespaces():
                        self.finalized(body["metadata"]["uid"])
                except Exception:
                    log.exception("finishing the deletes of services in ended namespaces failed")
            if self._stop.wait(tick):
                return

    def leading(self) -> bool:
        """Whether this process is the one of its peering that acts, by kopf's rule: no
        other live peer of the same or a higher priority. Without peering, always. Not
        while its peering cannot be read."""
        return self._peering_says() is True

    def _peering_says(self) -> bool | None:
        """``leading``, or None while the peering cannot be read."""
        if not self.peering:
            return True
        try:
            if self.namespaces:
                # kopf peers in each namespace served, any one tells; not one being deleted,
                # whose peering and the right to read it go with it.
                ending = set(self.reconciler.ended_namespaces())
                namespace = next((n for n in self.namespaces if n not in ending),
                                 self.namespaces[0])
                found = self.kube.list(PEERING_API_VERSION, "KopfPeering", namespace)
            else:
                found = self.kube.list(PEERING_API_VERSION, "ClusterKopfPeering")
        except (PermanentKubeError, TransientKubeError) as exc:
            # Said once, not every round, until the peering is read again.
            (log.debug if self._unread else log.warning)(
                "cannot read peering %s, so no sweep: %s", self.peering, exc)
            self._unread = True
            return None
        self._unread = False
        peering = next((p for p in found if p["metadata"]["name"] == self.peering), None)
        now = datetime.datetime.now(datetime.UTC)
        live = {peer: info for peer, info in ((peering or {}).get("status") or {}).items()
                if isinstance(info, dict) and _alive(info, now)}
        return leads(live, self.priority, os.environ.get("POD_ID"))


def leads(live: dict[str, dict[str, Any]], priority: int, own_id: str | None) -> bool:
    """Whether a peer of ``priority`` acts among the ``live`` ones (by id): it is among
    them and none other has its priority or a higher one. Without its own id (kopf's
    POD_ID; a process outside a pod), only as the one live peer."""
    if own_id is None:
        return len(live) == 1 and next(iter(live.values())).get("priority", 0) == priority
    return own_id in live and not any(
        info.get("priority", 0) >= priority for peer, info in live.items() if peer != own_id)


def _alive(info: dict[str, Any], now: datetime.datetime) -> bool:
    try:
        seen = datetime.datetime.fromisoformat(str(info["lastseen"]))
        lifetime = datetime.timedelta(seconds=int(info.get("lifetime", 60)))
    except (KeyError, TypeError, ValueError):
        return False
    if seen.tzinfo is None:
        seen = seen.replace(tzinfo=datetime.UTC)
    return seen + lifetime > now
