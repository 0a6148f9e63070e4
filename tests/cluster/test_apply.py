"""The operator's apply against the real API server: server-side apply and the digest."""

from __future__ import annotations

import pytest
from kubernetes import client, config

from imagegen_operator.kube import APPLIED_DIGEST, Kube, with_default_timeout

pytestmark = pytest.mark.cluster


def kube_of(cluster) -> Kube:
    """A Kube of its own: as an operator process that starts afresh."""
    configuration = client.Configuration()
    config.load_kube_config(config_file=str(cluster.kubeconfig),
                            client_configuration=configuration)
    return Kube(with_default_timeout(client.ApiClient(configuration)))


def test_a_field_a_new_render_leaves_out_goes_from_the_live_object(cluster):
    """A render that only drops a field is a subset of the live object: the digest tells
    them apart, so the apply is written and server-side apply removes the field, even by
    a process that never applied the object before (a restart, a new leader)."""
    def config_map(data: dict) -> dict:
        return {"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "digest-check", "namespace": "default"}, "data": data}

    first = kube_of(cluster)
    try:
        applied = first.apply(config_map({"a": "1", "b": "2"}), digest=True)
        assert applied["metadata"]["annotations"][APPLIED_DIGEST]
        restarted = kube_of(cluster)
        # The comparison alone takes the superset as done: b would stay for good.
        kept = restarted.apply(config_map({"a": "1"}))
        assert kept["data"] == {"a": "1", "b": "2"} and restarted.writes == 0
        live = restarted.apply(config_map({"a": "1"}), digest=True)
        assert live["data"] == {"a": "1"}
        assert restarted.writes == 1
        again = restarted.apply(config_map({"a": "1"}), digest=True)  # steady: no write
        assert restarted.writes == 1 and again["data"] == {"a": "1"}
    finally:
        cluster.kubectl("delete", "configmap", "digest-check", "-n", "default",
                        "--ignore-not-found", check=False, timeout=30)
