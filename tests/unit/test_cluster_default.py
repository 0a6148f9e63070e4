"""The operator's own cluster, the default of spec.nodePool.cluster."""

from __future__ import annotations

import pytest

from imagegen_operator.cluster_default import ClusterDefault
from support.clock import FakeClock
from support.fake_metadata import MetadataServerTestDouble
from support.kube import free_port_refusing
from support.not_gke_metadata import not_gke_metadata

CLUSTER = "projects/my-project/locations/us-central1/clusters/serving"


def test_the_chart_value_wins_and_asks_no_metadata_server() -> None:
    with MetadataServerTestDouble("other-project", "europe-west4", "other") as metadata:
        default = ClusterDefault({"IMAGEGEN_GKE_CLUSTER": CLUSTER,
                                  "GCE_METADATA_HOST": metadata.host})
        assert default() == CLUSTER
        assert metadata.requests == []


def test_a_bad_chart_value_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="IMAGEGEN_GKE_CLUSTER"):
        ClusterDefault({"IMAGEGEN_GKE_CLUSTER": "serving"})


def test_on_gke_the_metadata_server_names_the_cluster_once() -> None:
    with MetadataServerTestDouble("my-project", "us-central1", "serving") as metadata:
        default = ClusterDefault({"GCE_METADATA_HOST": metadata.host})
        assert default() == CLUSTER
        asked = len(metadata.requests)
        assert asked == 3
        assert default() == CLUSTER
        assert len(metadata.requests) == asked  # remembered


def test_without_either_there_is_no_default_and_it_is_asked_again_less_and_less_often():
    clock, slept = FakeClock(0.0), []
    with not_gke_metadata() as vm:
        default = ClusterDefault({"GCE_METADATA_HOST": vm.host}, clock=clock,
                                 sleep=slept.append)
        assert default() is None
    assert slept == []  # no cluster here: off GKE, not worth a second try
    assert not default.pending  # a spec's cluster is taken as it is
    with MetadataServerTestDouble("my-project", "us-central1", "serving") as metadata:
        default._metadata_host = metadata.host  # the same process, now on GKE
        metadata.unavailable_for = 10**6
        asked_at = []
        for _ in range(700):
            before = len(metadata.requests)
            assert default() is None
            if len(metadata.requests) > before:
                asked_at.append(clock.now)
            clock.now += 1
        # One read per try (the first of three fails), after 5 s, 10 s, 20 s ... 300 s.
        assert asked_at == [5, 15, 35, 75, 155, 315, 615]
        metadata.unavailable_for = 0
        clock.now = 615 + 300
        assert default() == CLUSTER


def test_a_metadata_server_still_starting_names_the_cluster_at_the_first_lookup() -> None:
    with MetadataServerTestDouble("my-project", "us-central1", "serving") as metadata:
        metadata.unavailable_for = 2
        slept = []
        default = ClusterDefault({"GCE_METADATA_HOST": metadata.host}, sleep=slept.append)
        assert default() == CLUSTER
        assert slept == [1.0, 1.0]


def test_a_metadata_server_that_is_named_but_silent_leaves_the_cluster_pending() -> None:
    """Refused or timed out (on GKE, not started yet, or kept out by a NetworkPolicy): not
    known, so a service naming a cluster waits rather than being taken at its word."""
    default = ClusterDefault({"GCE_METADATA_HOST": free_port_refusing()},
                             sleep=lambda _: None)
    assert default() is None and default.pending


def test_a_metadata_host_that_does_not_resolve_is_off_gke(monkeypatch) -> None:
    import socket
    import urllib.error
    import urllib.request

    def unresolvable(*_args, **_kwargs):
        # As urlopen fails where the name is unknown (a stand-in: no DNS lookup in tests).
        raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))

    monkeypatch.setattr(urllib.request, "urlopen", unresolvable)
    slept = []
    default = ClusterDefault({}, sleep=slept.append)
    assert default() is None and not default.pending and slept == []


def test_a_metadata_server_that_answers_with_errors_leaves_the_cluster_pending() -> None:
    """On GKE but not known yet: a service naming a cluster waits, rather than being taken
    at its word as off GKE (where nothing answers at all)."""
    clock = FakeClock(0.0)
    with MetadataServerTestDouble("my-project", "us-central1", "serving") as metadata:
        metadata.unavailable_for = 10**6
        default = ClusterDefault({"GCE_METADATA_HOST": metadata.host}, clock=clock,
                                 sleep=lambda _: None)
        assert default() is None and default.pending
        metadata.unavailable_for = 0
        clock.now += 5
        assert default() == CLUSTER and not default.pending


def test_a_lookup_failing_for_days_keeps_its_pace() -> None:
    clock = FakeClock(0.0)
    with not_gke_metadata() as vm:
        default = ClusterDefault({"GCE_METADATA_HOST": vm.host}, clock=clock,
                                 sleep=lambda _: None)
        default._failures = 2000  # days of failed lookups, one each 300 s
        clock.now = 10**6
        assert default() is None
        assert default._next_try == 10**6 + 300
