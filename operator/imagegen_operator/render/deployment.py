"""The serving Deployment: one pod per slot, on the GPUs the plan describes.

Scheduling follows GKE's rules (gke.py): each pod asks for exactly one
``nvidia.com/gpu`` and selects its nodes with GKE's own labels, the MIG
partition label when partitioned and both sharing labels when shared. The GPU
taint's toleration is rendered although GKE adds it itself, so the same pods
schedule on KWOK nodes and on pools GKE did not label for us.

Security: the pod runs under the Pod Security "restricted" profile (non-root,
no privilege escalation, all capabilities dropped, RuntimeDefault seccomp, a
read-only root filesystem with writable emptyDirs where the server writes).
The one exception is MPS: its clients talk to the node's MPS control daemon
over host IPC, so MPS pods set ``hostIPC: true``, which the "baseline" and
"restricted" profiles forbid; a namespace that enforces either rejects MPS
pods, and the namespace must allow the "privileged" level for them.

Models and LoRA adapters: ``pvc://claim/path`` mounts the claim read-only under
the server's ``pvc_root``; ``gs://bucket/path`` mounts the bucket with GKE's Cloud
Storage FUSE CSI driver under ``gcs_root`` (the pod's service account,
``spec.server.serviceAccountName``, needs read access to the bucket through Workload
Identity); each claim or bucket once, however
many of them live there; ``hf://`` downloads into an emptyDir cache; ``file://``
reads from the image.
"""

from __future__ import annotations

import math
from typing import Any

from imagegen_operator import gke
from imagegen_operator.api import POOL_PROVIDERS, ImageGenService
from imagegen_operator.planner import Plan, hub_download_gib
from imagegen_operator.render import server_env as env
from imagegen_operator.render.common import (
    DEFAULT_PORT,
    HTTP_PORT_NAME,
    SERVER_CONTAINER,
    common_labels,
    object_meta,
    selector_labels,
    server_port,
)
from imagegen_operator.render.nodepool import POOL_LABEL, SIMULATED_TAINT, kwok_node_count
from imagegen_server.config import SHUTDOWN_FLUSH_S

# The image used when spec.server.image is unset and the caller names none
# (the operator's configuration and `render --server-image` may).
DEFAULT_SERVER_IMAGE = "ghcr.io/imagegen-operator/imagegen-server:0.1.0"
# The operator's setting of that image (the chart's operator.serverImage).
SERVER_IMAGE_ENV = "IMAGEGEN_OPERATOR_SERVER_IMAGE"

# The server image's non-root user (inference_image/Dockerfile; numeric, so runAsNonRoot can verify it).
RUN_AS_USER = 10001
PRIVILEGED_PORTS_END = 1024  # Linux's default net.ipv4.ip_unprivileged_port_start

# Startup budget: model download and load, plus compile warm-up when enabled.
# max-autotune tries kernel variants and can take tens of minutes on a cold
# cache; a persistent compile cache makes restarts fast again.
STARTUP_PERIOD_S = 10
STARTUP_BUDGET_S = {"load": 15 * 60, "compile": 30 * 60, "max-autotune": 60 * 60}

# The preStop pause, the server's drain and its last answers, and a margin: the kubelet
# kills the container only once all of that is over.
SHUTDOWN_MARGIN_S = 20
TERMINATION_GRACE_S = (
    env.PRESTOP_PAUSE_S + env.DRAIN_TIMEOUT_S + SHUTDOWN_FLUSH_S + SHUTDOWN_MARGIN_S
)

GCSFUSE_DRIVER = "gcsfuse.csi.storage.gke.io"



def nodeselector(plan: Plan, provider: str = "Existing", pool_named: bool = False
                 ) -> dict[str, str]:
    """GKE's node labels for this GPU config (the labels :mod:`imagegen_operator.gke` lists).

    With a pool the operator makes (GKE, ConfigConnector, Local) the pods also select that
    pool by name, so they never land on another pool with the same GPUs (another service's,
    or an on-demand one when this one is Spot). An Existing pool's name is not known unless
    the spec names it (``pool_named``; node auto-provisioning names its own), so otherwise
    the GPU labels alone select. Spot pods select
    Spot nodes with either, and Flex-start pods Flex-start nodes.
    """
    labels = {gke.LABEL_ACCELERATOR: plan.gpu_type}
    if provider in POOL_PROVIDERS or pool_named:
        labels[gke.LABEL_NODEPOOL] = plan.nodepool_name
    if plan.spot:
        labels[gke.LABEL_SPOT] = "true"
    if plan.flex_start:
        labels[gke.LABEL_FLEX_START] = "true"
    if plan.partition_size:
        labels[gke.LABEL_PARTITION_SIZE] = plan.partition_size
    if plan.sharing_strategy:
        labels[gke.LABEL_SHARING_STRATEGY] = gke.SHARING_LABEL_VALUES[plan.sharing_strategy]
        labels[gke.LABEL_MAX_SHARED_CLIENTS] = str(plan.clients_per_gpu)
    return labels


