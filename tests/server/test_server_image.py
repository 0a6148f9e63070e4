"""The server image, hardened as the operator's Deployment runs it, serving a tiny model.

The container gets what the rendered Deployment's pod spec gives it (its uid, the
read-only root, dropped capabilities, no new privileges, the emptyDir volumes, the
model's PersistentVolumeClaim, here a host directory, and the environment); it
loads the model, turns ready, answers the official OpenAI client and drains on
SIGTERM. On the CPU: the image's torch also drives a GPU where the node has one.

Needs the image: `make test` builds it first (podman or docker; skipped without
either), `make test-images` runs only the image tests.
"""

from __future__ import annotations

import base64
import io
import os
import subprocess
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from imagegen_operator import api
from imagegen_operator.planner import plan
from imagegen_operator.render.deployment import render_deployment
from imagegen_server.tiny import make_tiny_model
from localcluster import free_port
from support.containers import built, run_args
from support.kube import eventually, http_status

pytestmark = pytest.mark.images

IMAGE = os.environ.get("IMAGEGEN_SERVER_IMAGE", "localhost/imagegen-server:dev")


def served_pod_spec(port: int) -> dict:
    resource = api.parse({
        "apiVersion": api.API_VERSION, "kind": api.KIND,
        "metadata": {"name": "tiny", "namespace": "default", "uid": "u"},
        "spec": {"model": {"uri": "pvc://models/tiny-sd15", "family": "SD15", "dtype": "float32"},
                 "gpu": {"type": "nvidia-l4"}, "nodePool": {"provider": "Local"},
                 "pipeline": {"defaults": {"width": 64, "height": 64, "steps": 4},
                              "compile": {"enabled": False}},
                 "server": {"port": port}},
    })
    deployment = render_deployment(resource, plan(resource.spec), IMAGE)
    return deployment["spec"]["template"]["spec"]


@pytest.fixture
def server(tmp_path: Path):
    run = built(IMAGE)
    claim = tmp_path / "claim"
    make_tiny_model(claim / "tiny-sd15", "sd15", seed=0)
    for path in [claim, *claim.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    tmp_path.chmod(0o755)
    port = free_port()
    pod = served_pod_spec(port)
    probe = pod["containers"][0]["readinessProbe"]["httpGet"]
    name = f"imagegen-server-test-{os.getpid()}"
    subprocess.run([*run, "rm", "-f", name], capture_output=True)
    subprocess.run([*run, "run", "-d", *run_args(pod, name, {"models": str(claim)}),
                    "--env", "IMAGEGEN_DEVICE=cpu", IMAGE],
                   check=True, capture_output=True, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        eventually(lambda: http_status(base + probe["path"]) == 200, timeout=180, interval=1,
                   what="the readiness probe's endpoint")
        yield run, name, base
    finally:
        print(subprocess.run([*run, "logs", name], capture_output=True, text=True).stderr[-4000:])
        subprocess.run([*run, "rm", "-f", "-t", "2", name], capture_output=True)


def test_the_image_serves_the_openai_client_and_drains_on_sigterm(server):
    run, name, base = server
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
    result = client.images.generate(prompt="a lighthouse", n=2, size="64x64",
                                    response_format="b64_json", extra_body={"seed": 3})
    images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in result.data]
    assert [im.size for im in images] == [(64, 64), (64, 64)]
    user = subprocess.run([*run, "exec", name, "id", "-u"], capture_output=True, text=True)
    assert user.stdout.strip() == "10001"
    root = subprocess.run([*run, "exec", name, "touch", "/opt/venv/x"], capture_output=True)
    assert root.returncode != 0  # the root filesystem is read-only

    # A request in flight when SIGTERM comes is answered; then the server exits cleanly.
    answers: list[int] = []

    def slow_request() -> None:
        answer = client.images.generate(prompt="slow", size="64x64", response_format="b64_json",
                                        extra_body={"steps": 200, "seed": 1})  # the most allowed
        answers.append(len(answer.data))

    def in_flight() -> float:
        metrics = httpx.get(base + "/metrics", timeout=5).text.splitlines()
        return next(float(line.split()[1]) for line in metrics
                    if line.startswith("imagegen_requests_in_flight "))

    thread = threading.Thread(target=slow_request)
    thread.start()
    deadline = time.monotonic() + 30
    while in_flight() < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert in_flight() == 1  # accepted, and still running when the signal comes
    subprocess.run([*run, "kill", "--signal", "TERM", name], check=True, capture_output=True)
    thread.join(120)
    assert answers == [1]
    waited = subprocess.run([*run, "wait", name], capture_output=True, text=True, timeout=60)
    assert waited.stdout.strip() == "0", waited
    logs = subprocess.run([*run, "logs", name], capture_output=True, text=True)
    assert "shutdown failed" not in logs.stdout + logs.stderr
