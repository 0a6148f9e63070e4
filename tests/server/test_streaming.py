"""stream: true with partial_images, as OpenAI streams images: server-sent events that the
official client reads into its own event types, previews made off the denoise thread."""

from __future__ import annotations

import base64
import io
import threading
import time
from concurrent.futures import Future
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch
from openai.types import (
    ImageEditCompletedEvent,
    ImageEditPartialImageEvent,
    ImageGenCompletedEvent,
    ImageGenPartialImageEvent,
)
from PIL import Image
from server_testlib import Gate, mean_abs_diff, source_image

from imagegen_server.engine import InvalidRequest
from imagegen_server.previews import preview_steps


def png(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    return image.convert("RGB")


@pytest.fixture
def client(make_runtime, serve_live):
    runtime = make_runtime("sd15", default_width=64, default_height=64)
    base = serve_live(runtime)
    return openai.OpenAI(base_url=base + "/v1", api_key="-", max_retries=0, timeout=120), runtime, base


def test_the_openai_client_reads_previews_then_the_image(client):
    openai_client, runtime, _ = client
    events = list(openai_client.images.generate(
        prompt="a lighthouse", size="64x64", stream=True, partial_images=2,
        extra_body={"seed": 9, "steps": 6},
    ))
    assert [type(e) for e in events] == [ImageGenPartialImageEvent] * 2 + [ImageGenCompletedEvent]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    for event in events:  # every field of OpenAI's own event types, strictly
        type(event).model_validate(event.model_dump(), strict=True)
        assert event.size == "64x64" and event.output_format == "png"
    previews = [png(e.b64_json) for e in events[:2]]
    assert all(p.size == (64, 64) for p in previews)
    # The seed, as a plain answer gives it; the provenance record is the image's, and a
    # preview is no image of record (nor signed: a timestamp round trip per preview).
    assert events[-1].model_extra["seed"] == 9
    assert "parameters" in Image.open(io.BytesIO(base64.b64decode(events[-1].b64_json))).text
    for event in events[:2]:
        assert not Image.open(io.BytesIO(base64.b64decode(event.b64_json))).text
    final = png(events[-1].b64_json)
    # The streamed image is the image the same request makes without streaming.
    params = runtime.params("a lighthouse", seed=9, steps=6)
    assert mean_abs_diff(final, runtime.engine.generate(params, timeout_s=60)[0]) == 0.0
    assert mean_abs_diff(previews[0], previews[1]) > 0  # each from its own step


def test_edits_stream_their_own_event_types(client):
    openai_client, _, _ = client
    buffer = io.BytesIO()
    source_image().save(buffer, format="PNG")
    events = list(openai_client.images.edit(
        image=("s.png", buffer.getvalue(), "image/png"), prompt="ink", stream=True,
        partial_images=1, extra_body={"seed": 2, "steps": 4, "strength": 0.75},
    ))
    assert [type(e) for e in events] == [ImageEditPartialImageEvent, ImageEditCompletedEvent]


def test_a_preview_that_fails_is_skipped_and_the_image_waits_for_nothing(client, monkeypatch):
    from imagegen_server import previews, streaming

    openai_client, _, _ = client
    project, calls = previews.project, []

    def fails_second(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("no preview of this one")
        return project(*args)

    monkeypatch.setattr(previews, "project", fails_second)
    # A stream that waited for the failed preview would wait ten minutes (its pings keep
    # the client reading): read on a thread, and give it two.
    monkeypatch.setattr(streaming, "PREVIEW_WAIT_S", 600.0)
    events = []
    reader = threading.Thread(target=lambda: events.extend(openai_client.images.generate(
        prompt="a lighthouse", size="64x64", stream=True, partial_images=3,
        extra_body={"seed": 9, "steps": 8},
    )), daemon=True)
    reader.start()
    reader.join(120)
    assert not reader.is_alive(), "the stream waited for a preview that had failed"
    assert [type(e) for e in events] == [ImageGenPartialImageEvent] * 2 + [ImageGenCompletedEvent]
    assert [e.partial_image_index for e in events[:2]] == [0, 2]


def test_no_partial_images_is_one_completed_event_on_the_wire(client):
    _, _, base = client
    with httpx.stream("POST", base + "/v1/images/generations", timeout=60,
                      json={"prompt": "x", "size": "64x64", "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        text = "".join(response.iter_text())
    assert text.count("event: image_generation.completed") == 1
    assert "partial_image" not in text


def test_a_stream_that_times_out_ends_in_an_error_event_and_is_counted(make_runtime, serve_live):
    runtime = make_runtime("sd15", default_width=64, default_height=64, request_timeout_s=0.5)
    base = serve_live(runtime)
    gate = Gate(runtime)  # the denoiser held past the request's timeout
    try:
        with httpx.stream("POST", base + "/v1/images/generations", timeout=60, json={
                "prompt": "x", "size": "64x64", "stream": True, "steps": 4}) as response:
            assert response.status_code == 200
            text = "".join(response.iter_text())
    finally:
        gate.close()
    assert "event: error" in text and "timeout_error" in text
    metrics = httpx.get(base + "/metrics").text
    assert 'imagegen_stream_errors_total{type="timeout_error"} 1.0' in metrics


def test_previews_are_made_on_their_own_thread_at_even_steps(make_runtime):
    runtime = make_runtime("sd15", default_width=64, default_height=64)
    seen = []
    params = runtime.params("x", seed=1, steps=8, partial_images=3)
    job = runtime.engine.submit(
        params, 60, lambda index, images: seen.append((index, threading.current_thread().name)))
    job.future.result(60)
    runtime.engine.close(10)  # the preview thread has delivered all it was handed
    assert seen == [(0, "previews"), (1, "previews"), (2, "previews")]
    assert preview_steps(8, 3) == (1, 3, 5) and preview_steps(2, 3) == (0,)
    assert preview_steps(30, 0) == ()


def test_a_family_without_a_latent_map_streams_the_final_image_only(make_runtime, serve_live):
    # OpenAI's streams may send fewer partial images than asked for: SD3 and Flux send none.
    runtime = make_runtime("sd3", default_width=64, default_height=64)
    base = serve_live(runtime)
    openai_client = openai.OpenAI(base_url=base + "/v1", api_key="-", max_retries=0, timeout=120)
    events = list(openai_client.images.generate(
        prompt="a lighthouse", size="64x64", stream=True, partial_images=2,
        extra_body={"seed": 9, "steps": 4},
    ))
    assert [type(e) for e in events] == [ImageGenCompletedEvent]
    params = runtime.params("a lighthouse", seed=9, steps=4)
    (want,) = runtime.engine.generate(params, timeout_s=60)
    assert mean_abs_diff(png(events[0].b64_json), want) == 0.0
    # Out of range is still refused, naming the field.
    with pytest.raises(InvalidRequest) as caught:
        runtime.engine.submit(runtime.params("x", partial_images=4), 60, lambda *_: None)
    assert caught.value.field == "partial_images"


def test_a_stream_torn_down_before_its_events_began_cancels_its_job():
    """The events' own cleanup cancels a job whose client left; a response torn down
    before they began (the client gone as it started) must not leave the job running."""
    import asyncio
    import contextlib
    from concurrent.futures import Future
    from types import SimpleNamespace

    from imagegen_server.api import JobStream

    job = SimpleNamespace(future=Future())
    began = []

    async def events():
        began.append(True)
        yield {"data": "never sent"}

    async def receive():
        return {"type": "http.disconnect"}

    async def send(message):
        raise OSError("connection reset by peer")

    scope = {"type": "http", "method": "POST", "path": "/v1/images/generations",
             "headers": []}
    with contextlib.suppress(Exception):  # the send's error, as the server would meet it
        asyncio.run(JobStream(job, events())(scope, receive, send))
    assert job.future.cancelled()


def test_a_stream_whose_client_reads_nothing_ends_quietly_and_cancels_its_job(caplog):
    """sse-starlette's send timeout is how a stalled reader is let go of: its job is
    cancelled and the server logs it as that, not as an unhandled error."""
    import asyncio
    import logging
    from concurrent.futures import Future
    from types import SimpleNamespace

    from imagegen_server.api import JobStream

    job = SimpleNamespace(future=Future())

    async def events():
        yield {"data": "a preview"}
        await asyncio.sleep(60)

    async def receive():
        await asyncio.sleep(60)
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.body":
            await asyncio.sleep(60)  # the client's window is full

    scope = {"type": "http", "method": "POST", "path": "/v1/images/generations",
             "headers": []}
    with caplog.at_level(logging.INFO, logger="imagegen_server"):
        asyncio.run(asyncio.wait_for(
            JobStream(job, events(), send_timeout=0.2, ping=30)(scope, receive, send), 30))
    assert job.future.cancelled()
    assert "stream dropped" in caplog.text and "Traceback" not in caplog.text


class CancelledWhileRead(Future):
    """A future its client cancels just after the preview thread read it as not cancelled."""

    def cancelled(self):
        was = super().cancelled()
        self.cancel()
        return was


def test_a_stream_cancelled_as_its_preview_is_taken_stops_no_other_stream():
    from imagegen_server.previews import SD15_RGB, Previewer, PreviewRequest
    from imagegen_server.request import Job

    def job(future: Future, seen: list) -> Job:
        made = Job(params=SimpleNamespace(width=8, height=8), future=future)
        made.preview = PreviewRequest(lambda index, images: seen.append(index))
        return made

    previewer, gone, kept = Previewer(), [], []
    latents = torch.zeros(1, 4, 1, 1)
    try:
        previewer.submit(job(CancelledWhileRead(), gone), 0, latents, SD15_RGB)
        previewer.submit(job(Future(), kept), 0, latents, SD15_RGB)
        deadline = time.monotonic() + 10
        while not kept and time.monotonic() < deadline:
            time.sleep(0.01)
        assert kept == [0], "the preview thread died with the cancelled stream"
        assert previewer._thread.is_alive()
    finally:
        previewer.stop()
