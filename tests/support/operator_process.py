"""The operator as a real process against the local control plane."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from localcluster import OPERATOR_USER, free_ports
from support.kube import free_port_refusing
from support.not_gke_metadata import not_gke_metadata_host

ROOT = Path(__file__).resolve().parents[2]


class OperatorProcess:
    """``imagegen-operator run`` with a fast resync, its log in a file."""

    def __init__(self, cluster, log_path: Path, resync_seconds: float = 1.0,
                 kubeconfig: Path | None = None, env: dict[str, str] | None = None):
        self.cluster = cluster
        self.extra_env = env or {}
        self.log_path = log_path
        self.resync_seconds = resync_seconds
        self.kubeconfig = kubeconfig or cluster.operator_kubeconfig
        self.proc: subprocess.Popen | None = None
        self.metrics_port = 0
        self.health_port = 0
        # Where its ports listen (--bind-address); tests reach them there.
        self.host = self.extra_env.get("IMAGEGEN_OPERATOR_BIND_ADDRESS", "127.0.0.1")

    def start(self) -> OperatorProcess:
        self.metrics_port, self.health_port = free_ports(2)
        env = {
            **os.environ,
            # Never Google's own: on a CI runner that is itself on GKE (or GCE), the metadata
            # server would name that cluster (and refuse the tests' as foreign), and a GKE
            # API endpoint left unset would be the real one. A test that wants either sets it.
            "GCE_METADATA_HOST": not_gke_metadata_host(),
            "IMAGEGEN_GKE_API_ENDPOINT": f"http://{free_port_refusing()}",
            "KUBECONFIG": str(self.kubeconfig),
            "PYTHONPATH": os.pathsep.join(
                [str(ROOT / "operator"), str(ROOT / "inference_image"),
                 os.environ.get("PYTHONPATH", "")]),
            **self.extra_env,
        }
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "imagegen_operator.cli", "run",
             f"--resync-seconds={self.resync_seconds}",
             f"--metrics-port={self.metrics_port}", f"--health-port={self.health_port}"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        try:
            self._wait_healthy()
        except BaseException:
            # Never left running: it would act on later tests' services beside their own.
            self.kill()
            raise
        return self

    def _wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"operator exited {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(
                        f"http://{self.host}:{self.health_port}/healthz", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"operator not healthy after {timeout}s:\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL: no cleanup, no graceful exit, as when a node dies."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://{self.host}:{self.metrics_port}/metrics") as r:
            return r.read().decode()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]


def audit_events(cluster, since_bytes: int = 0) -> list[dict]:
    """Completed requests in the audit log (writes only: see localcluster's policy)."""
    events = []
    with open(cluster.audit_log, "rb") as f:
        f.seek(since_bytes)
        for line in f:
            if not line.endswith(b"\n"):
                break  # the API server is still writing this entry
            event = json.loads(line)
            if event.get("stage") == "ResponseComplete":
                events.append(event)
    return events


def audit_writes(cluster, since_bytes: int, user: str = OPERATOR_USER) -> list[dict]:
    """Write requests ``user`` made since the audit log had ``since_bytes``."""
    return [e for e in audit_events(cluster, since_bytes)
            if e.get("user", {}).get("username") == user]
