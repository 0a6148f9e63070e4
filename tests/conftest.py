"""Shared test setup: make the repo's helpers importable without installing them."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT / "hack", ROOT / "tests", ROOT / "operator", ROOT / "inference_image"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

# Every connection the tests make is to this machine: never through a proxy the environment
# names (httpx, urllib, the Kubernetes clients and kubectl would send 127.0.0.1 there too).
for _name in ("NO_PROXY", "no_proxy"):
    os.environ[_name] = ",".join(
        filter(None, [os.environ.get(_name), "127.0.0.1", "localhost", "::1",
                      "127.0.0.2",  # the other loopback address some tests bind
                      "127.0.0.0/8"]))  # for Go's clients, which read ranges


def pytest_configure(config):
    """A SIGTERM (a cancelled or timed-out CI job) ends the run as Ctrl-C does: fixtures'
    teardown runs, so the control plane and the operators the tests started (each in a
    session of its own, out of the signal's reach) are stopped, not left running."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, interrupt)
