"""The GKE cluster the operator runs in: the default of ``spec.nodePool.cluster``.

A service that asks for a GKE (or Config Connector) pool without naming a
cluster means the operator's own, found in this order:

1. ``IMAGEGEN_GKE_CLUSTER`` (the chart's ``gke.cluster`` value),
   ``projects/P/locations/L/clusters/C``;
2. on GKE, the metadata server: ``project/project-id`` and the instance
   attributes ``cluster-name`` and ``cluster-location`` that GKE sets on every
   node (https://cloud.google.com/kubernetes-engine/docs/concepts/workload-identity#instance_metadata).
   ``GCE_METADATA_HOST`` points elsewhere, as it does for google-auth.

Nothing found means no default: such a service reports ``NodePoolReady=False``,
reason ``ClusterUnknown``, with what to set; so does one that names a cluster while the
metadata server's name resolves but it does not answer, or answers with a server error
(``pending``: on GKE, not known yet, or blocked by a NetworkPolicy), and it waits. Only a
name that does not resolve, or a server that says the instance has no cluster (a 4xx), is
"off GKE": an operator on GKE that cannot reach its metadata server does not take a spec's
cluster at its word.

Where the operator knows its cluster, a service that names another is refused
(``ForeignCluster``): the Deployment the operator makes runs in the operator's cluster,
whose scheduler can place its pods on that cluster's nodes only, so a pool elsewhere would
serve nothing and still be paid for; and a namespace's editors could otherwise make pools
in any cluster the operator's Google account reaches. An operator that knows no cluster
of its own (off GKE, no ``gke.cluster``) takes the spec's at its word.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping

from imagegen_operator.api import CLUSTER_PATTERN

log = logging.getLogger(__name__)

CLUSTER_ENV = "IMAGEGEN_GKE_CLUSTER"
METADATA_HOST_ENV = "GCE_METADATA_HOST"
METADATA_HOST = "metadata.google.internal"
# Off GKE the metadata host does not resolve or answer: give up fast, and ask
# again only now and then (a node pool is not created every second): after 5 s, then
# twice as long each time up to 5 minutes. On GKE the metadata server "needs a few
# seconds to start accepting requests on a new Pod" (GKE's Workload Identity docs): at the
# first lookup, a server that answers with an error is asked a few times, a second apart.
METADATA_TIMEOUT_S = 1.0
FIRST_LOOKUP_TRIES = 3
FIRST_RETRY_S = 5.0
RETRY_AFTER_S = 300.0
HOW_TO_SET = (
    "spec.nodePool.cluster is unset and the operator knows no default cluster: set "
    "spec.nodePool.cluster (projects/P/locations/L/clusters/C), or install the operator "
    "with --set gke.cluster=projects/P/locations/L/clusters/C, or run it on GKE, whose "
    "metadata server names the cluster"
)



def foreign_cluster(named: str, own: str) -> str:
    """The refusal of a service whose spec names ``named`` where the operator runs in
    ``own`` (see the module docstring)."""
    return (
        f"spec.nodePool.cluster names {named}, but the operator runs in {own}: the serving "
        f"pods can only be scheduled on its nodes, so a pool in another cluster would serve "
        f"nothing. Name {own}, or leave the field out"
    )


class ClusterDefault:
    """Callable: the default cluster, or None when none is known (see the module docstring)."""

    def __init__(
        self,
        environ: Mapping[str, str] = os.environ,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self._configured = environ.get(CLUSTER_ENV) or None
        self._metadata_host = environ.get(METADATA_HOST_ENV) or METADATA_HOST
        self._clock, self._sleep = clock, sleep
        self._lock = threading.Lock()
        self._found: str | None = None
        # A metadata server named but failing (silent, or answering with server errors): on
        # GKE, the cluster not known yet (a service naming one waits), rather than off GKE
        # (the spec's is taken as it is).
        self.pending = False
        self._next_try = 0.0
        self._failures = 0
        if self._configured and not re.fullmatch(CLUSTER_PATTERN, self._configured):
            raise ValueError(
                f"{CLUSTER_ENV}={self._configured!r} is not projects/P/locations/L/clusters/C"
            )

    def __call__(self) -> str | None:
        if self._configured:
            return self._configured
        with self._lock:
            if self._found or self._clock() < self._next_try:
                return self._found
            tries = FIRST_LOOKUP_TRIES if self._failures == 0 else 1
            for attempt in range(tries):
                if attempt:
                    self._sleep(1.0)
                self._found, starting = self._from_metadata()
                if self._found is not None or not starting:
                    break
            self.pending = self._found is None and starting
            if self._found is not None:
                return self._found
            self._next_try = self._clock() + min(  # the exponent capped: no overflow
                RETRY_AFTER_S, FIRST_RETRY_S * 2 ** min(self._failures, 16))
            self._failures += 1
            return None

    def _from_metadata(self) -> tuple[str | None, bool]:
        """The cluster, or None; and whether the server is named but failing (one still
        starting, worth asking again in a second), rather than not there at all (off GKE:
        one try, so that nothing waits on the lock for long)."""
        try:
            project = self._read("project/project-id")
            location = self._read("instance/attributes/cluster-location")
            name = self._read("instance/attributes/cluster-name")
        except urllib.error.HTTPError as exc:
            log.info("no default GKE cluster yet: metadata server %s: %s", self._metadata_host,
                     exc)
            return None, exc.code >= 500
        except (OSError, urllib.error.URLError) as exc:
            if isinstance(getattr(exc, "reason", exc), socket.gaierror):
                # The name does not resolve: not on GKE (whose DNS names the server).
                log.info("no default GKE cluster: metadata server %s: %s",
                         self._metadata_host, exc)
                return None, False
            # Named but silent (refused, timed out): on GKE, a server not started yet, or
            # one a NetworkPolicy keeps out. Not known, rather than taken for "off GKE".
            log.warning("no default GKE cluster yet: metadata server %s does not answer: %s",
                        self._metadata_host, exc)
            return None, True
        cluster = f"projects/{project}/locations/{location}/clusters/{name}"
        if not re.fullmatch(CLUSTER_PATTERN, cluster):
            log.warning("metadata server named an invalid cluster %r; no default", cluster)
            return None, False
        log.info("default GKE cluster from the metadata server: %s", cluster)
        return cluster, False

    def _read(self, path: str) -> str:
        request = urllib.request.Request(
            f"http://{self._metadata_host}/computeMetadata/v1/{path}",
            headers={"Metadata-Flavor": "Google"},
        )
        with urllib.request.urlopen(request, timeout=METADATA_TIMEOUT_S) as response:  # noqa: S310
            return response.read().decode().strip()
