"""Property tests: for any valid GPU config, the capacity math agrees with what is rendered."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from imagegen_operator import api, gke
from imagegen_operator.planner import (
    PoolTooSmall,
    TooManyPodsPerNode,
    default_nodepool_name,
    plan,
)
from imagegen_operator.render.deployment import render_deployment
from imagegen_operator.render.nodepool import render_kwok_nodes


@st.composite
def gpu_configs(draw) -> dict[str, Any]:
    gpu_type = draw(st.sampled_from(sorted(gke.ACCELERATORS)))
    gpu: dict[str, Any] = {
        "type": gpu_type,
        "countPerNode": draw(st.sampled_from(gke.GPU_COUNTS_PER_NODE)),
    }
    sizes = sorted(gke.mig_sizes(gpu_type))
    if sizes and draw(st.booleans()):
        gpu["partitionSize"] = draw(st.sampled_from(sizes))
    if draw(st.booleans()):
        gpu["sharing"] = {
            "strategy": draw(st.sampled_from(["TimeSharing", "MPS"])),
            "maxSharedClientsPerGpu": draw(
                st.integers(gke.MIN_SHARED_CLIENTS, gke.MAX_SHARED_CLIENTS)
            ),
        }
    return gpu


@st.composite
def local_services(draw) -> api.ImageGenService:
    max_nodes = draw(st.integers(1, 20))
    body = {
        "apiVersion": "imagegen.dev/v1alpha1",
        "kind": "ImageGenService",
        "metadata": {"name": "svc", "namespace": "ns"},
        "spec": {
            # Smaller than the smallest slot (1g.5gb shared by 48: 0.104 GiB).
            "model": {"uri": "hf://org/model", "memoryGiB": 0.1},
            "gpu": draw(gpu_configs()),
            # Local: any GPU count per node is a valid simulated shape.
            "nodePool": {
                "provider": "Local",
                "minNodes": draw(st.integers(0, max_nodes)),
                "maxNodes": max_nodes,
            },
            "replicas": draw(st.integers(0, 300)),
        },
    }
    return api.parse(body)


def expected_slots_per_gpu(gpu: api.GpuSpec) -> int:
    partitions = gke.mig_sizes(gpu.type)[gpu.partition_size] if gpu.partition_size else 1
    clients = gpu.sharing.max_shared_clients_per_gpu if gpu.sharing else 1
    return partitions * clients


@settings(max_examples=300, deadline=None)
@given(local_services())
def test_rendered_allocatable_is_partitions_times_clients_times_gpus(r: api.ImageGenService):
    p = plan(r.spec)
    assert p.workable, [f.to_dict() for f in p.blocking]
    assert p.slots_per_gpu == expected_slots_per_gpu(r.spec.gpu)
    nodes = render_kwok_nodes(r, p)
    # As many nodes as the replicas need, within the pool's bounds; zero only where
    # neither the replicas nor minNodes ask for one.
    pool = r.spec.node_pool
    assert len(nodes) == max(pool.min_nodes, min(p.nodes_needed, pool.max_nodes))
    assert nodes or (r.spec.replicas == 0 and pool.min_nodes == 0)
    for node in nodes:
        allocatable = int(node["status"]["allocatable"][gke.GPU_RESOURCE])
        assert allocatable == p.slots_per_gpu * r.spec.gpu.count_per_node == p.slots_per_node
        # Room for a pod per slot, as the pool is made for: the scheduler must not run out
        # of pods first, unless past GKE's limit, which the plan warns of.
        pods = int(node["status"]["allocatable"]["pods"])
        assert pods >= allocatable or (
            pods == gke.MAX_PODS_PER_NODE_LIMIT
            and any(isinstance(f, TooManyPodsPerNode) for f in p.findings))


@settings(max_examples=300, deadline=None)
@given(local_services())
def test_the_pods_select_the_nodes_that_are_rendered(r: api.ImageGenService):
    p = plan(r.spec)
    selector = render_deployment(r, p)["spec"]["template"]["spec"]["nodeSelector"]
    for node in render_kwok_nodes(r, p):
        assert node["metadata"]["labels"].items() >= selector.items()


@settings(max_examples=300, deadline=None)
@given(local_services())
def test_nodes_needed_is_the_fewest_that_hold_the_replicas(r: api.ImageGenService):
    p = plan(r.spec)
    target = r.spec.replicas
    assert 0 < p.pods_per_node <= p.slots_per_node or p.slots_per_node == 0
    assert p.nodes_needed * p.pods_per_node >= target
    assert (p.nodes_needed - 1) * p.pods_per_node < target or p.nodes_needed == 0
    assert p.gpus_needed * p.slots_per_gpu >= target
    assert p.replicas_at_max_nodes == r.spec.node_pool.max_nodes * p.pods_per_node
    too_small = any(isinstance(f, PoolTooSmall) for f in p.findings)
    assert too_small == (target > p.replicas_at_max_nodes)


@settings(max_examples=300, deadline=None)
@given(local_services())
def test_mps_limits_never_add_up_to_more_than_the_device(r: api.ImageGenService):
    p = plan(r.spec)
    if p.sharing_strategy != "MPS":
        assert p.mps_thread_percentage is None
        return
    clients = p.clients_per_gpu
    device_gib = (  # what CUDA gives a process of the slice or GPU
        gke.usable_slice_gib(p.gpu_type, p.partition_size) if p.partition_size
        else gke.usable_gib(p.gpu_type)
    )
    assert p.mps_thread_percentage * clients <= 100
    assert p.mps_pinned_memory_mib * clients <= device_gib * 1024
    pod = render_deployment(r, p)["spec"]["template"]["spec"]
    assert pod["hostIPC"] is True


def _name(gpu: dict[str, Any], spot: bool, zones: tuple[str, ...] = ()) -> str:
    sharing = gpu.get("sharing") or {}
    return default_nodepool_name(
        gpu["type"],
        gpu["countPerNode"],
        gpu.get("partitionSize"),
        sharing.get("strategy"),
        sharing.get("maxSharedClientsPerGpu"),
        spot,
        locations=zones,
    )


# None, or some zones of one region, in any order.
ZONES = st.one_of(st.just(()), st.lists(
    st.sampled_from(["us-central1-a", "us-central1-b", "us-central1-c", "us-central1-f"]),
    min_size=1, unique=True).map(tuple))


@settings(max_examples=500, deadline=None)
@given(gpu_configs(), st.booleans(), ZONES, gpu_configs(), st.booleans(), ZONES)
def test_pool_names_are_valid_and_equal_exactly_for_equal_configs(a, spot_a, zones_a,
                                                                  b, spot_b, zones_b):
    name_a, name_b = _name(a, spot_a, zones_a), _name(b, spot_b, zones_b)
    assert gke.NODEPOOL_NAME_RE.match(name_a) and len(name_a) <= gke.NODEPOOL_NAME_MAX
    assert name_a == _name(a, spot_a, zones_a[::-1])  # stable, whatever the zones' order
    assert (name_a == name_b) == (
        (a, spot_a, set(zones_a)) == (b, spot_b, set(zones_b)))
