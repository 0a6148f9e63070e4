"""The real control plane for cluster tests: one per test session.

Built from pinned sources on first use (see hack/build-tools.sh) and torn down once the
last cluster test is done (the server and unit tests after them get the machine's cores to
themselves), also when tests fail or the run is interrupted.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest

import localcluster
from imagegen_operator.render.nodepool import POOL_LABEL

HERE = Path(__file__).resolve().parent
# The control planes this session started, to stop once no cluster test is left.
_started: list[Path] = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    # After the last cluster test of the run, and after its fixtures' teardown (the wrapper's
    # second half, also when one of them failed), the control plane stops rather than idle
    # beside the server and unit tests. (A fixture's "package" scope is the session's here:
    # this directory has no __init__.py.)
    try:
        return (yield)
    finally:
        items = item.session.items
        if not any(HERE in later.path.parents for later in items[items.index(item) + 1:]):
            while _started:
                localcluster.down(_started.pop())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    # A failed cluster test says what the cluster and its operator were doing: on a CI
    # machine, that is all there is to go on.
    report = yield
    if report.failed and call.when == "call":
        running = item.funcargs.get("cluster")
        if running is not None:
            try:
                state = cluster_state(running)
            except Exception as exc:  # noqa: BLE001 - a report, never a second failure
                state = f"(could not be read: {exc!r})"
            report.sections.append(("cluster state at the failure", state))
        operator = item.funcargs.get("operator")
        if hasattr(operator, "log"):
            report.sections.append(("operator log, its end", operator.log()[-4000:]))
    return report


def cluster_state(running) -> str:
    """Services, pods (with why one is not scheduled) and GPU nodes, one line each."""
    def items(*args: str) -> list[dict]:
        result = running.kubectl("get", *args, "-o", "json", check=False, timeout=30)
        return json.loads(result.stdout)["items"] if result.returncode == 0 else []

    lines = []
    for igs in items("imagegenservices.imagegen.dev", "-A"):
        meta, status = igs["metadata"], igs.get("status") or {}
        conditions = {c["type"]: c for c in status.get("conditions") or []}
        ready = conditions.get("Ready") or {}
        lines.append(f"igs {meta['namespace']}/{meta['name']} gen={meta.get('generation')} "
                     f"observed={status.get('observedGeneration')} pool={status.get('nodePool')} "
                     + " ".join(f"{t}={c['status']}/{c.get('reason')}"
                                for t, c in conditions.items())
                     + f" Ready says: {ready.get('message')!r}")
    for pod in items("pods", "-A"):
        meta, status = pod["metadata"], pod.get("status") or {}
        if meta["namespace"] == "kube-system":
            continue
        unscheduled = [c.get("message", "") for c in status.get("conditions") or []
                       if c["type"] == "PodScheduled" and c["status"] != "True"]
        lines.append(f"pod {meta['namespace']}/{meta['name']} {status.get('phase')} "
                     f"node={pod['spec'].get('nodeName')} "
                     f"deleting={'deletionTimestamp' in meta} {' '.join(unscheduled)}")
    for node in items("nodes", "-l", POOL_LABEL):
        labels, spec = node["metadata"]["labels"], node.get("spec") or {}
        ready = [c["status"] for c in (node.get("status") or {}).get("conditions") or []
                 if c["type"] == "Ready"]
        lines.append(f"node {node['metadata']['name']} "
                     f"pool={labels.get(POOL_LABEL)} ready={ready} "
                     f"taints={[t['key'] for t in spec.get('taints') or []]} "
                     f"deleting={'deletionTimestamp' in node['metadata']}")
    return "\n".join(lines)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """A running control plane: `.kubeconfig`, `.bin`, `.kubectl(...)`."""
    existing = os.environ.get("IMAGEGEN_TEST_CLUSTER_DIR")
    if existing:
        # Reuse a cluster from `make cluster-up` for a quick edit-test loop.
        yield localcluster.attach(Path(existing))
        return
    cluster_dir = tmp_path_factory.mktemp("cluster")
    running = localcluster.up(cluster_dir)
    _started.append(cluster_dir)
    try:
        yield running
    finally:
        localcluster.down(cluster_dir)


@pytest.fixture(scope="module", autouse=True)
def nothing_left_behind(request: pytest.FixtureRequest, cluster):
    """After each module (its operators stopped), no ImageGenService and no simulated
    node is left for the next: a failed test's would be taken up by the next module's
    operators, or counted by its pools of the same name. What is left is removed, and
    named in a warning. First of the module's fixtures, so torn down last."""
    yield
    running, left = cluster, []
    found = running.kubectl("get", "imagegenservices.imagegen.dev", "-A", "-o",
                            "jsonpath={range .items[*]}{.metadata.namespace}/{.metadata.name} "
                            "{end}", check=False, timeout=30)
    for ref in found.stdout.split() if found.returncode == 0 else []:
        namespace, name = ref.split("/")
        left.append(f"ImageGenService {ref}")
        running.kubectl("patch", "imagegenservices.imagegen.dev", name, "-n", namespace,
                        "--type=merge", "-p", '{"metadata":{"finalizers":null}}',
                        check=False, timeout=30)
        running.kubectl("delete", "imagegenservices.imagegen.dev", name, "-n", namespace,
                        "--wait=false", "--ignore-not-found", check=False, timeout=30)
    nodes = running.kubectl("get", "nodes", "-l", "type=kwok", "-o", "name", check=False,
                            timeout=30)
    for node in nodes.stdout.split() if nodes.returncode == 0 else []:
        left.append(node)
        running.kubectl("delete", node, "--wait=false", "--ignore-not-found", check=False,
                        timeout=30)
    if left:
        warnings.warn(f"{request.module.__name__} left behind, now removed: {', '.join(left)}",
                      stacklevel=1)


@pytest.fixture(scope="session")
def crd(cluster):
    """The ImageGenService CRD from crds/, installed and established."""
    root = Path(__file__).resolve().parents[2]
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(root / "crds"))
    cluster.wait_established("imagegenservices.imagegen.dev")
    return "imagegenservices.imagegen.dev"
