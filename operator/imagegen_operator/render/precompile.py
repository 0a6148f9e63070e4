"""The precompile Job: compile once, before the Deployment's replicas start.

With ``spec.pipeline.compile.precompileJob`` the operator runs ``imagegen-server precompile``
in a Job with the serving pod's image, environment, GPU, node placement and cache volume. It
compiles every shape the service admits, saves the compiled artifacts on the cache volume
(keyed by model, torch version, device and shapes) and exits. Until the Job has succeeded the
Deployment is held at 0 replicas, so every replica that starts loads the artifacts instead of
compiling.

The Job's name carries a hash of what is compiled (the image, hence torch; the model; the
settings that shape the denoiser and its inputs; the GPU; the ServiceAccount, when named): a
change there names a new Job, and
the operator deletes the one before. The Deployment is held only while nothing serves yet: a
service already serving rolls out at once while the new Job runs (its new replicas compile for
themselves), so an edit never takes it down. A Job that succeeded is remembered in status
(``precompiledJob``) and not run again. A failed or suspended Job does not hold the service
back either: the replicas then compile for themselves, and ``Precompiled`` says why.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from imagegen_operator.api import ImageGenService
from imagegen_operator.planner import Plan
from imagegen_operator.render.common import (
    MANAGED_BY,
    PART_OF,
    name_of,
    object_meta,
)
from imagegen_operator.render.deployment import (
    DEFAULT_SERVER_IMAGE,
    NODE_PROVISIONING_S,
    render_deployment,
    startup_budget_s,
)

PRECOMPILE_APP = "imagegen-precompile"
# What a Job's pod drops from the serving container: it serves nothing and is never probed.
_SERVING_ONLY = ("ports", "lifecycle", "startupProbe", "readinessProbe", "livenessProbe")
# Nor does it answer requests or sign images: the serving secrets stay out of its pod (and a
# missing one cannot hold it in ContainerCreating while the service waits on it).
_SERVING_SECRETS = ("auth-token", "c2pa-signing")
_SERVING_SECRET_ENV = tuple(f"IMAGEGEN_{name}" for name in (
    "AUTH_TOKEN_FILE", "C2PA_CERT_FILE", "C2PA_KEY_FILE", "C2PA_ALGORITHM",
    "C2PA_TIMESTAMP_URL"))
_READ_ONLY_ENV = "IMAGEGEN_COMPILE_CACHE_READ_ONLY"
_HASH_CHARS = 10
# The server settings compiled code depends on (the server's artifacts key is finer: it also
# holds the torch version and the GPU model, which the image and the node selector decide).
# MAX_PIXELS shapes no compiled code, but it decides whether the server starts at all (a
# default size above it is refused): a Job that failed on it must run again once it is fixed.
COMPILE_KEY_ENV = tuple(f"IMAGEGEN_{name}" for name in (
    "MODEL", "FAMILY", "DTYPE", "QUANTIZATION", "CACHE", "COMPILE", "ATTENTION", "CHANNELS_LAST",
    "ALLOWED_SIZES", "DEFAULT_WIDTH", "DEFAULT_HEIGHT", "MAX_BATCH_SIZE",
    "MAX_IMAGES_PER_REQUEST", "MAX_PIXELS", "LORAS", "DEVICE",
))
# A LoRA's default scale is a number each request's denoise reads, not part of the compiled
# code: a new scale needs no new Job.
_LORA_KEY = ("name", "uri")
_MAX_NAME = 63  # the Job controller puts the name in a label of each pod


def precompile_labels(resource: ImageGenService) -> dict[str, str]:
    """Not the serving pods' selector labels: the Service and the PDB must not count these."""
    return {
        "app.kubernetes.io/name": PRECOMPILE_APP,
        "app.kubernetes.io/instance": name_of(resource),
        "app.kubernetes.io/component": "precompile",
        "app.kubernetes.io/part-of": PART_OF,
        "app.kubernetes.io/managed-by": MANAGED_BY,
    }


