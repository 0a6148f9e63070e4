"""Contract tests of the GKE provider against a local test double of GKE's REST API.

The provider runs with the real ``google-cloud-container`` client and its REST
transport; only the server is a double (``support.fake_gke``), which answers
the way GKE's v1 REST contract documents: operations, one operation at a time
per cluster, quota errors, not-found. Time in the double is counted in polls.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from google.cloud import container_v1

from imagegen_operator import api
from imagegen_operator.planner import plan as make_plan
from imagegen_operator.providers.base import PoolNotOwned, PoolState, ProviderError
from imagegen_operator.providers.gke import ENDPOINT_ENV, GkeProvider, build_client
from imagegen_operator.render.nodepool import render_gke_nodepool
from support import fake_gke
from support.clock import FakeClock
from support.fake_gke import DEFAULT_QUOTA_MESSAGE, GkeApiTestDouble

CLUSTER = "projects/imagegen-test/locations/us-central1/clusters/serving"
POOLS_PATH = f"/v1/{CLUSTER}/nodePools"
OPERATIONS_PATH = "/v1/projects/imagegen-test/locations/us-central1/operations/"


def service(gpu: dict[str, Any] | None = None, **pool: Any) -> api.ImageGenService:
    """An SD 1.5 service on 1g.10gb H100 slices, each time-shared by 2 pods, on Spot
    (unless ``gpu`` says otherwise)."""
    node_pool = {
        "provider": "GKE",
        "cluster": CLUSTER,
        "spot": True,
        "minNodes": 0,
        "maxNodes": 2,
        **pool,
    }
    return api.parse(
        {
            "apiVersion": "imagegen.dev/v1alpha1",
            "kind": "ImageGenService",
            "metadata": {"name": "sd15", "namespace": "default", "uid": "u-1"},
            "spec": {
                "model": {"uri": "gs://imagegen-models/sd15/v1", "family": "SD15"},
                "gpu": gpu or {
                    "type": "nvidia-h100-80gb",
                    "partitionSize": "1g.10gb",
                    "sharing": {"strategy": "TimeSharing", "maxSharedClientsPerGpu": 2},
                },
                "nodePool": node_pool,
                "replicas": 14,
            },
        }
    )


@pytest.fixture
def double():
    with GkeApiTestDouble(polls_to_done=2) as running:
        yield running


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def provider(double: GkeApiTestDouble, clock: FakeClock) -> GkeProvider:
    return GkeProvider(
        double.client(), timeout=5, backoff_base=10, backoff_max=80,
        failed_create_hold=300, clock=clock, jitter=lambda delay: delay,
    )


@pytest.fixture
def resource() -> api.ImageGenService:
    return service()


@pytest.fixture
def plan(resource):
    return make_plan(resource.spec)


def pool_name(plan) -> str:
    return f"{CLUSTER}/nodePools/{plan.nodepool_name}"


def ensure_until(provider, resource, plan, done, limit: int = 10, target: int = 1,
                 bounds: tuple[int, int] | None = None):
    """Call ensure like the operator's timer does until ``done(state)``; every state seen."""
    seen: list[PoolState | ProviderError] = []
    for _ in range(limit):
        try:
            state: PoolState | ProviderError = provider.ensure(resource, plan, target, bounds)
        except ProviderError as error:
            state = error
        seen.append(state)
        if done(state):
            return seen
    raise AssertionError(f"not done after {limit} calls: {seen}")


def made_by_us(resource, plan) -> dict[str, Any]:
    """The ``config`` of a pool as the provider creates it for this plan."""
    return render_gke_nodepool(resource, plan)["spec"]["config"]


def ready(state) -> bool:
    return isinstance(state, PoolState) and state.ready


# --- create -------------------------------------------------------------------------


def test_create_starts_one_operation_and_polls_it_until_ready(double, provider, resource, plan):
    first = provider.ensure(resource, plan, 1)
    assert first == PoolState(plan.nodepool_name, False, 0, "Provisioning", first.message)
    assert "operation-" in first.message

    [create] = double.requests_to("POST")
    assert create.path == POOLS_PATH
    # What reached the API is a valid NodePool carrying the whole accelerator config.
    sent = container_v1.NodePool.from_json(json.dumps(create.body["nodePool"]))
    [accelerator] = sent.config.accelerators
    assert sent.name == plan.nodepool_name
    assert sent.config.machine_type == "a3-highgpu-1g"
    assert sent.config.spot is True
    assert accelerator.accelerator_type == "nvidia-h100-80gb"
    assert accelerator.accelerator_count == 1
    assert accelerator.gpu_partition_size == "1g.10gb"
    sharing = accelerator.gpu_sharing_config
    strategies = container_v1.GPUSharingConfig.GPUSharingStrategy
    assert sharing.gpu_sharing_strategy == strategies.TIME_SHARING
    assert sharing.max_shared_clients_per_gpu == 2
    assert (sent.autoscaling.enabled, sent.autoscaling.total_min_node_count,
            sent.autoscaling.total_max_node_count) == (True, 0, 2)

    seen = ensure_until(provider, resource, plan, ready, target=5)
    assert [s.reason for s in seen[:-1]] == ["Provisioning"] * (len(seen) - 1)
    # Ready, with the node hint held to the pool's maximum (the v1 NodePool has no node count).
    assert seen[-1] == PoolState(plan.nodepool_name, True, 2, "Ready", seen[-1].message)
    assert double.requests_to("GET", "/operations/" + create_operation_id(double))
    assert len(double.requests_to("POST")) == 1


def create_operation_id(double: GkeApiTestDouble) -> str:
    [operation] = [o for o in double.operations.values() if o.operation_type == "CREATE_NODE_POOL"]
    return operation.name.rsplit("/", 1)[-1]


