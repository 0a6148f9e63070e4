"""The real scheduler places serving pods on the right shared-GPU nodes.

Two fake L4 nodes share their GPU differently (time-sharing and MPS, two
clients each). Pods that select GKE's time-sharing labels must land on the
time-sharing node only, and once its two slots are taken the next replica
must stay Pending for want of nvidia.com/gpu.
"""

from __future__ import annotations

import pytest

from imagegen_operator import gke
from support.gpu_nodes import fake_gpu_node
from support.kube import apply, eventually, get_json

pytestmark = pytest.mark.cluster

NS = "sched"


def serving_deployment(replicas: int) -> dict:
    selector = {
        gke.LABEL_ACCELERATOR: "nvidia-l4",
        gke.LABEL_SHARING_STRATEGY: gke.SHARING_LABEL_TIME_SHARING,
        gke.LABEL_MAX_SHARED_CLIENTS: "2",
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "server", "namespace": NS},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "server"}},
            "template": {
                "metadata": {"labels": {"app": "server"}},
                "spec": {
                    "nodeSelector": selector,
                    "tolerations": [{
                        "key": gke.GPU_TAINT_KEY, "operator": "Exists",
                        "effect": gke.GPU_TAINT_EFFECT,
                    }],
                    "containers": [{
                        "name": "server",
                        "image": "registry.invalid/imagegen-server:test",
                        "resources": {"limits": {gke.GPU_RESOURCE: "1"}},
                    }],
                },
            },
        },
    }


def pods(cluster) -> list[dict]:
    return get_json(cluster, "pods", "-n", NS, "-l", "app=server")["items"]


@pytest.fixture
def two_l4_nodes(cluster):
    apply(
        cluster,
        fake_gpu_node("l4-ts", "nvidia-l4", strategy="TimeSharing", clients=2),
        fake_gpu_node("l4-mps", "nvidia-l4", strategy="MPS", clients=2),
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}},
    )
    yield
    cluster.kubectl("delete", "namespace", NS, "--wait=false")
    cluster.kubectl("delete", "node", "l4-ts", "l4-mps")


def test_time_shared_pods_land_on_matching_node_and_overflow_stays_pending(
        cluster, two_l4_nodes):
    node = eventually(
        lambda: get_json(cluster, "node", "l4-ts")["status"].get("allocatable"),
        what="l4-ts registered",
    )
    assert node[gke.GPU_RESOURCE] == "2"
    eventually(
        lambda: all(
            any(c["type"] == "Ready" and c["status"] == "True"
                for c in get_json(cluster, "node", n)["status"].get("conditions", []))
            for n in ("l4-ts", "l4-mps")
        ),
        what="KWOK marks the fake nodes Ready",
    )

    apply(cluster, serving_deployment(2))

    def running():
        items = pods(cluster)
        ok = [p for p in items if p["status"].get("phase") == "Running"]
        return ok if len(ok) == 2 else None

    placed = eventually(running, timeout=90, what="two pods Running")
    assert {p["spec"]["nodeName"] for p in placed} == {"l4-ts"}

    apply(cluster, serving_deployment(3))

    def pending_with_reason():
        for p in pods(cluster):
            for cond in p["status"].get("conditions", []):
                if cond["type"] == "PodScheduled" and cond.get("reason") == "Unschedulable":
                    return p, cond
        return None

    pod, cond = eventually(pending_with_reason, timeout=90, what="third pod unschedulable")
    assert pod["status"]["phase"] == "Pending"
    assert "nodeName" not in pod["spec"]
    # The scheduler names both reasons: the time-sharing node is full and the
    # MPS node does not match the pod's node selector.
    assert "Insufficient nvidia.com/gpu" in cond["message"], cond["message"]
    assert "didn't match Pod's node affinity/selector" in cond["message"], cond["message"]
    assert len([p for p in pods(cluster) if p["status"].get("phase") == "Running"]) == 2


# --- pods stay on their own pool --------------------------------------------------------

STRAY_NS = "stray"


def local_service(name: str, spot: bool):
    from imagegen_operator import api

    return api.parse({
        "apiVersion": api.API_VERSION, "kind": api.KIND,
        "metadata": {"name": name, "namespace": STRAY_NS},
        "spec": {
            "model": {"uri": "gs://bucket/sd15", "family": "SD15", "memoryGiB": 4},
            "gpu": {"type": "nvidia-l4", "sharing": {"strategy": "MPS",
                                                     "maxSharedClientsPerGpu": 4}},
            "nodePool": {"provider": "Local", "spot": spot, "maxNodes": 1},
            "replicas": 1,
        },
    })


def test_a_spot_service_never_lands_on_another_pools_on_demand_node(cluster):
    """Same GPUs, same sharing: only the pool name and Spot tell the two pools apart."""
    from imagegen_operator.planner import plan
    from imagegen_operator.render.deployment import render_deployment
    from imagegen_operator.render.nodepool import render_kwok_nodes

    on_demand, spot = local_service("on-demand", False), local_service("spot", True)
    on_demand_plan, spot_plan = plan(on_demand.spec), plan(spot.spec)
    assert on_demand_plan.nodepool_name != spot_plan.nodepool_name
    other_pool = render_kwok_nodes(on_demand, on_demand_plan)
    apply(cluster, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": STRAY_NS}},
          *other_pool)
    try:
        apply(cluster, render_deployment(spot, spot_plan))

        def unschedulable():
            for p in get_json(cluster, "pods", "-n", STRAY_NS)["items"]:
                for cond in p["status"].get("conditions", []):
                    if cond["type"] == "PodScheduled" and cond.get("reason") == "Unschedulable":
                        return p
            return None

        # Free GPU slots of the right kind are there, on the other pool: still Pending.
        pod = eventually(unschedulable, timeout=90, what="the spot pod unschedulable")
        assert "nodeName" not in pod["spec"]

        own_pool = render_kwok_nodes(spot, spot_plan)
        apply(cluster, *own_pool)

        def placed():
            for p in get_json(cluster, "pods", "-n", STRAY_NS)["items"]:
                if p["spec"].get("nodeName"):
                    return p["spec"]["nodeName"]
            return None

        node = eventually(placed, timeout=90, what="the spot pod scheduled")
        assert node in {n["metadata"]["name"] for n in own_pool}
    finally:
        cluster.kubectl("delete", "namespace", STRAY_NS, "--wait=false")
        names = [n["metadata"]["name"] for n in other_pool + render_kwok_nodes(spot, spot_plan)]
        cluster.kubectl("delete", "node", *names, "--ignore-not-found")
