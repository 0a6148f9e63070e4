"""HTTP routes: the OpenAI Images API plus health, readiness and metrics.

The bodies and their errors are bodies.py's, streamed answers streaming.py's.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hmac
import json
import logging
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from sse_starlette import EventSourceResponse
from sse_starlette.sse import SendTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from . import provenance
from .bodies import (
    ApiError,
    ImageEditForm,
    ImageGenerationRequest,
    ImageRequest,
    decode_uploads,
    error_response,
    parse,
    parse_size,
    read_form,
    read_json_body,
    shown,
    streamed_previews,
)
from .config import SHUTDOWN_FLUSH_S, ServerSettings
from .engine import (
    EngineClosedError,
    InvalidRequest,
    Place,
    QueueFullError,
    check_edits_served,
    check_request,
    listed_sizes,
    max_pixels,
)
from .request import EditInput, GenerationParams, Job, JobTimeout, ShutdownError
from .runtime import ModelRuntime
from .streaming import SEND_TIMEOUT_S, Previews, image_events
from .uploads import UploadError, edit_size

log = logging.getLogger(__name__)

GENERATIONS_PATH = "/v1/images/generations"
EDITS_PATH = "/v1/images/edits"
# What the kubelet and Prometheus read without the token; everything else needs it.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
# The routes whose answers imagegen_requests_total counts, by its route label.
COUNTED_ROUTES = {GENERATIONS_PATH: "generations", EDITS_PATH: "edits"}


class JobStream(EventSourceResponse):
    """The event stream of one job, which it cancels however the response ends: also when
    it is torn down before the events began (image_events' own cancel never ran)."""

    def __init__(self, job: Job, content: Any, **kwargs: Any):
        super().__init__(content, **kwargs)
        self.job = job

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:
            # A client that reads nothing for SEND_TIMEOUT_S is let go of: how a stream ends
            # for a stalled reader, not a fault of the server's.
            # (uvicorn still says the response did not complete: it did not.)
            log.info("stream dropped: its client read nothing for %g s", self.send_timeout)
        finally:
            self.job.future.cancel()  # a no-op once answered

def request_body(media_type: str, model: type[BaseModel]) -> dict:
    """The OpenAPI request body of a route that reads its own body (to bound and check it)."""
    return {"requestBody": {"required": True,
                            "content": {media_type: {"schema": model.model_json_schema()}}}}


def create_app(settings: ServerSettings, runtime: ModelRuntime | None = None) -> FastAPI:
    """The ASGI app. Without ``runtime`` the model loads in the background at startup."""
    runtime = runtime or ModelRuntime(settings)
    metrics = runtime.metrics
    token = _read_token(settings)
    if token is None:
        log.warning("no auth_token_file or auth_token: every client that reaches port %d "
                    "may generate", settings.port)
    signer = _read_signer(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if runtime.engine is None and runtime.error is None:
            runtime.load_in_background()
        yield
        # After SIGTERM the engine has drained already (shutdown.DrainingServer); elsewhere
        # (tests, embedding) whatever is still accepted finishes here.
        drained = await asyncio.to_thread(runtime.close, settings.drain_timeout_s)
        log.info("engine stopped: %s", "drained" if drained else "drain timed out")

    # No interactive docs pages: a model server serves its API, and /openapi.json (behind
    # the token like the API) describes it.
    # No redirect from a path with a trailing slash: a client would send its body twice,
    # and an error in OpenAI's shape (a 404) tells it more than a bare 307.
    app = FastAPI(title="imagegen-server", lifespan=lifespan, docs_url=None, redoc_url=None,
                  redirect_slashes=False)
    app.state.runtime = runtime

    def authorized(request: Request) -> bool:
        if token is None:
            return True
        expected = token.current()
        if expected is None:
            return False  # a rotated token file that cannot be read: closed, not open
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        # Constant-time, so the comparison does not tell how much of a guess was right.
        return scheme.lower() == "bearer" and hmac.compare_digest(given.encode(),
                                                                  expected.encode())

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError):
        return error_response(exc.status, str(exc), exc.param, exc.kind, exc.headers, exc.code)

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(_request: Request, _exc: ClientDisconnect):
        # Gone while sending its body (an upload cut short): nobody to answer, and no
        # server error either; 499 as for a client gone while its images were made.
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _bug(_request: Request, exc: Exception):
        # Anything no route turned into an answer: still OpenAI's shape, never a traceback.
        log.error("unhandled error", exc_info=exc)
        return error_response(500, "internal server error", None, "server_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException):
        # 404 and 405 from routing, in OpenAI's shape like every other error.
        message = {404: "no such route", 405: "method not allowed"}.get(exc.status_code)
        return error_response(
            exc.status_code, message or str(exc.detail), None,
            "invalid_request_error" if exc.status_code < 500 else "server_error",
            getattr(exc, "headers", None),
        )

    # Plain ASGI, not @app.middleware: that wrapper hides a client's disconnect from the route.
    app.add_middleware(TokenAndCount, authorized=authorized, metrics=metrics)

    @app.post(
        GENERATIONS_PATH,
        openapi_extra=request_body("application/json", ImageGenerationRequest),
    )
    async def generate(request: Request):
        raw = await read_json_body(request, settings.max_body_bytes)
        # In a thread, as the JSON was read: the probes keep their turns on a large body.
        body = await asyncio.to_thread(parse, ImageGenerationRequest, raw, strict=True)
        check_served(body.model)
        params = params_of(body, parse_size(body.size))
        return await answer(request, params, "image_generation", body.stream)

    @app.post(
        EDITS_PATH,
        openapi_extra=request_body("multipart/form-data", ImageEditForm),
    )
    async def edit(request: Request):
        # A text field is no larger than a JSON body may be (lora as JSON text is parsed).
        fields, files = await read_form(request, settings.max_upload_bytes,
                                        settings.max_body_bytes)
        body = await asyncio.to_thread(parse, ImageEditForm, fields)
        if "image" not in files:
            raise ApiError(400, "image is required: the picture to edit, as a file",
                           param="image", code="missing_required_parameter")
        check_served(body.model)
        # What needs no picture (a family that edits, n, steps, guidance, the prompt, a size
        # given) is checked before the upload is decoded, which takes a while for a large one.
        with _as_bad_request():
            check_edits_served(runtime.steps)
        check_limits(params_of(body, parse_size(body.size)))
        # Room is held before the decode: a full server would refuse the edit after it, and a
        # burst of uploads decodes no more of them than there is room for.
        with contextlib.ExitStack() as held:
            with _refused_for_room():
                place = held.enter_context(runtime.engine.reserve())
            edit, size = await fitted_edit(body, files)
            # What waits in the queue is the picture at the size it is edited at; the
            # upload and its full-size decode go now.
            del files
            params = params_of(body, size, edit)
            return await answer(request, params, "image_edit", body.stream, place)

    async def fitted_edit(body: ImageEditForm, files: dict[str, bytes],
                          ) -> tuple[EditInput, tuple[int, int]]:
        """The edit's picture (and mask) decoded and fitted to the size it is made at."""
        try:
            image, mask, media_type = await asyncio.to_thread(
                decode_uploads, files, settings.max_upload_pixels
            )
        except UploadError as exc:
            raise ApiError(400, str(exc), param=exc.field, code="invalid_image") from exc
        size = parse_size(body.size)
        if size[0] is None:
            steps = runtime.steps
            size = edit_size(image.size, steps.size_multiple, max_pixels(steps, settings),
                             listed_sizes(steps, settings))
        strength = body.strength if body.strength is not None else (
            0.8 if mask is None else 1.0)
        edit = await asyncio.to_thread(
            runtime.steps.fitted, EditInput(image, strength, mask), *size)
        if signer is not None:
            parent = await asyncio.to_thread(
                provenance.parent_of, files["image"], media_type, edit.image)
            edit = dataclasses.replace(edit, parent=parent)
        return edit, size

    def params_of(body: ImageRequest, size: tuple[int | None, int | None],
                  edit: EditInput | None = None) -> GenerationParams:
        """The engine's request for a parsed body, the server's defaults filled in."""
        return runtime.params(
            body.prompt,
            n=1 if body.n is None else body.n,
            width=size[0],
            height=size[1],
            steps=body.steps,
            guidance_scale=body.guidance_scale,
            seed=body.seed,
            negative_prompt=body.negative_prompt,
            lora=[(choice.name, choice.scale) for choice in body.lora or []],
            edit=edit,
            partial_images=streamed_previews(body),
        )

    async def answer(request: Request, params: GenerationParams, kind: str,
                     streamed: bool | None, place: Place | None = None):
        """A stream of events when the request asked for one, else one JSON answer."""
        if signer is not None and (why := await asyncio.to_thread(signer.check)) is not None:
            # Refused before the GPU work rather than failed after it.
            raise ApiError(503, f"the images cannot be signed: {why}", kind="server_error",
                           headers={"Retry-After": "30"})
        if streamed:
            return stream(request, params, kind, place)
        return await serve(request, params, place)

    def check_served(name: str | None) -> None:
        """503 until the model is ready; 404 when ``name`` (a request's ``model``) is another."""
        if not runtime.ready:
            raise ApiError(
                503, "the server is shutting down" if runtime.draining else "model is not ready",
                kind="server_error", headers={"Retry-After": "5"}
            )
        if name not in (None, runtime.model.name):
            raise ApiError(
                404, f"model {shown(name)} is not served here; use {runtime.model.name!r}",
                param="model", code="model_not_found",
            )

    def check_limits(params: GenerationParams) -> None:
        with _as_bad_request():
            check_request(params, runtime.steps, settings)

    def submit(params: GenerationParams, on_preview=None, place: Place | None = None):
        """The engine's job for ``params``, or the 400, 429 or 503 that refuses it."""
        with _refused_for_room(), _as_bad_request():
            return runtime.engine.submit(params, settings.request_timeout_s, on_preview, place)

    @contextlib.contextmanager
    def _refused_for_room():
        """The engine's refusals for want of room as answers: 429 full, 503 shutting down."""
        try:
            yield
        except QueueFullError as exc:
            raise ApiError(
                429,
                str(exc),
                kind="rate_limit_error",
                headers={"Retry-After": str(exc.retry_after_s)},
            ) from exc
        except EngineClosedError as exc:
            raise ApiError(
                503, str(exc), kind="server_error", headers={"Retry-After": "5"}
            ) from exc

    async def serve(request: Request, params: GenerationParams,
                    place: Place | None = None) -> dict:
        """Submit, wait and answer: what generations and edits share once parsed."""
        started = time.monotonic()
        job = submit(params, place=place)
        try:
            images = await wait_for_images(job, request, settings.request_timeout_s)
        except ClientGone:
            # Nobody to answer; the engine drops the job at its next step boundary.
            return Response(status_code=499)
        except ShutdownError as exc:
            raise ApiError(
                503, str(exc), kind="server_error", headers={"Retry-After": "1"}
            ) from exc
        except (TimeoutError, JobTimeout) as exc:
            raise ApiError(504, "request timed out", kind="timeout_error") from exc
        except Exception as exc:
            log.exception("generation failed")
            raise ApiError(500, f"generation failed: {type(exc).__name__}") from exc
        try:
            encoded = await asyncio.to_thread(_png_base64, images, params, marked(), signer)
        except Exception as exc:
            log.exception("encoding the answer failed")
            raise ApiError(500, f"encoding the images failed: {type(exc).__name__}") from exc
        metrics.request_seconds.observe(time.monotonic() - started)
        return {
            "created": int(time.time()),
            "data": [{"b64_json": b, "revised_prompt": None} for b in encoded],
            "seed": params.seed,
        }

    def marked() -> dict | None:
        """What provenance records of the model and the server, or None when the PNGs carry
        none."""
        if not settings.provenance:
            return None
        return {"model": runtime.model.name, **provenance.levers(settings)}

    def stream(request: Request, params: GenerationParams, kind: str,
               place: Place | None = None) -> EventSourceResponse:
        """The answer as OpenAI streams images (streaming.py); refusals come first, plain."""
        previews = Previews()
        job = submit(params, previews.deliver, place)
        started = time.monotonic()

        def encode(image) -> str:
            return _png_base64([image], params, marked(), signer)[0]

        def encode_preview(image) -> str:
            # A rough estimate of the image, not the image: no provenance record and no
            # C2PA signature (with a timestamp authority, a round trip per preview).
            return _png_base64([image], params, None, None)[0]

        async def events():
            # Closed here, not whenever the collector gets to it: a client that left cancels
            # its job at once (image_events' finally), and frees its slot.
            async with contextlib.aclosing(image_events(
                    job, previews, params, kind, encode, settings.request_timeout_s,
                    encode_preview)) as stream_:
                async for event in stream_:
                    yield event
                    if event.event == f"{kind}.completed":
                        metrics.request_seconds.observe(time.monotonic() - started)
                    elif event.event == "error":  # counted 200 already: the stream had started
                        error = json.loads(event.data)["error"]
                        metrics.stream_errors.labels(type=error["type"]).inc()

        # At shutdown sse-starlette cancels open streams at once unless given a grace: the
        # drain is over when the last job is, but its PNG may still be encoding. As long as
        # uvicorn's own wait can be (shutdown.py: what is left of the drain deadline, plus
        # the flush), which ends it sooner once the stream is done.
        return JobStream(
            job, events(), ping=15, send_timeout=SEND_TIMEOUT_S,
            shutdown_grace_period=settings.drain_timeout_s + SHUTDOWN_FLUSH_S)

    @app.get("/v1/models")
    async def models():
        if runtime.model is None:
            return {"object": "list", "data": []}
        return {
            "object": "list",
            "data": [
                {
                    "id": runtime.model.name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "imagegen",
                    "family": runtime.model.family.value,
                }
            ],
        }

    @app.get("/healthz")
    async def healthz():
        # Unauthenticated, like every probe: the kind of failure only, not its text (local
        # paths, the model's repository); the log holds that.
        if runtime.error is not None:
            # A model that cannot load will not load on its own: let the kubelet restart us.
            return error_response(
                500, f"model failed to load ({type(runtime.error).__name__}; the server's "
                "log says why)", None, "server_error")
        if runtime.engine is not None and runtime.engine.fault is not None:
            # A stage thread is gone, or the device: nothing accepted would ever be
            # answered. Restart.
            dead = [s.name for s in runtime.engine.stages if s.died is not None]
            what = (f"the {', '.join(dead)} stage stopped working" if dead
                    else "the device failed")
            return error_response(500, f"{what} (the server's log says why)", None,
                                  "server_error")
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request):
        if not runtime.ready:
            return error_response(503, "not ready", None, "server_error")
        if signer is not None and await asyncio.to_thread(signer.check) is not None:
            # Out of service rather than failing each request after its GPU work; the API's
            # own refusal says why, not this open probe.
            return error_response(503, "the signing certificate cannot sign", None,
                                  "server_error")
        body = {"status": "ready", "model": runtime.model.name}
        if not authorized(request):
            # Open to the kubelet, like /healthz; the report (local paths, why a lever fell
            # back) only to callers the API itself would answer.
            return body
        if runtime.report is not None:
            body["optimizations"] = runtime.report.as_dict()
        body["startup_seconds"] = runtime.startup_seconds
        return body

    # A plain def: FastAPI runs it on its thread pool, so a scrape whose NVML reads hang (a
    # failing GPU) holds a thread, not the event loop that answers /healthz.
    @app.get("/metrics")
    def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


class TokenAndCount:
    """The bearer token check, before anything reads the body; and the generation counter.

    Counting here, outermost, includes the 401s the check itself answers.
    """

    def __init__(self, app, authorized, metrics):
        self.app = app
        self.authorized = authorized
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = COUNTED_ROUTES.get(scope["path"])
        counted = route is not None
        path = scope["path"]
        status = {}

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if path not in OPEN_PATHS and not self.authorized(Request(scope)):
                response = error_response(
                    401, "missing or wrong bearer token", "authorization", "authentication_error",
                    {"WWW-Authenticate": "Bearer"}, "invalid_api_key",
                )
                await response(scope, receive, send_and_note)
            else:
                await self.app(scope, receive, send_and_note if counted else send)
        except Exception:
            # A bug's 500 counts too: Starlette answers it, then raises on to the server.
            status.setdefault("code", 500)
            raise
        finally:
            if counted and "code" in status:
                self.metrics.requests.labels(route=route, status=str(status["code"])).inc()


class ClientGone(Exception):
    """The client closed its connection before the images were ready."""


async def wait_for_images(job, request: Request, timeout_s: float, poll_s: float = 0.25):
    """The job's images; cancels the job when the deadline passes or the client goes away.

    A cancelled job is dropped by the engine at its next stage or denoising step, which gives
    its batch rows and its admission slot back instead of finishing work nobody waits for.
    """
    future = asyncio.wrap_future(job.future)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            done, _ = await asyncio.wait({future}, timeout=min(poll_s, remaining))
            if done:
                return future.result()
            if await request.is_disconnected():
                raise ClientGone
    finally:
        if not job.future.done():
            job.future.cancel()


@contextlib.contextmanager
def _as_bad_request():
    """What the engine refuses (``InvalidRequest``) as OpenAI's 400, naming the field."""
    try:
        yield
    except InvalidRequest as exc:
        raise ApiError(400, str(exc), param=exc.field, code="invalid_value") from exc


def _png_base64(images, params: GenerationParams, made_with: dict | None,
                signer: provenance.ManifestSigner | None) -> list[str]:
    """Each image as base64 PNG; with ``made_with`` set (``marked``), carrying its provenance
    chunks; with a ``signer``, its signed C2PA manifest."""
    out = []
    for index, image in enumerate(images):
        record = None if made_with is None else provenance.parameters(params, made_with, index)
        parent = None if params.edit is None else params.edit.parent
        png = provenance.encode_png(image, record, signer, parent)
        out.append(base64.b64encode(png).decode("ascii"))
    return out


class ConfigError(ValueError):
    """A setting the server cannot start with; the message says which and why."""


class Token:
    """The bearer token: a fixed one, or a file's, read again when the file changes (a
    rotated Secret: the kubelet swaps the mounted file, and no restart is needed)."""

    def __init__(self, value: str | None = None, path: Path | None = None):
        self._value, self._path = value, path
        self._stamp: tuple[int, int, int] | None = None
        self._lock = threading.Lock()

    def current(self) -> str | None:
        """The token now; None while a rotated file cannot be read or is empty."""
        if self._path is None:
            return self._value
        try:
            info = self._path.stat()
            stamp = (info.st_ino, info.st_mtime_ns, info.st_size)
        except OSError:
            stamp = None
        with self._lock:
            if stamp != self._stamp or stamp is None:
                self._stamp = stamp
                had = self._value
                try:
                    self._value = self._path.read_text().strip() or None
                except OSError:
                    self._value = None
                if self._value is None and had is not None:  # once, not once a request
                    log.error("auth_token_file %s cannot be read or is empty: every request "
                              "is refused until it can", self._path)
            return self._value


def _read_token(settings: ServerSettings) -> Token | None:
    """The bearer token, or None when none is configured. Fails closed: a token file that is
    empty or unreadable stops the server instead of leaving the API open."""
    if settings.auth_token_file is not None:
        path = settings.auth_token_file
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"auth_token_file {path} cannot be read: {exc.strerror}") from exc
        if not token:
            raise ConfigError(f"auth_token_file {path} is empty: refusing to serve without auth")
        return Token(path=path)
    if settings.auth_token is not None:
        token = settings.auth_token.get_secret_value().strip()
        if not token:
            raise ConfigError("auth_token is set but empty: refusing to serve without auth")
        return Token(value=token)
    return None


def _read_signer(settings: ServerSettings) -> provenance.ManifestSigner | None:
    """The C2PA signer, or None without a certificate. Fails closed, as the token does: a
    certificate that cannot sign stops the server rather than serving unsigned images."""
    if settings.c2pa_cert_file is None:
        return None
    try:
        return provenance.ManifestSigner(settings.c2pa_cert_file, settings.c2pa_key_file,
                                         settings.c2pa_algorithm, settings.c2pa_timestamp_url)
    except provenance.SigningError as exc:
        raise ConfigError(f"c2pa_cert_file: {exc}") from exc
