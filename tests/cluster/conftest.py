"""The real control plane for cluster tests: one per test session.

Built from pinned sources on first use (see hack/build-tools.sh) and torn down once the
last cluster test is done (the server and unit tests after them get the machine's cores to
themselves), also when tests fail or the run is interrupted.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import localcluster

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


@pytest.fixture(scope="session")
def crd(cluster):
    """The ImageGenService CRD from crds/, installed and established."""
    root = Path(__file__).resolve().parents[2]
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(root / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                    "crd/imagegenservices.imagegen.dev")
    return "imagegenservices.imagegen.dev"
