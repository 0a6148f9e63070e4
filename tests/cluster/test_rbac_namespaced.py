"""An operator of some namespaces (the chart's watchNamespaces) under the chart's RBAC.

As in test_rbac_operator: the chart installed without an operator pod, a token for its
ServiceAccount, the operator process with nothing else. It serves a namespace it was
given, with peering in that namespace, leaves another alone, and its token writes
nowhere else; nothing it does is refused.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from cluster.test_rbac_operator import as_operator, forbidden_requests, helm, install_for_token

from imagegen_operator.render.nodepool import POOL_LABEL
from support.kube import apply, delete_services, eventually, get_json, wait_ready
from support.operator_process import OperatorProcess

pytestmark = pytest.mark.cluster

RELEASE, SYSTEM_NS = "scoped", "imagegen-scoped-system"
SERVED, OTHER = "scoped-served", "scoped-other"
DOOMED = "scoped-doomed"  # served too, and deleted whole by a test
FULLNAME = f"{RELEASE}-imagegen-operator"
USER = f"system:serviceaccount:{SYSTEM_NS}:{FULLNAME}"
# A GPU config no other test uses: pools are shared cluster-wide by configuration.
GPU = {"type": "nvidia-l4", "sharing": {"strategy": "TimeSharing", "maxSharedClientsPerGpu": 7}}


@pytest.fixture(scope="module")
def chart_kubeconfig(cluster, crd, tmp_path_factory) -> Path:
    for ns in (SYSTEM_NS, SERVED, OTHER, DOOMED):
        apply(cluster, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    yield install_for_token(cluster, RELEASE, SYSTEM_NS,
                            tmp_path_factory.mktemp("scoped-account") / "kubeconfig",
                            f"watchNamespaces={{{SERVED},{DOOMED}}}")
    helm(cluster, "uninstall", RELEASE, "--namespace", SYSTEM_NS, "--wait", check=False)
    for ns in (SERVED, OTHER, DOOMED):
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


@pytest.fixture(scope="module")
def operator(cluster, chart_kubeconfig, tmp_path_factory):
    since = cluster.audit_log.stat().st_size
    proc = OperatorProcess(cluster, tmp_path_factory.mktemp("scoped-operator") / "operator.log",
                           kubeconfig=chart_kubeconfig,
                           env={"IMAGEGEN_OPERATOR_PEERING": FULLNAME,
                                "IMAGEGEN_OPERATOR_NAMESPACES": f"{SERVED},{DOOMED}"}).start()
    proc.audit_since = since
    yield proc
    proc.stop()
    print(proc.log())


def service(name: str, namespace: str, gpu: dict = GPU) -> dict:
    return {
        "apiVersion": "imagegen.dev/v1alpha1", "kind": "ImageGenService",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"uri": "file:///models/tiny-sd15", "family": "SD15", "memoryGiB": 2},
            "gpu": gpu,
            "nodePool": {"provider": "Local", "maxNodes": 1},
            "replicas": 1,
        },
    }


def test_it_serves_its_namespace_leaves_the_other_and_is_refused_nothing(cluster, operator):
    apply(cluster, service("scoped", SERVED))
    apply(cluster, service("unserved", OTHER))
    wait_ready(cluster, SERVED, "scoped")
    pool = get_json(cluster, "igs", "scoped", "-n", SERVED)["status"]["nodePool"]["name"]
    assert get_json(cluster, "nodes", "-l", f"{POOL_LABEL}={pool}")["items"]
    # Peering in the namespace served, as kopf does for an operator of some namespaces.
    eventually(lambda: get_json(cluster, "kopfpeering", FULLNAME, "-n", SERVED).get("status"),
               timeout=60, what="the operator's keep-alive in its namespace's KopfPeering")

    # The other namespace's service: no finalizer, no status, no children, however long.
    time.sleep(5)
    unserved = get_json(cluster, "igs", "unserved", "-n", OTHER)
    assert not unserved["metadata"].get("finalizers") and not unserved.get("status")
    assert not get_json(cluster, "deployments", "-n", OTHER)["items"]

    # The pool goes with its last user, the served service's (the other asks for the same
    # configuration, but no operator serves it: a pool is no one's to keep for it).
    delete_services(cluster, operator, SERVED, "scoped")
    eventually(lambda: not get_json(cluster, "nodes", "-l", f"{POOL_LABEL}={pool}")["items"],
               timeout=30, what="pool deleted")
    cluster.kubectl("delete", "igs", "unserved", "-n", OTHER, "--wait=true", "--timeout=30s",
                    timeout=40)
    assert forbidden_requests(cluster, operator.audit_since, USER) == []
    assert "Forbidden" not in operator.log() and "Not enough permissions" not in operator.log()


@pytest.mark.parametrize(
    "args, allowed",
    [
        (("create", "deployments", "-n", SERVED), True),
        (("create", "deployments", "-n", OTHER), False),
        # Its own resource, patched everywhere (a finalizer taken off): a namespace deleted
        # takes its Role at once, while its services' finalizers still have pools to delete.
        (("patch", "imagegenservices", "-n", OTHER), True),
        (("patch", "imagegenservices", "--subresource=status", "-n", OTHER), False),
        (("create", "events", "-n", OTHER), False),
        (("list", "imagegenservices", "--all-namespaces"), True),
        (("watch", "imagegenservices", "--all-namespaces"), False),
        (("list", "nodes"), True),
    ],
    ids=["deploy-served", "deploy-other", "patch-igs-other", "status-other", "events-other",
         "list-igs-everywhere", "watch-igs-everywhere", "list-nodes"],
)
def test_the_token_writes_only_in_the_namespaces_served(cluster, chart_kubeconfig, args,
                                                        allowed):
    result = as_operator(cluster, chart_kubeconfig, "auth", "can-i", *args)
    assert result.stdout.strip() == ("yes" if allowed else "no"), result.stdout + result.stderr


def test_a_served_namespace_deleted_whole_goes_and_takes_its_pool(cluster, operator):
    """The namespace controller deletes the namespace's Role at once, and with it kopf's
    watch there; its service waits on the finalizer that deletes its pool, and the
    namespace on the service."""
    apply(cluster, service("doomed", DOOMED, gpu={**GPU, "sharing": {
        "strategy": "TimeSharing", "maxSharedClientsPerGpu": 6}}))
    wait_ready(cluster, DOOMED, "doomed")
    pool = get_json(cluster, "igs", "doomed", "-n", DOOMED)["status"]["nodePool"]["name"]
    assert get_json(cluster, "nodes", "-l", f"{POOL_LABEL}={pool}")["items"]
    cluster.kubectl("delete", "namespace", DOOMED, "--wait=true", "--timeout=120s",
                    timeout=130)
    eventually(lambda: not get_json(cluster, "nodes", "-l", f"{POOL_LABEL}={pool}")["items"],
               timeout=30, what="pool deleted")
