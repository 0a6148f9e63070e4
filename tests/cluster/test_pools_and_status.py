"""Which pool is whose, where pods may land, and what status says when things go wrong.

The operator as a real process against the real API server, scheduler and KWOK;
the GKE provider against the local test double of GKE's REST API (GKE itself
cannot be reached from here). The operator's default cluster comes from the
chart's ``gke.cluster`` value, read out of the chart as helm renders it.
"""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest
import yaml
from unit.test_chart import template_args

from imagegen_operator import api
from imagegen_operator.render.nodepool import KWOK_ANNOTATION, POOL_LABEL, SIMULATED_TAINT
from support.fake_gke import GkeApiTestDouble
from support.gpu_nodes import fake_gpu_node, pool_name
from support.kube import apply, delete_services, eventually, get_json, wait_ready
from support.operator_process import OperatorProcess

pytestmark = pytest.mark.cluster

NS = "v2-pools"
BACKOFF_NS = "v2-backoff"
CLUSTER = "projects/imagegen-test/locations/us-central1/clusters/home"
OTHER_CLUSTER = "projects/imagegen-test/locations/europe-west4/clusters/away"
# A configuration no other test module uses: its pools are this module's alone.
GPU = {"type": "nvidia-a100-80gb", "sharing": {"strategy": "MPS", "maxSharedClientsPerGpu": 3}}


