"""Streamed answers: OpenAI's server-sent image events, previews first, then the image.

``{kind}.partial_image`` for each preview as the preview thread makes it, then
``{kind}.completed`` with the final image (``kind`` is ``image_generation`` or
``image_edit``). Refusals (400, 429, 503) come before a stream starts, as plain errors; a
failure after it is an ``error`` event, which the openai client raises as an APIError.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable

from sse_starlette import ServerSentEvent

from .request import GenerationParams, Job, JobTimeout, ShutdownError

log = logging.getLogger(__name__)

# How long a finished stream waits for a preview still being made before the final image.
PREVIEW_WAIT_S = 2.0
# How long one event may take to reach the client before the stream is dropped: one that
# holds its connection open and stops reading would pin the images for good. Long enough for
# a large PNG to a slow reader (16 MB of base64 at 1 Mbit/s).
SEND_TIMEOUT_S = 180.0
# OpenAI's completed events carry token usage; a diffusion model counts no tokens.
NO_TOKENS = {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
             "output_tokens": 0, "total_tokens": 0}


def stream_error(exc: BaseException) -> ServerSentEvent:
    """An error once the stream has started: an ``error`` event in OpenAI's error shape,
    which the openai client raises as an APIError."""
    if isinstance(exc, JobTimeout | TimeoutError):
        error = {"message": "request timed out", "type": "timeout_error"}
    elif isinstance(exc, ShutdownError):
        error = {"message": str(exc), "type": "server_error"}
    else:
        log.error("streamed generation failed: %r", exc, exc_info=exc)
        error = {"message": f"generation failed: {type(exc).__name__}", "type": "server_error"}
    return ServerSentEvent(json.dumps({"error": {**error, "param": None, "code": None}}),
                           event="error")


class Previews:
    """The previews of one streamed request, handed from the preview thread to the loop."""

    def __init__(self):
        self._loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def deliver(self, index: int, images: list) -> None:  # on the preview thread
        self._loop.call_soon_threadsafe(self.queue.put_nowait, (index, images))


async def image_events(
    job: Job,
    previews: Previews,
    params: GenerationParams,
    kind: str,
    encode: Callable[[object], str],
    timeout_s: float,
    encode_preview: Callable[[object], str] | None = None,
) -> AsyncIterator[ServerSentEvent]:
    """The events of one streamed request; ``encode`` turns the image into base64 PNG, and
    ``encode_preview`` a preview (plain: no provenance, no signature; ``encode`` when unset);
    both run on a worker thread. Cancelling the iteration (a client that left) cancels the
    job."""
    started = time.monotonic()
    encode_preview = encode_preview or encode

    async def event(name: str, image, **fields) -> ServerSentEvent:
        encoder = encode if name == "completed" else encode_preview
        b64 = await asyncio.to_thread(encoder, image)
        body = {"type": f"{kind}.{name}", "b64_json": b64, "created_at": int(time.time()),
                "size": f"{params.width}x{params.height}", "quality": "auto",
                "background": "opaque", "output_format": "png", **fields}
        return ServerSentEvent(json.dumps(body), event=body["type"])

    future = asyncio.wrap_future(job.future)
    deadline = started + timeout_s
    sent = 0
    waiting = None
    try:
        while not future.done():
            waiting = asyncio.ensure_future(previews.queue.get())
            done, _ = await asyncio.wait(
                {future, waiting}, timeout=max(0.0, deadline - time.monotonic()),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if waiting in done:
                index, images = waiting.result()
                sent += 1
                if images is not None:  # None: a preview that failed
                    yield await event("partial_image", images[0], partial_image_index=index)
            else:
                waiting.cancel()
            if not done:
                raise TimeoutError
        try:
            images = future.result()
        except Exception as exc:
            yield stream_error(exc)
            return
        # Previews the denoise loop handed over before it finished come first, in order;
        # the preview thread may still be making the last of them.
        handed = job.preview.handed if job.preview is not None else 0
        while sent < handed:
            try:
                index, preview = await asyncio.wait_for(previews.queue.get(), PREVIEW_WAIT_S)
            except TimeoutError:
                break  # a preview thread that fell behind; the image does not wait longer
            sent += 1
            if preview is not None:
                yield await event("partial_image", preview[0], partial_image_index=index)
        # The seed as a plain answer gives it (not OpenAI's): the image can be made again.
        yield await event("completed", images[0], usage=NO_TOKENS, seed=params.seed)
    except TimeoutError:
        yield stream_error(JobTimeout("request timed out"))
    except Exception as exc:  # encoding or signing an image: still an answer in OpenAI's shape
        yield stream_error(exc)
    finally:
        if waiting is not None:
            waiting.cancel()
        if not job.future.done():
            job.future.cancel()
