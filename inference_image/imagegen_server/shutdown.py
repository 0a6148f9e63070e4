"""SIGTERM inside the pod's grace period: one drain deadline for the whole process.

uvicorn on its own stops listening at SIGTERM (new clients see a refused connection, not a
503), waits its own graceful timeout for open requests, and only then lets the app drain the
engine: two timeouts back to back, past the grace period. Here the signal first drains the
engine while the server still listens (new requests and /readyz answer 503, accepted ones
finish or are cancelled at the deadline), and only then is uvicorn told to exit. It then has
what is left of the drain deadline, plus ``SHUTDOWN_FLUSH_S``, to write the last answers: a job
done leaves its PNGs to encode (and sign, which may ask a timestamp server), seconds for large
images, and an early drain must not cut those short.
"""

from __future__ import annotations

import logging
import threading
import time

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
        started = time.monotonic()
        try:
            drained = self.runtime.drain(self.drain_timeout_s)
            log.info("shutdown: %s", "drained" if drained else "drain deadline passed")
        finally:
            # uvicorn reads its graceful timeout as it shuts down, and ends as soon as the
            # last answer is out: a longer one costs nothing when the answers are quick.
            left = max(0.0, self.drain_timeout_s - (time.monotonic() - started))
            self.config.timeout_graceful_shutdown = (
                (self.config.timeout_graceful_shutdown or 0) + left)
            self.should_exit = True
