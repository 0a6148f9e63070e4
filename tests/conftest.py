"""Shared test setup: make the repo's helpers importable without installing them."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT / "hack", ROOT / "tests", ROOT / "operator", ROOT / "inference_image"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


def pytest_configure(config):
    """A SIGTERM (a cancelled or timed-out CI job) ends the run as Ctrl-C does: fixtures'
    teardown runs, so the control plane and the operators the tests started (each in a
    session of its own, out of the signal's reach) are stopped, not left running."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, interrupt)
