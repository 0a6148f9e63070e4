"""``imagegen-operator``: run the operator, or render and plan offline.

- ``render -f FILE``: every object the operator would create for the
  ImageGenService(s) in FILE, as one YAML stream (byte-identical for the same
  input and the same operator settings, ``--cluster``, ``--node-service-account`` and
  ``--server-image``, whose defaults are the operator's variables; so it can be committed
  and diffed).
  Refuses, with exit status 1 and nothing on stdout, when a spec cannot give a
  running Deployment.
- ``plan -f FILE [-o table|json]``: the capacity math and cost estimate; the whole report,
  with exit status 1 when a spec cannot run (as ``render`` would refuse it).
- ``run``: the operator itself (a kopf process), from ``imagegen_operator.handlers``.
- ``in-use``: the ImageGenServices in the cluster; exit status 1, naming them, while there
  are any. The chart runs it before ``helm uninstall``: an operator removed before its
  services leaves them Terminating and their node pools running (and billed).

``render`` and ``plan`` need no cluster and no credentials.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TextIO

import yaml

from imagegen_operator import api, gke
from imagegen_operator.cluster_default import CLUSTER_ENV, foreign_cluster
from imagegen_operator.planner import Plan, plan
from imagegen_operator.render import (
    DEFAULT_SERVER_IMAGE,
    SERVER_IMAGE_ENV,
    UnworkableSpec,
    render_all,
)
from imagegen_operator.render.nodepool import NODE_SERVICE_ACCOUNT_ENV, node_service_account
from imagegen_operator.render.server_env import settings_problem

# The node-pool objects a provider renders (GKE's request, Config Connector's, KWOK's nodes).
POOL_KINDS = ("NodePool", "ContainerNodePool", "Node")
EXIT_OK = 0
EXIT_REFUSED = 1  # a spec is invalid or cannot run
EXIT_USAGE = 2  # argparse's own status for bad arguments


class InputError(Exception):
    """A file that cannot be read as ImageGenService objects."""


def load_resources(paths: Sequence[str], stdin: TextIO) -> list[api.ImageGenService]:
    """Every ImageGenService in the files (``-`` is stdin), in a ``kind: List`` too (what
    ``kubectl get -o yaml`` prints); other kinds are skipped."""
    resources = []
    for path in paths:
        try:
            text = stdin.read() if path == "-" else open(path, encoding="utf-8").read()  # noqa: SIM115
            documents = [d for d in yaml.safe_load_all(text) if d]
        except (OSError, yaml.YAMLError) as err:
            raise InputError(f"{path}: {err}") from None
        listed = []
        for doc in documents:
            if isinstance(doc, dict) and doc.get("kind") == "List":
                items = doc.get("items") or []
                if not isinstance(items, list):
                    raise InputError(f"{path}: a List's items must be a list of objects")
                listed += items
            else:
                listed.append(doc)
        for doc in listed:
            if not isinstance(doc, dict) or doc.get("kind") != api.KIND:
                continue
            try:
                resources.append(api.parse(doc))
            except api.InvalidSpec as err:
                metadata = doc.get("metadata")
                name = metadata.get("name", "?") if isinstance(metadata, dict) else "?"
                raise InputError(f"{path}: {api.KIND} {name}: " + "; ".join(err.problems)) from None
    if not resources:
        raise InputError(f"no {api.KIND} objects in {', '.join(paths)}")
    return resources


def file_warnings(resource: api.ImageGenService) -> list[str]:
    """What only a file can show: the operator sees live objects, whose defaults the API
    server and the autoscaler have filled in (a live object, one with a uid, is let be)."""
    if (resource.spec.autoscaling is not None and "replicas" in resource.spec.model_fields_set
            and not resource.metadata.uid):
        return [
            f"warning: {api.KIND} {_qualified(resource)}: ReplicasBesideAutoscaling "
            "[spec.replicas]: the autoscaler sets spec.replicas, and a GitOps tool that "
            "applies this file sets it back at every sync; leave spec.replicas out\n"
        ]
    return []


def dump_stream(objects: Iterable[dict[str, Any]]) -> str:
    """A YAML stream with sorted keys: the same objects always give the same bytes."""
    return "".join(
        "---\n" + yaml.safe_dump(obj, sort_keys=True, default_flow_style=False, width=1000)
        for obj in objects
    )


def _qualified(resource: api.ImageGenService) -> str:
    return f"{resource.metadata.namespace or 'default'}/{resource.metadata.name}"


def cmd_render(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    # The pool renderers read the operator's node account from its variable, as the
    # operator does: the option (whose default is that variable) stands in it meanwhile.
    with _environment(NODE_SERVICE_ACCOUNT_ENV, args.node_service_account):
        return _render(args, out, err)


def _set_environment(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


@contextlib.contextmanager
def _environment(name: str, value: str | None) -> Iterator[None]:
    """``name`` set to ``value`` (unset for None) meanwhile, as it was after."""
    before = os.environ.get(name)
    _set_environment(name, value)
    try:
        yield
    finally:
        _set_environment(name, before)


def _render(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    objects: list[dict[str, Any]] = []
    refused = []
    for resource in load_resources(args.filename, sys.stdin):
        the_plan = plan(resource.spec)
        pool = resource.spec.node_pool
        if (pool.provider in api.CLOUD_PROVIDERS and pool.cluster and args.cluster
                and pool.cluster != args.cluster):
            # As the operator refuses it (ForeignCluster) where it runs in --cluster.
            err.write(f"error: {api.KIND} {_qualified(resource)}: "
                      f"{foreign_cluster(pool.cluster, args.cluster)}\n")
            return EXIT_REFUSED
        if pool.provider in api.CLOUD_PROVIDERS and not pool.cluster:
            if not args.cluster:
                err.write(
                    f"error: {api.KIND} {_qualified(resource)}: spec.nodePool.cluster is unset "
                    "(the operator would use its own cluster): pass --cluster "
                    "projects/my-project/locations/us-central1/clusters/my-cluster\n"
                )
                return EXIT_REFUSED
            if outside := gke.zones_outside(args.cluster, pool.locations or []):
                # What the CRD checks against a cluster the spec names, as the operator
                # checks it against its own (LocationsOutsideCluster).
                err.write(
                    f"error: {api.KIND} {_qualified(resource)}: spec.nodePool.locations names "
                    f"{', '.join(outside)}, outside the region of --cluster {args.cluster}\n"
                )
                return EXIT_REFUSED
            pool = pool.model_copy(update={"cluster": args.cluster})
            spec = resource.spec.model_copy(update={"node_pool": pool})
            resource = resource.model_copy(update={"spec": spec})
        if (problem_text := settings_problem(resource)) is not None:
            err.write(f"error: {api.KIND} {_qualified(resource)}: {problem_text}\n")
            return EXIT_REFUSED
        try:
            objects += render_all(resource, the_plan, args.server_image)
        except UnworkableSpec as problem:
            refused.append((resource, problem))
            continue
        # Warnings go to stderr: stdout stays the exact, committable stream.
        for finding in the_plan.warnings:
            err.write(
                f"warning: {api.KIND} {_qualified(resource)}: {finding.reason} "
                f"[{', '.join(finding.fields)}]: {finding.message}\n"
            )
        err.writelines(file_warnings(resource))
    if refused:
        # Nothing on stdout: a partial stream applied by GitOps would be worse than none.
        for resource, problem in refused:
            err.write(f"error: {api.KIND} {_qualified(resource)} cannot run:\n")
            for finding in problem.findings:
                err.write(f"  {finding.reason} [{', '.join(finding.fields)}]: {finding.message}\n")
        return EXIT_REFUSED
    objects, problems = _one_of_each(objects)
    for problem in problems:
        err.write(problem + "\n")
    if any(p.startswith("error:") for p in problems):
        return EXIT_REFUSED
    out.write(dump_stream(objects))
    return EXIT_OK


def _identity(obj: dict[str, Any]) -> tuple[str, str, str, str]:
    meta = obj.get("metadata") or {}
    return obj["apiVersion"], obj["kind"], meta.get("namespace") or "", meta.get("name") or ""


def _one_of_each(objects: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Each object once, as an apply of the stream needs it. Services that share a node
    pool render its object each: it is kept once (a note says so when they size it
    differently: the operator sizes it for all its users). Anything else twice (two services
    of one name) is an error."""
    kept: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    problems = []
    for obj in objects:
        key = _identity(obj)
        first = kept.setdefault(key, obj)
        if first is obj or first == obj:
            continue
        where = f"{key[1]} {key[2] + '/' if key[2] else ''}{key[3]}"
        if key[1] in POOL_KINDS:
            problems.append(f"note: {where} is shared by services that size it differently: "
                            "printed once, as the first asks; the operator sizes it for all")
        else:
            problems.append(f"error: {where} is rendered twice, differently: two "
                            f"{api.KIND}s of one name and namespace?")
    return list(kept.values()), problems


