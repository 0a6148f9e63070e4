"""The operator image, run as the chart runs it, against the local control plane.

Everything the container gets is read from the rendered chart, not restated: the
user and group, the read-only root filesystem, the dropped capabilities, no new
privileges, /tmp as the chart mounts it, the environment, the arguments and the
ports its probes and Service point at. In-cluster configuration as the kubelet
gives it: KUBERNETES_SERVICE_HOST/PORT and the chart ServiceAccount's token, CA
and namespace under /var/run/secrets/kubernetes.io/serviceaccount.

Needs the image: `make test` builds it first (podman or docker; skipped without
either), `make test-images` runs only the image tests.
"""

from __future__ import annotations

import json
import os
import subprocess
from urllib.parse import urlsplit

import pytest
import yaml
from unit.test_chart import CHART, template_args

from localcluster import free_ports
from support.containers import built, run_args
from support.kube import apply, delete_services, eventually, get_json, http_status, wait_ready

pytestmark = [pytest.mark.cluster, pytest.mark.images]

IMAGE = os.environ.get("IMAGEGEN_OPERATOR_IMAGE", "localhost/imagegen-operator:dev")
RELEASE, SYSTEM_NS, NS = "img", "imagegen-image-system", "image-e2e"
FULLNAME = f"{RELEASE}-imagegen-operator"
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
GPU = {"type": "nvidia-tesla-a100", "sharing": {"strategy": "MPS", "maxSharedClientsPerGpu": 5}}


def helm(cluster, *args: str) -> str:
    return subprocess.run([str(cluster.bin / "helm"), "--kubeconfig", str(cluster.kubeconfig),
                           *args], capture_output=True, text=True, check=True, timeout=180).stdout