def absent_labels(plan: Plan, existing: bool = False) -> list[str]:
    """The node labels of sharing the spec did not ask for: a node with one is not the
    pods' (``node_affinity``). And for an Existing service that names no pool
    (``existing``, see ``shuns_operator_pools``), the label of the pools the operator makes."""
    absent = []
    if not plan.partition_size:
        absent.append(gke.LABEL_PARTITION_SIZE)
    if not plan.sharing_strategy:
        absent += [gke.LABEL_SHARING_STRATEGY, gke.LABEL_MAX_SHARED_CLIENTS]
    if existing:
        absent.append(POOL_LABEL)
    return absent


def shuns_operator_pools(provider: str, pool_named: bool) -> bool:
    """Whether the pods keep off the pools the operator makes: an Existing service's that
    names no pool do. Those pools go when their own services do (and one the service has
    just moved off goes once it runs elsewhere), so counting their nodes as its own would
    leave it with none."""
    return provider == "Existing" and not pool_named


def node_affinity(plan: Plan, existing: bool = False) -> dict[str, Any] | None:
    """Keep pods off nodes shared in a way the spec did not ask for, and in the zones of
    ``spec.nodePool.locations`` when it names some.

    A node selector only says what a node must have: without this, a pod that
    wants a whole GPU could land on a time-shared or MIG node of the same
    accelerator and take one of its slots (and the other way round).
    """
    expressions: list[dict[str, Any]] = [
        {"key": key, "operator": "DoesNotExist"} for key in absent_labels(plan, existing)]
    if plan.locations:
        expressions.append({"key": gke.LABEL_ZONE, "operator": "In",
                            "values": list(plan.locations)})
    if not expressions:
        return None
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": expressions}]
            }
        }
    }


def gpu_toleration() -> dict[str, str]:
    return {"key": gke.GPU_TAINT_KEY, "operator": "Exists", "effect": gke.GPU_TAINT_EFFECT}


def tolerations(provider: str, plan: Plan) -> list[dict[str, str]]:
    """The GPU taint everywhere; the simulated nodes' taint for Local services only. Spot
    and Flex-start pods also tolerate the taint of their kind of node, which pools made by
    node auto-provisioning may carry: harmless elsewhere, as the pods select such nodes."""
    out = [gpu_toleration()]
    for wanted, key in ((plan.spot, gke.LABEL_SPOT), (plan.flex_start, gke.LABEL_FLEX_START)):
        if wanted:
            out.append({"key": key, "operator": "Equal", "value": "true",
                        "effect": "NoSchedule"})
    if provider == "Local":
        out.append({"key": SIMULATED_TAINT["key"], "operator": "Exists",
                    "effect": SIMULATED_TAINT["effect"]})
    return out


def mps_pinned_memory_limit(mib: int) -> str:
    """CUDA_MPS_PINNED_DEVICE_MEM_LIMIT for device 0, in NVIDIA's ``0=<n>G`` / ``0=<n>M`` form.

    The pod sees its one GPU (or slice) as device 0.
    """
    if mib % 1024 == 0:
        return f"0={mib // 1024}G"
    return f"0={mib}M"


