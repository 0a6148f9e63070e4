"""GitOps readiness without a cluster: the Argo CD health check, the kustomization, quiet diffs.

The health check also runs against status objects the operator wrote on a real API
server, in tests/cluster/test_rbac_operator.py; here it runs against a table of
statuses shaped like the operator's, to pin each branch.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from imagegen_operator import api
from support.tools import pinned_tool

ROOT = Path(__file__).resolve().parents[2]
HEALTH_LUA = ROOT / "docs" / "argocd-health.lua"
GITOPS_DOC = ROOT / "docs" / "gitops.md"
GITOPS = ROOT / "examples" / "gitops"


def argocd_health(obj: dict[str, Any]) -> dict[str, str]:
    """Run docs/argocd-health.lua the way Argo CD does: `obj` global, a table returned."""
    import lupa

    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(copy.deepcopy(obj), recursive=True)
    result = lua.execute(HEALTH_LUA.read_text())
    return {"status": result["status"], "message": result["message"]}


def condition(type_: str, status: str, reason: str, generation: int = 1, message: str = "m"):
    return {"type": type_, "status": status, "reason": reason, "message": message,
            "observedGeneration": generation, "lastTransitionTime": "2026-01-01T00:00:00Z"}


def igs(generation: int = 1, status: dict[str, Any] | None = None) -> dict[str, Any]:
    obj = {"apiVersion": "imagegen.dev/v1alpha1", "kind": "ImageGenService",
           "metadata": {"name": "s", "namespace": "n", "generation": generation}, "spec": {}}
    if status is not None:
        obj["status"] = status
    return obj


READY = condition("Ready", "True", "Ready", message="2/2 replicas ready")
PROGRESSING_DONE = condition("Progressing", "False", "RolloutComplete")
PROGRESSING = condition("Progressing", "True", "RollingOut")
CASES = [
    ("no status yet", igs(), "Progressing", "report a status"),
    ("ready", igs(status={"observedGeneration": 1, "conditions": [READY, PROGRESSING_DONE]}),
     "Healthy", "2/2 replicas ready"),
    ("a new generation not yet seen", igs(2, {"observedGeneration": 1,
                                              "conditions": [READY, PROGRESSING_DONE]}),
     "Progressing", "observe generation 2"),
    ("a Ready condition from an older generation",
     igs(2, {"observedGeneration": 2, "conditions": [READY, PROGRESSING_DONE]}),
     "Progressing", "observe generation 2"),
    ("pool provisioning", igs(status={"observedGeneration": 1, "conditions": [
        condition("Ready", "False", "Provisioning", message="GKE is creating node pool p"),
        PROGRESSING]}), "Progressing", "GKE is creating"),
    ("spec that cannot run", igs(status={"observedGeneration": 1, "conditions": [
        condition("Ready", "False", "ModelDoesNotFitSlice", message="memoryGiB 40 > 1g.10gb"),
        condition("NodePoolReady", "False", "ModelDoesNotFitSlice"),
        condition("Available", "False", "ModelDoesNotFitSlice")]}),
     "Degraded", "ModelDoesNotFitSlice: memoryGiB 40"),
    ("quota, while the rollout waits", igs(status={"observedGeneration": 1, "conditions": [
        condition("Ready", "False", "QuotaExceeded", message="GKE quota exceeded"),
        PROGRESSING]}), "Degraded", "QuotaExceeded"),
    ("rate limited: it retries", igs(status={"observedGeneration": 1, "conditions": [
        condition("Ready", "False", "RateLimited"), PROGRESSING]}), "Progressing", ""),
    ("a stockout: the create is tried again", igs(status={"observedGeneration": 1,
        "conditions": [condition("Ready", "False", "CreateFailed"), PROGRESSING]}),
     "Progressing", ""),
    ("rolled out, yet not ready", igs(status={"observedGeneration": 1, "conditions": [
        condition("Ready", "False", "NoMatchingNodes"), PROGRESSING_DONE]}), "Degraded", ""),
    ("a child refused by the API server", igs(status={"observedGeneration": 1, "conditions": [
        condition("Ready", "False", "ApplyRejected", message="not applied: ..."),
        PROGRESSING]}), "Degraded", "ApplyRejected"),
    ("more replicas than the pool can hold", igs(status={"observedGeneration": 1, "conditions": [
        condition("Ready", "False", "PoolTooSmall", message="3/4 replicas ready; raise ..."),
        PROGRESSING]}), "Degraded", "PoolTooSmall: 3/4"),
    ("no cluster to make the pool in", igs(status={"observedGeneration": 1, "conditions": [
        condition("Ready", "False", "ClusterUnknown")]}), "Degraded", "ClusterUnknown"),
    ("serving while a pool move goes on", igs(status={"observedGeneration": 1, "conditions": [
        condition("Ready", "Unknown", "Progressing", message="2/2 replicas ready on pool a"),
        condition("Progressing", "True", "MovingPool")]}), "Progressing", "2/2"),
]


def test_every_reason_the_operator_stalls_on_is_degraded():
    """Each Ready reason that comes with Stalled=True is in the check's needs_a_person."""
    lua = (ROOT / "docs" / "argocd-health.lua").read_text()
    for reason in ("ApplyRejected", "PoolTooSmall", "ClusterUnknown", "ForeignCluster",
                   "LocationsOutsideCluster",
                   "QuotaExceeded",
                   "PermissionDenied", "PoolNotOwned", "PoolConfigMismatch", "PoolClaimed",
                   "ProgressDeadlineExceeded"):
        assert f"  {reason} = true," in lua, reason
    # And none the operator tries again by itself (not Stalled): kstatus reads those as
    # in progress, and Argo CD must not call them Degraded.
    for reason in ("CreateFailed", "RateLimited", "GkeUnavailable", "DeleteFailed", "PoolError"):
        assert f"  {reason} = true," not in lua, reason


