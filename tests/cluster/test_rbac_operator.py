"""The operator under the chart's RBAC: the end-to-end scenario with the chart's token.

The chart is installed (the Local provider's node rights and peering on, no operator
pod: under KWOK it would not run), a TokenRequest gives a token for its
ServiceAccount, and the operator process runs with nothing else. It must take a
service to Ready, follow a scale, refuse a spec that cannot work, and delete the pool
with the last service; the same token must be refused what the operator has no need for.

The status objects it writes on the way are the real inputs of the Argo CD health
check (docs/argocd-health.lua): Progressing, Healthy and Degraded, each checked.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from unit.test_chart import CHART
from unit.test_gitops import argocd_health

from imagegen_operator import crd as crd_module
from imagegen_operator.render.nodepool import POOL_LABEL
from localcluster import write_kubeconfig
from support.kube import apply, delete_services, eventually, get_json, wait_ready
from support.operator_process import OperatorProcess, audit_events

pytestmark = pytest.mark.cluster

RELEASE, SYSTEM_NS, NS = "rbac", "imagegen-rbac-system", "rbac-e2e"
FULLNAME = f"{RELEASE}-imagegen-operator"
USER = f"system:serviceaccount:{SYSTEM_NS}:{FULLNAME}"
# A GPU config no other test uses: pools are shared cluster-wide by configuration.
GPU = {"type": "nvidia-tesla-t4", "sharing": {"strategy": "TimeSharing", "maxSharedClientsPerGpu": 3}}


def helm(cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(cluster.bin / "helm"), "--kubeconfig", str(cluster.kubeconfig), *args],
        capture_output=True, text=True, check=check, timeout=180,
    )


@pytest.fixture(scope="module")
def chart_kubeconfig(cluster, crd, tmp_path_factory) -> Path:
    """A kubeconfig holding only a token for the chart's ServiceAccount."""
    apply(cluster, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": SYSTEM_NS}})
    path = install_for_token(cluster, RELEASE, SYSTEM_NS,
                             tmp_path_factory.mktemp("chart-account") / "kubeconfig")
    yield path
    helm(cluster, "uninstall", RELEASE, "--namespace", SYSTEM_NS, "--wait", check=False)


def install_for_token(cluster, release: str, namespace: str, kubeconfig: Path,
                      *sets: str) -> Path:
    """Install the chart with no operator pod and write ``kubeconfig`` holding only a token
    for its ServiceAccount (the Local provider's rights and peering on)."""
    # The `crd` fixture applied the CRD; this release leaves it alone (crds.enabled=false).
    args = ["crds.enabled=false", "providers.local.enabled=true", "peering.enabled=true",
            "replicaCount=0",
            # Its Job would never run under KWOK, and `helm uninstall` would wait for it.
            "uninstallCheck.enabled=false", *sets]
    helm(cluster, "upgrade", "--install", release, str(CHART), "--namespace", namespace,
         *[part for s in args for part in ("--set", s)])
    account = f"{release}-imagegen-operator"
    token = cluster.kubectl("create", "token", account, "-n", namespace,
                            "--duration=2h").stdout.strip()
    write_kubeconfig(kubeconfig, cluster.server, (cluster.dir / "pki" / "ca.crt").read_bytes(),
                     f"system:serviceaccount:{namespace}:{account}", token)
    return kubeconfig


def as_operator(cluster, kubeconfig: Path, *args: str, input: str | None = None):
    return subprocess.run([str(cluster.bin / "kubectl"), "--kubeconfig", str(kubeconfig), *args],
                          capture_output=True, text=True, timeout=60, input=input)


@pytest.fixture(scope="module")
def operator(cluster, chart_kubeconfig, tmp_path_factory):
    since = cluster.audit_log.stat().st_size
    proc = OperatorProcess(cluster, tmp_path_factory.mktemp("rbac-operator") / "operator.log",
                           kubeconfig=chart_kubeconfig,
                           env={"IMAGEGEN_OPERATOR_PEERING": FULLNAME}).start()
    proc.audit_since = since
    yield proc
    proc.stop()
    print(proc.log())


def service(name: str, gpu: dict, replicas: int, max_nodes: int = 1, memory: float = 4) -> dict:
    return {
        "apiVersion": "imagegen.dev/v1alpha1", "kind": "ImageGenService",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "model": {"uri": "file:///models/tiny-sd15", "family": "SD15", "memoryGiB": memory},
            "gpu": gpu,
            "nodePool": {"provider": "Local", "maxNodes": max_nodes},
            "replicas": replicas,
        },
    }