def chart_env(cluster, *sets: str) -> dict[str, str]:
    """The operator container's environment as the chart renders it."""
    rendered = subprocess.run([str(cluster.bin / "helm"), *template_args(*sets)],
                              capture_output=True, text=True, check=True, timeout=120).stdout
    deployment = next(d for d in yaml.safe_load_all(rendered)
                      if d and d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


@pytest.fixture(scope="module")
def gke_api():
    with GkeApiTestDouble(polls_to_done=1) as double:
        yield double


@pytest.fixture(scope="module")
def operator(cluster, crd, gke_api, tmp_path_factory):
    for ns in (NS, BACKOFF_NS):
        apply(cluster, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    env = chart_env(cluster, f"gke.cluster={CLUSTER}")
    assert env["IMAGEGEN_GKE_CLUSTER"] == CLUSTER
    proc = OperatorProcess(
        cluster, tmp_path_factory.mktemp("v2-operator") / "operator.log",
        env={"IMAGEGEN_GKE_CLUSTER": env["IMAGEGEN_GKE_CLUSTER"],
             "IMAGEGEN_GKE_API_ENDPOINT": f"http://{gke_api.host}",
             "IMAGEGEN_OPERATOR_NAMESPACES": f"{NS},{BACKOFF_NS}",
             "IMAGEGEN_GKE_BACKOFF_BASE_S": "1", "IMAGEGEN_GKE_BACKOFF_MAX_S": "4",
             # The sweep for unused pools, in seconds rather than minutes.
             "IMAGEGEN_OPERATOR_SWEEP_SECONDS": "2",
             "IMAGEGEN_OPERATOR_UNUSED_POOL_GRACE_SECONDS": "4"},
    ).start()
    yield proc
    try:
        # What a failed test left goes while the operator still runs to release its pools.
        for ns in (NS, BACKOFF_NS):
            cluster.kubectl("delete", "igs", "--all", "-n", ns, "--wait=true",
                            "--timeout=150s", check=False, timeout=180)
    finally:
        proc.stop()
        print(proc.log())


def service(name: str, ns: str = NS, gpu: dict | None = None, **spec) -> dict:
    return {
        "apiVersion": api.API_VERSION, "kind": api.KIND,
        "metadata": {"name": name, "namespace": ns},
        "spec": {"model": {"uri": "gs://models/sd15", "family": "SD15", "memoryGiB": 4},
                 "gpu": gpu or GPU, **spec},
    }


def igs(cluster, name: str, ns: str = NS) -> dict:
    return get_json(cluster, "igs", name, "-n", ns)


def condition(cluster, name: str, type_: str, ns: str = NS) -> dict:
    conditions = (igs(cluster, name, ns).get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == type_), {})


def events(cluster, name: str, ns: str = NS) -> list[dict]:
    return [e for e in get_json(cluster, "events", "-n", ns,
                                "--field-selector", f"involvedObject.name={name}")["items"]
            if e["involvedObject"]["kind"] == api.KIND]


def test_a_minimal_spec_is_accepted_and_ready_in_the_operators_cluster(cluster, operator, gke_api):
    minimal = {"apiVersion": api.API_VERSION, "kind": api.KIND,
               "metadata": {"name": "minimal", "namespace": NS},
               "spec": {"model": {"uri": "gs://models/sd15"}, "gpu": {"type": "nvidia-l4"}}}
    apply(cluster, minimal)
    name = pool_name(minimal)
    eventually(lambda: condition(cluster, "minimal", "NodePoolReady").get("status") == "True",
               timeout=60, what="the GKE pool made in the default cluster")
    assert f"{CLUSTER}/nodePools/{name}" in gke_api.pools
    status = igs(cluster, "minimal")["status"]
    # Ready nodes are counted, not inferred from the pool's bounds: none has joined yet.
    assert status["nodePool"] == {"name": name, "provider": "GKE", "cluster": CLUSTER,
                                  "readyNodes": 0, "created": True}
    # GKE's autoscaler would add a node for the pending pod: here, a node as GKE registers it.
    apply(cluster, fake_gpu_node(f"{name}-gke-0", "nvidia-l4", pool=name))
    try:
        wait_ready(cluster, NS, "minimal")
        eventually(lambda: igs(cluster, "minimal")["status"]["nodePool"]["readyNodes"] == 1,
                   timeout=30, what="the node GKE added, counted")
        delete_services(cluster, operator, NS, "minimal")
    finally:
        # Not simulated: the later Local services' pods of this pool name could land on it.
        cluster.kubectl("delete", "node", f"{name}-gke-0", "--ignore-not-found")
    assert f"{CLUSTER}/nodePools/{name}" not in gke_api.pools


def test_a_service_naming_another_cluster_than_the_operators_is_refused(
        cluster, operator, gke_api):
    away = service("away", nodePool={"provider": "GKE", "cluster": OTHER_CLUSTER})
    apply(cluster, away)

    def foreign() -> dict | None:
        pool = condition(cluster, "away", "NodePoolReady")
        return pool if pool.get("reason") == "ForeignCluster" else None

    refused = eventually(foreign, timeout=60, what="the other cluster refused")
    assert OTHER_CLUSTER in refused["message"] and CLUSTER in refused["message"]
    assert condition(cluster, "away", "Stalled")["status"] == "True"
    # Nothing asked of GKE there, and no serving pods made for a pool that cannot be.
    assert not [r for r in gke_api.requests if OTHER_CLUSTER in r.path]
    assert cluster.kubectl("get", "deployment", "away", "-n", NS, check=False).returncode != 0
    delete_services(cluster, operator, NS, "away")


def test_a_gke_pool_goes_with_its_last_user_and_its_pods_stay_off_simulated_nodes(
        cluster, operator, gke_api):
    on_gke = service("on-gke", nodePool={"provider": "GKE", "cluster": CLUSTER})
    on_local = service("on-local", nodePool={"provider": "Local"})
    name = pool_name(on_gke)
    assert pool_name(on_local) == name  # the same derived name, two different pools
    apply(cluster, on_gke, on_local)
    wait_ready(cluster, NS, "on-local")
    eventually(lambda: condition(cluster, "on-gke", "NodePoolReady").get("status") == "True",
               timeout=60, what="the GKE pool")
    assert f"{CLUSTER}/nodePools/{name}" in gke_api.pools

    # The GKE service's pod selects its pool by name, and the Local nodes carrying that
    # name are marked simulated: the real scheduler keeps it Pending.
    def pending_reason():
        pods = get_json(cluster, "pods", "-n", NS,
                        "-l", "app.kubernetes.io/instance=on-gke")["items"]
        for pod in pods:
            for c in pod["status"].get("conditions") or []:
                if c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable":
                    return c["message"]
        return None

    def weighed_against_the_nodes() -> str | None:
        # The scheduler's first try may predate the Local nodes ("no nodes available to
        # schedule pods"); it tries again as they register.
        message = pending_reason()
        return message if message and "nodes are available" in message else None

    message = eventually(weighed_against_the_nodes, timeout=60,
                         what="the GKE pod left unscheduled, the nodes weighed")
    # Of all the cluster's nodes (the scheduler counts each), the one the pod's selector
    # takes, the simulated one of the same name, is refused for its taint.
    assert re.match(r"0/\d+ nodes are available: (.*, )?1 node\(s\) had untolerated taint",
                    message), message
    local_pods = get_json(cluster, "pods", "-n", NS,
                          "-l", "app.kubernetes.io/instance=on-local")["items"]
    assert [p["status"]["phase"] for p in local_pods] == ["Running"]

    delete_services(cluster, operator, NS, "on-gke")
    # The Local service with the same pool name does not keep the GKE pool alive.
    assert f"{CLUSTER}/nodePools/{name}" not in gke_api.pools
    assert [r for r in gke_api.requests_to("DELETE") if r.path.endswith(f"/{name}")]
    assert get_json(cluster, "nodes", "-l", f"imagegen.dev/node-pool={name}")["items"]
    delete_services(cluster, operator, NS, "on-local")


POLICY = {
    "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
    "metadata": {"name": "v2-at-most-two-replicas"},
    "spec": {
        "failurePolicy": "Fail",
        "matchConstraints": {"resourceRules": [{
            "apiGroups": ["apps"], "apiVersions": ["v1"], "operations": ["CREATE", "UPDATE"],
            "resources": ["deployments"]}]},
        "validations": [{"expression": "object.spec.replicas <= 2",
                         "message": "spec.replicas: at most 2 replicas in this namespace"}],
    },
}
BINDING = {
    "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
    "metadata": {"name": "v2-at-most-two-replicas"},
    "spec": {"policyName": "v2-at-most-two-replicas", "validationActions": ["Deny"],
             "matchResources": {"namespaceSelector": {"matchLabels": {
                 "kubernetes.io/metadata.name": NS}}}},
}


def test_a_refused_deployment_is_stalled_in_status_and_recovers_when_fixed(cluster, operator):
    """A cluster policy (a ValidatingAdmissionPolicy, as Gatekeeper or Kyverno would be)
    refuses the Deployment: only the API server can know, so status must say it."""
    probe = {"apiVersion": "apps/v1", "kind": "Deployment",
             "metadata": {"name": "probe", "namespace": NS},
             "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "probe"}},
                      "template": {"metadata": {"labels": {"app": "probe"}},
                                   "spec": {"containers": [{"name": "c", "image": "x"}]}}}}

    def policy_bites():
        out = cluster.kubectl("create", "--dry-run=server", "-f", "-",
                              input=yaml.safe_dump(probe), check=False)
        return out.returncode != 0 and "at most 2 replicas" in out.stderr

    apply(cluster, POLICY, BINDING)
    try:
        # The policy takes a moment to reach the admission plugin: wait until it bites.
        eventually(policy_bites, timeout=30, what="the admission policy in force")
        too_many = service("refused", nodePool={"provider": "Local", "maxNodes": 2}, replicas=3)
        apply(cluster, too_many)

        def rejected():
            ready = condition(cluster, "refused", "Ready")
            return ready if ready.get("reason") == "ApplyRejected" else None

        ready = eventually(rejected, timeout=60, what="Ready=False ApplyRejected")
        assert ready["status"] == "False"
        assert "at most 2 replicas" in ready["message"]
        body = igs(cluster, "refused")
        assert body["status"]["observedGeneration"] == body["metadata"]["generation"]
        assert condition(cluster, "refused", "Stalled")["status"] == "True"
        eventually(lambda: [e for e in events(cluster, "refused")
                            if e["type"] == "Warning" and e["reason"] == "ApplyRejected"],
                   timeout=30, what="the ApplyRejected warning event")

        cluster.kubectl("patch", "igs", "refused", "-n", NS, "--type=merge",
                        "-p", '{"spec":{"replicas":2}}')  # no operator restart
        wait_ready(cluster, NS, "refused")
        assert condition(cluster, "refused", "Stalled")["status"] == "False"
        assert operator.proc.poll() is None
    finally:
        cluster.kubectl("delete", "validatingadmissionpolicybinding,validatingadmissionpolicy",
                        "v2-at-most-two-replicas", check=False)
        # And a moment to leave it: the next test's replicas must not meet it.
        eventually(lambda: not policy_bites(), timeout=30, what="the admission policy gone")
        cluster.kubectl("delete", "igs", "refused", "-n", NS, "--wait=true", "--timeout=150s",
                        check=False, timeout=180)


