"""The operator end to end: real API server, scheduler, controller-manager, KWOK nodes.

Each test uses its own namespace and its own GPU configuration, so the node
pools (shared by configuration, cluster-wide) of one test never meet another's.
"""

from __future__ import annotations

import time

import pytest

from imagegen_operator import gke
from imagegen_operator.render.nodepool import POOL_LABEL
from support.gpu_nodes import pool_name
from support.kube import apply, delete_services, eventually, get_json, wait_ready
from support.operator_process import OperatorProcess, audit_writes

pytestmark = pytest.mark.cluster


# The namespaces this module's tests made, so that what a failed test left is deleted while
# the operator still runs to release it: a simulated node left behind would be counted by
# the later modules' pools of the same name.
NAMESPACES: set[str] = set()


@pytest.fixture(scope="module")
def operator(cluster, crd, tmp_path_factory):
    proc = OperatorProcess(cluster, tmp_path_factory.mktemp("operator") / "operator.log").start()
    yield proc
    try:
        for ns in sorted(NAMESPACES):
            cluster.kubectl("delete", "igs", "--all", "-n", ns, "--wait=true",
                            "--timeout=150s", check=False, timeout=180)
    finally:
        proc.stop()
        print(proc.log())


def service(name: str, ns: str, gpu: dict, replicas: int = 1, **spec) -> dict:
    return {
        "apiVersion": "imagegen.dev/v1alpha1",
        "kind": "ImageGenService",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "model": {"uri": "file:///models/tiny-sd15", "family": "SD15", "memoryGiB": 4},
            "gpu": gpu,
            "nodePool": {"provider": "Local", "maxNodes": 3},
            "replicas": replicas,
            **spec,
        },
    }