def igs(cluster, name: str) -> dict:
    return get_json(cluster, "igs", name, "-n", NS)


def ready(obj: dict) -> dict | None:
    return next((c for c in (obj.get("status") or {}).get("conditions", [])
                 if c["type"] == "Ready"), None)


def when(obj: dict, check) -> dict | None:
    """``obj`` if it has a Ready condition that passes ``check``, else None (keep polling)."""
    condition = ready(obj)
    return obj if condition is not None and check(condition) else None


def forbidden_requests(cluster, since: int, user: str = USER) -> list[str]:
    """Requests by the chart's ServiceAccount (``user``) that the API server refused (403)."""
    return [f"{event['verb']} {event['requestURI']}" for event in audit_events(cluster, since)
            if event.get("user", {}).get("username") == user
            and event.get("responseStatus", {}).get("code") == 403]


def test_end_to_end_under_the_charts_service_account(cluster, operator):
    apply(cluster, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})

    # Four replicas, one node of three slots: the fourth pod can never be placed, so the
    # service is Stalled, naming the fields to change, and Argo CD calls it Degraded
    # while three replicas serve.
    apply(cluster, service("rbac-t4", GPU, replicas=4))
    waiting = eventually(
        lambda: when(igs(cluster, "rbac-t4"), lambda c: c["reason"] == "PoolTooSmall"
                     and c["message"].startswith("3/4")),
        timeout=60, what="3 of 4 replicas ready, the pool too small")
    assert waiting["status"]["observedGeneration"] == 1
    health = argocd_health(waiting)
    assert health["status"] == "Degraded" and "spec.nodePool.maxNodes" in health["message"]

    # Three fit: Ready, and Healthy for Argo CD.
    cluster.kubectl("patch", "igs", "rbac-t4", "-n", NS, "--type=merge",
                    "-p", '{"spec": {"replicas": 3}}')
    wait_ready(cluster, NS, "rbac-t4")
    healthy = igs(cluster, "rbac-t4")
    assert healthy["metadata"]["generation"] == healthy["status"]["observedGeneration"] == 2
    assert ready(healthy)["observedGeneration"] == 2
    assert argocd_health(healthy) == {"status": "Healthy", "message": "3/3 replicas ready"}
    pool = healthy["status"]["nodePool"]["name"]
    assert len(get_json(cluster, "nodes", "-l", f"{POOL_LABEL}={pool}")["items"]) == 1

    # Fenced in, then open again: the NetworkPolicy made and deleted under the chart's RBAC.
    def policy_exists() -> bool:
        return cluster.kubectl("get", "networkpolicy", "rbac-t4", "-n", NS,
                               check=False).returncode == 0

    cluster.kubectl("patch", "igs", "rbac-t4", "-n", NS, "--type=merge", "-p", json.dumps(
        {"spec": {"server": {"allowFrom": [{"podSelector": {"matchLabels": {"app": "gw"}}}]}}}))
    eventually(policy_exists, timeout=60, what="the NetworkPolicy of spec.server.allowFrom")
    cluster.kubectl("patch", "igs", "rbac-t4", "-n", NS, "--type=merge",
                    "-p", '{"spec": {"server": {"allowFrom": null}}}')
    eventually(lambda: not policy_exists(), timeout=60, what="the NetworkPolicy deleted")

    # A spec the operator refuses: nothing is created, and Argo CD calls it Degraded.
    too_big = {"type": "nvidia-h100-80gb", "partitionSize": "1g.10gb"}
    apply(cluster, service("rbac-too-big", too_big, replicas=1, memory=40))
    refused = eventually(
        lambda: when(igs(cluster, "rbac-too-big"), lambda c: c["status"] == "False"),
        timeout=60, what="Ready=False")
    assert ready(refused)["reason"] == "ModelDoesNotFitSlice"
    health = argocd_health(refused)
    assert health["status"] == "Degraded" and "ModelDoesNotFitSlice" in health["message"]

    # The pool goes with the last service that uses it (Node delete, under the chart's RBAC).
    delete_services(cluster, operator, NS, "rbac-t4", "rbac-too-big")
    eventually(lambda: not get_json(cluster, "nodes", "-l", f"{POOL_LABEL}={pool}")["items"],
               timeout=30, what="pool deleted")

    # Nothing it tried was refused, and kopf found every permission it looks for.
    assert forbidden_requests(cluster, operator.audit_since) == []
    assert "Forbidden" not in operator.log() and "Not enough permissions" not in operator.log()