def test_operation_is_polled_at_its_documented_path(double, provider, resource, plan):
    provider.ensure(resource, plan, 1)
    provider.ensure(resource, plan, 1)
    polls = [r.path for r in double.requests_to("GET") if "/operations/" in r.path]
    assert polls and all(p.startswith(OPERATIONS_PATH + "operation-") for p in polls)


def test_ensure_while_provisioning_never_creates_twice(double, resource, plan, clock):
    double.polls_to_done = 100  # a pool that takes its time
    first = GkeProvider(double.client(), clock=clock)
    states = [first.ensure(resource, plan, 1) for _ in range(3)]
    # An operator restart forgets everything; the pool's name is still the key.
    restarted = GkeProvider(double.client(), clock=clock)
    states.append(restarted.ensure(resource, plan, 1))

    assert {(s.ready, s.reason) for s in states} == {(False, "Provisioning")}
    assert len(double.requests_to("POST")) == 1
    assert list(double.pools) == [pool_name(plan)]


def test_concurrent_ensures_in_one_process_create_once(double, provider, resource, plan):
    # Two services sharing the pool, reconciled at the same moment in worker threads.
    double.latency_s = 0.05
    double.polls_to_done = 100
    with ThreadPoolExecutor(max_workers=4) as pool:
        states = list(pool.map(lambda _: provider.ensure(resource, plan, 1), range(4)))
    assert {s.reason for s in states} == {"Provisioning"}
    assert len(double.requests_to("POST")) == 1


def test_create_answered_already_exists_is_provisioning(double, provider, resource, plan):
    # The answer to an earlier create got lost, or another replica raced us.
    double.error_next_create("ALREADY_EXISTS", f"Already exists: {pool_name(plan)}.")
    state = provider.ensure(resource, plan, 1)
    assert (state.ready, state.reason) == (False, "Provisioning")


# --- conflicts and errors ----------------------------------------------------------------


def busy_delays(double, provider, resource, plan, count: int) -> list[float]:
    """The retry delays of ``count`` ensures the cluster refuses as busy."""
    double.busy_next(count)
    delays = []
    for _ in range(count):
        with pytest.raises(ProviderError) as caught:
            provider.ensure(resource, plan, 1)
        assert caught.value.reason == "ClusterBusy" and caught.value.transient
        delays.append(caught.value.retry_after)
    return delays


def test_concurrent_operation_is_retried_with_growing_backoff(double, provider, resource, plan):
    double.busy_next(3)
    delays = []
    for _ in range(3):
        with pytest.raises(ProviderError) as caught:
            provider.ensure(resource, plan, 1)
        assert caught.value.reason == "ClusterBusy"
        assert caught.value.transient
        assert "Please wait and try again" in caught.value.message
        delays.append(caught.value.retry_after)
    assert delays == [10, 20, 40]

    state = provider.ensure(resource, plan, 1)
    assert state.reason == "Provisioning"
    assert len(double.requests_to("POST")) == 4  # three refused, one accepted
    assert len(double.pools) == 1


def test_a_second_pool_waits_while_another_pool_of_the_cluster_is_made(double, provider,
                                                                          resource, plan):
    # GKE runs one node-pool operation at a time per cluster.
    double.polls_to_done = 5
    other = service(gpu={"type": "nvidia-h100-80gb", "partitionSize": "3g.40gb"})
    other_plan = make_plan(other.spec)
    assert provider.ensure(resource, plan, 1).reason == "Provisioning"
    with pytest.raises(ProviderError) as caught:
        provider.ensure(other, other_plan, 1)
    assert caught.value.reason == "ClusterBusy" and caught.value.transient
    ensure_until(provider, resource, plan, ready)
    ensure_until(provider, other, other_plan, ready)
    assert len(double.pools) == 2


def test_backoff_is_capped_and_starts_over_after_success(double, provider, resource, plan):
    delays = busy_delays(double, provider, resource, plan, 6)
    assert delays == [10, 20, 40, 80, 80, 80]
    provider.ensure(resource, plan, 1)  # accepted

    ensure_until(provider, resource, plan, ready)
    double.busy_next(1)
    with pytest.raises(ProviderError) as caught:
        provider.delete(resource, plan)
    assert (caught.value.reason, caught.value.retry_after) == ("ClusterBusy", 10)


def test_quota_error_is_permanent_and_keeps_gkes_words(double, provider, resource, plan):
    double.quota_error_next()
    with pytest.raises(ProviderError) as caught:
        provider.ensure(resource, plan, 1)
    error = caught.value
    assert error.reason == "QuotaExceeded"
    assert not error.transient
    assert "Insufficient regional quota" in error.message
    assert 'resource "NVIDIA_H100_GPUS"' in error.message
    assert "project=imagegen-test" in error.message
    assert double.pools == {}


@pytest.mark.parametrize(
    ("status", "message", "reason", "transient"),
    [
        ("PERMISSION_DENIED", "Required 'container.clusters.update' permission for "
         "'projects/imagegen-test/locations/us-central1/clusters/serving'.",
         "PermissionDenied", False),
        ("RESOURCE_EXHAUSTED", "Quota 'NVIDIA_H100_GPUS' exceeded. Limit: 0.0 in region "
         "us-central1.", "QuotaExceeded", False),
        ("RESOURCE_EXHAUSTED", "Quota exceeded for quota metric 'Write requests' and limit "
         "'Write requests per minute' of service 'container.googleapis.com'.",
         "RateLimited", True),
        ("FAILED_PRECONDITION", "Cluster is in an error state and cannot be changed.",
         "RequestRejected", False),
        ("INVALID_ARGUMENT", "Accelerator type \"nvidia-h100-80gb\" is not supported in "
         "zone us-central1-f.", "InvalidNodePool", False),
        ("NOT_FOUND", f"Not found: {CLUSTER}.", "ClusterNotFound", False),
        ("ABORTED", "Cluster is currently being updated.", "ClusterBusy", True),
        ("UNAVAILABLE", "The service is currently unavailable.", "GkeUnavailable", True),
        ("INTERNAL", "Internal error encountered.", "GkeUnavailable", True),
    ],
)
def test_api_errors_map_to_reasons(double, provider, resource, plan, status, message,
                                   reason, transient):
    double.error_next_create(status, message)
    with pytest.raises(ProviderError) as caught:
        provider.ensure(resource, plan, 1)
    assert (caught.value.reason, caught.value.transient) == (reason, transient)
    # GKE's own sentence, without the client's "POST http://..." prefix.
    assert message in caught.value.message
    assert "http://" not in caught.value.message


