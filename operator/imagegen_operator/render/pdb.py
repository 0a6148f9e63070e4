"""The PodDisruptionBudget: voluntary disruptions (drains, upgrades, the cluster autoscaler
emptying a node) take at most one node's worth of pods at a time."""

from __future__ import annotations

from typing import Any

from imagegen_operator.api import ImageGenService
from imagegen_operator.planner import Plan
from imagegen_operator.render.common import object_meta, selector_labels


def render_pdb(resource: ImageGenService, plan: Plan) -> dict[str, Any]:
    # maxUnavailable rather than minAvailable: with one replica a drain can still proceed
    # (and GPU node upgrades are not blocked forever). One node's worth, not one pod: the
    # cluster autoscaler removes a node only if the budget lets every pod on it go at once,
    # so with one pod a shared GPU node (MIG slices, time-sharing, MPS) holding two of them
    # would never be emptied, and would stay billed however idle. But never every replica
    # of a fixed count: two nodes drained at once (a surge upgrade) would take them all.
    # An autoscaled service keeps one node's worth: its count moves under the budget.
    allowed = max(1, plan.pods_per_node)
    if resource.spec.autoscaling is None:
        allowed = max(1, min(allowed, resource.spec.replicas - 1))
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": object_meta(resource),
        "spec": {
            "maxUnavailable": allowed,
            "selector": {"matchLabels": selector_labels(resource)},
            # Pods that never became ready (still loading or compiling) may be
            # evicted regardless: they serve nothing yet.
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }
