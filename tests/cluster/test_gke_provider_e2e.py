"""The operator with the GKE provider, against a local test double of GKE's REST API.

GKE itself cannot be reached from here; the double (tests/support/fake_gke.py)
follows GKE's documented node-pool REST contract: long-running operations,
quota errors, deletion. What is real: the operator process, its Google client
library, the API server and the status it writes.
"""

from __future__ import annotations

import time

import pytest

from support.fake_gke import GkeApiTestDouble
from support.kube import apply, eventually, get_json
from support.operator_process import OperatorProcess

pytestmark = pytest.mark.cluster

CLUSTER = "projects/imagegen-test/locations/us-central1/clusters/serving"


@pytest.fixture(scope="module")
def gke_api():
    with GkeApiTestDouble(polls_to_done=2) as double:
        yield double


@pytest.fixture(scope="module")
def gke_operator(cluster, crd, gke_api, tmp_path_factory):
    proc = OperatorProcess(
        cluster, tmp_path_factory.mktemp("gke-operator") / "operator.log",
        env={"IMAGEGEN_GKE_API_ENDPOINT": f"http://{gke_api.host}"},
    ).start()
    yield proc
    proc.stop()
    print(proc.log())


def pool_condition(cluster, ns: str, name: str) -> dict | None:
    body = get_json(cluster, "igs", name, "-n", ns)
    return next((c for c in (body.get("status") or {}).get("conditions", [])
                 if c["type"] == "NodePoolReady"), None)


def test_quota_error_is_a_condition_then_the_pool_is_created_and_deleted(
        cluster, gke_api, gke_operator):
    ns = "e2e-gke"
    apply(cluster, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    for _ in range(4):
        gke_api.quota_error_next()
    apply(cluster, {
        "apiVersion": "imagegen.dev/v1alpha1", "kind": "ImageGenService",
        "metadata": {"name": "on-gke", "namespace": ns},
        "spec": {
            "model": {"uri": "gs://models/sdxl", "family": "SDXL", "memoryGiB": 4},
            "gpu": {"type": "nvidia-h100-80gb", "partitionSize": "1g.10gb",
                    "sharing": {"strategy": "TimeSharing", "maxSharedClientsPerGpu": 2}},
            "nodePool": {"provider": "GKE", "cluster": CLUSTER, "spot": True, "maxNodes": 2},
            "replicas": 3,
        },
    })

    def quota_reported():
        cond = pool_condition(cluster, ns, "on-gke")
        return cond if cond and cond["reason"] == "QuotaExceeded" else None

    cond = eventually(quota_reported, timeout=30, interval=0.1, what="QuotaExceeded condition")
    assert cond["status"] == "False"
    assert "quota" in cond["message"].lower()

    # The injected errors run out: the next reconcile creates the pool once and
    # polls its operation until GKE reports it RUNNING.
    def pool_ready():
        cond = pool_condition(cluster, ns, "on-gke")
        return cond if cond and cond["status"] == "True" else None

    eventually(pool_ready, timeout=60, what="NodePoolReady=True")
    creates = gke_api.requests_to("POST", "/nodePools")
    bodies = [r.body for r in creates]
    accelerator = bodies[-1]["nodePool"]["config"]["accelerators"][0]
    assert accelerator["gpuPartitionSize"] == "1g.10gb"
    assert accelerator["gpuSharingConfig"]["gpuSharingStrategy"] in ("TIME_SHARING", 1)
    assert bodies[-1]["nodePool"]["config"]["spot"] is True
    assert len(gke_api.pools) == 1
    # The serving Deployment exists meanwhile: GKE's autoscaler adds nodes for its pods.
    deployment = get_json(cluster, "deployment", "on-gke", "-n", ns)
    assert deployment["spec"]["replicas"] == 3

    cluster.kubectl("delete", "igs", "on-gke", "-n", ns, "--wait=true", "--timeout=60s")
    # The finalizer held the object until the last user's pool was deleted in GKE.
    assert not gke_api.pools
    assert len(gke_api.requests_to("DELETE")) >= 1
    time.sleep(0.5)
    assert len(gke_api.requests_to("POST", "/nodePools")) == len(creates)