def test_unreachable_api_is_transient(resource, plan):
    with GkeApiTestDouble() as gone:
        client = gone.client()
    # The double has stopped: connection refused, like an API outage.
    provider = GkeProvider(client, timeout=2)
    with pytest.raises(ProviderError) as caught:
        provider.ensure(resource, plan, 1)
    assert (caught.value.reason, caught.value.transient) == ("GkeUnavailable", True)


# --- failed operations ---------------------------------------------------------------


STOCKOUT = (
    "Google Compute Engine: The zone 'projects/imagegen-test/zones/us-central1-a' does not "
    "have enough resources available to fulfill the request. '(resource type:compute)'."
)


@pytest.mark.parametrize(
    "polls", [1, 2], ids=["seen-through-the-operation", "seen-while-the-pool-provisions"]
)
def test_failed_create_operation_is_reported_then_retried_later(double, provider, resource,
                                                               plan, clock, polls):
    # polls=1: the pool is gone by the next ensure, and only the operation tells
    # why; polls=2: the operation fails while the pool still shows PROVISIONING.
    double.polls_to_done = polls
    double.fail_next_operation(STOCKOUT, status="INTERNAL", pool_after_failure="DELETED")
    seen = ensure_until(provider, resource, plan, lambda s: isinstance(s, ProviderError))
    failure = seen[-1]
    assert failure.reason == "CreateFailed"
    assert STOCKOUT in failure.message
    assert failure.retry_after == 300

    # Reported, not re-created, until the hold is over.
    clock.now += 100
    with pytest.raises(ProviderError) as again:
        provider.ensure(resource, plan, 1)
    assert again.value.reason == "CreateFailed"
    assert again.value.retry_after == pytest.approx(200)
    assert len(double.requests_to("POST")) == 1

    clock.now += 201
    ensure_until(provider, resource, plan, ready)
    assert len(double.requests_to("POST")) == 2


def test_quota_failure_inside_the_operation_is_permanent(double, provider, resource, plan):
    message = "Quota 'PREEMPTIBLE_NVIDIA_H100_GPUS' exceeded. Limit: 0.0 in region us-central1."
    double.fail_next_operation(message, status="RESOURCE_EXHAUSTED")
    seen = ensure_until(provider, resource, plan, lambda s: isinstance(s, ProviderError))
    assert (seen[-1].reason, seen[-1].transient) == ("QuotaExceeded", False)
    assert message in seen[-1].message


@pytest.mark.parametrize(
    ("status", "reason"),
    [("INTERNAL", "CreateFailed"), ("RESOURCE_EXHAUSTED", "QuotaExceeded")],
)
def test_pool_left_in_error_is_held_then_made_again(double, provider, resource, plan, clock,
                                                    status, reason):
    # GKE keeps a pool whose create failed on a stockout or a quota, in ERROR, and does
    # not mend it: the create's error is reported (its reason kept), then the pool is
    # deleted and made again.
    double.fail_next_operation(STOCKOUT, status=status, pool_after_failure="ERROR")
    seen = ensure_until(provider, resource, plan, lambda s: isinstance(s, ProviderError))
    assert seen[-1].reason == reason and STOCKOUT in seen[-1].message
    clock.now += 100
    with pytest.raises(ProviderError) as held:
        provider.ensure(resource, plan, 1)
    assert held.value.reason == reason
    if reason == "QuotaExceeded":  # held for good: one sentence with the time, no countdown
        assert "trying again at" in held.value.message
    else:
        assert held.value.retry_after == pytest.approx(200)
    assert double.requests_to("DELETE") == []

    clock.now += 201
    state = provider.ensure(resource, plan, 1)
    assert (state.ready, state.reason) == (False, "Recreating")
    assert STOCKOUT in state.message
    assert len(double.requests_to("DELETE")) == 1
    ensure_until(provider, resource, plan, ready)
    assert len(double.requests_to("POST")) == 2


def test_pool_found_in_error_after_a_restart_is_held_then_made_again(double, provider,
                                                                     resource, plan, clock):
    double.seed_pool(pool_name(plan), "ERROR", config=made_by_us(resource, plan),
                     statusMessage="nodes in us-central1-b could not start")
    with pytest.raises(ProviderError) as caught:
        provider.ensure(resource, plan, 1)
    assert (caught.value.reason, caught.value.retry_after) == ("PoolError", 300)
    assert "nodes in us-central1-b could not start" in caught.value.message
    clock.now += 301
    assert provider.ensure(resource, plan, 1).reason == "Recreating"
    ensure_until(provider, resource, plan, ready)


def test_a_pool_in_error_gone_before_its_delete_is_made_again(double, provider, resource,
                                                               plan, clock, monkeypatch):
    # Deleted meanwhile (by a person, say) between the read and the provider's delete.
    double.seed_pool(pool_name(plan), "ERROR", config=made_by_us(resource, plan),
                     statusMessage="nodes in us-central1-b could not start")
    with pytest.raises(ProviderError):
        provider.ensure(resource, plan, 1)
    clock.now += 301
    delete = double._delete_pool

    def gone_first(name):
        double.pools.pop(name, None)
        return delete(name)

    monkeypatch.setattr(double, "_delete_pool", gone_first)
    state = provider.ensure(resource, plan, 1)
    assert (state.ready, state.reason) == (False, "Recreating")
    ensure_until(provider, resource, plan, ready)