def mps_env(plan: Plan) -> list[dict[str, str]]:
    """Per-client MPS limits: an equal share of the SMs and of the slot's memory."""
    if plan.sharing_strategy != "MPS":
        return []
    return [
        {"name": "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "value": str(plan.mps_thread_percentage)},
        {
            "name": "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT",
            "value": mps_pinned_memory_limit(plan.mps_pinned_memory_mib or 0),
        },
    ]


# How long GKE may take to bring a GPU node for a new pod (scale-up, Spot or Flex-start
# capacity, driver install), on top of a pod's own start.
NODE_PROVISIONING_S = 20 * 60


def progress_deadline_s(resource: ImageGenService) -> int:
    """The Deployment's progressDeadlineSeconds: a new node and a whole start, compile
    included. Kubernetes' default (600 s) would mark a compiling rollout failed
    (ProgressDeadlineExceeded) long before its pods may be ready."""
    return NODE_PROVISIONING_S + startup_failure_threshold(resource) * STARTUP_PERIOD_S


def startup_budget_s(resource: ImageGenService) -> int:
    """How long a start may take: the model's download and load, then, with compile, the
    warm-up that compiles every admitted shape (the precompile Job's budget too)."""
    compile_ = resource.spec.pipeline.compile
    budget = STARTUP_BUDGET_S["load"]
    if compile_.enabled:
        budget += STARTUP_BUDGET_S["max-autotune" if "max-autotune" in compile_.mode
                                   else "compile"]
    return budget


def startup_failure_threshold(resource: ImageGenService) -> int:
    return math.ceil(startup_budget_s(resource) / STARTUP_PERIOD_S)


def probes(resource: ImageGenService) -> dict[str, Any]:
    def get(path: str) -> dict[str, Any]:
        return {"path": path, "port": HTTP_PORT_NAME}

    return {
        # Loading and compiling get their budget, and no more: the server answers /healthz
        # while it loads (in a thread), so only /readyz tells a load that hangs (a stalled
        # download) from one that is slow. Past the budget the kubelet restarts it.
        "startupProbe": {
            "httpGet": get("/readyz"),
            "periodSeconds": STARTUP_PERIOD_S,
            "timeoutSeconds": 5,
            "failureThreshold": startup_failure_threshold(resource),
        },
        "livenessProbe": {
            "httpGet": get("/healthz"),
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 6,
        },
        # Ready only when the model is loaded and warmed up (and a signing certificate, where
        # one is set, is within its validity).
        "readinessProbe": {
            "httpGet": get("/readyz"),
            "periodSeconds": 5,
            "timeoutSeconds": 3,
            "failureThreshold": 2,
        },
    }


def _source(uri: str) -> tuple[str, str] | None:
    """("pvc", claim) or ("gs", bucket) for a URI the pod must mount; None for hf:// and file://."""
    for scheme in ("pvc", "gs"):
        if uri.startswith(f"{scheme}://"):
            return scheme, uri[len(scheme) + 3 :].split("/", 1)[0]
    return None


def _source_volume(source: tuple[str, str], name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The volume and mount that make a claim or bucket visible where the server looks."""
    scheme, place = source
    if scheme == "pvc":
        return (
            {"name": name, "persistentVolumeClaim": {"claimName": place, "readOnly": True}},
            {"name": name, "mountPath": f"{env.MODEL_PVC_ROOT}/{place}", "readOnly": True},
        )
    return (
        {
            "name": name,
            "csi": {
                "driver": GCSFUSE_DRIVER,
                "readOnly": True,
                "volumeAttributes": {"bucketName": place, "mountOptions": "implicit-dirs"},
            },
        },
        {"name": name, "mountPath": f"{env.MODEL_GCS_ROOT}/{place}", "readOnly": True},
    )


def source_volumes(resource: ImageGenService) -> dict[tuple[str, str], str]:
    """Each claim or bucket the model and its LoRA adapters live on -> its volume's name:
    ``model`` for the model's, ``lora-N`` for others; one volume per claim or bucket."""
    model = resource.spec.model
    named: dict[tuple[str, str], str] = {}
    if (source := _source(model.uri)) is not None:
        named[source] = "model"
    for lora in model.loras or []:
        source = _source(lora.uri)
        if source is not None and source not in named:
            named[source] = f"lora-{sum(n.startswith('lora-') for n in named.values())}"
    return named


def volumes_and_mounts(
    resource: ImageGenService, host_ipc: bool = False
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    spec = resource.spec
    # The root filesystem is read-only: everything the server writes gets a volume.
    volumes: list[dict[str, Any]] = [
        {"name": "tmp", "emptyDir": {}},
        {"name": "cache", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "cache", "mountPath": "/var/cache/imagegen"},
    ]
    if not host_ipc:
        # PyTorch's data loaders and NCCL use /dev/shm; the default 64Mi is too small. Not
        # with host IPC (MPS): the clients and the node's MPS daemon share the host's
        # /dev/shm, which a volume there would hide.
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    for source, name in source_volumes(resource).items():
        volume, mount = _source_volume(source, name)
        volumes.append(volume)
        mounts.append(mount)
    cache = spec.pipeline.compile.cache
    if spec.pipeline.compile.enabled and cache is not None:
        volumes.append(
            {"name": "compile-cache", "persistentVolumeClaim": {"claimName": cache.pvc_name}}
        )
        mount = {"name": "compile-cache", "mountPath": env.COMPILE_CACHE_DIR}
        if spec.pipeline.compile.precompile_job:
            # Loaded code (inductor's pickles, AOT libraries) is only ever written by the
            # precompile Job: a serving pod cannot plant any for later starts to run.
            mount["readOnly"] = True
        mounts.append(mount)
    signing = spec.server.provenance.signing_secret_ref
    secrets = [
        # The precompile Job loads the model too, and keeps the hub token.
        ("hf-token", spec.model.token_secret_ref, env.HF_TOKEN_DIR),
        ("auth-token", spec.server.auth_secret_ref, env.AUTH_TOKEN_DIR),
        ("c2pa-signing", signing, env.C2PA_DIR),
    ]
    for name, ref, path in secrets:
        if ref is None:
            continue
        keys = ([(k, k) for k in ("tls.crt", "tls.key")] if name == "c2pa-signing"
                else [(ref.key, "token")])
        # Files the server's user reads (fsGroup), never environment variables.
        volumes.append({"name": name, "secret": {
            "secretName": ref.name,
            "items": [{"key": key, "path": file} for key, file in keys],
            "defaultMode": 0o440,
        }})
        mounts.append({"name": name, "mountPath": path, "readOnly": True})
    return volumes, mounts


def container_resources(resource: ImageGenService) -> dict[str, Any]:
    """The user's CPU/memory, plus exactly one GPU (or slice) as request and limit, and the
    local disk an hf:// download takes (unless the user gives a figure of their own): the
    scheduler then places no more of them on a node than its disk holds, where they would
    otherwise fill it and be evicted together. No limit: a larger model than the estimate
    is not evicted for it."""
    res = resource.spec.server.resources
    requests = dict(res.requests or {}) if res else {}
    limits = dict(res.limits or {}) if res else {}
    # A limit given alone is the request too (Kubernetes'): one of ours above it is refused.
    if "ephemeral-storage" not in requests and "ephemeral-storage" not in limits and (
            download := hub_download_gib(resource.spec.model)):
        requests["ephemeral-storage"] = f"{download}Gi"
    # A pod on shared GPUs must ask for exactly 1; GKE rejects more for time-sharing and MIG.
    requests[gke.GPU_RESOURCE] = 1
    limits[gke.GPU_RESOURCE] = 1
    return {"requests": dict(sorted(requests.items())), "limits": dict(sorted(limits.items()))}


def serving_replicas(spec: Any) -> int:
    """``spec.replicas``, raised to the autoscaler's minimum: the HorizontalPodAutoscaler
    never goes below it, and a service that leaves the count to it (as a GitOps repository
    should) need not wait for its first sync. 0 stays 0: an HPA leaves a workload scaled
    to zero alone."""
    if spec.autoscaling is not None and spec.replicas > 0:
        return max(spec.replicas, spec.autoscaling.min_replicas)
    return spec.replicas


def pod_security_context(port: int = DEFAULT_PORT) -> dict[str, Any]:
    context: dict[str, Any] = {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "fsGroup": RUN_AS_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    if port < PRIVILEGED_PORTS_END:
        # A non-root server with no capabilities binds a port below 1024 only where the
        # pod's network namespace says so: a safe sysctl, which every Pod Security level
        # allows, rather than NET_BIND_SERVICE.
        context["sysctls"] = [{"name": "net.ipv4.ip_unprivileged_port_start",
                               "value": str(port)}]
    return context


def container_security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def topology_spread(resource: ImageGenService) -> list[dict[str, Any]]:
    """Spread replicas over nodes and zones, softly.

    Shared GPUs exist to pack several pods per node, so a hard per-node skew
    limit would fight the packing (and the autoscaler); ScheduleAnyway only
    breaks ties towards spreading.
    """
    return [
        {
            "maxSkew": 1,
            "topologyKey": key,
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": selector_labels(resource)},
        }
        for key in ("kubernetes.io/hostname", "topology.kubernetes.io/zone")
    ]


def render_deployment(
    resource: ImageGenService,
    plan: Plan,
    default_image: str = DEFAULT_SERVER_IMAGE,
    held: bool = False,
    moving: bool = False,
    neighbours: float = 0,
    holds: int | None = None,
) -> dict[str, Any]:
    """``default_image`` is used when spec.server.image is unset (the operator's setting);
    ``held``: 0 replicas for now, while the precompile Job runs (precompile.py); ``moving``:
    the service is moving to a new node pool; ``neighbours``, ``holds``: see
    ``rolling_update`` (``holds`` None: what this service's own pool holds, by its plan)."""
    spec = resource.spec
    volumes, mounts = volumes_and_mounts(resource, host_ipc=plan.sharing_strategy == "MPS")
    container: dict[str, Any] = {
        "name": SERVER_CONTAINER,
        "image": spec.server.image or default_image,
        "ports": [{"name": HTTP_PORT_NAME, "containerPort": server_port(resource)}],
        "env": env.server_env(resource) + mps_env(plan),
        "resources": container_resources(resource),
        **probes(resource),
        # The kubelet's own sleep (no shell in the image needed); SIGTERM follows it.
        "lifecycle": {"preStop": {"sleep": {"seconds": env.PRESTOP_PAUSE_S}}},
        "securityContext": container_security_context(),
        "volumeMounts": mounts,
    }
    pod_spec: dict[str, Any] = {
        "nodeSelector": nodeselector(plan, spec.node_pool.provider,
                                     spec.node_pool.name is not None),
        "tolerations": tolerations(spec.node_pool.provider, plan),
        "topologySpreadConstraints": topology_spread(resource),
        "securityContext": pod_security_context(server_port(resource)),
        "terminationGracePeriodSeconds": TERMINATION_GRACE_S,
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
        **({"serviceAccountName": spec.server.service_account_name}
           if spec.server.service_account_name else {}),
        **({"imagePullSecrets": [{"name": s.name} for s in spec.server.image_pull_secrets]}
           if spec.server.image_pull_secrets else {}),
        "containers": [container],
        "volumes": volumes,
    }
    affinity = node_affinity(plan, shuns_operator_pools(spec.node_pool.provider,
                                                         spec.node_pool.name is not None))
    if affinity:
        pod_spec["affinity"] = affinity
    if plan.sharing_strategy == "MPS":
        # MPS clients reach the node's MPS control daemon through host IPC (see module docstring).
        pod_spec["hostIPC"] = True
    template_meta: dict[str, Any] = {"labels": common_labels(resource)}
    if any(scheme == "gs" for scheme, _ in source_volumes(resource)):
        # Asks GKE to inject the Cloud Storage FUSE sidecar that serves the csi volume.
        template_meta["annotations"] = {"gke-gcsfuse/volumes": "true"}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": object_meta(resource),
        "spec": {
            "replicas": 0 if held else serving_replicas(spec),
            "progressDeadlineSeconds": progress_deadline_s(resource),
            "selector": {"matchLabels": selector_labels(resource)},
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": rolling_update(
                             spec, plan, moving, neighbours,
                             holds if holds is not None else _pool_holds(resource, plan))},
            "template": {"metadata": template_meta, "spec": pod_spec},
        },
    }


def rolling_update(spec: Any, plan: Plan, moving: bool = False, neighbours: float = 0,
                   holds: int | None = None) -> dict[str, int]:
    """Surge one pod where the pool has a slot left for it (the autoscaler adds a node if
    needed) rather than take serving capacity away during a rollout. ``neighbours``: the
    pods other services run on a shared pool, counted in pods of this service (theirs may
    fill a node otherwise); ``holds``: the pods of this service the pool holds at most (at
    the largest maxNodes of its services; a Local pool, at the nodes it has made), None
    where that is not known. Where the replicas (spec.replicas, which the
    autoscaler writes, at least its minimum) and the neighbours fill that, a surge pod
    would wait Pending for a slot that never comes and hold the rollout for ever: replace
    pods instead, one more at a time than this service's own already Pending (which the
    controller takes away first, freeing no slot). Which pods of a shared pool wait is not
    known here: there, one at a time, so a rollout never takes more than one running pod
    away for a neighbour's Pending one to take its slot. A move to a new pool always surges:
    the old pods hold no slot of the new pool. An Existing pool's room is not known: surge,
    and replace one pod at a time as well, so a pool with no slot left neither holds the
    rollout nor takes more than one pod away."""
    replicas = serving_replicas(spec)
    if spec.node_pool.provider == "Existing" and replicas > 1 and not moving:
        return {"maxSurge": 1, "maxUnavailable": 1}
    if moving or holds is None or replicas + neighbours < holds:
        return {"maxSurge": 1, "maxUnavailable": 0}
    pending = 0 if neighbours else max(0, replicas - holds)
    return {"maxSurge": 0, "maxUnavailable": max(1, min(replicas, pending + 1))}


def _pool_holds(resource: ImageGenService, plan: Plan) -> int | None:
    """The pods of this service its own pool holds at most: at maxNodes, or for a Local pool
    (which adds no node for a Pending pod) at the nodes it makes."""
    if resource.spec.node_pool.provider == "Local":
        return kwok_node_count(resource, plan) * plan.pods_per_node
    return plan.replicas_at_max_nodes