def test_a_spec_that_can_never_fit_is_stalled_naming_the_fields(cluster, operator):
    apply(cluster, service("never-fits", gpu={"type": "nvidia-l4"},
                           nodePool={"provider": "Local", "maxNodes": 2}, replicas=3))

    def stalled():
        found = condition(cluster, "never-fits", "Stalled")
        return found if found.get("status") == "True" else None

    found = eventually(stalled, timeout=60, what="Stalled=True")
    assert found["reason"] == "PoolTooSmall"
    ready = condition(cluster, "never-fits", "Ready")
    assert ready["status"] == "False"
    assert "spec.replicas=3" in ready["message"] and "spec.nodePool.maxNodes=2" in ready["message"]
    # What fits still serves.
    eventually(lambda: igs(cluster, "never-fits")["status"].get("readyReplicas") == 2,
               timeout=60, what="two replicas serving")
    delete_services(cluster, operator, NS, "never-fits")


def test_a_failing_gke_api_is_called_less_and_less_by_all_users_of_a_pool(
        cluster, operator, gke_api):
    """Five services on one pool; the GKE API answers 503 to everything. The operator
    polls the pool every second (its resync here), yet GKE sees calls spaced about 1, 2, 4,
    4 s: the provider's backoff (base 1 s, cap 4 s for this test, each delay spread over its
    upper half), shared by the pool's users."""
    gke_api.outage("UNAVAILABLE")
    names = [f"user-{i}" for i in range(5)]
    gpu = {"type": "nvidia-h100-80gb", "partitionSize": "1g.10gb"}
    try:
        start = time.monotonic()
        apply(cluster, *[service(n, ns=BACKOFF_NS, gpu=gpu,
                                 nodePool={"provider": "GKE", "spot": True, "maxNodes": 3})
                   for n in names])
        # This pool's calls only: another test's service may still be asking for its own.
        pool = pool_name(service(names[0], ns=BACKOFF_NS, gpu=gpu,
                                 nodePool={"provider": "GKE", "spot": True, "maxNodes": 3}))

        def pool_calls() -> list[float]:
            return [r.at for r in gke_api.requests
                    if r.at > start and (pool in r.path or pool in json.dumps(r.body))]

        # 16 s from the first call, however long the operator took to take the services up.
        first = eventually(pool_calls, timeout=60, what="a first GKE call")[0]
        time.sleep(max(0.0, first + 16 - time.monotonic()))
        calls = [at - first for at in pool_calls() if at <= first + 16]
        print("GKE API calls at (s):", [round(c, 1) for c in calls])
        gaps = [b - a for a, b in zip(calls, calls[1:], strict=False)]
        # Without the backoff: 5 services x 16 polls. With it: delays of 1, 2, 4, 4, 4, ...
        # s, each between half and all of its step: 6 to 10 calls.
        assert 4 <= len(calls) <= 13, calls
        assert all(g >= 0.45 for g in gaps), gaps
        assert sorted(gaps)[-2:] >= [1.8, 1.8], gaps  # it reached the cap's range
        reason = condition(cluster, "user-0", "NodePoolReady", BACKOFF_NS)
        assert reason["reason"] == "GkeUnavailable" and "next try at" in reason["message"]
        assert condition(cluster, "user-0", "Stalled", BACKOFF_NS)["status"] == "False"
    finally:
        gke_api.outage(None)
    eventually(lambda: condition(cluster, "user-0", "NodePoolReady", BACKOFF_NS).get("status")
               == "True", timeout=30, what="recovered once GKE answers")
    # Five finalizers and one pool deletion.
    delete_services(cluster, operator, BACKOFF_NS)