def test_a_pool_in_error_whose_nodes_serve_is_reported_not_deleted(double, resource, plan,
                                                                      clock):
    provider = GkeProvider(double.client(), clock=clock, count_nodes=lambda pool: 2)
    double.seed_pool(pool_name(plan), "ERROR", config=made_by_us(resource, plan),
                     statusMessage="an upgrade failed")
    for _ in range(3):
        state = provider.ensure(resource, plan, 2)
        assert (state.ready, state.ready_nodes, state.reason) == (True, 2, "PoolError")
        assert "an upgrade failed" in state.message
        clock.now += 400
    assert double.requests_to("DELETE") == []


def test_a_pool_deleted_while_its_create_starts_is_deleted_once_listed(
        double, provider, resource, plan, monkeypatch):
    # GKE may not list a pool for a moment after accepting its create: the delete waits
    # for it rather than letting the service go with a pool on its way.
    name = pool_name(plan)
    unlisted, get = {name}, double._get_pool

    def listed_or_not(pool):
        if pool in unlisted:
            raise fake_gke.ApiError("NOT_FOUND", f"Not found: {pool}.")
        return get(pool)

    monkeypatch.setattr(double, "_get_pool", listed_or_not)
    assert provider.ensure(resource, plan, 1).reason == "Provisioning"
    assert provider.delete(resource, plan) is False
    unlisted.clear()
    for _ in range(20):
        if provider.delete(resource, plan):
            break
    assert name not in double.pools and len(double.requests_to("DELETE")) == 1
    # A create that ended, its pool rolled back, leaves nothing to wait for.
    assert provider.ensure(resource, plan, 1).reason == "Provisioning"
    unlisted.add(name)
    op = next(o for o in double.operations.values()
              if o.operation_type == "CREATE_NODE_POOL" and o.status != "DONE")
    op.status, op.error = "DONE", {"code": 8, "message": STOCKOUT}
    assert [provider.delete(resource, plan) for _ in range(2)] == [False, True]


def test_a_pool_in_error_that_served_is_held_anew_when_its_nodes_go(double, resource, plan,
                                                                     clock):
    # No node at first (held), then a node serves for hours, then it goes (a Spot node
    # reclaimed): the pool is held a whole hold again before it is deleted.
    serving = [0]
    provider = GkeProvider(double.client(), clock=clock, count_nodes=lambda pool: serving[0])
    double.seed_pool(pool_name(plan), "ERROR", config=made_by_us(resource, plan),
                     statusMessage="an upgrade failed")
    with pytest.raises(ProviderError):
        provider.ensure(resource, plan, 1)
    serving[0] = 1
    clock.now += 100
    assert provider.ensure(resource, plan, 1).reason == "PoolError"
    clock.now += 10_000
    assert provider.ensure(resource, plan, 1).reason == "PoolError"
    serving[0] = 0
    clock.now += 10
    with pytest.raises(ProviderError) as held:
        provider.ensure(resource, plan, 1)
    assert held.value.reason == "PoolError" and held.value.retry_after == 300
    assert double.requests_to("DELETE") == []
    clock.now += 301
    assert provider.ensure(resource, plan, 1).reason == "Recreating"


def test_a_failing_delete_of_a_pool_in_error_is_held_again(double, provider, resource, plan,
                                                           clock):
    double.seed_pool(pool_name(plan), "ERROR", config=made_by_us(resource, plan))
    with pytest.raises(ProviderError):
        provider.ensure(resource, plan, 1)
    clock.now += 301
    assert provider.ensure(resource, plan, 1).reason == "Recreating"
    # GKE ends the delete with an error; the pool stays in ERROR.
    op = next(o for o in double.operations.values() if o.operation_type == "DELETE_NODE_POOL")
    op.status, op.error = "DONE", {"code": 13, "message": "Internal error."}
    double.pools[pool_name(plan)]["status"] = "ERROR"
    with pytest.raises(ProviderError) as caught:
        provider.ensure(resource, plan, 1)
    assert "Internal error" in caught.value.message and caught.value.retry_after == 300
    with pytest.raises(ProviderError):
        provider.ensure(resource, plan, 1)  # held: no second delete at once
    assert len(double.requests_to("DELETE")) == 1


def test_a_pool_of_another_in_error_is_never_deleted(double, provider, resource, plan, clock):
    double.seed_pool(pool_name(plan), "ERROR", config={"machineType": "a3-highgpu-1g"})
    clock.now += 10_000
    for _ in range(2):
        with pytest.raises(PoolNotOwned):
            provider.ensure(resource, plan, 1)
    assert double.requests_to("DELETE") == []


@pytest.mark.parametrize(
    ("status", "message"),
    [
        ("PERMISSION_DENIED", DEFAULT_QUOTA_MESSAGE.replace("{project}", "imagegen-test")),
        ("PERMISSION_DENIED", "Required 'container.clusters.update' permission."),
        ("INVALID_ARGUMENT", "Accelerator type is not supported in zone us-central1-f."),
    ],
)
def test_a_create_refused_for_good_is_held_not_sent_on_every_resync(
        double, provider, resource, plan, clock, status, message):
    double.error_next_create(status, message)
    for _ in range(3):
        with pytest.raises(ProviderError) as caught:
            provider.ensure(resource, plan, 1)
        assert not caught.value.transient
        clock.now += 60
    assert len(double.requests_to("POST")) == 1
    assert "trying again at" in caught.value.message
    clock.now += 200
    assert provider.ensure(resource, plan, 1).reason == "Provisioning"
    assert len(double.requests_to("POST")) == 2


