"""The Helm chart, rendered by the real helm: lint, what each value switches, RBAC, security.

No cluster here (tests/cluster/test_chart_*.py install it). The helpers at the top are
shared with those tests: ``render(...)`` is `helm template` with --set flags, parsed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from imagegen_operator import crd
from support.tools import pinned_tool

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "imagegen-operator"
DOCKERFILE = ROOT / "operator" / "Dockerfile"
# The pinned API server's version; helm would otherwise assume its own compiled-in default.
KUBE_VERSION = "1.34.4"
RELEASE, NAMESPACE = "igs", "imagegen-system"
FULLNAME = "igs-imagegen-operator"


def find_helm() -> Path:
    return pinned_tool("helm")


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(find_helm()), *args], capture_output=True, text=True, check=check, timeout=120
    )


def template_args(*sets: str, values: Path | None = None, include_crds: bool = False) -> list[str]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE,
            "--kube-version", KUBE_VERSION]
    if include_crds:
        args.append("--include-crds")
    if values is not None:
        args += ["--values", str(values)]
    for s in sets:
        args += ["--set", s]
    return args


def render(*sets: str, include_crds: bool = False) -> list[dict[str, Any]]:
    """`helm template` with ``--set`` for each of ``sets``; the documents, parsed."""
    out = helm(*template_args(*sets, include_crds=include_crds)).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(matches) == 1, f"{len(matches)} {kind} {name or ''} in {[d['kind'] for d in docs]}"
    return matches[0]


def kinds(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def cluster_role_rules(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return find(docs, "ClusterRole", FULLNAME)["rules"]


def allowed(rules: list[dict[str, Any]], group: str, resource: str, verb: str) -> bool:
    """Whether ``rules`` grant ``verb`` on ``resource`` (any name), as RBAC would decide."""
    return any(
        group in r.get("apiGroups", [])
        and resource in r.get("resources", [])
        and verb in r.get("verbs", [])
        and not r.get("resourceNames")
        for r in rules
    )


# --- lint and the defaults ---------------------------------------------------------------


def test_helm_lint_strict():
    result = helm("lint", str(CHART), "--strict", "--kube-version", KUBE_VERSION, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


def test_a_cluster_that_would_refuse_the_crd_or_drop_the_prestop_sleep_is_refused():
    for too_old in ("1.29.9", "1.30.9"):
        result = helm("template", RELEASE, str(CHART), "--kube-version", too_old, check=False)
        assert result.returncode != 0 and "kubeVersion" in result.stderr, result.stderr
    assert helm("template", RELEASE, str(CHART), "--kube-version", "1.31.0").returncode == 0


def test_default_render_has_the_operator_and_nothing_optional():
    docs = render()
    assert kinds(docs) == sorted([
        "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "Deployment",
        "Pod", "Service", "ServiceAccount",
        "ClusterRole", "ClusterRole",  # users' view and edit, aggregated
        # The uninstall check, pre-delete hooks: its Job, and its own account to list with.
        "Job", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
    ])
    for doc in docs:
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        if doc["kind"] not in ("ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"):
            assert doc["metadata"]["namespace"] == NAMESPACE


def test_rendering_is_byte_identical_across_runs():
    assert helm(*template_args()).stdout == helm(*template_args()).stdout


# --- the CRD: switchable, kept, identical to the generator's ----------------------------


def test_chart_crd_file_matches_the_generator():
    copy = CHART / "files" / "crds" / crd.CRD_FILENAME
    assert copy.read_text() == crd.render(), (
        f"run `python -m imagegen_operator.crd --write {copy.relative_to(ROOT)}`")


def test_templated_crd_is_the_generated_one_with_helm_metadata():
    rendered = find(render(), "CustomResourceDefinition")
    generated = crd.crd()
    # helm adds labels and the keep annotation; everything else is the generator's.
    assert rendered["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert rendered["metadata"]["labels"]["app.kubernetes.io/part-of"] == "imagegen-operator"
    assert rendered["metadata"]["name"] == generated["metadata"]["name"]
    assert rendered["spec"] == generated["spec"]


@pytest.mark.parametrize(
    "sets, present, keep",
    [
        ((), True, True),
        (("crds.keep=false",), True, False),
        (("crds.enabled=false",), False, None),
    ],
    ids=["default", "not-kept", "off"],
)
def test_crd_switches(sets, present, keep):
    crds = [d for d in render(*sets) if d["kind"] == "CustomResourceDefinition"]
    assert bool(crds) == present
    if present:
        annotations = crds[0]["metadata"].get("annotations") or {}
        assert (annotations.get("helm.sh/resource-policy") == "keep") == keep


def test_kopf_peering_crds_are_in_helms_crds_dir():
    # crds/: installed before templates (the peering object needs its kind), never deleted.
    docs = [d for d in yaml.safe_load_all((CHART / "crds" / "kopf-peering.yaml").read_text()) if d]
    assert {d["metadata"]["name"] for d in docs} == {
        "clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}
    assert "nolar/kopf" in (CHART / "crds" / "kopf-peering.yaml").read_text()
    # The ImageGenService CRD is templated; a copy in crds/ would be installed twice.
    ignored = (CHART / ".helmignore").read_text().splitlines()
    assert [p.name for p in (CHART / "crds").iterdir()
            if f"crds/{p.name}" not in ignored] == ["kopf-peering.yaml"]
    with_crds = render(include_crds=True)
    assert sorted(d["metadata"]["name"] for d in with_crds
                  if d["kind"] == "CustomResourceDefinition") == sorted([
        "clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev", crd.CRD_NAME])


# --- RBAC --------------------------------------------------------------------------------


def test_rbac_has_no_wildcards_and_no_secrets():
    for sets in [(), ("providers.local.enabled=true", "peering.enabled=true")]:
        rules = cluster_role_rules(render(*sets))
        for rule in rules:
            for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert "*" not in rule.get(field, []), rule
        assert not any("secrets" in r["resources"] for r in rules)
        assert not any("namespaces" in r["resources"] for r in rules)
        assert not allowed(rules, "", "pods", "create")
        assert not allowed(rules, "rbac.authorization.k8s.io", "clusterroles", "create")


def test_users_get_view_and_edit_through_the_default_roles():
    docs = render()
    view = find(docs, "ClusterRole", f"{FULLNAME}-view")
    edit = find(docs, "ClusterRole", f"{FULLNAME}-edit")
    aggregated = "rbac.authorization.k8s.io/aggregate-to-{}"
    assert all(view["metadata"]["labels"][aggregated.format(r)] == "true"
               for r in ("view", "edit", "admin"))
    assert aggregated.format("view") not in edit["metadata"]["labels"]
    assert allowed(view["rules"], "imagegen.dev", "imagegenservices", "list")
    assert not allowed(view["rules"], "imagegen.dev", "imagegenservices", "patch")
    assert allowed(edit["rules"], "imagegen.dev", "imagegenservices", "create")
    assert allowed(edit["rules"], "imagegen.dev", "imagegenservices/scale", "update")
    # Status is the operator's to write, never a user's.
    assert not allowed(edit["rules"], "imagegen.dev", "imagegenservices/status", "patch")
    assert kinds(render("rbac.aggregateToDefaultRoles=false", "uninstallCheck.enabled=false")
                 ).count("ClusterRole") == 1


# What the operator's own code calls (kube.py through reconcile.py and the providers) and
# what kopf does for it; the cluster test proves the set is enough by running the e2e.
REQUIRED = [
    ("imagegen.dev", "imagegenservices", "get list watch patch"),
    ("imagegen.dev", "imagegenservices/status", "patch"),
    ("apps", "deployments", "get list watch create patch"),
    ("", "services", "get list watch create patch"),
    ("policy", "poddisruptionbudgets", "get list watch create patch"),
    ("autoscaling", "horizontalpodautoscalers", "get list watch create patch delete"),
    ("networking.k8s.io", "networkpolicies", "get list watch create patch delete"),
    ("batch", "jobs", "get list watch create patch delete"),
    ("monitoring.coreos.com", "servicemonitors", "get list create patch delete"),
    ("monitoring.coreos.com", "podmonitors", "get list create patch delete"),
    ("", "pods", "list"),
    ("", "nodes", "list"),
    ("", "events", "create"),
    ("container.cnrm.cloud.google.com", "containernodepools", "get list create patch delete"),
]


@pytest.mark.parametrize("group, resource, verbs", REQUIRED, ids=[r[1] for r in REQUIRED])
def test_rbac_grants_what_the_operator_calls(group, resource, verbs):
    rules = cluster_role_rules(render())
    for verb in verbs.split():
        assert allowed(rules, group, resource, verb), f"{verb} {resource}"


def test_workload_children_are_never_deleted_by_the_operator():
    # The garbage collector removes them with their owner; the operator needs no delete.
    rules = cluster_role_rules(render())
    for group, resource in [("apps", "deployments"), ("", "services"),
                            ("policy", "poddisruptionbudgets"), ("", "events")]:
        assert not allowed(rules, group, resource, "delete"), resource


@pytest.mark.parametrize("local", [False, True])
def test_node_writes_only_for_the_local_provider(local):
    rules = cluster_role_rules(render(f"providers.local.enabled={str(local).lower()}"))
    for verb in ("create", "patch", "delete"):
        assert allowed(rules, "", "nodes", verb) == local
    # Listed; read one by one only by the Local provider, before it makes a node.
    assert allowed(rules, "", "nodes", "get") == local


def test_config_connector_rights_are_switchable():
    rules = cluster_role_rules(render("providers.configConnector.enabled=false"))
    assert not any("container.cnrm.cloud.google.com" in r["apiGroups"] for r in rules)


def test_peering_rights_only_on_the_releases_own_peering_object():
    assert not any("kopf.dev" in r["apiGroups"] for r in cluster_role_rules(render()))
    rules = cluster_role_rules(render("peering.enabled=true"))
    assert allowed(rules, "kopf.dev", "clusterkopfpeerings", "watch")
    assert not allowed(rules, "kopf.dev", "clusterkopfpeerings", "patch")
    (named,) = [r for r in rules if r.get("resourceNames")]
    assert named["resourceNames"] == [FULLNAME]
    assert named["verbs"] == ["patch"]
    # An older kopf's group too: kopf uses both where both are served.
    assert allowed(rules, "zalando.org", "clusterkopfpeerings", "watch")


@pytest.mark.parametrize("group, resource, verbs", REQUIRED, ids=[r[1] for r in REQUIRED])
def test_an_operator_of_some_namespaces_writes_only_there(group, resource, verbs):
    docs = render("watchNamespaces={team-a,team-b}", "peering.enabled=true")
    container = find(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["IMAGEGEN_OPERATOR_NAMESPACES"] == "team-a,team-b"
    cluster_wide = cluster_role_rules(docs)
    roles = {d["metadata"]["namespace"]: d["rules"] for d in docs if d["kind"] == "Role"}
    assert set(roles) == {"team-a", "team-b"}
    namespaced = resource not in ("nodes",)
    for verb in verbs.split():
        for rules in roles.values():
            assert allowed(rules, group, resource, verb) == namespaced, f"{verb} {resource}"
        # Cluster-wide: nodes, and reading the services (and Config Connector's pools)
        # of every namespace; nothing written outside the namespaces served but the
        # services themselves (a served namespace deleted loses its Role before they
        # are finalized).
        reads = (resource == "imagegenservices" and verb in ("list", "patch")
                 or resource == "containernodepools" and verb == "list")
        assert allowed(cluster_wide, group, resource, verb) == (not namespaced or reads), (
            f"{verb} {resource} cluster-wide")
    # kopf follows the namespaces it serves (one made after the operator started, too).
    assert allowed(cluster_wide, "", "namespaces", "watch")
    assert not allowed(cluster_wide, "", "namespaces", "delete")
    for namespace in roles:
        binding = find([d for d in docs if d["metadata"].get("namespace") == namespace],
                       "RoleBinding")
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                      "name": FULLNAME}
        assert binding["subjects"][0]["namespace"] == NAMESPACE


def test_an_operator_of_some_namespaces_peers_in_each():
    docs = render("watchNamespaces={team-a,team-b}", "peering.enabled=true")
    assert "ClusterKopfPeering" not in kinds(docs)
    assert {d["metadata"]["namespace"] for d in docs if d["kind"] == "KopfPeering"} == {
        "team-a", "team-b"}
    assert not any("kopf.dev" in r["apiGroups"] for r in cluster_role_rules(docs))
    role = next(d for d in docs if d["kind"] == "Role")
    assert allowed(role["rules"], "kopf.dev", "kopfpeerings", "watch")
    (named,) = [r for r in role["rules"] if r.get("resourceNames")]
    assert named["resourceNames"] == [FULLNAME] and named["verbs"] == ["patch"]
    # Every namespace by default: no Role, the peering cluster-wide.
    assert "Role" not in kinds(render("peering.enabled=true"))


def test_binding_names_the_service_account():
    docs = render("serviceAccount.name=custom")
    binding = find(docs, "ClusterRoleBinding", FULLNAME)
    assert binding["roleRef"]["name"] == find(docs, "ClusterRole", FULLNAME)["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "custom", "namespace": NAMESPACE}]
    assert find(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "custom"


def test_rbac_and_service_account_can_be_left_to_someone_else():
    docs = render("rbac.create=false", "serviceAccount.create=false", "serviceAccount.name=ops")
    assert "ClusterRole" not in kinds(docs) and "ServiceAccount" not in kinds(docs)
    assert find(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "ops"
    # The uninstall check then lists as the operator's account: no role of the chart's own.
    assert find(docs, "Job")["spec"]["template"]["spec"]["serviceAccountName"] == "ops"
    result = helm(*template_args("serviceAccount.create=false"), check=False)
    assert result.returncode != 0 and "serviceAccount.name must name" in result.stderr


# --- the Deployment ----------------------------------------------------------------------


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (c,) = find(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def test_pod_meets_the_restricted_pod_security_standard():
    docs = render()
    pod = find(docs, "Deployment")["spec"]["template"]["spec"]
    c = container(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert not pod.get("hostNetwork") and not pod.get("hostPID")
    assert all("hostPath" not in v for v in pod["volumes"])


def test_image_user_matches_the_pods_run_as_user():
    user = re.search(r"^USER (\d+):(\d+)$", DOCKERFILE.read_text(), re.M)
    assert user, "the Dockerfile must name a numeric non-root user"
    pod = find(render(), "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == int(user.group(1)) != 0
    assert pod["securityContext"]["runAsGroup"] == int(user.group(2))


def test_dockerfile_runs_the_operator():
    text = DOCKERFILE.read_text()
    assert re.search(r'^ENTRYPOINT \["imagegen-operator"\]$', text, re.M)
    assert re.search(r'^CMD \["run"\]$', text, re.M)
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\}$", text, re.M)
    assert "python:3.12-slim" in text


def test_probes_and_ports_follow_the_values():
    c = container(render("metrics.port=9090", "health.port=9091", "operator.resyncSeconds=12",
                         "operator.logFormat=json", "operator.bindAddress=::",
                         "operator.stuckSeconds=600", "gke.failedCreateHoldSeconds=900"))
    assert c["args"] == ["run", "--resync-seconds=12", "--metrics-port=9090", "--health-port=9091",
                         "--log-format=json", "--stuck-seconds=600", "--bind-address=::"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["IMAGEGEN_GKE_FAILED_CREATE_HOLD_S"] == "900"
    image = "registry.example/ml/imagegen-server:1.2"
    assert f"--server-image={image}" in container(render(f"operator.serverImage={image}"))["args"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"metrics": 9090, "health": 9091}
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["resources"]["limits"]["memory"] == "512Mi"


def test_single_replica_without_peering_is_recreated_not_surged():
    deployment = find(render(), "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert "ClusterKopfPeering" not in kinds(render())


def test_two_replicas_with_peering_each_get_their_own_priority():
    docs = render("replicaCount=2", "peering.enabled=true")
    deployment = find(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    # Recreated too: an upgrade that turns peering on must not start a peer beside the old
    # pod, which is outside the peering and would go on acting.
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    c = container(docs)
    env = {e["name"]: e for e in c["env"]}
    assert env["IMAGEGEN_OPERATOR_PEERING"]["value"] == FULLNAME
    assert env["POD_UID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.uid"
    assert c["command"] == ["/bin/sh", "-c"]
    script, argv0, *args = c["args"]
    assert args[0] == "--resync-seconds=30"
    # The script really yields a different integer priority for different pod UIDs.
    priorities = set()
    for uid in ("0a1b2c3d-0000-4000-8000-000000000000", "ffeeddcc-0000-4000-8000-000000000000"):
        out = subprocess.run(
            ["/bin/sh", "-c", script.replace("exec imagegen-operator", "echo"), argv0, *args],
            env={"POD_UID": uid, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
            check=True,
        ).stdout.split()
        assert out[:2] == ["run", f"--priority={int(uid.split('-')[0], 16)}"]
        assert out[2:] == args
        priorities.add(out[1])
    assert len(priorities) == 2
    assert find(docs, "ClusterKopfPeering")["metadata"]["name"] == FULLNAME


def test_disruption_budget_only_with_more_than_one_replica():
    assert "PodDisruptionBudget" not in kinds(render())
    docs = render("replicaCount=2", "peering.enabled=true")
    budget = find(docs, "PodDisruptionBudget")
    assert budget["spec"]["maxUnavailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"] == find(docs, "Service")["spec"]["selector"]
    assert "PodDisruptionBudget" not in kinds(
        render("replicaCount=2", "peering.enabled=true", "podDisruptionBudget.enabled=false"))


def test_image_reference():
    assert container(render())["image"] == "ghcr.io/imagegen-operator/imagegen-operator:0.1.0"
    digest = "sha256:" + "a" * 64
    assert container(render("image.tag=1.2.3", f"image.digest={digest}"))["image"] == (
        f"ghcr.io/imagegen-operator/imagegen-operator:1.2.3@{digest}")


# --- metrics, GKE, network policy, chart test --------------------------------------------


def test_metrics_service_selects_only_the_operator_pods():
    docs = render()
    service = find(docs, "Service")
    pod_labels = find(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    test_pod_labels = find(docs, "Pod")["metadata"]["labels"]
    selector = service["spec"]["selector"]
    assert selector.items() <= pod_labels.items()
    assert not selector.items() <= test_pod_labels.items()
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {
        "metrics": 8080, "health": 8081}


def test_service_monitor_is_optional():
    assert "ServiceMonitor" not in kinds(render())
    docs = render("metrics.serviceMonitor.enabled=true",
                  "metrics.serviceMonitor.labels.release=prometheus")
    monitor = find(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= (
        find(docs, "Service")["metadata"]["labels"].items())


def test_workload_identity_annotation():
    account = find(render(), "ServiceAccount", FULLNAME)
    assert "annotations" not in account["metadata"]
    gsa = "imagegen-operator@my-project.iam.gserviceaccount.com"
    docs = render(f"gke.workloadIdentity.gcpServiceAccount={gsa}",
                  "serviceAccount.annotations.team=ml", "gke.apiEndpoint=https://gke.example")
    assert find(docs, "ServiceAccount", FULLNAME)["metadata"]["annotations"] == {
        "iam.gke.io/gcp-service-account": gsa, "team": "ml"}
    env = {e["name"]: e.get("value") for e in container(docs)["env"]}
    assert env["IMAGEGEN_GKE_API_ENDPOINT"] == "https://gke.example"


def test_default_cluster_value_reaches_the_operator_and_is_checked():
    assert "IMAGEGEN_GKE_CLUSTER" not in {e["name"] for e in container(render())["env"]}
    cluster = "projects/my-project/locations/us-central1/clusters/serving"
    env = {e["name"]: e.get("value") for e in container(render(f"gke.cluster={cluster}"))["env"]}
    assert env["IMAGEGEN_GKE_CLUSTER"] == cluster
    refused = helm(*template_args("gke.cluster=serving"), check=False)
    assert refused.returncode != 0 and "/gke/cluster" in refused.stderr


def test_node_service_account_value_reaches_the_operator_and_is_checked():
    assert "IMAGEGEN_GKE_NODE_SERVICE_ACCOUNT" not in {
        e["name"] for e in container(render())["env"]}
    email = "gpu-nodes@my-project.iam.gserviceaccount.com"
    env = {e["name"]: e.get("value")
           for e in container(render(f"gke.nodeServiceAccount={email}"))["env"]}
    assert env["IMAGEGEN_GKE_NODE_SERVICE_ACCOUNT"] == email
    refused = helm(*template_args("gke.nodeServiceAccount=gpu-nodes"), check=False)
    assert refused.returncode != 0 and "/gke/nodeServiceAccount" in refused.stderr


def test_network_policy_is_optional_and_tight():
    assert "NetworkPolicy" not in kinds(render())
    docs = render("networkPolicy.enabled=true")
    policy = find(docs, "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert policy["podSelector"]["matchLabels"] == find(docs, "Service")["spec"]["selector"]
    (ingress,) = policy["ingress"]
    assert {p["port"] for p in ingress["ports"]} == {"metrics", "health"}
    # The chart's own test pod may come in (helm test must pass with the policy on).
    test_labels = find(docs, "Pod")["metadata"]["labels"]
    assert any(
        peer.get("podSelector", {}).get("matchLabels", {}).items() <= test_labels.items()
        for peer in ingress["from"]
    )
    open_ports = {p["port"] for rule in policy["egress"] if "to" not in rule
                  for p in rule["ports"]}
    assert open_ports == {53, 443, 6443}
    # GKE's metadata server, where Workload Identity's tokens come from, by address only.
    metadata = {(rule["to"][0]["ipBlock"]["cidr"], rule["ports"][0]["port"])
                for rule in policy["egress"] if "to" in rule}
    assert metadata == {("169.254.169.254/32", 80), ("169.254.169.252/32", 988)}
    off = find(render("networkPolicy.enabled=true", "networkPolicy.metadataServer=false"),
               "NetworkPolicy")["spec"]
    assert all("to" not in rule for rule in off["egress"])


def test_uninstall_waits_for_the_services_to_be_gone():
    docs = render()
    job = find(docs, "Job")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-delete"
    assert job["spec"]["ttlSecondsAfterFinished"] == 86400  # a failed one, kept a day
    # A failed check is kept, so its log can say which services are left.
    assert "hook-failed" not in job["metadata"]["annotations"]["helm.sh/hook-delete-policy"]
    spec = job["spec"]
    assert spec["backoffLimit"] == 0 and spec["activeDeadlineSeconds"] == 120
    pod = spec["template"]["spec"]
    deployment = find(docs, "Deployment")["spec"]["template"]["spec"]
    # The operator's image, as restricted, and an account of its own that may list the
    # services and nothing more (not the operator's, which may write Deployments anywhere).
    (c,) = pod["containers"]
    assert c["args"] == ["in-use"] and c["image"] == deployment["containers"][0]["image"]
    account = pod["serviceAccountName"]
    assert account != deployment["serviceAccountName"] and pod["automountServiceAccountToken"]
    hooks = [d for d in docs if d["metadata"]["name"] == account]
    assert sorted(d["kind"] for d in hooks) == [
        "ClusterRole", "ClusterRoleBinding", "Job", "ServiceAccount"]
    for hook in hooks:
        assert hook["metadata"]["annotations"]["helm.sh/hook"] == "pre-delete"
        if hook["kind"] != "Job":  # made before the Job
            assert int(hook["metadata"]["annotations"]["helm.sh/hook-weight"]) < 0
    role = next(d for d in hooks if d["kind"] == "ClusterRole")
    assert role["rules"] == [{"apiGroups": ["imagegen.dev"], "resources": ["imagegenservices"],
                              "verbs": ["list"]}]
    binding = next(d for d in hooks if d["kind"] == "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account,
                                    "namespace": NAMESPACE}]
    assert c["securityContext"] == deployment["containers"][0]["securityContext"]
    assert pod["securityContext"] == deployment["securityContext"]
    # Not picked by the operator's Service.
    selector = find(docs, "Service")["spec"]["selector"]
    assert not selector.items() <= spec["template"]["metadata"]["labels"].items()
    assert "Job" not in kinds(render("uninstallCheck.enabled=false"))
    # Within 63 characters, its pod's label included, however long the release's name.
    args = template_args()
    args[1] = "release-name-that-is-fairly-long-prod-eu-west1-a"
    long = [d for d in yaml.safe_load_all(helm(*args).stdout) if d]
    assert len(find(long, "Job")["metadata"]["name"]) <= 63


def test_helm_test_hook_fetches_healthz_through_the_service():
    docs = render()
    pod = find(docs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    service = find(docs, "Service")["metadata"]["name"]
    (c,) = pod["spec"]["containers"]
    assert c["command"][-1] == f"http://{service}.{NAMESPACE}.svc:8081/healthz"
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert "Pod" not in kinds(render("tests.enabled=false"))


NOTES_CASES = [
    # (values set, phrases the notes must hold, phrases they must not)
    (["peering.enabled=true", "crds.enabled=false", "providers.local.enabled=true",
      "gke.workloadIdentity.gcpServiceAccount=a@b.iam.gserviceaccount.com"],
     ["did not install the ImageGenService CRD", "clusterkopfpeering " + FULLNAME,
      "roles/iam.workloadIdentityUser", "WARNING: providers.local.enabled",
      f"helm test {RELEASE} -n {NAMESPACE}", "examples/l4-exclusive.yaml",
      "Delete every ImageGenService"],
     ["Annotate it yourself"]),
    # The default install makes no Local nodes: the example it points to must not need them.
    ([], ["examples/h100-mig-1g10gb.yaml"], ["examples/l4-exclusive.yaml", "WARNING"]),
    (["tests.enabled=false"], [], ["helm test"]),
    (["uninstallCheck.enabled=false"], ["Delete every ImageGenService"],
     ["fails, deleting nothing"]),
    (["gke.workloadIdentity.gcpServiceAccount=a@b.iam.gserviceaccount.com",
      "gke.nodeServiceAccount=nodes@b.iam.gserviceaccount.com",
      "providers.configConnector.enabled=true"],
     ["(nodes@b.iam.gserviceaccount.com)", "Config Connector's own Google account",
      "fails, deleting nothing"], ["Compute Engine default"]),
    (["gke.workloadIdentity.gcpServiceAccount=a@b.iam.gserviceaccount.com",
      "providers.configConnector.enabled=false"],
     ["Compute Engine default service account"], ["Config Connector's own"]),
    (["serviceAccount.create=false", "serviceAccount.name=mine",
      "gke.workloadIdentity.gcpServiceAccount=a@b.iam.gserviceaccount.com"],
     ["Annotate it yourself", "serviceaccount mine",
      "iam.gke.io/gcp-service-account=a@b.iam.gserviceaccount.com"], []),
]


@pytest.mark.parametrize(("sets", "present", "absent"), NOTES_CASES)
def test_notes_render_for_every_option(tmp_path, sets, present, absent):
    # NOTES.txt is a template too: a typo there fails only at install time. `helm template`
    # leaves it out, so a copy of the chart renders it into a ConfigMap with `tpl`.
    chart = shutil.copytree(CHART, tmp_path / "chart")
    (chart / "files" / "NOTES.txt").write_text((CHART / "templates" / "NOTES.txt").read_text())
    (chart / "templates" / "notes-check.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\ndata:\n  notes: |\n"
        '    {{- tpl (.Files.Get "files/NOTES.txt") . | nindent 4 }}\n'
    )
    options = [arg for value in sets for arg in ("--set", value)]
    out = helm("template", RELEASE, str(chart), "--namespace", NAMESPACE,
               "--kube-version", KUBE_VERSION, "--show-only", "templates/notes-check.yaml",
               *options).stdout
    notes = yaml.safe_load(out)["data"]["notes"]
    for phrase in present:
        assert phrase in notes
    for phrase in absent:
        assert phrase not in notes


# --- the values schema refuses what the chart would ignore -------------------------------

TYPOS = [
    ({"replicaCont": 2}, "replicaCont"),
    ({"image": {"repository": "r", "pullPolicy": "IfNotPresent", "tagg": "1"}}, "tagg"),
    ({"metrics": {"port": 8080, "serviceMonitor": {"enable": True}}}, "enable"),
    ({"securityContext": {"runAsNonroot": True}}, "runAsNonroot"),
    ({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
    ({"replicaCount": "two"}, "replicaCount"),
    ({"replicaCount": 2}, "peering"),
    ({"metrics": {"port": 80800}}, "port"),
    ({"operator": {"logFormat": "yaml"}}, "logFormat"),
    ({"gke": {"workloadIdentity": {"gcpServiceAccount": "not-an-email"}}}, "gcpServiceAccount"),
    # A key set to null is a key removed: the templates read every one.
    ({"metrics": {"port": None}}, "port"),
    ({"providers": None}, "providers"),
    ({"tests": None}, "tests"),
    ({"securityContext": None}, "securityContext"),
    ({"networkPolicy": {"enabled": True, "metricsFrom": [{}]}}, "minProperties"),
    # Kubernetes would drop it with a warning, and the replicas would not spread.
    ({"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnored": []}}},
     "requiredDuringSchedulingIgnored"),
]


@pytest.mark.parametrize("values, field", TYPOS, ids=[t[1] for t in TYPOS])
def test_schema_rejects_typos_and_bad_values(tmp_path, values, field):
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    result = helm(*template_args(values=path), check=False)
    assert result.returncode != 0, f"{values} was accepted"
    assert "values don't meet the specifications of the schema" in result.stderr
    assert field in result.stderr


def test_a_security_context_key_may_be_removed(tmp_path):
    # Rendered whole: dropping runAsUser (OpenShift's restricted SCC picks the user) is a
    # choice the schema leaves to the user.
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump({"podSecurityContext": {"runAsUser": None},
                                    "resources": {"limits": None}}))
    result = helm(*template_args(values=path), check=False)
    assert result.returncode == 0, result.stderr
    pod = find([d for d in yaml.safe_load_all(result.stdout) if d], "Deployment")
    assert "runAsUser" not in pod["spec"]["template"]["spec"]["securityContext"]


def test_one_port_for_metrics_and_health_is_refused(tmp_path):
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump({"metrics": {"port": 8081}, "health": {"port": 8081}}))
    result = helm(*template_args(values=path), check=False)
    assert result.returncode != 0
    assert "metrics.port and health.port are both 8081" in result.stderr


def test_a_service_monitor_the_network_policy_would_block_is_refused():
    result = helm(*template_args("metrics.serviceMonitor.enabled=true",
                                 "networkPolicy.enabled=true"), check=False)
    assert result.returncode != 0
    assert "networkPolicy.metricsFrom" in result.stderr
    allowed = render("metrics.serviceMonitor.enabled=true", "networkPolicy.enabled=true",
                     "networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.name=monitoring")
    assert find(allowed, "ServiceMonitor") and find(allowed, "NetworkPolicy")


def test_schema_is_strict_everywhere():
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(node, path="$"):
        if node.get("type") == "object" and "properties" in node:
            assert node.get("additionalProperties") is False, path
        for name, child in node.get("properties", {}).items():
            yield from walk(child, f"{path}.{name}")
        if isinstance(node.get("items"), dict):
            yield from walk(node["items"], f"{path}[]")
        yield path

    assert len(list(walk(schema))) > 60


def test_a_full_values_file_is_accepted(tmp_path):
    # Every option at once: the schema must not refuse what the chart documents.
    values = {
        "replicaCount": 2,
        "peering": {"enabled": True, "name": "imagegen"},
        "image": {"repository": "example.com/op", "tag": "1", "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "regcred"}],
        "gke": {"workloadIdentity": {"gcpServiceAccount": "op@p-1.iam.gserviceaccount.com"},
                "apiEndpoint": "https://container.googleapis.com"},
        "metrics": {"serviceMonitor": {"enabled": True, "interval": "15s",
                                       "labels": {"release": "prom"}}},
        "networkPolicy": {"enabled": True, "metricsFrom": [
            {"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}]},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops",
                         "effect": "NoSchedule"}],
        "affinity": {"podAntiAffinity": {}},
        "nodeSelector": {"pool": "system"},
        "resources": {"requests": {"cpu": "200m", "memory": "300Mi"}, "limits": {"cpu": 1}},
        "priorityClassName": "system-cluster-critical",
    }
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    result = helm(*template_args(values=path), check=False)
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert find(docs, "ClusterKopfPeering")["metadata"]["name"] == "imagegen"
    spec = find(docs, "Deployment")["spec"]["template"]["spec"]
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert spec["priorityClassName"] == "system-cluster-critical"
    assert spec["nodeSelector"] == {"pool": "system"}
