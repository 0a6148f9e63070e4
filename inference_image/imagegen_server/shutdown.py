"""SIGTERM inside the pod's grace period: one drain deadline for the whole process.

uvicorn on its own stops listening at SIGTERM (new clients see a refused connection, not a
503), waits its own graceful timeout for open requests, and only then lets the app drain the
engine: two timeouts back to back, past the grace period. Here the signal first drains the
engine while the server still listens (new requests and /readyz answer 503, accepted ones
finish or are cancelled at the deadline), and only then is uvicorn told to exit, with
``SHUTDOWN_FLUSH_S`` to write the last answers.
"""

from __future__ import annotations

import logging
import threading

import uvicorn

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, runtime, drain_timeout_s: float):
        super().__init__(config)
        self.runtime = runtime
        self.drain_timeout_s = drain_timeout_s
        self._drain: threading.Thread | None = None

    def handle_exit(self, sig, frame) -> None:
        if self._drain is not None:
            # A second signal: stop now, as uvicorn would.
            return super().handle_exit(sig, frame)
        # Remembered so uvicorn re-raises it at the end and the exit status names the signal.
        self._captured_signals.append(sig)
        log.info("signal %s: draining for up to %.0fs", sig, self.drain_timeout_s)
        self._drain = threading.Thread(target=self._drain_then_exit, name="drain", daemon=True)
        self._drain.start()

    def _drain_then_exit(self) -> None:
        try:
            drained = self.runtime.drain(self.drain_timeout_s)
            log.info("shutdown: %s", "drained" if drained else "drain deadline passed")
        finally:
            self.should_exit = True
