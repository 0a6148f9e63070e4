"""Every call to the API server is bounded in time, discovery included: a server that takes
the connection and never answers fails the call, it does not hold the operator."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from kubernetes import client

from imagegen_operator import kube


@pytest.fixture
def silent_server():
    """A TCP server on 127.0.0.1 that accepts connections and never says a word."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join(5)
    for conn in held:
        conn.close()
    listener.close()


def test_a_discovery_that_never_answers_fails_in_time(silent_server, monkeypatch) -> None:
    monkeypatch.setattr(kube, "REQUEST_TIMEOUT_S", 0.5)
    configuration = client.Configuration(host=f"http://127.0.0.1:{silent_server}")
    api = kube.Kube(kube.with_default_timeout(client.ApiClient(configuration)))
    started = time.monotonic()
    with pytest.raises(kube.TransientKubeError, match="unreachable"):
        api.get("v1", "Node", "gpu-node-0")  # the kind is discovered first
    assert time.monotonic() - started < 10
