"""A metadata server that says "not a GKE node", for operators the tests start.

Never Google's own (on a CI runner that is itself on GKE or GCE, it would name that
cluster), and not a port that refuses either: a named server that does not answer is, to
the operator, a GKE metadata server not ready yet (it fails closed). This one answers as a
Compute Engine VM's does: a project, and no cluster attributes (404). One for the session.
"""

from __future__ import annotations

import threading

from support.fake_metadata import MetadataServerTestDouble

_lock = threading.Lock()
_server: MetadataServerTestDouble | None = None


def not_gke_metadata() -> MetadataServerTestDouble:
    """A Compute Engine VM's metadata server (not started): a project, no cluster (404)."""
    double = MetadataServerTestDouble("ci-project", "unused", "unused")
    del double.values["instance/attributes/cluster-location"]
    del double.values["instance/attributes/cluster-name"]
    return double


def not_gke_metadata_host() -> str:
    """``127.0.0.1:PORT`` of the session's metadata server without a cluster."""
    global _server
    with _lock:
        if _server is None:
            _server = not_gke_metadata().__enter__()  # a daemon thread, gone with the session
        return _server.host
