"""The PodDisruptionBudget: voluntary disruptions (drains, upgrades) take one pod at a time."""

from __future__ import annotations

from typing import Any

from imagegen_operator.api import ImageGenService
from imagegen_operator.render.common import object_meta, selector_labels


def render_pdb(resource: ImageGenService) -> dict[str, Any]:
    # maxUnavailable rather than minAvailable: with one replica a drain can still
    # proceed (and GPU node upgrades are not blocked forever), with more it is
    # one pod at a time.
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": object_meta(resource),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector_labels(resource)},
            # Pods that never became ready (still loading or compiling) may be
            # evicted regardless: they serve nothing yet.
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }
