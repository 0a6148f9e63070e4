"""Pure renderers: (ImageGenService, Plan) -> the Kubernetes objects the operator applies.

Nothing here talks to a cluster. :func:`render_all` returns every object in
apply order; it refuses (``UnworkableSpec``) when the plan has a blocking
finding, because a Deployment that cannot run must not be created.
"""

from __future__ import annotations

from typing import Any

from imagegen_operator.api import ImageGenService
from imagegen_operator.planner import Finding, Plan, plan
from imagegen_operator.render.autoscaling import render_hpa
from imagegen_operator.render.common import common_labels, selector_labels, selector_string
from imagegen_operator.render.deployment import (
    DEFAULT_SERVER_IMAGE,
    SERVER_IMAGE_ENV,
    render_deployment,
)
from imagegen_operator.render.monitoring import render_monitor, requested_monitors
from imagegen_operator.render.network_policy import render_network_policy
from imagegen_operator.render.nodepool import (
    create_node_pool_request,
    render_config_connector_nodepool,
    render_gke_nodepool,
    render_kwok_nodes,
)
from imagegen_operator.render.pdb import render_pdb
from imagegen_operator.render.precompile import job_state, render_precompile_job
from imagegen_operator.render.service import endpoint, render_service

__all__ = [
    "DEFAULT_SERVER_IMAGE",
    "SERVER_IMAGE_ENV",
    "UnworkableSpec",
    "common_labels",
    "create_node_pool_request",
    "endpoint",
    "job_state",
    "render_all",
    "render_config_connector_nodepool",
    "render_deployment",
    "render_gke_nodepool",
    "render_hpa",
    "render_kwok_nodes",
    "render_monitor",
    "render_network_policy",
    "render_pdb",
    "render_precompile_job",
    "render_service",
    "render_workload",
    "selector_labels",
    "selector_string",
]


class UnworkableSpec(ValueError):
    """The spec cannot give a running Deployment; ``findings`` say why and which fields."""

    def __init__(self, name: str, findings: tuple[Finding, ...]):
        self.name = name
        self.findings = findings
        super().__init__(f"{name}: " + "; ".join(f"{f.reason}: {f.message}" for f in findings))


def _check(resource: ImageGenService, the_plan: Plan) -> None:
    if the_plan.blocking:
        raise UnworkableSpec(resource.metadata.name, the_plan.blocking)


def render_workload(
    resource: ImageGenService,
    the_plan: Plan | None = None,
    default_image: str = DEFAULT_SERVER_IMAGE,
    held: bool = False,
    moving: bool = False,
    neighbours: float = 0,
    holds: int | None = None,
) -> list[dict[str, Any]]:
    """The precompile Job (when asked for), NetworkPolicy (with allowFrom), Deployment,
    Service, PDB, HPA (with autoscaling) and monitors (when requested). ``held``: the
    Deployment at 0 replicas while the Job runs;
    ``moving``: the service is moving to a new node pool (its rollout may always surge);
    ``neighbours``, ``holds``: the pods other services run on the same pool, and the pods of
    this service the pool holds (deployment.rolling_update)."""
    the_plan = the_plan or plan(resource.spec)
    _check(resource, the_plan)
    job = render_precompile_job(resource, the_plan, default_image)
    objects = [] if job is None else [job]
    # The fence before what it fences: a refused policy keeps a new Deployment from
    # serving unfenced (reconcile applies in this order).
    policy = render_network_policy(resource)
    if policy is not None:
        objects.append(policy)
    objects += [
        render_deployment(resource, the_plan, default_image, held=held, moving=moving,
                          neighbours=neighbours, holds=holds),
        render_service(resource),
        render_pdb(resource, the_plan),
    ]
    hpa = render_hpa(resource)
    if hpa is not None:
        objects.append(hpa)
    return objects + requested_monitors(resource)


def render_all(
    resource: ImageGenService, the_plan: Plan | None = None, default_image: str = DEFAULT_SERVER_IMAGE
) -> list[dict[str, Any]]:
    """Every object for one ImageGenService: node pool first, then the workload."""
    from imagegen_operator.providers import render_pool  # providers render their own pools

    the_plan = the_plan or plan(resource.spec)
    _check(resource, the_plan)
    return render_pool(resource, the_plan) + render_workload(resource, the_plan, default_image)
