"""The server over real sockets on 127.0.0.1: the official openai client, and SIGTERM drain."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image
from server_testlib import Gate, count_calls, free_port, mean_abs_diff

from imagegen_server.config import SHUTDOWN_FLUSH_S

REPO = Path(__file__).resolve().parents[2]


def test_official_openai_client_generates_and_decodes(live_server, reference_pipeline):
    base_url, runtime = live_server
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="client-token", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == ["sd15"]
    result = client.images.generate(
        model="sd15",
        prompt="a lighthouse at dusk",
        n=2,
        size="64x64",
        response_format="b64_json",
        extra_body={"seed": 11, "steps": 3, "guidance_scale": 5.0, "negative_prompt": "fog"},
    )
    images = [
        Image.open(io.BytesIO(base64.b64decode(d.b64_json))).convert("RGB") for d in result.data
    ]
    assert [im.size for im in images] == [(64, 64), (64, 64)]
    params = runtime.params(
        "a lighthouse at dusk",
        n=2,
        width=64,
        height=64,
        seed=11,
        steps=3,
        guidance_scale=5.0,
        negative_prompt="fog",
    )
    expected = reference_pipeline("sd15")(**runtime.steps.reference_kwargs(params)).images
    assert all(mean_abs_diff(a, b) < 1.0 for a, b in zip(images, expected, strict=True))


@pytest.mark.parametrize(
    ("kwargs", "error", "param"),
    [
        ({"n": 0}, openai.BadRequestError, "n"),
        ({"size": "1024x1792"}, openai.BadRequestError, "size"),
        ({"size": "auto", "background": "see-through"}, openai.BadRequestError, "background"),
        ({"response_format": "url"}, openai.BadRequestError, "response_format"),
        ({"extra_body": {"guidance_scale": "7"}}, openai.BadRequestError, "guidance_scale"),
        ({"extra_body": {"steps": 0}}, openai.BadRequestError, "steps"),
        ({"model": "dall-e-3"}, openai.NotFoundError, "model"),
        ({"extra_body": {"prompt": "x" * 2_000_000}}, openai.APIStatusError, None),
    ],
)
def test_openai_client_raises_the_class_for_each_error(live_server, kwargs, error, param):
    base_url, runtime = live_server
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="client-token", max_retries=0, timeout=120)
    kwargs = {"prompt": "x", "response_format": "b64_json", **kwargs}
    with pytest.raises(error) as info:
        client.images.generate(**kwargs)
    assert info.value.body["param"] == param
    assert info.value.body["message"]
    if error is openai.APIStatusError:
        assert info.value.status_code == 413
    assert runtime.engine.in_flight == 0


def test_openai_client_without_the_token_is_refused(live_server):
    base_url, _ = live_server
    wrong = openai.OpenAI(base_url=base_url + "/v1", api_key="wrong", max_retries=0, timeout=120)
    with pytest.raises(openai.AuthenticationError):
        wrong.images.generate(prompt="x", response_format="b64_json")


def test_a_client_that_goes_away_cancels_its_work(live_server):
    base_url, runtime = live_server
    engine = runtime.engine
    denoiser_calls = count_calls(runtime.steps.pipeline.unet)
    body = {"prompt": "long", "steps": 200, "size": "128x128"}
    headers = {"Authorization": "Bearer client-token"}
    # The second step waits until the client has gone, however fast this machine denoises.
    gate = Gate(runtime, at=2)
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(base_url + "/v1/images/generations", json=body, headers=headers,
                       timeout=1.0)
        assert gate.entered.wait(60)  # on the device when the client left
    finally:
        gate.close()
    deadline = time.monotonic() + 60
    while engine.in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.in_flight == 0
    assert 0 < denoiser_calls() < 200  # dropped between steps, not run to the end
    ok = httpx.post(base_url + "/v1/images/generations", json={"prompt": "next", "steps": 2},
                    headers=headers, timeout=60)
    assert ok.status_code == 200


def _in_flight(base_url: str) -> float:
    for line in httpx.get(base_url + "/metrics", timeout=5).text.splitlines():
        if line.startswith("imagegen_requests_in_flight "):
            return float(line.split()[1])
    return -1


@contextlib.contextmanager
def server_process(model, *flags: str, env: dict | None = None):
    """The real `imagegen-server` process on 127.0.0.1, ready; yields (base_url, process,
    the file its output goes to: a pipe nobody reads until the end could fill and stall it)."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(REPO / "inference_image"), "IMAGEGEN_TORCH_THREADS": "1",
           **(env or {})}
    command = [
        sys.executable, "-m", "imagegen_server", "--model", str(model),
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--device", "cpu",
        "--default-steps", "3", "--max-batch-size", "1", "--log-level", "info", *flags,
    ]  # fmt: skip
    log = Path(tempfile.mkdtemp(prefix="imagegen-server-")) / "output.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(base_url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, log.read_text()
            time.sleep(0.2)
        else:
            pytest.fail("server never became ready")
        yield base_url, process, log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        shutil.rmtree(log.parent, ignore_errors=True)