def namespace(cluster, name: str) -> str:
    NAMESPACES.add(name)
    apply(cluster, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    # Pods are refused until the controller-manager has made its default ServiceAccount:
    # a ReplicaFailure that is not the test's.
    eventually(lambda: exists(cluster, "serviceaccount", "default", "-n", name), timeout=30,
               what=f"the default ServiceAccount of {name}")
    return name


def igs(cluster, ns: str, name: str) -> dict:
    return get_json(cluster, "igs", name, "-n", ns)


def condition(obj: dict, type_: str) -> dict | None:
    return next((c for c in (obj.get("status") or {}).get("conditions", [])
                 if c["type"] == type_), None)


def pool_nodes(cluster, pool: str) -> list[dict]:
    return get_json(cluster, "nodes", "-l", f"{POOL_LABEL}={pool}")["items"]


def exists(cluster, *args: str) -> bool:
    return cluster.kubectl("get", *args, check=False).returncode == 0


TS2_L4 = {"type": "nvidia-l4", "sharing": {"strategy": "TimeSharing", "maxSharedClientsPerGpu": 2}}


def test_two_services_share_one_pool_which_goes_with_the_last(cluster, operator):
    ns = namespace(cluster, "e2e-shared")
    apply(cluster, service("alpha", ns, TS2_L4), service("beta", ns, TS2_L4, replicas=2))
    wait_ready(cluster, ns, "alpha", "beta")

    alpha, beta = igs(cluster, ns, "alpha"), igs(cluster, ns, "beta")
    pool = alpha["status"]["nodePool"]["name"]
    assert beta["status"]["nodePool"]["name"] == pool
    assert alpha["status"]["observedGeneration"] == alpha["metadata"]["generation"]
    assert condition(alpha, "Ready")["observedGeneration"] == alpha["metadata"]["generation"]
    assert alpha["status"]["capacity"]["slotsPerGpu"] == 2
    assert condition(alpha, "Reconciling")["status"] == "False"
    assert condition(alpha, "Stalled")["status"] == "False"
    assert alpha["status"]["sharing"] == "ts:2"
    assert beta["status"]["readyReplicas"] == 2
    # Three pods need two time-shared L4s: the one pool grew to two nodes.
    nodes = pool_nodes(cluster, pool)
    assert len(nodes) == 2
    assert {n["metadata"]["labels"][gke.LABEL_SHARING_STRATEGY] for n in nodes} == {"time-sharing"}

    pods = get_json(cluster, "pods", "-n", ns)["items"]
    assert len(pods) == 3
    node_names = {n["metadata"]["name"] for n in nodes}
    for pod in pods:
        assert pod["status"]["phase"] == "Running"
        assert pod["spec"]["nodeName"] in node_names
        assert pod["spec"]["nodeSelector"][gke.LABEL_MAX_SHARED_CLIENTS] == "2"

    # The transitions are Kubernetes Events on the service (kubectl describe shows them);
    # kopf posts them a moment after the status they follow.
    def service_events() -> list[dict]:
        return [e for e in get_json(cluster, "events", "-n", ns, "--field-selector",
                                    "involvedObject.name=alpha")["items"]
                if e["involvedObject"]["kind"] == "ImageGenService"]

    events = eventually(lambda: [e for e in service_events()
                                 if e["message"].startswith("Ready=True")] and service_events(),
                        timeout=30, what="the Ready=True event")
    messages = [e["message"] for e in events]
    assert any(m.startswith("NodePoolReady=True") for m in messages), messages
    # Not ready while it rolled out is what status says; nothing went wrong, so no warning
    # but the one of a spec that serves with neither a token nor a NetworkPolicy.
    warnings = [e["reason"] for e in events if e["type"] == "Warning"]
    assert set(warnings) == {"ServingUnauthenticated"}, warnings

    delete_services(cluster, operator, ns, "alpha")
    assert pool_nodes(cluster, pool), "the pool went while beta still uses it"
    delete_services(cluster, operator, ns, "beta")
    eventually(lambda: not pool_nodes(cluster, pool), timeout=30, what="pool deleted")


def test_model_that_does_not_fit_its_slice_creates_nothing(cluster, operator):
    ns = namespace(cluster, "e2e-nofit")
    gpu = {"type": "nvidia-h100-80gb", "partitionSize": "1g.10gb"}
    body = service("too-big", ns, gpu)
    body["spec"]["model"]["memoryGiB"] = 40
    apply(cluster, body)

    def not_ready():
        cond = condition(igs(cluster, ns, "too-big"), "Ready")
        return cond if cond and cond["status"] == "False" else None

    cond = eventually(not_ready, timeout=30, what="Ready=False")
    assert cond["reason"] == "ModelDoesNotFitSlice"
    assert "memoryGiB" in cond["message"] and "1g.10gb" in cond["message"]
    assert cond["observedGeneration"] == 1
    stalled = condition(igs(cluster, ns, "too-big"), "Stalled")
    assert (stalled["status"], stalled["reason"]) == ("True", "ModelDoesNotFitSlice")
    # Stuck, not waiting: that is worth a warning.
    events = eventually(
        lambda: [e for e in get_json(cluster, "events", "-n", ns)["items"]
                 if e["type"] == "Warning" and e["reason"] == "ModelDoesNotFitSlice"],
        timeout=30, what="a Warning event",
    )
    assert events[0]["involvedObject"]["name"] == "too-big"
    # A couple of resyncs later, still nothing created.
    resynced = _timer_reconciles(operator.metrics())
    eventually(lambda: _timer_reconciles(operator.metrics()) >= resynced + 2, timeout=60,
               what="two more resyncs")
    assert not exists(cluster, "deployment", "too-big", "-n", ns)
    assert pool_nodes(cluster, pool_name(body)) == []
    delete_services(cluster, operator, ns, "too-big")


def test_hand_edits_are_undone_and_steady_state_writes_nothing(cluster, operator):
    ns = namespace(cluster, "e2e-drift")
    apply(cluster, service("drift", ns, {"type": "nvidia-tesla-t4"}, replicas=2))
    wait_ready(cluster, ns, "drift")

    # Steady state: once the last status update after Ready has landed, reconciles
    # keep running (a timer every second) and write nothing at all for this service.
    settle_quietly(cluster, ns, quiet_s=3, timeout=30)
    before = _timer_reconciles(operator.metrics())
    since = cluster.audit_log.stat().st_size
    eventually(lambda: _timer_reconciles(operator.metrics()) >= before + 2, timeout=30,
               what="two timer reconciles")
    time.sleep(2)
    writes = writes_for(cluster, since, ns)
    assert writes == [], [(w["verb"], w["requestURI"]) for w in writes]

    # A replica count edited by hand is put back.
    cluster.kubectl("scale", "deployment/drift", "-n", ns, "--replicas=5")
    eventually(lambda: get_json(cluster, "deployment", "drift", "-n", ns)["spec"]["replicas"] == 2,
               timeout=30, what="replicas restored to 2")

    # A Deployment deleted by hand comes back.
    uid = get_json(cluster, "deployment", "drift", "-n", ns)["metadata"]["uid"]
    cluster.kubectl("delete", "deployment", "drift", "-n", ns, "--wait=true")
    eventually(
        lambda: exists(cluster, "deployment", "drift", "-n", ns)
        and get_json(cluster, "deployment", "drift", "-n", ns)["metadata"]["uid"] != uid,
        timeout=30, what="Deployment recreated",
    )
    wait_ready(cluster, ns, "drift")
    delete_services(cluster, operator, ns, "drift")


def writes_for(cluster, since: int, ns: str) -> list[dict]:
    """The operator's writes since ``since`` to ``ns``'s objects and to nodes."""
    return [w for w in audit_writes(cluster, since)
            if (w.get("objectRef") or {}).get("namespace") == ns
            or (w.get("objectRef") or {}).get("resource") == "nodes"]


def settle_quietly(cluster, ns: str, quiet_s: float, timeout: float) -> None:
    """Wait for a window of ``quiet_s`` with no operator writes for ``ns``; fail if it
    never comes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        since = cluster.audit_log.stat().st_size
        time.sleep(quiet_s)
        if not writes_for(cluster, since, ns):
            return
    raise AssertionError(f"the operator kept writing for {timeout}s")


def _timer_reconciles(metrics_text: str) -> float:
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("imagegen_operator_reconcile_total{") and 'trigger="timer"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_operator_killed_mid_reconcile_converges_without_duplicates(cluster, operator):
    ns = namespace(cluster, "e2e-restart")
    gpu = {"type": "nvidia-a100-80gb", "partitionSize": "2g.20gb"}
    apply(cluster, service("restart", ns, gpu, replicas=4))
    # Killed once the reconcile has begun: the pool is named in status before it is asked for.
    eventually(lambda: ((igs(cluster, ns, "restart").get("status") or {}).get("nodePool")
                        or {}).get("name"), timeout=60, interval=0.02, what="the pool named")
    operator.kill()
    operator.start()
    wait_ready(cluster, ns, "restart")

    status = igs(cluster, ns, "restart")["status"]
    pool = status["nodePool"]["name"]
    # 4 replicas, 3 slots per A100 with 2g.20gb: two nodes, no more.
    assert len(pool_nodes(cluster, pool)) == 2
    deployments = get_json(cluster, "deployments", "-n", ns)["items"]
    assert [d["metadata"]["name"] for d in deployments] == ["restart"]
    assert len(get_json(cluster, "pods", "-n", ns)["items"]) == 4
    delete_services(cluster, operator, ns, "restart")
    eventually(lambda: not pool_nodes(cluster, pool), timeout=30, what="no orphaned pool")


def test_sharing_change_moves_to_a_new_pool_without_downtime(cluster, operator):
    ns = namespace(cluster, "e2e-move")
    old_gpu = {"type": "nvidia-h100-80gb", "partitionSize": "1g.20gb",
               "sharing": {"strategy": "TimeSharing", "maxSharedClientsPerGpu": 2}}
    apply(cluster, service("mover", ns, old_gpu, replicas=2))
    wait_ready(cluster, ns, "mover")
    old_pool = igs(cluster, ns, "mover")["status"]["nodePool"]["name"]

    new_gpu = {**old_gpu, "sharing": {"strategy": "TimeSharing", "maxSharedClientsPerGpu": 3}}
    apply(cluster, service("mover", ns, new_gpu, replicas=2))
    lowest_ready = 2
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        dep = get_json(cluster, "deployment", "mover", "-n", ns)
        lowest_ready = min(lowest_ready, dep["status"].get("readyReplicas") or 0)
        current = igs(cluster, ns, "mover")
        if (current["status"]["nodePool"]["name"] != old_pool
                and (condition(current, "Ready") or {}).get("status") == "True"
                and condition(current, "Ready")["observedGeneration"] == 2):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"never moved off {old_pool}: {current['status']}")

    new_pool = current["status"]["nodePool"]["name"]
    assert lowest_ready >= 1, "the move left no ready replica"
    # An old pod on its way out may outlive its node a moment: the ones that stay count.
    running = [pod for pod in get_json(cluster, "pods", "-n", ns)["items"]
               if pod["status"]["phase"] == "Running"
               and not pod["metadata"].get("deletionTimestamp")]
    assert running, "no pod runs after the move"
    new_nodes = {node["metadata"]["name"] for node in pool_nodes(cluster, new_pool)}
    for pod in running:
        assert pod["spec"]["nodeName"] in new_nodes, (pod["spec"]["nodeName"], new_nodes)
    eventually(lambda: not pool_nodes(cluster, old_pool), timeout=30, what="old pool retired")
    delete_services(cluster, operator, ns, "mover")


def test_whole_gpu_pods_stay_off_shared_nodes_of_the_same_accelerator(cluster, operator):
    ns = namespace(cluster, "e2e-exclusive")
    mps = {"type": "nvidia-l4", "sharing": {"strategy": "MPS", "maxSharedClientsPerGpu": 4}}
    apply(cluster, service("shared", ns, mps, replicas=1))
    wait_ready(cluster, ns, "shared")
    # Two whole-GPU replicas: the MPS node has free slots, but they are not whole GPUs.
    apply(cluster, service("whole", ns, {"type": "nvidia-l4"}, replicas=2))
    wait_ready(cluster, ns, "whole")
    pods = get_json(cluster, "pods", "-n", ns, "-l", "app.kubernetes.io/instance=whole")["items"]
    assert len(pods) == 2, [p["metadata"]["name"] for p in pods]
    for pod in pods:
        labels = get_json(cluster, "node", pod["spec"]["nodeName"])["metadata"]["labels"]
        assert gke.LABEL_SHARING_STRATEGY not in labels, pod["spec"]["nodeName"]
    delete_services(cluster, operator, ns)


def test_a_gpu_quota_that_refuses_the_pods_is_said_in_status(cluster, operator):
    """A ResourceQuota on GPUs: the ReplicaSet controller cannot create the second pod, which
    no pod condition could tell; the service says so in the controller's words."""
    ns = namespace(cluster, "e2e-quota")
    apply(cluster, {"apiVersion": "v1", "kind": "ResourceQuota",
                    "metadata": {"name": "gpus", "namespace": ns},
                    "spec": {"hard": {"requests.nvidia.com/gpu": "1"}}})
    gpu = {"type": "nvidia-a100-80gb", "partitionSize": "3g.40gb"}
    apply(cluster, service("over", ns, gpu, replicas=2))

    def refused():
        ready = condition(igs(cluster, ns, "over"), "Ready")
        return ready if ready and ready["reason"] == "ReplicaFailure" else None

    ready = eventually(refused, timeout=120, what="Ready=False, ReplicaFailure")
    assert ready["status"] == "False" and "forbidden" in ready["message"], ready
    assert "gpus" in ready["message"], ready  # the quota, named by the controller
    delete_services(cluster, operator, ns)


def test_autoscaling_switched_off_removes_the_hpa(cluster, operator):
    ns = namespace(cluster, "e2e-hpa")
    gpu = {"type": "nvidia-tesla-t4", "sharing": {"strategy": "MPS", "maxSharedClientsPerGpu": 2}}
    scaled = service("scaled", ns, gpu, replicas=1,
                     autoscaling={"minReplicas": 1, "maxReplicas": 4, "targetQueueDepth": 2})
    apply(cluster, scaled)
    hpa = eventually(lambda: exists(cluster, "hpa", "scaled", "-n", ns)
                     and get_json(cluster, "hpa", "scaled", "-n", ns), what="HPA created")
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "ImageGenService"
    assert hpa["spec"]["maxReplicas"] == 4
    cluster.kubectl("patch", "igs", "scaled", "-n", ns, "--type=json",
                    "-p", '[{"op": "remove", "path": "/spec/autoscaling"}]')
    eventually(lambda: not exists(cluster, "hpa", "scaled", "-n", ns), timeout=30,
               what="HPA deleted")
    delete_services(cluster, operator, ns, "scaled")


def cache_volume(ns: str) -> list[dict]:
    """A bound claim for the compile cache (KWOK mounts nothing; the scheduler needs it bound)."""
    return [
        {
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": f"{ns}-compile-cache"},
            "spec": {
                "capacity": {"storage": "10Gi"}, "accessModes": ["ReadWriteMany"],
                "storageClassName": "", "hostPath": {"path": "/var/cache/imagegen"},
                "claimRef": {"namespace": ns, "name": "compile-cache"},
            },
        },
        {
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": "compile-cache", "namespace": ns},
            "spec": {
                "accessModes": ["ReadWriteMany"], "storageClassName": "",
                "volumeName": f"{ns}-compile-cache", "resources": {"requests": {"storage": "10Gi"}},
            },
        },
    ]


def test_a_precompile_job_finishes_before_any_replica_starts(cluster, operator):
    ns = namespace(cluster, "e2e-precompile")
    gpu = {"type": "nvidia-l4", "sharing": {"strategy": "TimeSharing", "maxSharedClientsPerGpu": 3}}
    compiled = {"compile": {"enabled": True, "cache": {"pvcName": "compile-cache"},
                            "precompileJob": True}}
    apply(cluster, service("warm", ns, gpu, replicas=2, pipeline=compiled))
    # No cache volume yet: the Job's pod cannot be scheduled, so the Job runs on and on.
    eventually(lambda: (condition(igs(cluster, ns, "warm"), "Ready") or {}).get("reason")
               == "Precompiling", timeout=60, what="Ready=False Precompiling")
    deployment = get_json(cluster, "deployment", "warm", "-n", ns)
    assert deployment["spec"]["replicas"] == 0
    assert condition(igs(cluster, ns, "warm"), "Precompiled")["reason"] == "JobRunning"

    apply(cluster, *cache_volume(ns))
    # The real Job controller runs the Job; KWOK's pod-complete stage ends its pod.
    wait_ready(cluster, ns, "warm", timeout=150)
    [job] = get_json(cluster, "jobs", "-n", ns)["items"]
    assert job["status"].get("succeeded") == 1
    warm = igs(cluster, ns, "warm")
    assert condition(warm, "Precompiled")["status"] == "True"
    assert warm["status"]["precompiledJob"] == job["metadata"]["name"]
    serving = get_json(cluster, "pods", "-n", ns, "-l",
                       "app.kubernetes.io/name=imagegen-server")["items"]
    assert len(serving) == 2
    delete_services(cluster, operator, ns, "warm")
