"""The container engine the images were built with (hack/images.sh picks it the same way)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest


def engine() -> list[str]:
    """``docker`` when a daemon answers, else ``podman`` with hack/images.sh's settings.

    Without either the test is skipped, as `make test` announces when it builds no
    images, unless ``IMAGEGEN_REQUIRE_IMAGES=1`` (CI) makes that a failure; with one, the
    image must have been built (`make images`).
    """
    chosen = os.environ.get("CONTAINER_ENGINE")
    if chosen is None and shutil.which("docker"):
        ok = subprocess.run(["docker", "info"], capture_output=True).returncode == 0
        chosen = "docker" if ok else None
    if chosen is None and not shutil.which("podman"):
        why = "neither docker nor podman is installed: the images cannot be built here"
        if os.environ.get("IMAGEGEN_REQUIRE_IMAGES") == "1":
            pytest.fail(why)
        pytest.skip(why)
    chosen = chosen or "podman"
    if chosen == "podman":
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        conf = cache / "imagegen-operator" / "podman" / "containers.conf"
        if conf.exists():
            os.environ.setdefault("CONTAINERS_CONF", str(conf))
    return [chosen]


def built(image: str) -> list[str]:
    """The engine's command line, once `image` is known to exist in its storage."""
    run = engine()
    if subprocess.run([*run, "image", "inspect", image], capture_output=True).returncode != 0:
        pytest.fail(f"{image} is not built: run `make images` first")
    return run


def run_args(pod_spec: dict, name: str, claims: dict[str, str] | None = None) -> list[str]:
    """`run` options that give a container what a Kubernetes pod spec gives its first one.

    Read from the pod spec itself (the chart's or the operator's rendering), not restated:
    user and group, read-only root, dropped capabilities, no new privileges, emptyDir
    volumes as tmpfs, PersistentVolumeClaims as the host directories in ``claims``, and
    the environment's plain values.
    """
    container = pod_spec["containers"][0]
    pod_sc, sc = pod_spec.get("securityContext") or {}, container.get("securityContext") or {}
    args = ["--name", name, "--network", "host", "--user",
            f"{pod_sc['runAsUser']}:{pod_sc.get('runAsGroup', pod_sc['runAsUser'])}"]
    if sc.get("readOnlyRootFilesystem"):
        args.append("--read-only")
    for cap in (sc.get("capabilities") or {}).get("drop") or []:
        args.append(f"--cap-drop={cap}")
    if sc.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    volumes = {v["name"]: v for v in pod_spec.get("volumes") or []}
    for mount in container.get("volumeMounts") or []:
        volume = volumes[mount["name"]]
        if "emptyDir" in volume:
            limit = (volume["emptyDir"] or {}).get("sizeLimit", "1Gi")
            size = limit.replace("Gi", "g").replace("Mi", "m")
            # World-writable with the sticky bit: what fsGroup makes of an emptyDir for the pod.
            args += ["--tmpfs", f"{mount['mountPath']}:rw,size={size},mode=1777"]
        elif "persistentVolumeClaim" in volume:
            host = (claims or {})[volume["persistentVolumeClaim"]["claimName"]]
            ro = ":ro" if mount.get("readOnly") else ""
            args += ["--volume", f"{host}:{mount['mountPath']}{ro}"]
        else:
            raise AssertionError(f"no local stand-in for volume {volume}")
    for env in container.get("env") or []:
        if "value" in env:
            args += ["--env", f"{env['name']}={env['value']}"]
    return args
