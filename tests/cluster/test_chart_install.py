"""The chart on the real API server: kubeconform, helm install, what it creates, uninstall.

Under KWOK the operator pods never run a container (and with no untainted simulated
node they are not even scheduled), so these tests check objects, admission and
permissions; tests/cluster/test_rbac_operator.py runs the operator process itself
under the chart's ServiceAccount.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from unit.test_chart import CHART, template_args
from unit.test_render_kubeconform import CRDS, SCHEMA_LOCATION, crd_schemas, kubernetes_schemas

from imagegen_operator import crd
from support.kube import apply, eventually, get_json

pytestmark = pytest.mark.cluster

RELEASE, NAMESPACE = "chart-install", "imagegen-chart-install"
FULLNAME = f"{RELEASE}-imagegen-operator"
SERVICE_ACCOUNT = f"system:serviceaccount:{NAMESPACE}:{FULLNAME}"
# Every optional object on, so each one is installed (the ServiceMonitor is checked by
# kubeconform only: the local cluster does not serve monitoring.coreos.com).
INSTALL_SETS = [
    "replicaCount=2", "peering.enabled=true", "networkPolicy.enabled=true",
    "gke.workloadIdentity.gcpServiceAccount=imagegen-operator@imagegen-test.iam.gserviceaccount.com",
    # Its pod would never be scheduled here, and `helm uninstall` would wait for it: it is
    # rendered and admitted below, and run in the operator's image in test_operator_image.
    "uninstallCheck.enabled=false",
]


def helm(cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(cluster.bin / "helm"), "--kubeconfig", str(cluster.kubeconfig), *args],
        capture_output=True, text=True, check=check, timeout=180,
    )


def adopt_crd(cluster, name: str, release: str, namespace: str) -> None:
    """Let ``release`` take over a CRD applied without Helm (the `crd` fixture's, say),
    as the chart README tells users to; a CRD belongs to one release at a time."""
    if cluster.kubectl("get", "crd", name, check=False).returncode != 0:
        return
    cluster.kubectl("label", "--overwrite", "crd", name, "app.kubernetes.io/managed-by=Helm")
    cluster.kubectl("annotate", "--overwrite", "crd", name,
                    f"meta.helm.sh/release-name={release}",
                    f"meta.helm.sh/release-namespace={namespace}")


# --- kubeconform: the rendered chart against the pinned API server's own schemas ---------

HIDDEN = {"$ref": "x-property-named-ref", "description": "x-property-named-description"}


def with_object_meta(definition: dict[str, Any]) -> dict[str, Any]:
    """The API server accepts apiVersion, kind and metadata on every custom object, even
    when a CRD's schema (kopf's) does not list them; say so for the strict schema."""
    definition = json.loads(json.dumps(definition))
    for version in definition["spec"]["versions"]:
        properties = version["schema"]["openAPIV3Schema"].setdefault("properties", {})
        properties.setdefault("apiVersion", {"type": "string"})
        properties.setdefault("kind", {"type": "string"})
        properties.setdefault("metadata", {"type": "object"})
    return definition


def rename_property(node: Any, old: str, new: str) -> Any:
    """A copy of ``node`` where every schema property called ``old`` is called ``new``."""
    if isinstance(node, list):
        return [rename_property(n, old, new) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: rename_property(v, old, new) for k, v in node.items()}
    if isinstance(out.get("properties"), dict) and old in out["properties"]:
        out["properties"][new] = out["properties"].pop(old)
    return out



@pytest.fixture(scope="module")
def kubeconform(cluster, tmp_path_factory):
    """kubeconform, strict and offline, with schemas from this API server's /openapi/v2.

    The checked-in OpenAPI snapshot holds only the kinds the operator renders; the chart
    adds RBAC, NetworkPolicy, CRD, Pod and Job objects, so their schemas come from the running
    server (the same pinned version the snapshot was taken from).
    """
    openapi = json.loads(cluster.kubectl("get", "--raw", "/openapi/v2").stdout)
    wanted = {
        ("", "v1", "ServiceAccount"), ("", "v1", "Service"), ("", "v1", "Pod"),
        ("", "v1", "ConfigMap"),
        ("apps", "v1", "Deployment"), ("batch", "v1", "Job"),
        ("networking.k8s.io", "v1", "NetworkPolicy"),
        ("policy", "v1", "PodDisruptionBudget"),
        ("rbac.authorization.k8s.io", "v1", "ClusterRole"),
        ("rbac.authorization.k8s.io", "v1", "ClusterRoleBinding"),
        ("apiextensions.k8s.io", "v1", "CustomResourceDefinition"),
    }
    openapi["definitions"] = {
        name: d for name, d in openapi["definitions"].items()
        if not d.get("x-kubernetes-group-version-kind")
        or {(g["group"], g["version"], g["kind"]) for g in d["x-kubernetes-group-version-kind"]}
        & wanted
    }
    # The CRD kind's own schema has properties named "$ref" and "description", which the
    # converter takes for a reference and for documentation: hide them meanwhile.
    for name, hidden in HIDDEN.items():
        openapi = rename_property(openapi, name, hidden)
    schemas = kubernetes_schemas(openapi)
    for name, hidden in HIDDEN.items():
        schemas = rename_property(schemas, hidden, name)
    kopf_crds = yaml.safe_load_all((CHART / "crds" / "kopf-peering.yaml").read_text())
    third_party = [yaml.safe_load(p.read_text()) for p in sorted(CRDS.glob("*.yaml"))]
    for definition in [crd.crd(), *[d for d in kopf_crds if d], *third_party]:
        schemas.update(crd_schemas(with_object_meta(definition)))
    directory = tmp_path_factory.mktemp("chart-schemas")
    for relative, schema in schemas.items():
        (directory / relative).write_text(json.dumps(schema))

    def run(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(cluster.bin / "kubeconform"), "-strict", "-summary", "-output", "text",
             "-schema-location", f"{directory}/{SCHEMA_LOCATION}", str(path)],
            capture_output=True, text=True, timeout=120,
        )

    return run


def rendered_with_everything(cluster) -> list[dict[str, Any]]:
    sets = [*INSTALL_SETS, "metrics.serviceMonitor.enabled=true", "providers.local.enabled=true",
            "metrics.prometheusRule.enabled=true", "metrics.grafanaDashboard.enabled=true",
            "networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.name=monitoring",
            "uninstallCheck.enabled=true"]
    args = template_args(*sets, include_crds=True)
    out = subprocess.run([str(cluster.bin / "helm"), *args], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def test_rendered_chart_passes_kubeconform(cluster, kubeconform, tmp_path):
    docs = rendered_with_everything(cluster)
    assert {"ServiceMonitor", "PrometheusRule", "ConfigMap", "NetworkPolicy", "ClusterKopfPeering",
            "Pod", "Job", "CustomResourceDefinition", "PodDisruptionBudget"} <= {
                d["kind"] for d in docs}
    path = tmp_path / "chart.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    result = kubeconform(path)
    assert result.returncode == 0, result.stdout + result.stderr
    # Every document checked against a schema: none skipped for want of one.
    assert f"Valid: {len(docs)}, Invalid: 0, Errors: 0, Skipped: 0" in result.stdout, result.stdout


@pytest.mark.parametrize(
    "kind, mutate, expected",
    [
        ("ClusterRole", lambda d: d["rules"][0].update(verb=["get"]), "verb"),
        ("Deployment", lambda d: d["spec"]["template"]["spec"].update(hostIpc=True), "hostIpc"),
        ("NetworkPolicy", lambda d: d["spec"].update(policyTypes="Ingress"), "policyTypes"),
        ("CustomResourceDefinition", lambda d: d["spec"].update(scopes="Namespaced"), "scopes"),
        ("PrometheusRule", lambda d: d["spec"]["groups"][0]["rules"][0].update(expresion="up"),
         "expresion"),
    ],
    ids=["clusterrole", "deployment", "networkpolicy", "crd", "prometheusrule"],
)
def test_kubeconform_catches_a_broken_chart_object(cluster, kubeconform, tmp_path, kind, mutate,
                                                   expected):
    """The schemas are strict enough to fail: a check that cannot fail checks nothing."""
    doc = next(d for d in rendered_with_everything(cluster) if d["kind"] == kind)
    mutate(doc)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(doc))
    result = kubeconform(path)
    assert result.returncode != 0 and expected in result.stdout, result.stdout


# --- helm install ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def release(cluster):
    # The restricted Pod Security Standard, enforced: the operator pods are admitted
    # only if the chart's securityContext really meets it.
    apply(cluster, {"apiVersion": "v1", "kind": "Namespace", "metadata": {
        "name": NAMESPACE, "labels": {"pod-security.kubernetes.io/enforce": "restricted"}}})
    adopt_crd(cluster, crd.CRD_NAME, RELEASE, NAMESPACE)
    args = ["upgrade", "--install", RELEASE, str(CHART), "--namespace", NAMESPACE]
    for s in INSTALL_SETS:
        args += ["--set", s]
    result = helm(cluster, *args, check=False)
    assert result.returncode == 0, result.stderr
    yield result
    helm(cluster, "uninstall", RELEASE, "--namespace", NAMESPACE, "--wait", check=False)
    cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)


def manifest(cluster) -> list[dict[str, Any]]:
    out = helm(cluster, "get", "manifest", RELEASE, "--namespace", NAMESPACE).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def test_install_creates_every_object(cluster, release):
    docs = manifest(cluster)
    assert {d["kind"] for d in docs} == {
        "CustomResourceDefinition", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
        "Service", "Deployment", "NetworkPolicy", "ClusterKopfPeering", "PodDisruptionBudget"}
    roles = {d["metadata"]["name"] for d in docs if d["kind"] == "ClusterRole"}
    assert roles == {FULLNAME, f"{FULLNAME}-view", f"{FULLNAME}-edit"}
    for doc in docs:
        name = doc["metadata"]["name"]
        ns = ["-n", NAMESPACE] if doc["metadata"].get("namespace") else []
        live = get_json(cluster, f"{doc['kind'].lower()}.{doc['apiVersion'].split('/')[0]}"
                        if "/" in doc["apiVersion"] else doc["kind"].lower(), name, *ns)
        assert live["metadata"]["annotations"]["meta.helm.sh/release-name"] == RELEASE
    # Helm's crds/: kopf's peering CRDs, installed before the peering object.
    for name in ("clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev", crd.CRD_NAME):
        cluster.wait_established(name)


def test_installed_crd_is_the_generated_one(cluster, release):
    live = get_json(cluster, "crd", crd.CRD_NAME)
    assert live["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert live["spec"]["versions"][0]["schema"] == crd.crd()["spec"]["versions"][0]["schema"]
    # And it still enforces its rules after Helm's round trip through YAML.
    bad = {"apiVersion": "imagegen.dev/v1alpha1", "kind": "ImageGenService",
           "metadata": {"name": "bad", "namespace": NAMESPACE},
           "spec": {"model": {"uri": "ftp://nope"}, "gpu": {"type": "nvidia-l4"},
                    "nodePool": {"provider": "Local"}}}
    result = cluster.kubectl("apply", "--dry-run=server", "-f", "-",
                             input=yaml.safe_dump(bad), check=False)
    assert result.returncode != 0 and "spec.model.uri" in result.stderr


def test_operator_pods_are_admitted_under_the_restricted_standard(cluster, release):
    deployment = get_json(cluster, "deployment", FULLNAME, "-n", NAMESPACE)
    assert deployment["spec"]["replicas"] == 2
    # The ReplicaSet controller made both pods: Pod Security admission let them in.
    pods = eventually(
        lambda: [p for p in get_json(cluster, "pods", "-n", NAMESPACE, "-l",
                                     f"app.kubernetes.io/instance={RELEASE}")["items"]]
        if len(get_json(cluster, "pods", "-n", NAMESPACE)["items"]) == 2 else None,
        timeout=60, what="two operator pods")
    assert {p["spec"]["serviceAccountName"] for p in pods} == {FULLNAME}
    # A pod that breaks the standard is refused in the same namespace: the check is live.
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "root", "namespace": NAMESPACE},
           "spec": {"containers": [{"name": "c", "image": "busybox"}]}}
    result = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump(pod),
                             check=False)
    assert result.returncode != 0 and "violates PodSecurity" in result.stderr


def test_uninstall_check_pod_is_admitted_under_the_restricted_standard(cluster, release):
    args = template_args(*INSTALL_SETS, "uninstallCheck.enabled=true")
    args[1] = RELEASE
    args[args.index("--namespace") + 1] = NAMESPACE
    out = subprocess.run([str(cluster.bin / "helm"), *args, "--show-only",
                          "templates/uninstall-check.yaml"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    (job,) = [d for d in docs if d["kind"] == "Job"]
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-delete"
    # Its own ServiceAccount, which Helm makes first (a pod naming a missing one is refused).
    (account,) = [d for d in docs if d["kind"] == "ServiceAccount"]
    apply(cluster, account)
    try:
        # The pod its Job controller would make, as Pod Security admission would see it.
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "uninstall-check", "namespace": NAMESPACE,
                            "labels": job["spec"]["template"]["metadata"]["labels"]},
               "spec": job["spec"]["template"]["spec"]}
        result = cluster.kubectl("apply", "--dry-run=server", "-f", "-",
                                 input=yaml.safe_dump(pod), check=False)
    finally:
        cluster.kubectl("delete", "serviceaccount", account["metadata"]["name"], "-n",
                        NAMESPACE, check=False)
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr, result.stderr


def test_helm_test_pod_is_admitted_under_the_restricted_standard(cluster, release):
    # `helm test` cannot run here (KWOK runs no containers), but its pod can be admitted.
    args = template_args(*INSTALL_SETS)
    args[1] = RELEASE
    args[args.index("--namespace") + 1] = NAMESPACE
    out = subprocess.run([str(cluster.bin / "helm"), *args, "--show-only",
                          "templates/tests/test-healthz.yaml"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    assert "helm.sh/hook: test" in out
    result = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=out, check=False)
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr, result.stderr


def test_service_account_is_annotated_for_workload_identity(cluster, release):
    account = get_json(cluster, "serviceaccount", FULLNAME, "-n", NAMESPACE)
    assert account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"] == (
        "imagegen-operator@imagegen-test.iam.gserviceaccount.com")


@pytest.mark.parametrize(
    "verb, resource, allowed",
    [
        ("list", "imagegenservices.imagegen.dev", "yes"),
        ("patch", "imagegenservices.imagegen.dev --subresource=status", "yes"),
        ("update", "imagegenservices.imagegen.dev --subresource=status", "no"),
        ("patch", f"clusterkopfpeerings.kopf.dev/{FULLNAME}", "yes"),
        ("patch", "clusterkopfpeerings.kopf.dev/someone-elses", "no"),
        # The Local provider is off by default: no writing Node objects.
        ("delete", "nodes", "no"),
        ("create", "nodes", "no"),
        ("list", "secrets", "no"),
        ("delete", "namespaces", "no"),
    ],
)
def test_default_rbac(cluster, release, verb, resource, allowed):
    result = cluster.kubectl("auth", "can-i", verb, *resource.split(), "--all-namespaces",
                             f"--as={SERVICE_ACCOUNT}", check=False)
    assert result.stdout.strip() == allowed, result.stderr


@pytest.mark.parametrize(
    "role, verb, resource, allowed",
    [
        ("edit", "create", "imagegenservices.imagegen.dev", "yes"),
        ("edit", "patch", "imagegenservices.imagegen.dev --subresource=scale", "yes"),
        ("edit", "patch", "imagegenservices.imagegen.dev --subresource=status", "no"),
        ("view", "list", "imagegenservices.imagegen.dev", "yes"),
        ("view", "delete", "imagegenservices.imagegen.dev", "no"),
        ("view", "patch", "imagegenservices.imagegen.dev --subresource=scale", "no"),
    ],
)
def test_namespace_roles_reach_imagegenservices(cluster, release, role, verb, resource, allowed):
    """Kubernetes' aggregation controller folds the chart's roles into view and edit: a
    namespace's editors manage its services with no grant of their own."""
    user, namespace = f"{role}-user", "team-roles"
    cluster.kubectl("create", "namespace", namespace, check=False)
    cluster.kubectl("create", "rolebinding", user, f"--clusterrole={role}", f"--user={user}",
                    "-n", namespace, check=False)

    def answer() -> str:
        return cluster.kubectl("auth", "can-i", verb, *resource.split(), "-n", namespace,
                               f"--as={user}", check=False).stdout.strip()

    if allowed == "yes":  # the controller aggregates within moments
        eventually(lambda: answer() == "yes", timeout=30, what=f"{role} may {verb} {resource}")
    assert answer() == allowed


def test_upgrade_with_the_same_values_changes_nothing(cluster, release):
    before = get_json(cluster, "deployment", FULLNAME, "-n", NAMESPACE)["metadata"]["generation"]
    args = ["upgrade", RELEASE, str(CHART), "--namespace", NAMESPACE]
    for s in INSTALL_SETS:
        args += ["--set", s]
    helm(cluster, *args)
    after = get_json(cluster, "deployment", FULLNAME, "-n", NAMESPACE)["metadata"]["generation"]
    assert after == before


def test_uninstall_keeps_the_crd_and_removes_the_rest(cluster, release):
    helm(cluster, "uninstall", RELEASE, "--namespace", NAMESPACE, "--wait")
    assert cluster.kubectl("get", "crd", crd.CRD_NAME, check=False).returncode == 0
    for kind, name, ns in [("deployment", FULLNAME, NAMESPACE), ("clusterrole", FULLNAME, None),
                           ("clusterrole", f"{FULLNAME}-edit", None),
                           ("clusterrolebinding", FULLNAME, None),
                           ("clusterkopfpeering", FULLNAME, None)]:
        args = [kind, name] + (["-n", ns] if ns else [])
        assert cluster.kubectl("get", *args, check=False).returncode != 0, f"{kind} {name} left"
