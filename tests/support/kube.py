"""Small helpers for tests that drive the local control plane with kubectl."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import yaml


def apply(cluster, *objects: dict[str, Any], namespace: str | None = None) -> None:
    """Server-side apply a list of objects with the built kubectl."""
    args = ["apply", "--server-side", "--field-manager=tests", "-f", "-"]
    if namespace:
        args += ["-n", namespace]
    cluster.kubectl(*args, input=yaml.safe_dump_all(objects))


def get_json(cluster, *args: str) -> dict[str, Any]:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


def eventually(check: Callable[[], Any], timeout: float = 60, interval: float = 0.5,
               what: str = "condition") -> Any:
    """Poll until ``check`` returns something truthy; fail with its last value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what} not met after {timeout}s; last: {last!r}")


def free_port_refusing() -> str:
    """``127.0.0.1:PORT`` where nothing listens: connections are refused at once."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def http_status(url: str, timeout: float = 3) -> int:
    """The HTTP status of a GET (an error's code too); 0 when nothing answers."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


def wait_ready(cluster, namespace: str, *names: str, timeout: int = 120) -> None:
    """Wait for ImageGenServices' Ready condition.

    120 s: a new Local pool's chain (the finalizer, the node, KWOK, the scheduler's retry,
    the pod's readiness, the status) takes 5-15 s alone, and several times that on a
    loaded 2-core machine. On failure the cluster's state goes into the report (conftest).
    """
    cluster.kubectl("wait", "-n", namespace, "--for=condition=Ready", f"--timeout={timeout}s",
                    *[f"igs/{name}" for name in names], timeout=timeout + 15)


def delete_services(cluster, operator, namespace: str, *names: str) -> None:
    """Delete ImageGenServices and wait for their finalizers (the operator's pool release).

    150 s, not kubectl's usual 60: in a full-suite run a finalizer has, rarely, taken longer.
    If it does not finish, the operator's log goes into the test's output to say why.
    """
    from localcluster import KubectlError

    try:
        cluster.kubectl("delete", "igs", *(names or ("--all",)), "-n", namespace, "--wait=true",
                        "--timeout=150s", timeout=180)
    except KubectlError:
        if operator is not None:  # None: an operator whose log the test cannot read
            print(operator.log()[-20000:])
        raise
