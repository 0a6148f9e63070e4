"""The node pool per provider: GKE API body, Config Connector object, KWOK nodes."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from imagegen_operator import api, gke
from imagegen_operator.planner import plan
from imagegen_operator.providers import render_pool
from imagegen_operator.render.nodepool import (
    NODE_SERVICE_ACCOUNT_ENV,
    create_node_pool_request,
    kwok_node_count,
    node_service_account,
    parse_cluster,
    render_config_connector_nodepool,
    render_gke_nodepool,
    render_kwok_nodes,
)

CLUSTER = "projects/demo-project/locations/us-central1/clusters/gpus"
BASE: dict[str, Any] = yaml.safe_load(
    f"""
apiVersion: imagegen.dev/v1alpha1
kind: ImageGenService
metadata: {{name: svc, namespace: team-a}}
spec:
  model: {{uri: gs://bucket/model, memoryGiB: 4}}
  gpu:
    type: nvidia-h100-80gb
    countPerNode: 2
    partitionSize: 1g.10gb
    sharing: {{strategy: TimeSharing, maxSharedClientsPerGpu: 2}}
  nodePool: {{provider: GKE, cluster: {CLUSTER}, spot: true, minNodes: 1, maxNodes: 3}}
  replicas: 30
"""
)


def resource(provider: str = "GKE", **gpu: Any) -> api.ImageGenService:
    body = copy.deepcopy(BASE)
    body["spec"]["nodePool"]["provider"] = provider
    if provider in ("Existing", "Local"):
        body["spec"]["nodePool"].pop("cluster")
    body["spec"]["gpu"].update(gpu)
    body["spec"]["gpu"] = {k: v for k, v in body["spec"]["gpu"].items() if v is not None}
    return api.parse(body)


def test_gke_nodepool_document_is_the_create_request() -> None:
    r = resource()
    doc = render_gke_nodepool(r, plan(r.spec))
    request = create_node_pool_request(doc)
    assert request["parent"] == CLUSTER
    pool = request["node_pool"]
    assert pool.name == "igs-h100x2-mig1g10gb-ts2-spot" == doc["metadata"]["name"]
    assert pool.config.machine_type == "a3-highgpu-2g"
    assert pool.config.spot is True
    [acc] = pool.config.accelerators
    assert (acc.accelerator_type, acc.accelerator_count) == ("nvidia-h100-80gb", 2)
    assert acc.gpu_partition_size == "1g.10gb"
    assert acc.gpu_sharing_config.gpu_sharing_strategy.name == "TIME_SHARING"
    assert acc.gpu_sharing_config.max_shared_clients_per_gpu == 2
    assert acc.gpu_driver_installation_config.gpu_driver_version.name == "LATEST"
    auto = pool.autoscaling
    assert (auto.enabled, auto.total_min_node_count, auto.total_max_node_count) == (True, 1, 3)
    assert auto.location_policy.name == "ANY"


def flex_start(provider: str = "GKE") -> api.ImageGenService:
    body = copy.deepcopy(BASE)
    body["spec"]["nodePool"] |= {"provider": provider, "spot": False, "flexStart": True}
    if provider == "Local":
        body["spec"]["nodePool"].pop("cluster")
    return api.parse(body)


def test_a_flex_start_pool_is_made_as_gke_documents_it() -> None:
    r = flex_start()
    p = plan(r.spec)
    assert p.workable and p.nodepool_name == "igs-h100x2-mig1g10gb-ts2-flex"
    pool = create_node_pool_request(render_gke_nodepool(r, p))["node_pool"]
    assert (pool.config.flex_start, pool.config.spot) == (True, False)
    assert pool.config.reservation_affinity.consume_reservation_type.name == "NO_RESERVATION"
    assert pool.management.auto_repair is False and pool.management.auto_upgrade is True
    assert pool.initial_node_count == 0  # it starts empty, even in a zonal cluster
    auto = pool.autoscaling
    assert (auto.enabled, auto.total_min_node_count, auto.location_policy.name) == (
        True, 1, "ANY")
    # Its pods ask for Flex-start nodes, and the simulated ones carry GKE's label.
    from imagegen_operator.render.deployment import nodeselector

    assert nodeselector(p, "GKE")["cloud.google.com/gke-flex-start"] == "true"
    assert "cloud.google.com/gke-spot" not in nodeselector(p, "GKE")
    local = flex_start("Local")
    [node, *_] = render_kwok_nodes(local, plan(local.spec))
    assert node["metadata"]["labels"]["cloud.google.com/gke-flex-start"] == "true"
    # Not asked for: no such label anywhere.
    plain = resource()
    assert "flexStart" not in render_gke_nodepool(plain, plan(plain.spec))["spec"]["config"]


def test_gke_document_fails_on_a_field_the_client_does_not_know() -> None:
    r = resource()
    doc = render_gke_nodepool(r, plan(r.spec))
    doc["spec"]["config"]["gpuCount"] = 2
    with pytest.raises(Exception, match="gpuCount"):
        create_node_pool_request(doc)


def test_exclusive_pool_has_no_partition_or_sharing() -> None:
    r = resource(partitionSize=None, sharing=None)
    [acc] = render_gke_nodepool(r, plan(r.spec))["spec"]["config"]["accelerators"]
    assert "gpuPartitionSize" not in acc and "gpuSharingConfig" not in acc


NODE_SA = "gpu-nodes@demo-project.iam.gserviceaccount.com"


def test_the_nodes_run_as_the_configured_service_account(monkeypatch) -> None:
    r = resource()
    gke_body, cc_body = (render_gke_nodepool(r, plan(r.spec)),
                         render_config_connector_nodepool(r, plan(r.spec)))
    assert "serviceAccount" not in gke_body["spec"]["config"]  # GKE's default
    assert "serviceAccountRef" not in cc_body["spec"]["nodeConfig"]
    monkeypatch.setenv(NODE_SERVICE_ACCOUNT_ENV, NODE_SA)
    pool = create_node_pool_request(render_gke_nodepool(r, plan(r.spec)))["node_pool"]
    assert pool.config.service_account == NODE_SA
    assert list(pool.config.oauth_scopes) == ["https://www.googleapis.com/auth/cloud-platform"]
    node_config = render_config_connector_nodepool(r, plan(r.spec))["spec"]["nodeConfig"]
    assert node_config["serviceAccountRef"] == {"external": NODE_SA}
    assert node_config["oauthScopes"] == ["https://www.googleapis.com/auth/cloud-platform"]
    monkeypatch.setenv(NODE_SERVICE_ACCOUNT_ENV, "gpu-nodes")
    with pytest.raises(ValueError, match=NODE_SERVICE_ACCOUNT_ENV):
        node_service_account()


def test_config_connector_nodepool() -> None:
    r = resource("ConfigConnector", sharing={"strategy": "MPS", "maxSharedClientsPerGpu": 3})
    pool = render_config_connector_nodepool(r, plan(r.spec))
    assert (pool["apiVersion"], pool["kind"]) == (
        "container.cnrm.cloud.google.com/v1beta1",
        "ContainerNodePool",
    )
    assert pool["metadata"]["annotations"]["cnrm.cloud.google.com/project-id"] == "demo-project"
    spec = pool["spec"]
    assert spec["location"] == "us-central1" and spec["clusterRef"] == {"external": CLUSTER}
    assert spec["autoscaling"]["totalMinNodeCount"] == 1
    assert spec["autoscaling"]["totalMaxNodeCount"] == 3
    [acc] = spec["nodeConfig"]["guestAccelerator"]
    assert acc == {
        "type": "nvidia-h100-80gb",
        "count": 2,
        "gpuPartitionSize": "1g.10gb",
        "gpuSharingConfig": {"gpuSharingStrategy": "MPS", "maxSharedClientsPerGpu": 3},
        "gpuDriverInstallationConfig": {"gpuDriverVersion": "LATEST"},
    }
    assert spec["nodeConfig"]["spot"] is True


def zoned(provider: str, zones: list[str], cluster: str = CLUSTER,
          min_nodes: int = 1) -> api.ImageGenService:
    body = copy.deepcopy(BASE)
    body["spec"]["nodePool"] |= {"provider": provider, "locations": zones, "minNodes": min_nodes}
    if provider in ("Existing", "Local"):
        body["spec"]["nodePool"].pop("cluster")
    else:
        body["spec"]["nodePool"]["cluster"] = cluster
    return api.parse(body)


def test_the_spec_s_zones_make_the_pool_s_everywhere() -> None:
    zones = ["us-central1-a", "us-central1-c"]
    gke_pool = zoned("GKE", zones)
    p = plan(gke_pool.spec)
    request = create_node_pool_request(render_gke_nodepool(gke_pool, p))["node_pool"]
    assert list(request.locations) == zones
    # GKE starts initialNodeCount nodes in each zone: two zones start empty (the
    # autoscaler adds what the pods need), one zone at the minimum, even in a regional cluster.
    assert request.initial_node_count == 0
    one_zone = zoned("GKE", ["us-central1-a"], min_nodes=2)
    assert create_node_pool_request(render_gke_nodepool(
        one_zone, plan(one_zone.spec)))["node_pool"].initial_node_count == 2
    cc = zoned("ConfigConnector", zones)
    spec = render_config_connector_nodepool(cc, plan(cc.spec))["spec"]
    assert spec["nodeLocations"] == zones and spec["initialNodeCount"] == 0
    # Simulated nodes take the zones in turn, labelled as GKE labels a node's zone.
    local = zoned("Local", zones)
    labels = [n["metadata"]["labels"] for n in render_kwok_nodes(local, plan(local.spec))]
    assert [(x["topology.kubernetes.io/zone"], x["topology.kubernetes.io/region"])
            for x in labels] == [("us-central1-a", "us-central1"), ("us-central1-c", "us-central1")]
    # Not asked for: none of it.
    plain = resource()
    assert "locations" not in render_gke_nodepool(plain, plan(plain.spec))["spec"]
    assert all("topology.kubernetes.io/zone" not in n["metadata"]["labels"]
               for n in render_kwok_nodes(resource("Local"), plan(resource("Local").spec)))


def test_the_pods_are_kept_to_the_spec_s_zones_with_every_provider() -> None:
    from imagegen_operator.providers.existing import takes_pods_of
    from imagegen_operator.render.deployment import render_deployment

    zones = ["us-central1-a", "us-central1-c"]
    for provider in ("GKE", "ConfigConnector", "Existing", "Local"):
        r = zoned(provider, zones)
        terms = render_deployment(r, plan(r.spec))["spec"]["template"]["spec"]["affinity"][
            "nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        assert {"key": "topology.kubernetes.io/zone", "operator": "In", "values": zones} in (
            terms[0]["matchExpressions"]), provider
    plain = resource()
    pod = render_deployment(plain, plan(plain.spec))["spec"]["template"]["spec"]
    assert "topology.kubernetes.io/zone" not in str(pod.get("affinity"))
    # An Existing service counts only the nodes of its zones as its pool's.
    existing = zoned("Existing", zones)
    p = plan(existing.spec)

    def node(zone: str) -> dict[str, Any]:
        return {"metadata": {"labels": {"topology.kubernetes.io/zone": zone}}, "spec": {}}

    assert takes_pods_of(node("us-central1-c"), p)
    assert not takes_pods_of(node("us-central1-b"), p)


def test_a_pool_with_more_pods_a_node_than_gkes_default_is_made_for_them() -> None:
    # 8 GPUs x 7 slices x 2 clients: 112 serving pods a node, past the 110 GKE's default
    # allows with its own pods.
    crowded = {"countPerNode": 8}
    r = resource(**crowded)
    request = create_node_pool_request(render_gke_nodepool(r, plan(r.spec)))["node_pool"]
    # 122 rounded up to the power of two whose pod addresses (twice that) 110 takes anyway.
    assert request.max_pods_constraint.max_pods_per_node == 128
    cc = resource("ConfigConnector", **crowded)
    assert render_config_connector_nodepool(cc, plan(cc.spec))["spec"]["maxPodsPerNode"] == 128
    local = resource("Local", **crowded)
    [node, *_] = render_kwok_nodes(local, plan(local.spec))
    assert node["status"]["allocatable"]["pods"] == "128"
    # Within GKE's default, the default, set all the same: a cluster's own may be lower.
    few = resource()  # 2 x 7 x 2 = 28
    request = create_node_pool_request(render_gke_nodepool(few, plan(few.spec)))["node_pool"]
    assert request.max_pods_constraint.max_pods_per_node == 110
    assert render_config_connector_nodepool(
        resource("ConfigConnector"), plan(resource("ConfigConnector").spec))["spec"][
            "maxPodsPerNode"] == 110
    [node, *_] = render_kwok_nodes(resource("Local"), plan(resource("Local").spec))
    assert node["status"]["allocatable"]["pods"] == str(gke.DEFAULT_MAX_PODS_PER_NODE)


def test_kwok_nodes_look_like_the_gke_pool() -> None:
    r = resource("Local")
    p = plan(r.spec)
    nodes = render_kwok_nodes(r, p)
    # 30 replicas at 28 slots per node need 2 nodes (within minNodes 1..maxNodes 3).
    assert [n["metadata"]["name"] for n in nodes] == [
        "igs-h100x2-mig1g10gb-ts2-spot-0",
        "igs-h100x2-mig1g10gb-ts2-spot-1",
    ]
    node = nodes[0]
    labels = node["metadata"]["labels"]
    assert labels["cloud.google.com/gke-accelerator"] == "nvidia-h100-80gb"
    assert labels["cloud.google.com/gke-gpu-partition-size"] == "1g.10gb"
    assert labels["cloud.google.com/gke-gpu-sharing-strategy"] == "time-sharing"
    assert labels["cloud.google.com/gke-max-shared-clients-per-gpu"] == "2"
    assert labels["cloud.google.com/gke-nodepool"] == p.nodepool_name
    assert node["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake"
    # GKE's GPU taint, and the one that keeps pods of non-Local services off.
    assert node["spec"]["taints"] == [
        {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"},
        {"key": "imagegen.dev/simulated", "value": "true", "effect": "NoSchedule"},
    ]
    # partitions x clients x GPUs = 7 x 2 x 2
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "28"
    # The machine's CPU and memory, less what GKE reserves (a3-highgpu-2g: 52 vCPUs, 468 GB).
    cpu, memory = gke.node_allocatable(p.machine_type)
    assert node["status"]["allocatable"]["cpu"] == f"{int(cpu * 1000)}m"
    assert node["status"]["allocatable"]["memory"] == f"{int(memory * 1024)}Mi"
    assert node["status"]["capacity"]["cpu"] == "52" and cpu < 52


@pytest.mark.parametrize("replicas, count", [(0, 1), (1, 1), (29, 2), (500, 3)])
def test_kwok_node_count_stays_within_min_and_max(replicas: int, count: int) -> None:
    body = copy.deepcopy(BASE)
    body["spec"]["nodePool"] = {"provider": "Local", "minNodes": 1, "maxNodes": 3}
    body["spec"]["replicas"] = replicas
    r = api.parse(body)
    assert kwok_node_count(r, plan(r.spec)) == count == len(render_kwok_nodes(r, plan(r.spec)))


@pytest.mark.parametrize(
    "provider, kinds",
    [
        ("GKE", ["NodePool"]),
        ("ConfigConnector", ["ContainerNodePool"]),
        ("Local", ["Node", "Node"]),
        ("Existing", []),
    ],
)
def test_render_nodepool_per_provider(provider: str, kinds: list[str]) -> None:
    r = resource(provider)
    assert [o["kind"] for o in render_pool(r, plan(r.spec))] == kinds


def test_parse_cluster() -> None:
    assert parse_cluster(CLUSTER) == ("demo-project", "us-central1", "gpus")
    with pytest.raises(ValueError, match="spec.nodePool.cluster"):
        parse_cluster("gpus")