def _money(value: float) -> str:
    return f"${value:,.2f}"


def plan_table(resource: api.ImageGenService, p: Plan) -> str:
    """A readable summary of one plan."""
    rows: list[tuple[str, str]] = [
        (
            "accelerator",
            f"{p.accelerator} ({p.gpu_type}), {p.count_per_node} per node, "
            f"machine {p.machine_type or 'none'}",
        ),
        (
            "sharing",
            f"{p.sharing}: {p.partitions_per_gpu} partition(s) x {p.clients_per_gpu} "
            f"client(s) = {p.slots_per_gpu} slot(s) per GPU, {p.slots_per_node} per node"
            + (f" (a node holds {p.pods_per_node} serving pods)"
               if p.pods_per_node < p.slots_per_node else ""),
        ),
        (
            "replicas",
            (f"{p.floor_replicas} to {p.target_replicas} (autoscaling)"
             if resource.spec.autoscaling is not None else f"{p.replicas}")
            + f": {p.gpus_needed} GPU(s) on {p.nodes_needed} node(s)",
        ),
        (
            "node pool",
            f"{p.nodepool_name}"
            + (
                f", maxNodes {p.max_nodes} holds {p.replicas_at_max_nodes} replica(s)"
                if p.replicas_at_max_nodes is not None
                else ""
            )
            + (", Spot" if p.spot else "")
            + (", Flex-start" if p.flex_start else "")
            + (f", in {', '.join(p.locations)}" if p.locations else "")
            + (f", made for {p.max_pods_per_node} pods a node"
               if resource.spec.node_pool.provider in api.POOL_PROVIDERS else ""),
        ),
        (
            "memory",
            f"model {p.footprint_gib:g} GiB ({p.footprint_source}) vs "
            f"{math.floor(p.slot_memory_gib * 100) / 100:g} GiB "
            f"per slot (GPU {p.gpu_memory_gib:g} GiB, as CUDA reports it)",
        ),
    ]
    if p.sharing_strategy == "MPS":
        rows.append(
            (
                "mps limits",
                f"{p.mps_thread_percentage}% of SMs, {p.mps_pinned_memory_mib} MiB pinned per client",
            )
        )
    sold_on_demand = p.machine_type not in gke.SPOT_OR_FLEX_START_ONLY
    on_demand = (  # no price for what Compute Engine does not sell
        f"{_money(p.cost.on_demand)} on-demand" if sold_on_demand else "no on-demand")
    floor = " (the autoscaler's floor)" if p.floor_replicas != p.target_replicas else ""
    cost = f"{on_demand}, {_money(p.cost.spot)} Spot for {p.cost.nodes} node(s){floor}"
    if p.flex_start:
        # Flex-start has prices of its own (the Dynamic Workload Scheduler's, below
        # on-demand) that the table does not hold: the on-demand list price bounds them.
        cost = (f"at most {_money(p.cost.on_demand)} Flex-start (the nominal on-demand rate) "
                f"for {p.cost.nodes} node(s){floor}")
    if p.cost_at_max_nodes is not None:
        at_max = p.cost_at_max_nodes
        if p.flex_start:
            cost += f"; at maxNodes at most {_money(at_max.on_demand)} Flex-start"
        elif p.spot:
            cost += f"; at maxNodes {_money(at_max.spot)} Spot"
        else:
            cost += (f"; at maxNodes {_money(at_max.on_demand)} on-demand" if sold_on_demand
                     else "; at maxNodes no on-demand")
    rows.append(("cost/hour", cost))
    rows.append(("", f"estimate: {gke.PRICE_REGION} list prices as of {gke.PRICE_TABLE_DATE}"))
    if p.flex_start:
        rows.append(("", "Flex-start nodes are billed at Dynamic Workload Scheduler prices, "
                         f"below on-demand, and run at most {gke.FLEX_START_MAX_RUN_DAYS} days"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{api.KIND} {_qualified(resource)}"]
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    if p.findings:
        lines.append("  findings:")
        for f in p.findings:
            lines.append(f"    {f.severity}: {f.reason} [{', '.join(f.fields)}]: {f.message}")
    return "\n".join(lines) + "\n"


def cmd_plan(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    resources = load_resources(args.filename, sys.stdin)
    plans = [(r, plan(r.spec)) for r in resources]
    for resource in resources:
        err.writelines(file_warnings(resource))
    if args.output == "json":
        doc = [
            {"name": r.metadata.name, "namespace": r.metadata.namespace or "default",
             "plan": p.to_dict()}
            for r, p in plans
        ]
        out.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    else:
        out.write("\n".join(plan_table(r, p) for r, p in plans))
    # The whole report either way; a spec that cannot run exits as render does, so a CI
    # step can gate on it.
    return EXIT_REFUSED if any(p.blocking for _, p in plans) else EXIT_OK


def cmd_run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """The operator process. Imported lazily: kopf and the Kubernetes client are only
    needed here, so render and plan stay light and offline."""
    try:
        from imagegen_operator import handlers
    except ImportError as problem:
        err.write(f"error: the operator is not available: {problem}\n")
        return EXIT_USAGE
    return handlers.run(args.operator_args) or EXIT_OK


def cmd_in_use(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Refuse (exit 1) while any ImageGenService exists, naming them; 0 when none does or
    the cluster does not serve the kind at all. Needs list on imagegenservices. Only those
    of the namespaces an operator of some serves (IMAGEGEN_OPERATOR_NAMESPACES): no other
    is its to leave Terminating."""
    from imagegen_operator.kube import Kube, MissingKind

    served = [n for n in os.environ.get("IMAGEGEN_OPERATOR_NAMESPACES", "").split(",") if n]
    try:
        kube = Kube()
        services = [s for ns in served or [None] for s in kube.list(api.API_VERSION, api.KIND, ns)]
    except MissingKind:
        out.write("no ImageGenService: the cluster does not serve the kind\n")
        return EXIT_OK
    if not services:
        out.write("no ImageGenService in the cluster\n")
        return EXIT_OK
    names = sorted(f"{s['metadata'].get('namespace')}/{s['metadata']['name']}"
                   for s in services)
    shown = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
    err.write(
        f"{len(names)} ImageGenService(s) still exist: {shown}. Delete them first and wait "
        "until they are gone (the operator deletes their node pools): `kubectl delete igs "
        "--all -A --wait`. Uninstalling the operator before them would leave them "
        "Terminating and their node pools running.\n"
    )
    return EXIT_REFUSED


def _cluster(text: str) -> str:
    if not re.fullmatch(api.CLUSTER_PATTERN, text):
        raise argparse.ArgumentTypeError(f"{text!r}: {api.CLUSTER_MESSAGE}")
    return text


def _service_account(text: str) -> str:
    try:
        return node_service_account({NODE_SERVICE_ACCOUNT_ENV: text}) or ""
    except ValueError as problem:
        raise argparse.ArgumentTypeError(str(problem)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imagegen-operator",
        description="Diffusion-model serving on shared GKE GPUs.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the operator (a kopf process)", add_help=False)
    run.add_argument(
        "operator_args", nargs=argparse.REMAINDER, help="arguments for the operator process"
    )
    run.set_defaults(func=cmd_run)

    render = commands.add_parser(
        "render", help="print every object the operator would create, as YAML (offline)"
    )
    render.add_argument(
        "-f", "--filename", action="append", required=True, help="ImageGenService YAML ('-': stdin)"
    )
    render.add_argument(
        "--server-image",
        default=os.environ.get(SERVER_IMAGE_ENV) or DEFAULT_SERVER_IMAGE,
        help="server image for services that set no spec.server.image, as the operator's "
        f"operator.serverImage (default: ${SERVER_IMAGE_ENV}, else %(default)s)",
    )
    render.add_argument(
        "--cluster",
        default=os.environ.get(CLUSTER_ENV),
        type=_cluster,
        help="GKE cluster for services that name none, as the operator's own "
        f"(default: ${CLUSTER_ENV})",
    )
    render.add_argument(
        "--node-service-account",
        default=os.environ.get(NODE_SERVICE_ACCOUNT_ENV) or None,
        type=_service_account,
        help="Google service account the nodes of GKE and ConfigConnector pools run as, as "
        f"the operator's gke.nodeServiceAccount (default: ${NODE_SERVICE_ACCOUNT_ENV}; "
        "none: GKE's default)",
    )
    render.set_defaults(func=cmd_render)

    plan_ = commands.add_parser("plan", help="show the capacity math and cost (offline)")
    plan_.add_argument(
        "-f", "--filename", action="append", required=True, help="ImageGenService YAML ('-': stdin)"
    )
    plan_.add_argument("-o", "--output", choices=("table", "json"), default="table")
    plan_.set_defaults(func=cmd_plan)

    in_use = commands.add_parser(
        "in-use", help="fail while any ImageGenService exists (the chart's uninstall check)")
    in_use.set_defaults(func=cmd_in_use)
    return parser


def main(
    argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    parser = build_parser()
    # The operator's own options (kopf's) pass through `run` untouched.
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command != "run":
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "run":
        args.operator_args = unknown + args.operator_args
    try:
        return args.func(args, out, err)
    except InputError as problem:
        err.write(f"error: {problem}\n")
        return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