def test_too_many_operations_is_busy_not_a_quota(double, provider, resource, plan):
    message = ("Too many operations: cluster serving hits the concurrent operations quota 5, "
               "please try again later.")
    double.error_next_create("RESOURCE_EXHAUSTED", message)
    with pytest.raises(ProviderError) as caught:
        provider.ensure(resource, plan, 1)
    assert (caught.value.reason, caught.value.retry_after) == ("ClusterBusy", 10)
    assert provider.ensure(resource, plan, 1).reason == "Provisioning"


def test_backoff_is_spread_between_half_and_all_of_its_step(double, resource, plan):
    provider = GkeProvider(double.client(), backoff_base=10, backoff_max=80)
    delays = busy_delays(double, provider, resource, plan, 40)
    assert 5 <= delays[0] <= 10 and 10 <= delays[1] <= 20
    assert all(40 <= d <= 80 for d in delays[3:])
    assert len(set(delays[3:])) > 1  # spread, not one fixed step


@pytest.mark.parametrize(("base", "cap"), [(0, 10), (-1, 10), (20, 10)])
def test_a_backoff_that_cannot_work_is_refused(base, cap):
    with pytest.raises(ValueError, match="backoff"):
        GkeProvider(object(), backoff_base=base, backoff_max=cap)


@pytest.mark.parametrize(
    ("status", "expected_ready", "expected_reason"),
    [
        ("PROVISIONING", False, "Provisioning"),
        ("RUNNING", True, "Ready"),
        ("RECONCILING", True, "Reconciling"),  # an upgrade: the nodes keep serving
        ("STOPPING", False, "Deleting"),
        ("RUNNING_WITH_ERROR", True, "RunningWithError"),  # "partially usable"
    ],
)
def test_pool_status_maps_to_state(double, provider, resource, plan, status, expected_ready,
                                   expected_reason):
    double.seed_pool(
        pool_name(plan), status, config=made_by_us(resource, plan),
        statusMessage="nodes in us-central1-b could not start",
        autoscaling={"enabled": True, "totalMinNodeCount": 0, "totalMaxNodeCount": 2},
    )
    state = provider.ensure(resource, plan, 1)
    assert (state.ready, state.reason) == (expected_ready, expected_reason)
    assert state.ready_nodes == (1 if expected_ready else 0)
    if expected_reason == "RunningWithError":
        assert "nodes in us-central1-b could not start" in state.message
    assert double.requests_to("POST") == []


# --- pools the operator did not make, or made for other GPUs -------------------------------


def test_a_pool_the_operator_did_not_make_is_neither_resized_nor_deleted(
        double, provider, resource, plan):
    """spec.nodePool.name may name any pool, the cluster's default one included."""
    double.seed_pool(
        pool_name(plan), "RUNNING", config={"machineType": "e2-standard-4"},
        autoscaling={"enabled": True, "totalMinNodeCount": 3, "totalMaxNodeCount": 10},
    )
    with pytest.raises(ProviderError) as refused:
        provider.ensure(resource, plan, 1)
    assert refused.value.reason == "PoolNotOwned" and not refused.value.transient
    assert "spec.nodePool.name" in refused.value.message
    with pytest.raises(PoolNotOwned):
        provider.delete(resource, plan)
    assert double.requests_to("POST") == double.requests_to("DELETE") == []
    assert pool_name(plan) in double.pools


def test_a_pool_of_ours_with_other_gpus_is_reported_not_used(double, provider):
    """An explicit name keeps the pool across an edit of the GPU settings; GKE cannot
    change them on a pool, so the service is told to take a new name."""
    before = service(name="sd15-serving")
    old_plan = make_plan(before.spec)
    double.seed_pool(pool_name(old_plan), "RUNNING", config=made_by_us(before, old_plan))
    edited = service(gpu={"type": "nvidia-h100-80gb", "partitionSize": "3g.40gb"},
                     name="sd15-serving")
    with pytest.raises(ProviderError) as refused:
        provider.ensure(edited, make_plan(edited.spec), 1)
    assert refused.value.reason == "PoolConfigMismatch"
    message = refused.value.message
    assert "partition size 1g.10gb (the spec asks for 3g.40gb)" in message
    assert "spec.nodePool.name" in message
    assert double.requests_to("POST") == []


def test_a_named_pool_made_without_flex_start_is_not_taken_for_a_flex_start_one(double,
                                                                                provider):
    before = service(name="sd15-serving")
    old_plan = make_plan(before.spec)
    double.seed_pool(pool_name(old_plan), "RUNNING", config=made_by_us(before, old_plan))
    edited = service(name="sd15-serving", spot=False, flexStart=True)
    with pytest.raises(ProviderError) as refused:
        provider.ensure(edited, make_plan(edited.spec), 1)
    assert refused.value.reason == "PoolConfigMismatch"
    assert "flex start False (the spec asks for True)" in refused.value.message


def test_a_derived_machine_type_may_differ_but_one_asked_for_may_not(double, provider):
    """A derived machine type follows GKE's tables, which an upgrade may change: the pools
    it finds are kept. One the spec names is part of the pool's identity."""
    resource = service()
    plan = make_plan(resource.spec)
    config = {**made_by_us(resource, plan), "machineType": "a3-highgpu-1g-older"}
    double.seed_pool(pool_name(plan), "RUNNING", config=config, autoscaling={
        "enabled": True, "totalMinNodeCount": 0, "totalMaxNodeCount": 2})
    assert provider.ensure(resource, plan, 1).ready
    named = service(machineType="a3-highgpu-1g")  # the derived one: the same pool name
    assert make_plan(named.spec).nodepool_name == plan.nodepool_name
    with pytest.raises(ProviderError, match="machine type a3-highgpu-1g-older") as refused:
        provider.ensure(named, make_plan(named.spec), 1)
    assert refused.value.reason == "PoolConfigMismatch"