@pytest.mark.slow
def test_sigterm_finishes_accepted_requests_then_exits(tiny_models):
    # Room for the five 200-step requests: admission counts work (each is 67 default
    # requests). 200 steps, so all five are in before the first is done, however fast the CPU.
    with server_process(tiny_models["sd15"], "--queue-capacity", "400") as (
            base_url, process, log):
        results: dict[int, Any] = {}

        def call(i: int) -> None:
            body = {"prompt": f"drain {i}", "seed": i, "steps": 200}
            results[i] = httpx.post(base_url + "/v1/images/generations", json=body, timeout=120)

        def streamed() -> None:
            body = {"prompt": "drain streamed", "seed": 9, "steps": 200, "stream": True}
            with httpx.stream("POST", base_url + "/v1/images/generations", json=body,
                              timeout=120) as response:
                results[4] = response.read().decode()

        threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
        threads.append(threading.Thread(target=streamed))
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while _in_flight(base_url) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _in_flight(base_url) == 5  # all five accepted before the signal

        process.send_signal(signal.SIGTERM)
        # Still listening while it drains: the readiness probe takes the pod out of the
        # Service, and a new request is told to go elsewhere.
        deadline = time.monotonic() + 30
        while (httpx.get(base_url + "/readyz", timeout=5).status_code != 503
               and time.monotonic() < deadline):
            time.sleep(0.05)
        late = httpx.post(base_url + "/v1/images/generations", json={"prompt": "late"}, timeout=5)
        assert late.status_code == 503, late.text
        assert "shutting down" in late.json()["error"]["message"]
        assert int(late.headers["Retry-After"]) >= 1
        assert late.json()["error"]["type"] == "server_error"
        assert httpx.get(base_url + "/readyz", timeout=5).status_code == 503
        for t in threads:
            t.join(120)
        assert sorted(results) == [0, 1, 2, 3, 4]
        stream = results.pop(4)  # a stream ends with its image, not cut off at the exit
        assert "event: image_generation.completed" in stream and "event: error" not in stream
        assert [r.status_code for r in results.values()] == [200] * 4
        assert all(r.json()["data"][0]["b64_json"] for r in results.values())
        # uvicorn re-raises the signal after its graceful shutdown, so the status names SIGTERM.
        assert process.wait(timeout=60) in (0, -signal.SIGTERM)
        output = log.read_text()
        assert "shutdown: drained" in output
        assert "Traceback" not in output and "ERROR" not in output, output
        # The access log keeps the requests, and of the probes and scrapes (asked every
        # few seconds) only those answered with an error.
        assert '"POST /v1/images/generations HTTP/1.1" 200' in output, output
        assert '"GET /readyz HTTP/1.1" 503' in output, output
        assert '"GET /readyz HTTP/1.1" 200' not in output, output
        assert '"GET /metrics HTTP/1.1" 200' not in output, output


@pytest.mark.slow
def test_sigterm_cancels_what_cannot_finish_by_the_drain_deadline(tiny_models):
    drain_s = 4.0
    with server_process(
        tiny_models["sd15"], "--drain-timeout-s", str(drain_s),
        env={"IMAGEGEN_MAX_PIXELS": str(256 * 256)},
    ) as (base_url, process, log):
        result: dict = {}
        body = {"prompt": "too long to finish", "steps": 200, "size": "256x256"}
        worker = threading.Thread(target=lambda: result.setdefault("r", httpx.post(
            base_url + "/v1/images/generations", json=body, timeout=120)))
        worker.start()
        deadline = time.monotonic() + 30
        while _in_flight(base_url) < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        worker.join(120)
        exit_status = process.wait(timeout=120)
        took = time.monotonic() - signalled
        output = log.read_text()
    # The client is told, rather than cut off; the process is gone within the drain deadline
    # plus the flush time and the stages' stop: well inside a pod's grace period.
    response = result["r"]
    assert response.status_code == 503, response.text
    assert "shut down" in response.json()["error"]["message"]
    assert exit_status in (0, -signal.SIGTERM)
    assert took < drain_s + SHUTDOWN_FLUSH_S + 15, (took, output)
    assert "drain deadline: cancelled 1 request(s)" in output
    assert "Traceback" not in output, output


@pytest.mark.slow
def test_json_logs_are_one_object_a_line_with_the_severity_cloud_logging_reads(tiny_models):
    """GKE's agent takes a plain line on stderr for an error, whatever its level."""
    import json

    with server_process(tiny_models["sd15"], "--log-format", "json") as (base_url, process, log):
        response = httpx.post(base_url + "/v1/images/generations",
                              json={"prompt": "a json line", "seed": 1}, timeout=120)
        assert response.status_code == 200, response.text
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) in (0, -signal.SIGTERM)
        lines = [line for line in log.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line, uvicorn's too
    assert all({"severity", "message", "time", "logger"} <= set(r) for r in records)
    assert {r["severity"] for r in records} <= {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}
    access = [r["message"] for r in records if r["logger"] == "uvicorn.access"]
    assert any('"POST /v1/images/generations HTTP/1.1" 200' in m for m in access), access
    # Probes answered without an error stay out (a 503 while it loads is kept).
    assert not any('"GET /readyz HTTP/1.1" 200' in m for m in access), access
    assert any(r["logger"].startswith("imagegen_server") for r in records)
