"""The pod's securityContext and the image agree on the non-root user; the image finds GKE's
GPU driver."""

import re
from pathlib import Path

from imagegen_operator.render.deployment import RUN_AS_USER

ROOT = Path(__file__).resolve().parents[2]


def test_server_pods_run_as_the_server_images_user():
    dockerfile = (ROOT / "inference_image" / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\d+):(\d+)\s*$", dockerfile, flags=re.M)
    assert users, "the server image must name a numeric USER uid:gid"
    assert users[-1] == (str(RUN_AS_USER), str(RUN_AS_USER))


def test_the_server_image_loads_the_driver_gke_mounts():
    """GKE's device plugin mounts the node's driver libraries at /usr/local/nvidia/lib64,
    which only a path the loader searches makes torch (and NVML) find."""
    dockerfile = (ROOT / "inference_image" / "Dockerfile").read_text()
    paths = re.findall(r"^\s*LD_LIBRARY_PATH=(\S+?)\s*\\?$", dockerfile, flags=re.M)
    assert paths and "/usr/local/nvidia/lib64" in paths[-1].split(":")