def _compile_key(resource: ImageGenService, pod: dict[str, Any]) -> str:
    """A hash of what the compiled artifacts depend on: the image (torch), the settings that
    shape the denoiser and its inputs, the GPU the pod lands on; and the service, so two
    services never share a Job. Not the serving knobs (batch window, queue, timeouts)."""
    container = pod["containers"][0]
    settings = {e["name"]: e.get("value") for e in container["env"]
                if e["name"].startswith(COMPILE_KEY_ENV)}
    if settings.get("IMAGEGEN_LORAS"):
        settings["IMAGEGEN_LORAS"] = [{k: lora[k] for k in _LORA_KEY}
                                      for lora in json.loads(settings["IMAGEGEN_LORAS"])]
    key = [name_of(resource), container["image"], settings, container.get("resources"),
           pod.get("nodeSelector"), pod.get("affinity")]
    if account := pod.get("serviceAccountName"):
        # The one a gs:// model's bucket is read as: a Job stuck without it (its pod cannot
        # mount the bucket) is replaced once it is named. Unnamed, the key is as before.
        key.append(account)
    # So are a hub token (a Job refused a gated model, or stuck on a Secret misnamed) and
    # the image's pull Secrets. None named, the key is as before.
    token = next((v["secret"] for v in pod.get("volumes", []) if v["name"] == "hf-token"), None)
    if token is not None:
        key.append({"hf-token": token})
    if pulls := pod.get("imagePullSecrets"):
        key.append({"imagePullSecrets": pulls})
    # The volume the artifacts are left on: another claim is empty (and a Job stuck on a
    # misnamed one is replaced once the name is fixed).
    cache = next((v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", [])
                  if v["name"] == "compile-cache"), None)
    if cache is not None:
        key.append({"compile-cache": cache})
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:_HASH_CHARS]


def wants_precompile(resource: ImageGenService) -> bool:
    compile_ = resource.spec.pipeline.compile
    return compile_.enabled and compile_.precompile_job


def render_precompile_job(
    resource: ImageGenService, plan: Plan, default_image: str = DEFAULT_SERVER_IMAGE
) -> dict[str, Any] | None:
    """The Job, or None when the service does not ask for one."""
    if not wants_precompile(resource):
        return None
    serving = render_deployment(resource, plan, default_image)["spec"]["template"]
    pod = copy.deepcopy(serving["spec"])
    container = pod["containers"][0]
    for key in _SERVING_ONLY:
        container.pop(key, None)
    pod["volumes"] = [v for v in pod.get("volumes", []) if v["name"] not in _SERVING_SECRETS]
    container["volumeMounts"] = [m for m in container.get("volumeMounts", [])
                                 if m["name"] not in _SERVING_SECRETS]
    container["env"] = [e for e in container.get("env", [])
                        if e["name"] not in (*_SERVING_SECRET_ENV, _READ_ONLY_ENV)]
    for mount in container.get("volumeMounts", []):
        if mount["name"] == "compile-cache":
            mount.pop("readOnly", None)  # what the Job is for: the serving pods only read it
    for key in ("volumes",):
        if not pod[key]:
            del pod[key]
    if not container["volumeMounts"]:
        del container["volumeMounts"]
    container["args"] = ["precompile"]
    pod.pop("topologySpreadConstraints", None)  # they spread the serving pods
    pod["restartPolicy"] = "Never"
    digest = _compile_key(resource, pod)
    prefix = name_of(resource)[: _MAX_NAME - len("-precompile-") - _HASH_CHARS].rstrip("-")
    # Fresh dicts each: one object in two places would print as a YAML alias.
    template_meta = {**serving["metadata"], "labels": precompile_labels(resource)}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            **object_meta(resource, name=f"{prefix}-precompile-{digest}"),
            "labels": precompile_labels(resource),
        },
        "spec": {
            # One retry for a lost node or a preempted Spot VM; a model that fails to compile
            # fails again, and the replicas then compile for themselves.
            "backoffLimit": 1,
            # A pod taken by a disruption (a Spot VM reclaimed, a node drained or upgraded,
            # preempted) did not fail: it is run again without spending that retry.
            "podFailurePolicy": {"rules": [{
                "action": "Ignore",
                "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
            }]},
            # A node (the deadline counts from the Job's start, Pending included), then a
            # model download, a load and every admitted shape compiled.
            "activeDeadlineSeconds": NODE_PROVISIONING_S + startup_budget_s(resource),
            "template": {"metadata": template_meta, "spec": pod},
        },
    }


def job_state(job: dict[str, Any] | None) -> str | None:
    """Succeeded, Failed, Suspended or Running (still to finish), from the Job's conditions;
    None: no Job."""
    if job is None:
        return None
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("status") != "True":
            continue
        if condition.get("type") == "Complete":
            return "Succeeded"
        if condition.get("type") == "Failed":
            return "Failed"
        if condition.get("type") == "Suspended":
            # A queue (Kueue) or a policy holds it; its deadline does not run meanwhile.
            return "Suspended"
    return "Running"
