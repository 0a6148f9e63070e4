"""Which operator of a peering sweeps for unused node pools: the one kopf lets act."""

from __future__ import annotations

import datetime

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
