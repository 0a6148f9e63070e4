"""The pod's securityContext and the image agree on the non-root user."""

import re
from pathlib import Path

from imagegen_operator.render.deployment import RUN_AS_USER

ROOT = Path(__file__).resolve().parents[2]


def test_server_pods_run_as_the_server_images_user():
    dockerfile = (ROOT / "inference_image" / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\d+):(\d+)\s*$", dockerfile, flags=re.M)
    assert users, "the server image must name a numeric USER uid:gid"
    assert users[-1] == (str(RUN_AS_USER), str(RUN_AS_USER))
