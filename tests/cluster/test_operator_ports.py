"""The operator's metrics and health ports listen where --bind-address says, and only there."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from support.operator_process import OperatorProcess

pytestmark = pytest.mark.cluster


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError):
        return False


def test_ports_listen_on_the_bind_address_only(cluster, tmp_path):
    # Another loopback address, so "not on 127.0.0.1" can be seen without leaving the host.
    proc = OperatorProcess(cluster, tmp_path / "operator.log",
                           env={"IMAGEGEN_OPERATOR_BIND_ADDRESS": "127.0.0.2"}).start()
    try:
        assert answers(f"http://127.0.0.2:{proc.health_port}/healthz")
        assert "imagegen" in proc.metrics()
        assert not answers(f"http://127.0.0.1:{proc.health_port}/healthz")
        assert not answers(f"http://127.0.0.1:{proc.metrics_port}/metrics")
    finally:
        proc.stop()