def test_the_spec_s_zones_are_asked_for_and_none_leaves_gke_the_cluster_s(double, provider):
    zoned = service(locations=["us-central1-a", "us-central1-c"])
    ensure_until(provider, zoned, make_plan(zoned.spec), ready)
    (created,) = double.requests_to("POST", "/nodePools")
    assert created.body["nodePool"]["locations"] == ["us-central1-a", "us-central1-c"]

    anywhere = service(spot=False, flexStart=True)  # another pool: no zones asked for
    ensure_until(provider, anywhere, make_plan(anywhere.spec), ready)
    second = double.requests_to("POST", "/nodePools")[1]
    assert "locations" not in second.body["nodePool"]
    # GKE gave it the cluster's zones; the spec named none, so any are its own.
    assert double.pools[pool_name(make_plan(anywhere.spec))]["locations"] == [
        "us-central1-a", "us-central1-b", "us-central1-c"]
    assert provider.ensure(anywhere, make_plan(anywhere.spec), 1).ready


def test_a_dense_pool_is_made_for_its_pods_and_one_found_with_less_room_is_refused(
        double, provider):
    dense = service(gpu={"type": "nvidia-h100-80gb", "countPerNode": 8,
                         "partitionSize": "1g.10gb",
                         "sharing": {"strategy": "TimeSharing", "maxSharedClientsPerGpu": 2}})
    plan = make_plan(dense.spec)
    ensure_until(provider, dense, plan, ready)
    (created,) = double.requests_to("POST", "/nodePools")
    assert created.body["nodePool"]["maxPodsConstraint"] == {"maxPodsPerNode": "128"}
    # One of the name made at GKE's default (by hand, or before pools were made for their
    # pods): 12 of a node's 112 serving pods would stay Pending on a pool read as Ready.
    double.seed_pool(pool_name(plan), "RUNNING", config=made_by_us(dense, plan),
                     maxPodsConstraint={"maxPodsPerNode": "110"},
                     autoscaling={"enabled": True, "totalMinNodeCount": 0,
                                  "totalMaxNodeCount": 2})
    with pytest.raises(ProviderError) as refused:
        provider.ensure(dense, plan, 1)
    assert refused.value.reason == "PoolConfigMismatch"
    assert "runs at most 110 pods on a node" in refused.value.message
    assert "need 122" in refused.value.message and "spec.nodePool.name" in refused.value.message
    # The same pool serves a configuration it has room for.
    double.seed_pool(pool_name(plan), "RUNNING", config=made_by_us(dense, plan),
                     maxPodsConstraint={"maxPodsPerNode": "122"},
                     autoscaling={"enabled": True, "totalMinNodeCount": 0,
                                  "totalMaxNodeCount": 2})
    assert provider.ensure(dense, plan, 1).ready


def test_a_named_pool_in_other_zones_is_not_taken_for_the_spec_s(double, provider):
    before = service(name="sd15-serving")
    old_plan = make_plan(before.spec)
    double.seed_pool(pool_name(old_plan), "RUNNING", config=made_by_us(before, old_plan))
    edited = service(name="sd15-serving", locations=["us-central1-f"])
    with pytest.raises(ProviderError) as refused:
        provider.ensure(edited, make_plan(edited.spec), 1)
    assert refused.value.reason == "PoolConfigMismatch"
    assert ("zones ['us-central1-a', 'us-central1-b', 'us-central1-c'] (the spec asks for "
            "['us-central1-f'])") in refused.value.message
    assert double.requests_to("POST") == []


# --- autoscaling bounds ------------------------------------------------------------------


def seed_running(double, plan, low: int = 0, high: int = 2) -> None:
    double.seed_pool(
        pool_name(plan), "RUNNING", config=made_by_us(service(), plan),
        autoscaling={"enabled": True, "totalMinNodeCount": low, "totalMaxNodeCount": high},
    )


def test_a_pool_running_with_errors_serves_and_takes_new_bounds(double, provider, resource,
                                                                 plan):
    double.seed_pool(
        pool_name(plan), "RUNNING_WITH_ERROR", config=made_by_us(resource, plan),
        statusMessage="1 of 2 nodes could not start",
        autoscaling={"enabled": True, "totalMinNodeCount": 0, "totalMaxNodeCount": 2},
    )
    seen = ensure_until(provider, resource, plan, lambda s: s.reason == "Ready", target=2,
                        bounds=(1, 4))
    assert all(s.ready for s in seen)
    assert len(double.requests_to("POST", ":setAutoscaling")) == 1


def test_ready_nodes_are_counted_where_the_cluster_can_be_asked(double, resource, plan):
    counted = []
    provider = GkeProvider(double.client(), count_nodes=lambda pool: counted.append(pool) or 1)
    seed_running(double, plan, 0, 2)
    state = provider.ensure(resource, plan, 5, (0, 2))
    assert (state.ready, state.ready_nodes) == (True, 1)  # not the 2 the bounds allow
    assert counted == [plan.nodepool_name]
    assert state.message.endswith("is running.")


def test_a_running_pool_short_of_its_minimum_says_how_many_nodes_it_has(double, resource,
                                                                        plan):
    provider = GkeProvider(double.client(), count_nodes=lambda pool: 1)
    seed_running(double, plan, 3, 4)
    state = provider.ensure(resource, plan, 3, (3, 4))
    assert (state.ready, state.ready_nodes, state.reason) == (True, 1, "Ready")
    assert "with 1 of its minimum 3 node(s) ready" in state.message


