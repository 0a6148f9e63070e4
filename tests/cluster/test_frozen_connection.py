"""The operator behind a proxy that freezes its connections to the API server.

Every API call and watch has a timeout, so a dead connection turns into
transient errors and the operator comes back by itself once new connections
work; a reconcile stuck past its limit turns /healthz unhealthy, so the kubelet
would restart the pod. The proxy (tests/support/tcp_proxy.py) keeps frozen
sockets open and silent for good: only timeouts get the operator off them.
"""

from __future__ import annotations

import json
import time
from urllib.parse import urlsplit

import pytest

from support.kube import apply, delete_services, eventually, get_json, http_status, wait_ready
from support.operator_process import OperatorProcess
from support.tcp_proxy import FreezableProxy

pytestmark = pytest.mark.cluster

NS = "frozen"
API_TIMEOUT_S = 3
STUCK_S = 2


def healthz(proc: OperatorProcess) -> int:
    return http_status(f"http://{proc.host}:{proc.health_port}/healthz", timeout=5)


def test_frozen_api_connections_time_out_and_the_operator_recovers(cluster, crd, tmp_path):
    config = json.loads(cluster.operator_kubeconfig.read_text())
    server = urlsplit(config["clusters"][0]["cluster"]["server"])
    proxy = FreezableProxy(server.hostname, server.port)
    config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{proxy.port}"
    kubeconfig = tmp_path / "through-proxy.kubeconfig"
    kubeconfig.write_text(json.dumps(config))
    apply(cluster, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    proc = OperatorProcess(
        cluster, tmp_path / "operator.log", kubeconfig=kubeconfig,
        env={"IMAGEGEN_OPERATOR_NAMESPACES": NS,
             "IMAGEGEN_OPERATOR_API_TIMEOUT_S": str(API_TIMEOUT_S),
             "IMAGEGEN_OPERATOR_STUCK_SECONDS": str(STUCK_S),
             "IMAGEGEN_OPERATOR_WATCH_TIMEOUT_SECONDS": "5"},
    ).start()
    try:
        apply(cluster, {
            "apiVersion": "imagegen.dev/v1alpha1", "kind": "ImageGenService",
            "metadata": {"name": "steady", "namespace": NS},
            "spec": {"model": {"uri": "gs://models/sd15", "family": "SD15", "memoryGiB": 4},
                     "gpu": {"type": "nvidia-l4", "sharing": {
                         "strategy": "TimeSharing", "maxSharedClientsPerGpu": 4}},
                     "nodePool": {"provider": "Local", "maxNodes": 1}, "replicas": 1},
        })
        wait_ready(cluster, NS, "steady")
        # A reconcile that runs past STUCK_S just then fails one probe: healthy soon after.
        eventually(lambda: healthz(proc) == 200, timeout=30, what="/healthz healthy")

        proxy.freeze()
        frozen_at = time.monotonic()
        # Edited while the operator cannot hear (kubectl goes to the API server directly).
        cluster.kubectl("patch", "igs", "steady", "-n", NS, "--type=merge",
                        "-p", '{"spec":{"replicas":2}}')
        # A reconcile waits on a dead socket until its timeout: past the stuck limit,
        # so /healthz says so (kopf re-runs probes at most every 10 s).
        eventually(lambda: healthz(proc) == 500, timeout=30, interval=0.5,
                   what="/healthz unhealthy while reconciles hang")
        time.sleep(max(0.0, 8 - (time.monotonic() - frozen_at)))
        assert proc.proc.poll() is None
        proxy.thaw()
        thawed_at = time.monotonic()

        # The old sockets stay dead; timeouts move the operator onto new ones, and the
        # edit made while frozen is acted on.
        eventually(lambda: get_json(cluster, "deployment", "steady", "-n", NS)
                   ["spec"]["replicas"] == 2, timeout=60, what="the edit applied after thaw")
        recovered_s = time.monotonic() - thawed_at
        eventually(lambda: healthz(proc) == 200, timeout=30, what="/healthz healthy again")
        print(f"edit applied {recovered_s:.1f}s after the thaw")
        wait_ready(cluster, NS, "steady")
        delete_services(cluster, proc, NS, "steady")
    finally:
        proc.stop()
        print(proc.log())
        proxy.close()
