"""The container engine the images were built with (hack/images.sh picks it the same way)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


def engine() -> list[str]:
    """``docker`` when a daemon answers, else ``podman`` with hack/images.sh's settings."""
    chosen = os.environ.get("CONTAINER_ENGINE")
    if chosen is None and shutil.which("docker"):
        ok = subprocess.run(["docker", "info"], capture_output=True).returncode == 0
        chosen = "docker" if ok else None
    chosen = chosen or "podman"
    if chosen == "podman":
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        conf = cache / "imagegen-operator" / "podman" / "containers.conf"
        if conf.exists():
            os.environ.setdefault("CONTAINERS_CONF", str(conf))
    return [chosen]
