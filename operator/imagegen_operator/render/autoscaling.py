"""The HorizontalPodAutoscaler (autoscaling/v2) on the servers' requests in flight.

It scales the ImageGenService through its scale subresource, not the
Deployment: the operator keeps writing ``spec.replicas`` into the Deployment,
so the two never fight over the replica count. The metric is a Pods metric
served by a custom-metrics adapter (for example prometheus-adapter) from the
server's gauge of admitted, unanswered requests (its queue plus the batch in
progress); the target is ``autoscaling.targetQueueDepth`` per pod on average.
"""

from __future__ import annotations

from typing import Any

from imagegen_operator.api import ImageGenService
from imagegen_operator.render.common import API_VERSION, KIND, name_of, object_meta

# The server's Prometheus gauge (imagegen_server.metrics) of requests admitted
# and not yet answered, per pod; a test checks the server still exports it.
QUEUE_DEPTH_METRIC = "imagegen_requests_in_flight"

# GPU pods are slow to start (model load, compile): scale up at once, down slowly.
SCALE_DOWN_STABILIZATION_S = 300


def render_hpa(resource: ImageGenService) -> dict[str, Any] | None:
    autoscaling = resource.spec.autoscaling
    if autoscaling is None:
        return None
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": object_meta(resource),
        "spec": {
            "scaleTargetRef": {"apiVersion": API_VERSION, "kind": KIND, "name": name_of(resource)},
            "minReplicas": autoscaling.min_replicas,
            "maxReplicas": autoscaling.max_replicas,
            "metrics": [
                {
                    "type": "Pods",
                    "pods": {
                        "metric": {"name": QUEUE_DEPTH_METRIC},
                        "target": {
                            "type": "AverageValue",
                            "averageValue": str(autoscaling.target_queue_depth),
                        },
                    },
                }
            ],
            "behavior": {
                "scaleUp": {
                    "stabilizationWindowSeconds": 0,
                    "policies": [{"type": "Pods", "value": 4, "periodSeconds": 60}],
                },
                "scaleDown": {
                    "stabilizationWindowSeconds": SCALE_DOWN_STABILIZATION_S,
                    "policies": [{"type": "Pods", "value": 1, "periodSeconds": 120}],
                },
            },
        },
    }