def test_a_field_added_by_hand_to_the_pod_template_is_removed(cluster, operator):
    """kubebuilder's Owns() users expect the whole pod template to be the operator's:
    a nodeSelector key added with kubectl (another field manager) goes again, while
    `kubectl rollout restart` keeps working."""
    apply(cluster, service("owned", gpu={"type": "nvidia-l4"},
                           nodePool={"provider": "Local", "maxNodes": 1}))
    wait_ready(cluster, NS, "owned")
    cluster.kubectl("patch", "deployment", "owned", "-n", NS, "--type=merge", "-p",
                    '{"spec":{"template":{"spec":{"nodeSelector":{"disk":"ssd"}}}}}')

    def selector():
        return get_json(cluster, "deployment", "owned", "-n", NS)[
            "spec"]["template"]["spec"]["nodeSelector"]

    eventually(lambda: "disk" not in selector(), timeout=30, what="the hand-added key removed")
    assert selector()["cloud.google.com/gke-accelerator"] == "nvidia-l4"  # ours stay
    wait_ready(cluster, NS, "owned")

    cluster.kubectl("rollout", "restart", "deployment/owned", "-n", NS)
    # A second hand edit, and its removal: a reconcile has run since the restart.
    cluster.kubectl("patch", "deployment", "owned", "-n", NS, "--type=merge", "-p",
                    '{"spec":{"template":{"spec":{"nodeSelector":{"disk":"nvme"}}}}}')
    eventually(lambda: "disk" not in selector(), timeout=30, what="the second key removed")
    template = get_json(cluster, "deployment", "owned", "-n", NS)["spec"]["template"]
    assert "kubectl.kubernetes.io/restartedAt" in template["metadata"].get("annotations", {})
    delete_services(cluster, operator, NS, "owned")