def test_create_takes_the_bounds_of_every_service_on_the_pool(double, provider, resource, plan):
    provider.ensure(resource, plan, 1, (1, 5))
    [create] = double.requests_to("POST")
    sent = container_v1.NodePool.from_json(json.dumps(create.body["nodePool"]))
    # A regional cluster: GKE would start initialNodeCount nodes in each zone, so the pool
    # starts empty and the autoscaler brings it up to the total minimum.
    assert (sent.autoscaling.total_min_node_count, sent.autoscaling.total_max_node_count,
            sent.initial_node_count) == (1, 5, 0)


@pytest.mark.parametrize(
    ("location", "initial"),
    [("us-central1-a", 2), ("us-central1", 0), ("europe-west4-b", 2), ("europe-west4", 0)],
)
def test_a_pool_starts_at_its_minimum_in_a_zone_and_empty_in_a_region(location, initial):
    from imagegen_operator.render.nodepool import render_config_connector_nodepool

    cluster = f"projects/imagegen-test/locations/{location}/clusters/serving"
    resource = service(cluster=cluster, minNodes=2, maxNodes=4)
    plan = make_plan(resource.spec)
    assert render_gke_nodepool(resource, plan)["spec"]["initialNodeCount"] == initial
    assert render_config_connector_nodepool(resource, plan)["spec"]["initialNodeCount"] == initial


@pytest.mark.parametrize(
    ("zones", "initial"),
    [(None, 2), (["us-central1-a"], 2), (["us-central1-a", "us-central1-b"], 0)],
)
def test_a_zonal_cluster_with_more_node_locations_starts_its_pools_empty(
        double, provider, zones, initial):
    # GKE counts initialNodeCount in each of the cluster's node locations, which a pool
    # without spec.nodePool.locations takes: 2 would start 4 GPU nodes in 2 zones.
    if zones:
        double.set_cluster_zones(ZONAL, zones)
    resource = service(cluster=ZONAL, minNodes=2, maxNodes=4)
    provider.ensure(resource, make_plan(resource.spec), 2, (2, 4))
    [create] = double.requests_to("POST")
    # proto3 JSON leaves a 0 out
    assert int(create.body["nodePool"].get("initialNodeCount", 0)) == initial
    assert "locations" not in create.body["nodePool"]  # the cluster's, as they change
    assert len(double.requests_to("GET", "/clusters/serving")) == 1


ZONAL = "projects/imagegen-test/locations/us-central1-a/clusters/serving"


@pytest.mark.parametrize(("cluster", "pool", "bounds"), [
    (CLUSTER, {}, (1, 5)),  # regional: every pool starts empty
    (ZONAL, {"minNodes": 0}, (0, 4)),  # no minimum: empty anyway
    (ZONAL, {"flexStart": True, "spot": False, "minNodes": 2}, (2, 4)),  # Flex-start too
])
def test_the_cluster_is_not_asked_for_its_zones_where_they_change_nothing(
        double, provider, cluster, pool, bounds):
    resource = service(cluster=cluster, **pool)
    provider.ensure(resource, make_plan(resource.spec), 1, bounds)
    assert double.requests_to("GET", "/clusters/serving") == []
    assert len(double.requests_to("POST")) == 1


def test_a_cluster_that_is_gone_is_said_before_any_create(double, provider):
    resource = service(cluster=ZONAL.replace("serving", "gone"), minNodes=1)
    double.missing_clusters = {resource.spec.node_pool.cluster}
    with pytest.raises(ProviderError) as error:
        provider.ensure(resource, make_plan(resource.spec), 1, (1, 2))
    assert error.value.reason == "ClusterNotFound"
    assert double.requests_to("POST") == []


def test_zones_that_cannot_be_read_start_the_pool_empty(double, provider):
    # Not knowing whether GKE would start the minimum in one zone or in several: none.
    resource = service(cluster=ZONAL, minNodes=2, maxNodes=4)
    double.set_cluster_zones(ZONAL, ["us-central1-a"])  # had it answered: one zone
    double.error_next_cluster_get("UNAVAILABLE")
    provider.ensure(resource, make_plan(resource.spec), 2, (2, 4))
    [create] = double.requests_to("POST")
    assert int(create.body["nodePool"].get("initialNodeCount", 0)) == 0


def test_running_pool_is_brought_to_new_bounds_while_it_serves(double, provider, resource,
                                                               plan):
    seed_running(double, plan, 0, 2)
    # A second service on the pool allows more nodes (or maxNodes was edited).
    seen = ensure_until(provider, resource, plan, lambda s: s.reason == "Ready", target=3,
                        bounds=(1, 4))
    [update] = double.requests_to("POST", ":setAutoscaling")
    assert update.path == f"/v1/{pool_name(plan)}:setAutoscaling"
    sent = container_v1.NodePoolAutoscaling.from_json(json.dumps(update.body["autoscaling"]))
    assert (sent.enabled, sent.total_min_node_count, sent.total_max_node_count) == (True, 1, 4)
    assert sent.location_policy == container_v1.NodePoolAutoscaling.LocationPolicy.ANY
    # While GKE works the nodes keep serving: ready all along, never a second update.
    assert [s.reason for s in seen[:-1]] == ["Reconciling"] * (len(seen) - 1)
    assert all(s.ready for s in seen)
    assert "1-4 nodes" in seen[0].message
    assert seen[-1].ready_nodes == 3
    assert double.pools[pool_name(plan)]["autoscaling"]["totalMaxNodeCount"] == 4
    provider.ensure(resource, plan, 3, (1, 4))
    assert len(double.requests_to("POST")) == 1


