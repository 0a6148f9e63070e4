"""Which operator of a peering sweeps for unused node pools: the one kopf lets act."""

from __future__ import annotations

import datetime
import time

from imagegen_operator.sweeper import _alive, leads

NOW = datetime.datetime(2026, 12, 7, 12, 0, tzinfo=datetime.UTC)


def peer(priority: int, seen_s_ago: float = 5, lifetime: int = 60) -> dict:
    seen = NOW - datetime.timedelta(seconds=seen_s_ago)
    return {"priority": priority, "lifetime": lifetime, "lastseen": seen.isoformat()}


def test_the_highest_priority_alone_leads() -> None:
    assert leads({"a": peer(200), "b": peer(100)}, 200, "a")
    assert not leads({"a": peer(200), "b": peer(100)}, 100, "b")
    # The same priority: kopf pauses both, and so does the sweep.
    assert not leads({"a": peer(100), "b": peer(100)}, 100, "a")
    # Not yet in the peering: not acting yet.
    assert not leads({"b": peer(100)}, 200, "a")


def test_without_its_own_id_only_the_one_live_peer_leads() -> None:
    assert leads({"x": peer(0)}, 0, None)
    assert not leads({"x": peer(0), "y": peer(0)}, 0, None)
    assert not leads({"x": peer(5)}, 0, None)


def test_a_peer_past_its_lifetime_is_gone() -> None:
    assert _alive(peer(1, seen_s_ago=30), NOW)
    assert not _alive(peer(1, seen_s_ago=61), NOW)
    assert not _alive({"priority": 1}, NOW)


def test_the_operator_says_whether_it_acts_and_sweeps_only_then(monkeypatch) -> None:
    from imagegen_operator import metrics
    from imagegen_operator.sweeper import Sweeper
    from support.memory_kube import InMemoryKube

    class Reconciler:
        sweeps = 0
        ended = [{"metadata": {"uid": "u1"}}]  # a service of a namespace being deleted

        def sweep(self, acting) -> None:
            self.sweeps += 1

        def finish_deletes_in_ended_namespaces(self) -> list:
            done, self.ended = self.ended, []
            return done

        def ended_namespaces(self) -> list:
            return []

    now = datetime.datetime.now(datetime.UTC)
    kube = InMemoryKube()
    peering = {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering",
               "metadata": {"name": "imagegen"},
               "status": {"a": {"priority": 100, "lifetime": 60, "lastseen": now.isoformat()},
                          "b": {"priority": 200, "lifetime": 60, "lastseen": now.isoformat()}}}
    kube.put(peering)
    monkeypatch.setenv("POD_ID", "a")
    reconciler = Reconciler()
    metrics.LEADING.set(-1)  # not yet said
    finalized, stood_down = [], []
    sweeper = Sweeper(reconciler, kube, every_s=0.02, peering="imagegen", priority=100,
                      lead_check_s=0.01, finalized=finalized.append,
                      stood_down=lambda: stood_down.append(True)).start()
    try:
        deadline = time.monotonic() + 5
        while metrics.LEADING._value.get() == -1 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)  # sweeps it would make, had it taken the lead: none
        assert metrics.LEADING._value.get() == 0 and reconciler.sweeps == 0  # b acts
        assert finalized == []
        del peering["status"]["b"]
        kube.put(peering)
        deadline = time.monotonic() + 5
        while reconciler.sweeps == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert metrics.LEADING._value.get() == 1 and reconciler.sweeps > 0
        wait_until = time.monotonic() + 5
        while not finalized and time.monotonic() < wait_until:
            time.sleep(0.01)
        assert finalized == ["u1"]  # its gauges and bookkeeping go with it
        assert stood_down == []
        peering["status"]["b"] = {"priority": 200, "lifetime": 60,
                                  "lastseen": datetime.datetime.now(datetime.UTC).isoformat()}
        kube.put(peering)  # b is back, and acts: a's per-service gauges are b's to say
        wait_until = time.monotonic() + 5
        while not stood_down and time.monotonic() < wait_until:
            time.sleep(0.01)
        assert stood_down == [True] and metrics.LEADING._value.get() == 0
    finally:
        sweeper.stop()


def test_an_operator_of_some_namespaces_reads_its_peering_where_it_lasts(monkeypatch) -> None:
    """The first namespace served may be the one being deleted: its peering, and the right
    to read it, go with it."""
    from imagegen_operator.sweeper import Sweeper
    from support.memory_kube import InMemoryKube

    class Reconciler:
        def ended_namespaces(self) -> list:
            return ["a"]

    seen = datetime.datetime.now(datetime.UTC).isoformat()
    kube = InMemoryKube()
    kube.put({"apiVersion": "kopf.dev/v1", "kind": "KopfPeering",
              "metadata": {"name": "imagegen", "namespace": "b"},
              "status": {"me": {"priority": 0, "lifetime": 60, "lastseen": seen}}})
    monkeypatch.setenv("POD_ID", "me")
    sweeper = Sweeper(Reconciler(), kube, every_s=0, peering="imagegen", namespaces=("a", "b"))
    assert sweeper.leading()


def test_a_fault_of_a_round_does_not_end_the_sweeps(monkeypatch) -> None:
    from imagegen_operator.sweeper import Sweeper

    class Reconciler:
        sweeps = 0

        def sweep(self, acting) -> None:
            self.sweeps += 1
            if self.sweeps == 1:
                raise KeyError("nodePools")  # an answer of a shape nobody expected

        def finish_deletes_in_ended_namespaces(self) -> list:
            raise KeyError("items")  # nor does this stop the sweeps

        def ended_namespaces(self) -> list:
            return []

    class Kube:
        reads = 0

        def list(self, api_version, kind, namespace=None):
            self.reads += 1
            if self.reads == 1:
                raise KeyError("items")
            seen = datetime.datetime.now(datetime.UTC).isoformat()
            return [{"metadata": {"name": "p"},
                     "status": {"me": {"priority": 0, "lifetime": 60, "lastseen": seen}}}]

    monkeypatch.delenv("POD_ID", raising=False)
    reconciler = Reconciler()
    sweeper = Sweeper(reconciler, Kube(), every_s=0.01, peering="p", lead_check_s=0.01).start()
    try:
        deadline = time.monotonic() + 5
        while reconciler.sweeps < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert reconciler.sweeps >= 3 and sweeper._thread.is_alive()
    finally:
        sweeper.stop()