def test_a_key_added_by_hand_to_a_selector_is_removed(cluster, operator):
    """A key added to the NetworkPolicy's pod selector would take the server's pods out
    of its fence, one added to the Service's selector would cut its traffic off: both go
    again, labels added to the objects themselves stay."""
    apply(cluster, service("fenced", gpu={"type": "nvidia-l4"},
                           nodePool={"provider": "Local", "maxNodes": 1},
                           server={"allowFrom": [{"podSelector": {"matchLabels": {"app": "gw"}}}]}))
    wait_ready(cluster, NS, "fenced")

    def policy_selector():
        policy = get_json(cluster, "networkpolicy", "fenced", "-n", NS)
        return policy["spec"]["podSelector"]["matchLabels"]

    def service_selector():
        return get_json(cluster, "service", "fenced", "-n", NS)["spec"]["selector"]

    for kind, patch, selector in (
        ("networkpolicy", {"podSelector": {"matchLabels": {"hand": "added"}}}, policy_selector),
        ("service", {"selector": {"hand": "added"}}, service_selector),
    ):
        cluster.kubectl("patch", kind, "fenced", "-n", NS, "--type=merge",
                        "-p", json.dumps({"spec": patch}))
        cluster.kubectl("label", kind, "fenced", "-n", NS, "team=ml")
        eventually(lambda selector=selector: "hand" not in selector(), timeout=30,
                   what=f"the key added to the {kind}'s selector removed")
        assert selector()["app.kubernetes.io/instance"] == "fenced"  # ours stay
        assert get_json(cluster, kind, "fenced", "-n", NS)["metadata"]["labels"]["team"] == "ml"
    delete_services(cluster, operator, NS, "fenced")