@pytest.fixture(scope="module")
def running_image(cluster, crd, tmp_path_factory):
    run = built(IMAGE)
    apply(cluster, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": SYSTEM_NS}})
    metrics_port, health_port = free_ports(2)
    sets = ["crds.enabled=false", "providers.local.enabled=true", f"image.repository={IMAGE}",
            f"metrics.port={metrics_port}", f"health.port={health_port}",
            "operator.resyncSeconds=2"]
    # The chart's ServiceAccount and RBAC, without its pod (KWOK would not run it), nor the
    # uninstall check's (the test runs it below, in the image).
    helm(cluster, "upgrade", "--install", RELEASE, str(CHART), "--namespace", SYSTEM_NS,
         *[x for s in [*sets, "replicaCount=0", "uninstallCheck.enabled=false"]
           for x in ("--set", s)])
    rendered = subprocess.run([str(cluster.bin / "helm"), *template_args(*sets)],
                              capture_output=True, text=True, check=True, timeout=120).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    service = next(d for d in docs if d["kind"] == "Service")
    uninstall_check = next(d for d in docs if d["kind"] == "Job")

    secrets = tmp_path_factory.mktemp("serviceaccount")
    token = cluster.kubectl("create", "token", FULLNAME, "-n", SYSTEM_NS, "--duration=1h")
    (secrets / "token").write_text(token.stdout.strip())
    (secrets / "ca.crt").write_bytes((cluster.dir / "pki" / "ca.crt").read_bytes())
    (secrets / "namespace").write_text(SYSTEM_NS)
    for path in [secrets, *secrets.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    server = urlsplit(cluster.server)
    name = f"imagegen-operator-test-{os.getpid()}"
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    command = [*(container.get("command") or []), *(container.get("args") or [])]
    entrypoint = ["--entrypoint", command.pop(0)] if container.get("command") else []
    in_cluster = ["--env", f"KUBERNETES_SERVICE_HOST={server.hostname}",
                  "--env", f"KUBERNETES_SERVICE_PORT={server.port}",
                  "--volume", f"{secrets}:{SA_DIR}:ro"]
    subprocess.run([*run, "rm", "-f", name], capture_output=True)
    subprocess.run([
        *run, "run", "-d", *run_args(deployment["spec"]["template"]["spec"], name),
        "--env", f"POD_ID={name}", "--env", "POD_UID=00000000-0000-0000-0000-000000000000",
        *in_cluster, *entrypoint, IMAGE, *command,
    ], check=True, capture_output=True, text=True)

    def run_uninstall_check() -> subprocess.CompletedProcess[str]:
        """The chart's pre-delete Job, run once in the image as its pod would run it."""
        pod = uninstall_check["spec"]["template"]["spec"]
        check_name = f"{name}-uninstall-check"
        return subprocess.run([*run, "run", "--rm", *run_args(pod, check_name), *in_cluster,
                               IMAGE, *pod["containers"][0]["args"]],
                              capture_output=True, text=True, timeout=120)

    try:
        yield {"deployment": deployment, "service": service, "name": name,
               "uninstall_check": run_uninstall_check}
    finally:
        print(subprocess.run([*run, "logs", name], capture_output=True, text=True).stdout[-6000:])
        subprocess.run([*run, "rm", "-f", "-t", "5", name], capture_output=True)
        helm(cluster, "uninstall", RELEASE, "--namespace", SYSTEM_NS, "--wait")


def apply_service(cluster, name: str, replicas: int) -> None:
    """A service on a Local pool in the test namespace (made first if missing)."""
    apply(cluster, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    apply(cluster, {
        "apiVersion": "imagegen.dev/v1alpha1", "kind": "ImageGenService",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"model": {"uri": "gs://models/sd15", "family": "SD15", "memoryGiB": 4},
                 "gpu": GPU, "nodePool": {"provider": "Local", "maxNodes": 1},
                 "replicas": replicas},
    })


def named_port(container: dict, name: str) -> int:
    return next(p["containerPort"] for p in container["ports"] if p["name"] == name)


def test_the_image_runs_the_end_to_end_scenario_as_the_chart_runs_it(cluster, running_image):
    deployment = running_image["deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    probe = container["livenessProbe"]["httpGet"]
    health = named_port(container, probe["port"])
    eventually(lambda: http_status(f"http://127.0.0.1:{health}{probe['path']}") == 200, timeout=60,
               what="the liveness probe's endpoint")
    metrics_target = running_image["service"]["spec"]["ports"][0]["targetPort"]
    metrics = named_port(container, metrics_target) if isinstance(metrics_target, str) \
        else metrics_target
    assert http_status(f"http://127.0.0.1:{metrics}/metrics") == 200

    apply_service(cluster, "in-image", replicas=1)
    wait_ready(cluster, NS, "in-image")
    body = get_json(cluster, "igs", "in-image", "-n", NS)
    pool, uid = body["status"]["nodePool"]["name"], body["metadata"]["uid"]

    cluster.kubectl("delete", "deployment", "in-image", "-n", NS, "--wait=true")
    eventually(lambda: cluster.kubectl("get", "deployment", "in-image", "-n", NS,
                                       check=False).returncode == 0,
               timeout=30, what="the deleted Deployment restored")
    wait_ready(cluster, NS, "in-image")

    # The children go with their owner: Kubernetes' garbage collector deletes them by their
    # controller reference (in a control plane this young it may not have mapped the CRD
    # yet, so the reference is what is checked, read before the delete, not the collector's
    # timing).
    children = json.loads(cluster.kubectl("get", "deployment,service,pdb", "-n", NS, "-o",
                                          "json").stdout)["items"]
    assert {c["kind"] for c in children} == {"Deployment", "Service", "PodDisruptionBudget"}
    delete_services(cluster, None, NS, "in-image")
    eventually(lambda: not get_json(cluster, "nodes", "-l",
                                    f"imagegen.dev/node-pool={pool}")["items"],
               timeout=30, what="no orphaned node")
    for child in children:
        refs = child["metadata"].get("ownerReferences") or []
        assert [r for r in refs if r["kind"] == "ImageGenService" and r["uid"] == uid
                and r.get("controller")], child["metadata"]


def test_the_uninstall_check_refuses_while_a_service_exists(cluster, running_image):
    apply_service(cluster, "left-behind", replicas=0)
    refused = running_image["uninstall_check"]()
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert f"{NS}/left-behind" in refused.stderr and "kubectl delete igs" in refused.stderr
    delete_services(cluster, None, NS, "left-behind")
    # Services other tests of this cluster left would still (rightly) refuse it.
    others = get_json(cluster, "igs", "-A")["items"]
    allowed = running_image["uninstall_check"]()
    assert allowed.returncode == (1 if others else 0), allowed.stdout + allowed.stderr
    assert f"{NS}/left-behind" not in allowed.stderr
