"""DrainingServer: after SIGTERM's drain, the answers still being written get what is left of
the drain deadline, not only uvicorn's flush time.

Real uvicorn and the real DrainingServer, in a thread of this process; what they serve is a
stand-in: an ASGI app whose answer takes longer to write than the flush time (a done job's
large PNGs encoding), and an in-memory fake runtime whose engine has nothing left to drain.
"""

from __future__ import annotations

import asyncio
import signal
import threading

import httpx
import uvicorn
from server_testlib import free_port, wait_until

from imagegen_server.config import SHUTDOWN_FLUSH_S
from imagegen_server.shutdown import DrainingServer

WRITE_S = SHUTDOWN_FLUSH_S + 2.0


class DrainedRuntime:
    """In-memory fake: an engine whose accepted jobs are all done (the drain ends at once)."""

    def __init__(self) -> None:
        self.drains: list[float] = []

    def drain(self, timeout: float) -> bool:
        self.drains.append(timeout)
        return True


def test_an_answer_still_being_written_gets_what_is_left_of_the_drain_deadline():
    writing = threading.Event()

    async def slow_answer(scope, receive, send):
        assert scope["type"] == "http"
        writing.set()
        await asyncio.sleep(WRITE_S)  # the job is done; its answer takes this long to encode
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"images"})

    port = free_port()
    config = uvicorn.Config(slow_answer, host="127.0.0.1", port=port, lifespan="off",
                            log_level="warning", timeout_graceful_shutdown=SHUTDOWN_FLUSH_S)
    runtime = DrainedRuntime()
    server = DrainingServer(config, runtime, drain_timeout_s=60)
    serving = threading.Thread(target=server.run, daemon=True)
    serving.start()
    wait_until(lambda: server.started)
    answer: dict = {}
    client = threading.Thread(target=lambda: answer.setdefault(
        "r", httpx.get(f"http://127.0.0.1:{port}/", timeout=60)), daemon=True)
    client.start()
    assert writing.wait(30)
    server.handle_exit(signal.SIGTERM, None)  # as the signal would, from uvicorn's handler
    client.join(60)
    serving.join(60)
    assert runtime.drains == [60]
    # Not cut off at the flush time: the answer came, whole.
    assert answer["r"].status_code == 200 and answer["r"].text == "images"
    assert not serving.is_alive()
