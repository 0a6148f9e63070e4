"""A local test double of GKE's metadata server (the parts the operator reads).

It follows the documented contract of the Compute Engine metadata API that GKE's
metadata server keeps: ``GET /computeMetadata/v1/<path>`` with the header
``Metadata-Flavor: Google`` (refused with 403 without it), plain-text values,
404 for an unknown key. Only 127.0.0.1; never Google's.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class MetadataServerTestDouble:
    def __init__(self, project: str, location: str, cluster: str):
        self.values = {
            "project/project-id": project,
            "instance/attributes/cluster-location": location,
            "instance/attributes/cluster-name": cluster,
        }
        self.requests: list[str] = []
        # Answers 503 to this many requests first: GKE's metadata server "needs a few seconds
        # to start accepting requests on a new Pod" (GKE's Workload Identity docs).
        self.unavailable_for = 0
        self._server: ThreadingHTTPServer | None = None

    @property
    def host(self) -> str:
        assert self._server
        return f"127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> MetadataServerTestDouble:
        double = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                double.requests.append(self.path)
                path = self.path.removeprefix("/computeMetadata/v1/")
                if len(double.requests) <= double.unavailable_for:
                    self._answer(503, "Service Unavailable")
                elif self.headers.get("Metadata-Flavor") != "Google":
                    self._answer(403, "Missing required header: Metadata-Flavor")
                elif path in double.values:
                    self._answer(200, double.values[path])
                else:
                    self._answer(404, "Not Found")

            def _answer(self, code: int, text: str) -> None:
                data = text.encode()
                self.send_response(code)
                self.send_header("Metadata-Flavor", "Google")
                self.send_header("Content-Type", "application/text")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
