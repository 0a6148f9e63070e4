"""Two operator replicas with kopf peering: only one acts at a time.

The higher-priority replica reconciles; the other sees it in the peering
object and stays paused, and takes over once it is gone.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from support.kube import apply, delete_services, eventually, get_json, wait_ready
from support.operator_process import OperatorProcess

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
PEERING = "imagegen-test"


def reconciles(op: OperatorProcess) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in op.metrics().splitlines()
        if line.startswith("imagegen_operator_reconcile_total{")
    )


def leading(op: OperatorProcess) -> float:
    [value] = [float(line.rsplit(" ", 1)[1]) for line in op.metrics().splitlines()
               if line.startswith("imagegen_operator_leading ")]
    return value


def svc(name: str, replicas: int) -> dict:
    return {
        "apiVersion": "imagegen.dev/v1alpha1", "kind": "ImageGenService",
        "metadata": {"name": name, "namespace": "e2e-peering"},
        "spec": {
            "model": {"uri": "file:///models/tiny", "family": "SD15", "memoryGiB": 2},
            "gpu": {"type": "nvidia-tesla-t4",
                    "sharing": {"strategy": "TimeSharing", "maxSharedClientsPerGpu": 4}},
            "nodePool": {"provider": "Local", "maxNodes": 2},
            "replicas": replicas,
        },
    }


def test_only_the_leader_reconciles_and_the_other_takes_over(cluster, crd, tmp_path):
    cluster.kubectl("apply", "--server-side", "-f",
                    str(ROOT / "charts/imagegen-operator/crds/kopf-peering.yaml"))
    cluster.wait_established("clusterkopfpeerings.kopf.dev")
    apply(cluster,
          {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering",
           "metadata": {"name": PEERING}},
          {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "e2e-peering"}})
    leader = OperatorProcess(cluster, tmp_path / "leader.log",
                             env={"IMAGEGEN_OPERATOR_PEERING": PEERING, "POD_ID": "leader",
                                  "IMAGEGEN_OPERATOR_PRIORITY": "100"}).start()
    standby = OperatorProcess(cluster, tmp_path / "standby.log",
                              env={"IMAGEGEN_OPERATOR_PEERING": PEERING, "POD_ID": "standby",
                                   "IMAGEGEN_OPERATOR_PRIORITY": "50"}).start()
    try:
        # Both have announced themselves before any work exists.
        eventually(lambda: len(get_json(cluster, "clusterkopfpeering", PEERING)
                                .get("status") or {}) >= 2, what="two peers registered")
        apply(cluster, svc("led", 1))
        wait_ready(cluster, "e2e-peering", "led")
        assert reconciles(leader) > 0
        assert reconciles(standby) == 0, standby.log()
        eventually(lambda: (leading(leader), leading(standby)) == (1, 0),
                   what="each says whether it acts")

        leader.stop()  # a clean exit withdraws it from the peering object
        apply(cluster, svc("led", 2))
        eventually(lambda: (get_json(cluster, "igs", "led", "-n", "e2e-peering")["status"]
                            .get("readyReplicas")) == 2,
                   timeout=90, what="the standby reconciled the change")
        assert reconciles(standby) > 0
        eventually(lambda: leading(standby) == 1, what="the standby says it acts now")
        delete_services(cluster, standby, "e2e-peering", "led")
    finally:
        leader.stop()
        standby.stop()