@pytest.mark.parametrize("obj, health, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_health_check_table(obj, health, message):
    result = argocd_health(obj)
    assert result["status"] == health
    assert message in result["message"]


def test_docs_show_the_check_that_is_tested():
    doc = GITOPS_DOC.read_text()
    block = doc.split("```lua\n", 1)[1].split("```", 1)[0]
    assert block == HEALTH_LUA.read_text()
    assert "resource.customizations.health.imagegen.dev_ImageGenService" in doc


def test_docs_name_the_kstatus_fields():
    doc = GITOPS_DOC.read_text()
    for phrase in ("status.observedGeneration", "Ready", "Reconciling", "Stalled", "kstatus"):
        assert phrase in doc


def kustomize_build() -> list[dict[str, Any]]:
    out = subprocess.run([str(pinned_tool("kubectl")), "kustomize", str(GITOPS)],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def test_gitops_kustomization_builds_into_valid_services():
    docs = kustomize_build()
    services = [d for d in docs if d["kind"] == "ImageGenService"]
    assert {d["kind"] for d in docs} == {"Namespace", "ImageGenService"}
    assert len(services) == 2
    namespace = next(d for d in docs if d["kind"] == "Namespace")["metadata"]["name"]
    for doc in services:
        assert doc["metadata"]["namespace"] == namespace
        api.parse(doc)  # the operator's own models accept it
        # Labels on the services only: kustomize must not rewrite selectors we do not own.
        assert doc["metadata"]["labels"] == {"app.kubernetes.io/part-of": namespace}
    # The Flux Kustomization is beside the services, not among them.
    assert "flux-kustomization.yaml" not in (GITOPS / "kustomization.yaml").read_text().split(
        "resources:", 1)[1]


def test_flux_kustomization_checks_every_service_kind():
    flux = yaml.safe_load((GITOPS / "flux-kustomization.yaml").read_text())
    assert flux["spec"]["path"] == "./examples/gitops" and flux["spec"]["wait"] is True
    (check,) = flux["spec"]["healthCheckExprs"]
    assert (check["apiVersion"], check["kind"]) == (api.API_VERSION, api.KIND)
    assert "observedGeneration" in check["inProgress"] and "'Ready'" in check["current"]
    # Failed is what the operator marks as needing a person, whatever condition is beside.
    assert "'Stalled'" in check["failed"] and "Progressing" not in check["failed"]
    # docs/gitops.md shows the very expressions the file holds.
    docs = (ROOT / "docs" / "gitops.md").read_text()
    shown = docs.split("  healthCheckExprs:\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(shown) == [check]


def render_in_new_process(files: list[Path], seed: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONHASHSEED": seed,
           "PYTHONPATH": os.pathsep.join([str(ROOT / "operator"), str(ROOT / "inference_image")])}
    # The GKE examples that name no cluster take the operator's, as --cluster; those that
    # name one name this one (another would be refused, as the operator refuses it).
    args = [sys.executable, "-m", "imagegen_operator.cli", "render",
            "--cluster", "projects/imagegen-prod/locations/us-central1/clusters/serving"]
    for f in files:
        args += ["-f", str(f)]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_render_is_byte_identical_across_runs(tmp_path):
    built = tmp_path / "gitops.yaml"
    built.write_text(yaml.safe_dump_all(kustomize_build()))
    files = [built, *sorted((ROOT / "examples").glob("*.yaml"))]
    runs = [render_in_new_process(files, seed) for seed in ("0", "1", "2")]
    for run in runs:
        assert run.returncode == 0, run.stderr
    assert runs[0].stdout == runs[1].stdout == runs[2].stdout
    objects = [d for d in yaml.safe_load_all(runs[0].stdout) if d]
    kinds = {d["kind"] for d in objects}
    assert {"Deployment", "Service", "NodePool"} <= kinds
    # Nothing that changes by itself between runs: no timestamps, no generated names.
    text = runs[0].stdout
    assert "creationTimestamp" not in text and "generateName" not in text and "uid:" not in text