def test_bounds_refused_while_the_cluster_is_busy_are_tried_again_later(
        double, provider, resource, plan, clock):
    seed_running(double, plan, 0, 2)
    double.busy_next(1, "upgrading cluster")
    state = provider.ensure(resource, plan, 1, (0, 4))
    assert (state.ready, state.reason) == (True, "AutoscalingNotSet")
    assert "0-4 nodes" in state.message and "Please wait and try again" in state.message
    # Held for the backoff: no second call at once...
    assert provider.ensure(resource, plan, 1, (0, 4)).reason == "AutoscalingNotSet"
    assert len(double.requests_to("POST", ":setAutoscaling")) == 1
    # ...but once it has passed; a cluster busy for long is asked less and less often.
    holds = []
    for _ in range(3):
        clock.now += 1000
        double.busy_next(1, "upgrading cluster")
        assert provider.ensure(resource, plan, 1, (0, 4)).reason == "AutoscalingNotSet"
        memory = provider._memory_of(pool_name(plan))
        holds.append(memory.autoscaling_after - clock())
    assert holds == [20, 40, 80]
    clock.now += 81
    assert provider.ensure(resource, plan, 1, (0, 4)).reason == "Reconciling"
    assert len(double.requests_to("POST", ":setAutoscaling")) == 5


def test_failed_bounds_update_is_reported_and_held(double, provider, resource, plan, clock):
    seed_running(double, plan, 0, 2)
    double.fail_next_update("Internal error while updating node pool autoscaling.")
    seen = ensure_until(provider, resource, plan, lambda s: s.reason == "AutoscalingNotSet",
                        bounds=(0, 3))
    assert all(s.ready for s in seen)  # the nodes never stopped serving
    assert "Internal error while updating node pool autoscaling." in seen[-1].message
    assert double.pools[pool_name(plan)]["autoscaling"]["totalMaxNodeCount"] == 2
    provider.ensure(resource, plan, 1, (0, 3))
    assert len(double.requests_to("POST", ":setAutoscaling")) == 1
    clock.now += 301
    ensure_until(provider, resource, plan, lambda s: s.reason == "Ready", bounds=(0, 3))
    assert double.pools[pool_name(plan)]["autoscaling"]["totalMaxNodeCount"] == 3


# --- delete --------------------------------------------------------------------------


def test_delete_runs_until_the_pool_is_gone(double, provider, resource, plan):
    ensure_until(provider, resource, plan, ready)

    results = []
    for _ in range(10):
        results.append(provider.delete(resource, plan))
        if results[-1]:
            break
    assert results[0] is False and results[-1] is True
    assert set(results[:-1]) == {False}
    # One DELETE: while it runs the provider only looks.
    [delete] = double.requests_to("DELETE")
    assert delete.path == f"/v1/{pool_name(plan)}"
    assert double.pools == {}


def test_missing_credentials_are_reported(resource, plan, monkeypatch, tmp_path):
    monkeypatch.delenv(ENDPOINT_ENV, raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    with pytest.raises(ProviderError) as caught:
        GkeProvider().ensure(resource, plan, 1)
    assert caught.value.reason == "CredentialsUnavailable"
    assert "missing.json" in caught.value.message


def test_delete_of_a_missing_pool_is_done(double, provider, resource, plan):
    assert provider.delete(resource, plan) is True
    assert double.requests_to("DELETE") == []


def test_delete_while_the_create_runs_is_cluster_busy(double, provider, resource, plan):
    provider.ensure(resource, plan, 1)
    with pytest.raises(ProviderError) as caught:
        provider.delete(resource, plan)
    assert (caught.value.reason, caught.value.transient) == ("ClusterBusy", True)


def test_ensure_of_a_pool_being_deleted_waits_then_creates_it_again(double, provider,
                                                                    resource, plan):
    ensure_until(provider, resource, plan, ready)
    assert provider.delete(resource, plan) is False
    seen = ensure_until(provider, resource, plan, ready)
    assert seen[0].reason == "Deleting"
    assert len(double.requests_to("POST")) == 2


# --- the client ------------------------------------------------------------------


def test_default_client_follows_the_endpoint_variable(double, resource, plan, monkeypatch):
    monkeypatch.setenv(ENDPOINT_ENV, f"http://{double.host}")
    provider = GkeProvider()  # what the operator builds
    assert provider.ensure(resource, plan, 1).reason == "Provisioning"
    assert len(double.requests_to("POST")) == 1


def test_build_client_for_a_plain_http_endpoint_uses_rest(double):
    client = build_client(f"http://{double.host}")
    assert client.transport.kind == "rest"


@pytest.mark.parametrize(
    ("base", "cap", "hold", "named"),
    [("soon", None, None, "IMAGEGEN_GKE_BACKOFF_BASE_S"),
     ("0", None, None, "IMAGEGEN_GKE_BACKOFF_BASE_S"),
     (None, "-5", None, "IMAGEGEN_GKE_BACKOFF_MAX_S"),
     ("60", "30", None, "IMAGEGEN_GKE_BACKOFF_BASE_S"),
     (None, None, "inf", "IMAGEGEN_GKE_FAILED_CREATE_HOLD_S"),
     (None, None, "nan", "IMAGEGEN_GKE_FAILED_CREATE_HOLD_S")],
)
def test_the_operator_refuses_to_start_with_a_backoff_setting_that_cannot_work(
        monkeypatch, base, cap, hold, named):
    from imagegen_operator.providers import build_providers
    from support.memory_kube import InMemoryKube

    for env, value in (("IMAGEGEN_GKE_BACKOFF_BASE_S", base), ("IMAGEGEN_GKE_BACKOFF_MAX_S", cap),
                       ("IMAGEGEN_GKE_FAILED_CREATE_HOLD_S", hold)):
        if value is None:
            monkeypatch.delenv(env, raising=False)
        else:
            monkeypatch.setenv(env, value)
    with pytest.raises(ValueError, match=named):
        build_providers(InMemoryKube())