def test_a_commit_the_operator_has_not_seen_is_progressing(cluster, operator):
    apply(cluster, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    apply(cluster, service("rbac-gen", GPU, replicas=1))
    wait_ready(cluster, NS, "rbac-gen")
    operator.stop()
    try:
        cluster.kubectl("patch", "igs", "rbac-gen", "-n", NS, "--type=merge",
                        "-p", '{"spec": {"replicas": 2}}')
        unseen = igs(cluster, "rbac-gen")
        assert unseen["metadata"]["generation"] == 2 > unseen["status"]["observedGeneration"]
        assert argocd_health(unseen) == {
            "status": "Progressing", "message": "Waiting for the operator to observe generation 2"}
    finally:
        operator.start()
    wait_ready(cluster, NS, "rbac-gen")
    assert argocd_health(igs(cluster, "rbac-gen"))["status"] == "Healthy"
    delete_services(cluster, operator, NS, "rbac-gen")


def test_peering_keepalives_land_in_the_releases_peering_object(cluster, operator):
    # One: the operator restarted by the test before may stay listed until its entry ages
    # out, when it had no time to say goodbye.
    eventually(lambda: len(get_json(cluster, "clusterkopfpeering", FULLNAME)
                           .get("status") or {}) == 1, timeout=90, what="one peer")


@pytest.mark.parametrize(
    "args, what",
    [
        (("get", "secrets", "--all-namespaces"), 'cannot list resource "secrets"'),
        (("get", "secret", "anything", "-n", SYSTEM_NS), 'cannot get resource "secrets"'),
        (("delete", "namespace", "kube-public", "--dry-run=server"),
         'cannot delete resource "namespaces"'),
        (("run", "x", "--image=busybox", "-n", "default", "--dry-run=server"),
         'cannot create resource "pods"'),
        (("delete", "deployment", "x", "-n", "default"), 'cannot delete resource "deployments"'),
        (("create", "clusterrolebinding", "escalate", "--clusterrole=cluster-admin",
          f"--serviceaccount={SYSTEM_NS}:{FULLNAME}", "--dry-run=server"),
         'cannot create resource "clusterrolebindings"'),
        (("patch", "clusterkopfpeering", "someone-else", "--type=merge", "-p", "{}"),
         # kubectl reads before it patches: refused at the read already.
         'cannot get resource "clusterkopfpeerings"'),
    ],
    ids=["list-secrets", "get-secret", "delete-namespace", "create-pod",
         "delete-deployment", "escalate", "other-peering"],
)
def test_the_charts_token_is_refused(cluster, chart_kubeconfig, args, what):
    """Real requests with the real token: the API server answers 403 Forbidden."""
    result = as_operator(cluster, chart_kubeconfig, *args)
    assert result.returncode != 0
    assert "forbidden" in result.stderr.lower() and what in result.stderr, result.stderr


def test_server_side_apply_of_a_new_child_is_allowed(cluster, chart_kubeconfig):
    # What the operator does for every child: a server-side apply (a PATCH that creates).
    # The dry run writes nothing.
    apply(cluster, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    service_obj = {"apiVersion": "v1", "kind": "Service",
                   "metadata": {"name": "ssa-probe", "namespace": NS},
                   "spec": {"ports": [{"port": 80}]}}
    result = as_operator(cluster, chart_kubeconfig, "apply", "--server-side", "--dry-run=server",
                         "--field-manager=imagegen-operator", "-f", "-",
                         input=yaml.safe_dump(service_obj))
    assert result.returncode == 0, result.stderr


def test_the_crd_is_what_the_operator_reads(cluster, chart_kubeconfig):
    result = as_operator(cluster, chart_kubeconfig, "auth", "can-i", "--list")
    assert result.returncode == 0
    assert crd_module.CRD_NAME in result.stdout
    assert "secrets" not in result.stdout
