"""The real control plane for cluster tests: one per test session.

Built from pinned sources on first use (see hack/build-tools.sh) and torn down
when the session ends, also when tests fail or the run is interrupted.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import localcluster


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
