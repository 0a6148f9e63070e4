"""The operator with the GKE provider, against a local test double of GKE's REST API.

GKE itself cannot be reached from here; the double (tests/support/fake_gke.py)
follows GKE's documented node-pool REST contract: long-running operations,
quota errors, deletion. What is real: the operator process, its Google client
library, the API server and the status it writes.
"""

from __future__ import annotations

import time

import pytest

from imagegen_operator.handlers import POOL_POLL_SECONDS
from support.fake_gke import GkeApiTestDouble
from support.kube import apply, delete_services, eventually, get_json
from support.operator_process import OperatorProcess

pytestmark = pytest.mark.cluster

QUOTA_ERRORS = 4
NS = "e2e-gke"
CLUSTER = "projects/imagegen-test/locations/us-central1/clusters/serving"


@pytest.fixture(scope="module")
def gke_api():
    with GkeApiTestDouble(polls_to_done=2) as double:
        yield double


@pytest.fixture(scope="module")
def gke_operator(cluster, crd, gke_api, tmp_path_factory):
    proc = OperatorProcess(
        cluster, tmp_path_factory.mktemp("gke-operator") / "operator.log",
        # Its own namespace only: other tests leave GKE-provider services behind
        # (their API-validation examples) that must not reach this double.
        env={"IMAGEGEN_GKE_API_ENDPOINT": f"http://{gke_api.host}",
             "IMAGEGEN_OPERATOR_NAMESPACES": NS,
             # A refused create is held this long before it is sent again (5 min by default).
             "IMAGEGEN_GKE_FAILED_CREATE_HOLD_S": "1"},
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
    ns = NS
    apply(cluster, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    for _ in range(QUOTA_ERRORS):
        gke_api.quota_error_next()
    apply(cluster, {
        "apiVersion": "imagegen.dev/v1alpha1", "kind": "ImageGenService",
        "metadata": {"name": "on-gke", "namespace": ns},
        "spec": {
            "model": {"uri": "gs://models/sdxl", "family": "SDXL", "memoryGiB": 4},
            # A config no other test uses, so the pool is this service's alone.
            "gpu": {"type": "nvidia-h200-141gb", "countPerNode": 8, "partitionSize": "1g.18gb",
                    "sharing": {"strategy": "TimeSharing", "maxSharedClientsPerGpu": 2}},
            "nodePool": {"provider": "GKE", "cluster": CLUSTER, "spot": True, "maxNodes": 2},
            "replicas": 3,
        },
    })

    def quota_reported():
        # Both conditions from one read: the quota errors run out in a few seconds.
        conditions = {c["type"]: c for c in (get_json(cluster, "igs", "on-gke", "-n", ns)
                                              .get("status") or {}).get("conditions") or []}
        cond = conditions.get("NodePoolReady") or {}
        return conditions if cond.get("reason") == "QuotaExceeded" else None

    conditions = eventually(quota_reported, timeout=30, interval=0.1,
                            what="QuotaExceeded condition")
    cond = conditions["NodePoolReady"]
    assert cond["status"] == "False"
    assert "quota" in cond["message"].lower()
    # kstatus: waiting will not fix a quota, a person must.
    stalled = conditions["Stalled"]
    assert (stalled["status"], stalled["reason"]) == ("True", "QuotaExceeded")

    # The injected errors run out: the next reconcile creates the pool once and
    # polls its operation until GKE reports it RUNNING.
    def pool_ready():
        cond = pool_condition(cluster, ns, "on-gke")
        return cond if cond and cond["status"] == "True" else None

    eventually(pool_ready, timeout=60, what="NodePoolReady=True")
    # Other tests' services may use the double too (the operator watches the whole
    # cluster): look at this service's pool only.
    pool = get_json(cluster, "igs", "on-gke", "-n", ns)["status"]["nodePool"]["name"]
    creates = [r for r in gke_api.requests_to("POST", "/nodePools")
               if r.body["nodePool"]["name"] == pool]
    # Four refused for quota, then one accepted; none once the pool existed.
    assert len(creates) == QUOTA_ERRORS + 1
    request = creates[0].body["nodePool"]
    accelerator = request["config"]["accelerators"][0]
    assert accelerator["gpuPartitionSize"] == "1g.18gb"
    assert request["config"]["machineType"] == "a3-ultragpu-8g"
    assert accelerator["gpuSharingConfig"]["gpuSharingStrategy"] in ("TIME_SHARING", 1)
    assert request["config"]["spot"] is True
    assert [name for name in gke_api.pools if name.endswith("/" + pool)]
    # The serving Deployment exists meanwhile: GKE's autoscaler adds nodes for its pods.
    deployment = get_json(cluster, "deployment", "on-gke", "-n", ns)
    assert deployment["spec"]["replicas"] == 3

    delete_services(cluster, gke_operator, ns, "on-gke")
    # The finalizer held the object until its pool was deleted in GKE.
    assert not [name for name in gke_api.pools if name.endswith("/" + pool)]
    assert [r for r in gke_api.requests_to("DELETE") if r.path.endswith("/" + pool)]
    time.sleep(2.5)  # past two resyncs (1 s): a reconcile still under way would have posted
    assert len([r for r in gke_api.requests_to("POST", "/nodePools")
                if r.body["nodePool"]["name"] == pool]) == QUOTA_ERRORS + 1


def test_a_pool_on_its_way_is_polled_sooner_than_the_resync(cluster, crd, tmp_path):
    """Nothing in Kubernetes says when a GKE operation ends: the operator looks again
    every few seconds while the pool is on its way, not once a resync period."""
    ns = "e2e-gke-poll"
    apply(cluster, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    with GkeApiTestDouble(polls_to_done=6) as gke_api:
        proc = OperatorProcess(
            cluster, tmp_path / "operator.log", resync_seconds=600,
            env={"IMAGEGEN_GKE_API_ENDPOINT": f"http://{gke_api.host}",
                 "IMAGEGEN_OPERATOR_NAMESPACES": ns},
        ).start()
        try:
            apply(cluster, {
                "apiVersion": "imagegen.dev/v1alpha1", "kind": "ImageGenService",
                "metadata": {"name": "polled", "namespace": ns},
                "spec": {
                    "model": {"uri": "gs://models/sd15", "family": "SD15", "memoryGiB": 4},
                    "gpu": {"type": "nvidia-l4"},
                    "nodePool": {"provider": "GKE", "cluster": CLUSTER, "maxNodes": 1},
                    "replicas": 0,  # no pods, so no Deployment events to wake the operator
                },
            })

            def pool_ready():
                cond = pool_condition(cluster, ns, "polled")
                return cond if cond and cond["status"] == "True" else None

            def reads() -> list[str]:
                return [r.path for r in gke_api.requests if r.method == "GET"]

            eventually(pool_ready, timeout=90, what="NodePoolReady=True well before the resync")
            polls = [p for p in reads() if "/operations/" in p]
            assert len(polls) >= 3, reads()
            # Once Ready, the polling stops: GKE is not asked again, for two poll periods.
            seen = len(reads())
            time.sleep(2 * POOL_POLL_SECONDS + 1)
            assert len(reads()) == seen, reads()[seen:]
            gke_api.polls_to_done = 1  # a quick deletion: it is not what this test is about
            delete_services(cluster, proc, ns, "polled")
        finally:
            proc.stop()
