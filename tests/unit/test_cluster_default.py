"""The operator's own cluster, the default of spec.nodePool.cluster."""

from __future__ import annotations

import pytest

from imagegen_operator.cluster_default import ClusterDefault
from support.clock import FakeClock
from support.fake_metadata import MetadataServerTestDouble
from support.kube import free_port_refusing

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


def test_without_either_there_is_no_default_and_it_is_asked_again_later() -> None:
    clock = FakeClock(0.0)
    default = ClusterDefault({"GCE_METADATA_HOST": free_port_refusing()}, clock=clock)
    assert default() is None
    clock.now += 10
    assert default() is None  # not asked again so soon
    with MetadataServerTestDouble("my-project", "us-central1", "serving") as metadata:
        default._metadata_host = metadata.host  # the same process, now on GKE
        assert default() is None and metadata.requests == []
        clock.now += 301
        assert default() == CLUSTER