def test_a_local_pool_never_takes_over_a_node_it_did_not_make(cluster, operator):
    # A real node labelled as the pool's (a GKE pool of the same name labels its nodes so).
    apply(cluster, {"apiVersion": "v1", "kind": "Node", "metadata": {
        "name": "worker-0", "labels": {"kubernetes.io/arch": "arm64", POOL_LABEL: "worker"}}})
    try:
        apply(cluster, service("hijack", gpu={"type": "nvidia-l4"},
                               nodePool={"provider": "Local", "name": "worker", "maxNodes": 1}))
        wait_ready(cluster, NS, "hijack")
        pool = get_json(cluster, "nodes", "-l", f"{POOL_LABEL}=worker")["items"]
        made = [n["metadata"]["name"] for n in pool if n["metadata"]["name"] != "worker-0"]
        assert len(made) == 1 and made[0].startswith("worker-"), made
        assert get_json(cluster, "igs", "hijack", "-n", NS)["status"]["nodePool"][
            "readyNodes"] == 1  # its own, not the real one
        delete_services(cluster, operator, NS, "hijack")
        assert cluster.kubectl("get", "node", made[0], check=False).returncode != 0
        node = get_json(cluster, "node", "worker-0")  # still there, as it was
        assert node["metadata"]["labels"]["kubernetes.io/arch"] == "arm64"
        # None of a simulated node's marks (the controllers' own taints and annotations aside).
        taints = {t["key"] for t in node["spec"].get("taints") or []}
        assert not taints & {"nvidia.com/gpu", SIMULATED_TAINT["key"]}, taints
        assert KWOK_ANNOTATION not in (node["metadata"].get("annotations") or {})
    finally:
        cluster.kubectl("delete", "node", "worker-0", check=False)


def test_a_pool_left_by_a_service_whose_finalizer_was_taken_off_is_swept(cluster, operator):
    """`kubectl patch` taking the finalizer off a service stuck in deletion: no finalize
    deletes its pool; the sweep does, once it has been unused for its grace."""
    apply(cluster, service("forced", gpu={"type": "nvidia-l4", "countPerNode": 2},
                           nodePool={"provider": "Local", "maxNodes": 1}))
    wait_ready(cluster, NS, "forced")
    pool = get_json(cluster, "igs", "forced", "-n", NS)["status"]["nodePool"]["name"]

    def nodes() -> list[dict]:
        return get_json(cluster, "nodes", "-l", f"imagegen.dev/node-pool={pool}")["items"]

    assert nodes()
    operator.stop()  # as when an operator is down and someone forces the delete through
    try:
        cluster.kubectl("delete", "igs", "forced", "-n", NS, "--wait=false")
        cluster.kubectl("patch", "igs", "forced", "-n", NS, "--type=merge",
                        "-p", '{"metadata": {"finalizers": null}}')
        eventually(lambda: cluster.kubectl("get", "igs", "forced", "-n", NS,
                                           check=False).returncode != 0,
                   timeout=30, what="the service gone without its finalizer")
        assert nodes()  # nothing deleted the pool
    finally:
        operator.start()
    eventually(lambda: not nodes(), timeout=60, what="the unused pool swept")
    # Logged once the delete returns, which may be a moment after the nodes went.
    eventually(lambda: f"node pool {pool}" in operator.log()
               and "used by no service" in operator.log(), timeout=15, what="the sweep logged")
