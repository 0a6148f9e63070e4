"""`make cluster-up` / `make cluster-down`: what they promise, through the same script."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "hack" / "localcluster.py"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone in all but name: it is waiting for a parent that left.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


@contextlib.contextmanager
def cpu_load(workers: int) -> Iterator[None]:
    """Busy processes, one per core: a loaded machine is where a hurried teardown shows."""
    spin = "import time\nend = time.monotonic() + 120\nwhile time.monotonic() < end: pass"
    procs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(workers)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)


def test_up_gives_a_working_kubeconfig_and_down_leaves_no_process(tmp_path, cluster):
    # `cluster` first: the binaries are built (or found in the cache) by then.
    cluster_dir = tmp_path / "c"
    try:
        up = subprocess.run([sys.executable, str(SCRIPT), "up", "--dir", str(cluster_dir)],
                            capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, up.stderr
        pids = [int(line.split()[0])
                for line in (cluster_dir / "pids").read_text().splitlines()]
        names = [line.split()[1] for line in (cluster_dir / "pids").read_text().splitlines()]
        assert names == ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler",
                         "kwok"]
        kubectl = cluster_dir / "bin" / "kubectl"
        nodes = subprocess.run(
            [str(kubectl), "--kubeconfig", str(cluster_dir / "kubeconfig"), "get", "nodes"],
            capture_output=True, text=True, timeout=60)
        assert nodes.returncode == 0, nodes.stderr
        version = subprocess.run(
            [str(kubectl), "--kubeconfig", str(cluster_dir / "kubeconfig"), "version", "-o",
             "json"], capture_output=True, text=True, timeout=60, check=True).stdout
        assert '"gitVersion": "v1.34.4"' in version
        assert all(alive(pid) for pid in pids)
    finally:
        # What a user runs, with every core busy.
        with cpu_load(os.cpu_count() or 2):
            down = subprocess.run(
                ["make", "-C", str(ROOT), "cluster-down", f"CLUSTER_DIR={cluster_dir}"],
                capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    assert [pid for pid in pids if alive(pid)] == []
    assert not (cluster_dir / "pids").exists()
