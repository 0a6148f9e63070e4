"""The HTTP contract: OpenAI images schema, errors naming the field, 429, auth, probes, metrics."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from server_testlib import Gate, mean_abs_diff, wait_until

from imagegen_server.api import ConfigError, create_app
from imagegen_server.config import ServerSettings

GENERATE = "/v1/images/generations"


def decode_png(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    return image.convert("RGB")


def test_generation_returns_pngs_equal_to_diffusers(client_for, reference_pipeline):
    client = client_for()
    body = {
        "prompt": "a red cat",
        "n": 2,
        "size": "64x64",
        "seed": 7,
        "steps": 3,
        "guidance_scale": 6.0,
    }
    response = client.post(GENERATE, json=body)
    assert response.status_code == 200, response.text
    payload = response.json()
    assert payload["seed"] == 7 and isinstance(payload["created"], int)
    images = [decode_png(item["b64_json"]) for item in payload["data"]]
    runtime = client.app.state.runtime
    params = runtime.params(
        "a red cat", n=2, width=64, height=64, seed=7, steps=3, guidance_scale=6.0
    )
    expected = reference_pipeline("sd15")(**runtime.steps.reference_kwargs(params)).images
    assert [mean_abs_diff(a, b) < 1.0 for a, b in zip(images, expected, strict=True)] == [
        True,
        True,
    ]


def test_defaults_fill_in_and_seed_is_reported(client_for):
    body = {"prompt": "defaults", "n": None, "size": None, "response_format": None, "user": "u1"}
    response = client_for().post(GENERATE, json=body)
    assert response.status_code == 200
    payload = response.json()
    assert decode_png(payload["data"][0]["b64_json"]).size == (64, 64)  # the model's native size
    assert 0 <= payload["seed"] < 2**63


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux"])
def test_a_long_prompt_leaves_no_text_in_the_log(make_runtime, family, capfd, caplog):
    # CLIP takes 77 tokens, T5 here 64; diffusers logs what it cuts off: the user's prompt.
    runtime = make_runtime(family, warmup=False)
    client = TestClient(create_app(runtime.settings, runtime))
    filler = " ".join(["word"] * 90)
    body = {"prompt": f"{filler} tailsecret", "negative_prompt": f"{filler} negsecret",
            "steps": 1}
    assert client.post(GENERATE, json=body).status_code == 200
    logged = capfd.readouterr().err + caplog.text
    assert "secret" not in logged
    assert "a prompt was cut to the length its text encoder takes" in logged


def test_sizes_default_to_at_most_the_models_native_pixels(client_for):
    # No max_pixels set: the tiny model's native 64x64 is the most a request may ask for.
    client = client_for(max_pixels=None, warmup=False)
    refused = client.post(GENERATE, json={"prompt": "x", "size": "64x72", "steps": 1})
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["param"] == "size" and "at most 4096" in error["message"]
    assert "64x64" in error["message"]  # the native size, named
    assert client.post(GENERATE, json={"prompt": "x", "size": "64x64", "steps": 1}).status_code == 200
    assert client.app.state.runtime.engine.in_flight == 0


def test_full_queue_answers_429_with_retry_after(client_for):
    client = client_for(queue_capacity=1, max_batch_size=1)
    gate = Gate(client.app.state.runtime)  # the first request holds the device until told
    slow: dict = {}
    worker = threading.Thread(
        target=lambda: slow.setdefault(
            "r", client.post(GENERATE, json={"prompt": "slow", "steps": 2})
        )
    )
    worker.start()
    try:
        assert gate.entered.wait(30)
        response = client.post(GENERATE, json={"prompt": "rejected"})
        # An edit is refused before its upload is decoded (this one would not decode).
        edit = client.post("/v1/images/edits", data={"prompt": "rejected"},
                           files={"image": ("a.png", b"not decoded", "image/png")})
    finally:
        gate.close()
    worker.join(60)
    assert response.status_code == 429, response.text
    assert int(response.headers["Retry-After"]) >= 1
    assert response.json()["error"]["type"] == "rate_limit_error"
    assert edit.status_code == 429 and int(edit.headers["Retry-After"]) >= 1, edit.text
    assert slow["r"].status_code == 200


def test_an_edit_with_room_by_its_own_cost_is_not_refused_before_its_decode(client_for):
    # A request on the device (4 of the default 3 steps: 1.33 units of work), room for two:
    # an edit running a third of its steps (0.33 units) fits, where a whole default
    # request (1 unit) would not.
    client = client_for(queue_capacity=2, max_batch_size=1)
    gate = Gate(client.app.state.runtime)
    answers: dict = {}
    held = threading.Thread(target=lambda: answers.setdefault(
        "held", client.post(GENERATE, json={"prompt": "held", "steps": 4})))
    held.start()
    try:
        assert gate.entered.wait(30)
        source = io.BytesIO()
        Image.new("RGB", (64, 64), (120, 60, 30)).save(source, format="PNG")
        editing = threading.Thread(target=lambda: answers.setdefault("edit", client.post(
            "/v1/images/edits", data={"prompt": "edit", "strength": "0.34"},
            files={"image": ("a.png", source.getvalue(), "image/png")})))
        editing.start()
        wait_until(lambda: client.app.state.runtime.engine.in_flight == 2 or "edit" in answers)
    finally:
        gate.close()
    held.join(60)
    editing.join(60)
    assert answers["edit"].status_code == 200, answers["edit"].text
    assert answers["held"].status_code == 200


def test_a_burst_of_edits_decodes_no_more_uploads_than_there_is_room_for(client_for,
                                                                        monkeypatch):
    from imagegen_server import api

    client = client_for(queue_capacity=2, warmup=False)
    entered, release, decoded = threading.Semaphore(0), threading.Event(), []

    def held_decode(*args, **kwargs):
        decoded.append(1)
        entered.release()
        release.wait(30)
        return real_decode(*args, **kwargs)

    real_decode = api.decode_uploads
    monkeypatch.setattr(api, "decode_uploads", held_decode)
    source = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 60, 30)).save(source, format="PNG")

    def post_edit():
        return client.post("/v1/images/edits", data={"prompt": "edit", "steps": "2"},
                           files={"image": ("a.png", source.getvalue(), "image/png")})

    answers: list = []
    first = [threading.Thread(target=lambda: answers.append(post_edit())) for _ in range(2)]
    for thread in first:
        thread.start()
    try:
        assert entered.acquire(timeout=30) and entered.acquire(timeout=30)
        late = post_edit()  # both places held by uploads still decoding
        assert late.status_code == 429 and int(late.headers["Retry-After"]) >= 1, late.text
        assert len(decoded) == 2  # refused before its upload was decoded
        # The autoscaler sees them: requests in flight, if not yet on the device.
        registry = client.app.state.runtime.metrics.registry
        assert registry.get_sample_value("imagegen_requests_in_flight") == 2
    finally:
        release.set()
        for thread in first:
            thread.join(60)
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    assert client.app.state.runtime.engine.in_flight == 0
    assert registry.get_sample_value("imagegen_requests_in_flight") == 0
    assert post_edit().status_code == 200  # the places were handed back


def test_bearer_token_guards_the_api_but_not_the_probes(client_for, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    client = client_for(auth_token_file=str(token_file), warmup=False)
    body = {"prompt": "x", "steps": 1}
    assert client.post(GENERATE, json=body).status_code == 401
    wrong = client.post(GENERATE, json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.headers["WWW-Authenticate"] == "Bearer"
    ok = client.post(GENERATE, json=body, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    assert client.get("/v1/models").status_code == 401
    for probe in ("/healthz", "/readyz", "/metrics"):
        assert client.get(probe).status_code == 200, probe
    # The probe says ready to anyone; what the start did (paths, fallbacks) to the token only.
    assert client.get("/readyz").json() == {"status": "ready", "model": "sd15"}
    told = client.get("/readyz", headers={"Authorization": "Bearer s3cret"}).json()
    assert {"optimizations", "startup_seconds"} <= told.keys()


def test_a_rotated_token_file_takes_effect_without_a_restart(client_for, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("first\n")
    client = client_for(auth_token_file=str(token_file), warmup=False)

    def models_with(token: str) -> int:
        return client.get("/v1/models", headers={"Authorization": f"Bearer {token}"}).status_code

    assert models_with("first") == 200
    # As the kubelet rotates a mounted Secret: a new file swapped in under the same path.
    rotated = tmp_path / "token.new"
    rotated.write_text("second\n")
    rotated.replace(token_file)
    assert (models_with("second"), models_with("first")) == (200, 401)
    token_file.write_text("")  # unreadable or empty: closed, never open
    assert (models_with("second"), models_with("")) == (401, 401)


def test_size_auto_is_the_default_size_and_seeds_fit_a_javascript_number(client_for):
    client = client_for(warmup=False)
    for body in ({"prompt": "x", "steps": 1}, {"prompt": "x", "steps": 1, "size": "auto"}):
        answer = client.post(GENERATE, json=body)
        assert answer.status_code == 200, answer.text
        image = Image.open(io.BytesIO(base64.b64decode(answer.json()["data"][0]["b64_json"])))
        assert image.size == client.app.state.runtime.default_size
        assert 0 <= answer.json()["seed"] < 2**53


def test_a_scrape_held_up_by_its_collectors_leaves_the_probes_answering(make_runtime,
                                                                      serve_live):
    # NVML reads on a failing GPU can hang; /healthz must not wait behind them.
    runtime = make_runtime("sd15", warmup=False)
    base = serve_live(runtime)
    held, release, gave_up = threading.Event(), threading.Event(), threading.Event()

    class Stuck:
        def describe(self):  # else registering it would collect, and wait, already
            return []

        def collect(self):
            held.set()
            if not release.wait(10):
                gave_up.set()
            return []

    runtime.metrics.registry.register(Stuck())
    scrape = threading.Thread(target=httpx.get, args=(base + "/metrics",),
                              kwargs={"timeout": 30})
    scrape.start()
    try:
        assert held.wait(30)
        assert httpx.get(base + "/healthz", timeout=30).status_code == 200
        assert not gave_up.is_set()  # answered while the scrape was still held
    finally:
        release.set()
        scrape.join(30)


def test_models_health_and_readiness(client_for):
    client = client_for()
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert models["data"][0]["id"] == "sd15" and models["data"][0]["family"] == "SD15"
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready"
    assert ready["optimizations"]["attention_active"] == "Auto"
    # Where the start's seconds went, phase by phase (no compile: nothing saved or loaded).
    assert set(ready["startup_seconds"]) == {"imports", "load", "optimize", "warmup"}
    assert ready["optimizations"]["compile_artifacts"] is None


def test_model_that_cannot_load_fails_health_and_readiness(tmp_path):
    settings = ServerSettings(model=str(tmp_path / "missing"), dtype="float32")
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 30
        while client.get("/healthz").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        health = client.get("/healthz")
        assert health.status_code == 500
        message = health.json()["error"]["message"]
        assert message.startswith("model failed to load (") and "log says why" in message
        assert str(tmp_path) not in message  # unauthenticated: no local path
        assert client.get("/readyz").status_code == 503
        assert client.post(GENERATE, json={"prompt": "x"}).status_code == 503


def test_queue_and_batch_series_are_those_of_the_stages_there_are(client_for):
    client = client_for(stage_mode="Stacked")
    text = client.get("/metrics").text
    series = {(s.name, s.labels.get("stage")) for f in text_string_to_metric_families(text)
              for s in f.samples}
    assert ("imagegen_stage_queue_depth", "stacked") in series
    assert ("imagegen_stage_batch_size_count", "stacked") in series
    # No queue that never moves: the phases run inside the one stage, timed each.
    assert not any(name == "imagegen_stage_queue_depth" and stage != "stacked"
                   for name, stage in series)
    assert ("imagegen_stage_duration_seconds_count", "denoise") in series


def test_metrics_parse_and_carry_per_stage_series(client_for):
    client = client_for()
    assert client.post(GENERATE, json={"prompt": "counted", "n": 2}).status_code == 200
    client.get("/healthz")
    text = client.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families.values()
        for s in f.samples
    }
    for stage in ("encode", "denoise", "decode"):
        labels = (("stage", stage),)
        # The request's batch only: warm-up runs the steps before the stages see traffic.
        assert samples[("imagegen_stage_duration_seconds_count", labels)] == 1
        assert samples[("imagegen_stage_batch_size_count", labels)] == 1
        assert ("imagegen_stage_queue_depth", labels) in samples
    assert samples[("imagegen_images_generated_total", ())] == 2
    # Probes not counted.
    assert samples[("imagegen_requests_total", (("route", "generations"), ("status", "200")))] == 1
    assert samples[("imagegen_request_duration_seconds_count", ())] == 1
    # The buckets reach past the longest a request may take: a p99 near the timeout is
    # not capped at the last bucket below it.
    bounds = [float(dict(labels)["le"]) for name, labels in samples
              if name == "imagegen_request_duration_seconds_bucket"]
    timeout = ServerSettings.model_fields["request_timeout_s"].default
    assert max(b for b in bounds if b != float("inf")) >= timeout
    assert samples[("imagegen_ready", ())] == 1
    assert families["imagegen_server_info"].samples[0].labels["family"] == "SD15"
    # Declared even without a GPU, so dashboards need no special case.
    for name in ("imagegen_gpu_utilization_ratio", "imagegen_gpu_memory_used_bytes"):
        assert name in families


def test_a_server_error_is_counted_with_its_500(client_for, monkeypatch):
    from fastapi.testclient import TestClient

    # The same started app, answering as uvicorn would: a 500, not the exception.
    client = TestClient(client_for().app, raise_server_exceptions=False)

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(client.app.state.runtime.engine, "submit", broken)
    response = client.post(GENERATE, json={"prompt": "x"})
    assert response.status_code == 500
    # OpenAI's shape even for a bug, and nothing of the bug's own words.
    assert response.json() == {"error": {"message": "internal server error",
                                         "type": "server_error", "param": None, "code": None}}
    families = text_string_to_metric_families(client.get("/metrics").text)
    counted = {tuple(sorted(s.labels.items())): s.value for f in families
               for s in f.samples if s.name == "imagegen_requests_total"}
    assert counted == {(("route", "generations"), ("status", "500")): 1}


def test_request_timeout_answers_504_and_frees_the_slot(client_for):
    client = client_for(request_timeout_s=0.3, queue_capacity=1)
    gate = Gate(client.app.state.runtime)  # the denoiser held past the request's timeout
    try:
        response = client.post(GENERATE, json={"prompt": "too slow", "steps": 20})
    finally:
        gate.close()
    assert response.status_code == 504
    assert response.json()["error"]["type"] == "timeout_error"
    engine = client.app.state.runtime.engine
    deadline = time.monotonic() + 60
    while engine.in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.in_flight == 0  # the abandoned job was dropped at a stage boundary
    assert client.post(GENERATE, json={"prompt": "fits", "steps": 1}).status_code == 200


@pytest.mark.parametrize("content", ["", "\n", "   \n\t"])
def test_an_empty_token_file_stops_the_server_instead_of_opening_it(tmp_path, content):
    token_file = tmp_path / "token"
    token_file.write_text(content)
    settings = ServerSettings(model=str(tmp_path), auth_token_file=str(token_file))
    with pytest.raises(ConfigError, match="auth_token_file .* is empty"):
        create_app(settings)


def test_an_unreadable_token_file_stops_the_server(tmp_path):
    settings = ServerSettings(model=str(tmp_path), auth_token_file=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="cannot be read"):
        create_app(settings)


def test_the_cli_exits_with_a_clear_message_on_an_empty_token_file(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("\n")
    result = subprocess.run(
        [sys.executable, "-m", "imagegen_server", "--model", str(tmp_path),
         "--auth-token-file", str(token_file), "--port", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert f"auth_token_file {token_file} is empty" in result.stderr


def test_a_list_of_sizes_admits_only_those(client_for):
    client = client_for(allowed_sizes=["128x64"], warmup=False)  # the default is 64x64
    refused = client.post(GENERATE, json={"prompt": "x", "size": "64x128", "steps": 1})
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["param"] == "size" and "64x64, 128x64" in error["message"]
    # The default size is always admitted, listed or not.
    for size in ("64x64", "128x64"):
        response = client.post(GENERATE, json={"prompt": "x", "size": size, "steps": 1})
        assert response.status_code == 200, response.text


@pytest.mark.parametrize(("path", "content_type"), [
    (GENERATE, "application/json"), ("/v1/images/edits", "multipart/form-data; boundary=zz")])
def test_a_client_gone_mid_body_is_a_499_not_a_server_error(client_for, path, content_type):
    """An upload cut short (a phone losing its network): nothing to answer, and nothing for
    an error-rate alert to count as the server's fault."""
    import asyncio

    app = client_for().app
    sent: list[dict] = []
    parts = [b'{"prompt": "a']

    async def receive():
        if parts:
            return {"type": "http.request", "body": parts.pop(), "more_body": True}
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 80),
             "headers": [(b"content-type", content_type.encode()), (b"content-length", b"999")]}
    asyncio.run(app(scope, receive, send))  # raises nothing on to the server
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [499]
    families = text_string_to_metric_families(
        TestClient(app).get("/metrics").text)
    counted = {s.labels["status"] for f in families for s in f.samples
               if s.name == "imagegen_requests_total"}
    assert counted == {"499"}
