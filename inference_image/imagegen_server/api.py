"""HTTP routes: the OpenAI Images API plus health, readiness and metrics.

Errors follow OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with
``param`` naming the offending field.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import re
import time
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictStr,
    ValidationError,
    field_validator,
)
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from . import provenance
from .config import ServerSettings
from .engine import EngineClosedError, InvalidRequest, QueueFullError, ShutdownError
from .request import EditInput, GenerationParams, JobTimeout
from .runtime import ModelRuntime
from .uploads import UploadError, edit_image, edit_mask, open_image

log = logging.getLogger(__name__)

GENERATIONS_PATH = "/v1/images/generations"
EDITS_PATH = "/v1/images/edits"
# The routes whose answers imagegen_requests_total counts, by its route label.
COUNTED_ROUTES = {GENERATIONS_PATH: "generations", EDITS_PATH: "edits"}


SIZE = re.compile(r"^([1-9][0-9]{0,4})x([1-9][0-9]{0,4})$")
# A number, strictly: "7" is not one, nor NaN or infinity; 7 is 7.0.
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]


class LoraChoice(BaseModel):
    """One LoRA adapter a request asks for: a name the service declared, and its scale
    (the declared scale when left out)."""

    model_config = ConfigDict(extra="forbid")

    name: StrictStr
    scale: Number | None = None


class _ImageRequest(BaseModel):
    """What generations and edits share: OpenAI's fields plus seed, steps, guidance_scale,
    negative_prompt and lora; the size grammar; inline PNG answers.

    Only types and the size grammar are checked here; every limit (how many images, pixels,
    steps) is the engine's ``check_request``, so each has one message. A JSON body is read
    strictly (``"2"`` is no number); a form's values are text and are read as such.
    """

    # OpenAI clients send fields this server has no use for (quality, style, user): ignore them.
    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(min_length=1)
    model: str | None = None
    # null means "the default" for the optional OpenAI fields, as OpenAI itself treats them.
    n: int | None = 1
    size: str | None = None
    response_format: str | None = "b64_json"
    output_format: str | None = None
    background: str | None = None
    stream: bool | None = None
    partial_images: int | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    steps: int | None = None
    guidance_scale: float | None = Field(default=None, allow_inf_nan=False)
    negative_prompt: str | None = None
    lora: list[LoraChoice] | None = Field(default=None, max_length=16)

    @field_validator("size", check_fields=False)
    @classmethod
    def _size_grammar(cls, value: str | None) -> str | None:
        if value is None or SIZE.match(value):
            return value
        if value == "auto":
            raise ValueError(
                "size 'auto' is not supported here: give WIDTHxHEIGHT in pixels, such as "
                "'512x512', or leave size out for the default size"
            )
        raise ValueError(f"size {value!r} is not WIDTHxHEIGHT in pixels, such as '512x512'")

    @field_validator("response_format", check_fields=False)
    @classmethod
    def _inline_only(cls, value: str | None) -> str | None:
        if value not in (None, "b64_json"):
            raise ValueError(
                f"response_format {value!r} is not supported: this server returns images "
                "inline, as 'b64_json', and hosts no URLs"
            )
        return value

    @field_validator("output_format", check_fields=False)
    @classmethod
    def _png_only(cls, value: str | None) -> str | None:
        if value not in (None, "png"):
            raise ValueError(f"output_format {value!r} is not supported: this server returns PNG")
        return value

    @field_validator("background", check_fields=False)
    @classmethod
    def _opaque_only(cls, value: str | None) -> str | None:
        if value == "transparent":
            raise ValueError("background 'transparent' is not supported: the images are opaque")
        return value



class ImageGenerationRequest(_ImageRequest):
    """OpenAI's ``images.generate`` body, with the extensions; validated strictly."""


class ImageEditForm(_ImageRequest):
    """The text fields of OpenAI's ``images.edit`` form, with the extensions and strength."""

    # diffusers' defaults: 0.8 for image-to-image, 1.0 (repaint fully) under a mask.
    strength: float | None = Field(default=None, allow_inf_nan=False)

    # A form field holds text: the same list as on generations, as JSON.
    @field_validator("lora", mode="before")
    @classmethod
    def _lora_json(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return json.loads(value)
        except ValueError:
            raise ValueError(
                'lora must be a JSON list such as [{"name": "ink", "scale": 0.8}]'
            ) from None


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        kind: str = "",
        code: str | None = None,
        headers=None,
    ):
        super().__init__(message)
        self.status = status
        self.param = param
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")
        self.code = code
        self.headers = headers or {}


def error_response(
    status: int, message: str, param: str | None, kind: str, headers=None, code: str | None = None
):
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# pydantic's error types -> OpenAI-style codes.
VALIDATION_CODES = {"missing": "missing_required_parameter", "value_error": "invalid_value"}


def validation_error(exc: ValidationError) -> ApiError:
    """The first problem of a body, as OpenAI reports it: 400, the field, a sentence."""
    first = exc.errors(include_url=False)[0]
    loc = [str(part) for part in first.get("loc", ())]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    message = first.get("msg", "invalid value")
    if kind == "value_error":
        message = str(first.get("ctx", {}).get("error", message))
    elif kind == "model_type":
        message = "the request body must be a JSON object"
    elif param:
        message = f"{param}: {message}"
    code = VALIDATION_CODES.get(kind, "invalid_type" if kind.endswith("_type") else "invalid_value")
    return ApiError(400, message, param=param, code=code)


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, or a 413 once it is known to be larger than ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body is larger than {limit} bytes", code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:  # a body without a length, or one that lied about it
            raise ApiError(413, f"request body is larger than {limit} bytes", code="body_too_large")
    return bytes(body)


def _require_media_type(request: Request, expected: str) -> None:
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != expected:
        raise ApiError(
            415,
            f"Content-Type must be {expected}, not {content_type or 'missing'!r}",
            code="unsupported_media_type",
        )


async def read_json_body(request: Request, limit: int) -> Any:
    """The body as JSON, or the error a client should see: 415, 413 or 400."""
    _require_media_type(request, "application/json")
    body = await read_body(request, limit)
    try:
        return json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ApiError(400, "request body is not valid UTF-8", code="invalid_json") from exc
    except RecursionError as exc:
        raise ApiError(400, "request body is nested too deeply", code="invalid_json") from exc
    except ValueError as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from exc


# A form has a few text fields and at most these files (image and mask).
FORM_FILES = ("image", "mask")


async def read_form(request: Request, limit: int) -> tuple[dict[str, str], dict[str, bytes]]:
    """A multipart form's text fields and files, within ``limit`` bytes in all: 415, 413, 400.

    A file field sent twice (OpenAI's client sends a list of images as ``image[]``) is a 400:
    an edit starts from one image.
    """
    _require_media_type(request, "multipart/form-data")
    body = await read_body(request, limit)

    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(
            max_files=len(FORM_FILES), max_fields=64, max_part_size=limit
        )
    except (StarletteHTTPException, MultiPartException) as exc:
        detail = getattr(exc, "detail", None) or getattr(exc, "message", str(exc))
        raise ApiError(400, f"request body is not a valid multipart form: {detail}",
                       code="invalid_form") from exc
    try:
        fields: dict[str, str] = {}
        files: dict[str, bytes] = {}
        for key, value in form.multi_items():
            name = key.removesuffix("[]")
            if name in fields or name in files:
                raise ApiError(400, f"{name} is given more than once: send one", param=name,
                               code="invalid_value")
            if isinstance(value, str):
                if name in FORM_FILES:
                    raise ApiError(400, f"{name} must be a file upload, not a text field",
                                   param=name, code="invalid_type")
                fields[name] = value
            elif name in FORM_FILES:
                files[name] = await value.read()
            else:
                raise ApiError(400, f"{name} is a file; only {' and '.join(FORM_FILES)} are",
                               param=name, code="invalid_type")
        return fields, files
    finally:
        await form.close()


# How long a finished stream waits for a preview still being made before the final image.
PREVIEW_WAIT_S = 2.0
# OpenAI's completed events carry token usage; a diffusion model counts no tokens.
NO_TOKENS = {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
             "output_tokens": 0, "total_tokens": 0}


def streamed_previews(body: _ImageRequest) -> int:
    """How many previews a request streams; a streamed request makes one image."""
    if not body.stream:
        return 0  # partial_images without stream: ignored, as OpenAI ignores it
    if body.n not in (None, 1):
        raise ApiError(400, f"a streamed request makes one image: n must be 1, not {body.n}",
                       param="n", code="invalid_value")
    return body.partial_images or 0


def stream_error(exc: BaseException) -> ServerSentEvent:
    """An error once the stream has started: an ``error`` event in OpenAI's error shape,
    which the openai client raises as an APIError."""
    if isinstance(exc, JobTimeout | TimeoutError):
        error = {"message": "request timed out", "type": "timeout_error"}
    elif isinstance(exc, ShutdownError):
        error = {"message": str(exc), "type": "server_error"}
    else:
        log.error("streamed generation failed: %r", exc)
        error = {"message": f"generation failed: {type(exc).__name__}", "type": "server_error"}
    return ServerSentEvent(json.dumps({"error": {**error, "param": None, "code": None}}),
                           event="error")


def parse(model: type[BaseModel], raw: Any, *, strict: bool = False):
    """A body validated by ``model``, or the 400 naming its first bad field."""
    try:
        return model.model_validate(raw, strict=strict)
    except ValidationError as exc:
        raise validation_error(exc) from exc


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    if size is None:
        return None, None
    width, height = (int(v) for v in size.split("x"))
    return width, height


def decode_uploads(files: dict[str, bytes], max_pixels: int):
    """The edit's RGB image and grayscale mask (None without one), checked and decoded."""
    image = open_image(files["image"], "image", max_pixels)
    mask = None
    if "mask" in files:
        mask = edit_mask(open_image(files["mask"], "mask", max_pixels), image)
    return edit_image(image), mask


def create_app(settings: ServerSettings, runtime: ModelRuntime | None = None) -> FastAPI:
    """The ASGI app. Without ``runtime`` the model loads in the background at startup."""
    runtime = runtime or ModelRuntime(settings)
    metrics = runtime.metrics
    token = _read_token(settings)
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

    app = FastAPI(title="imagegen-server", lifespan=lifespan)
    app.state.runtime = runtime

    def authorized(request: Request) -> bool:
        if token is None:
            return True
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        # Constant-time, so the comparison does not tell how much of a guess was right.
        return scheme.lower() == "bearer" and hmac.compare_digest(given.encode(), token.encode())

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError):
        return error_response(exc.status, str(exc), exc.param, exc.kind, exc.headers, exc.code)

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
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": ImageGenerationRequest.model_json_schema()}},
            }
        },
    )
    async def generate(request: Request):
        raw = await read_json_body(request, settings.max_body_bytes)
        body = parse(ImageGenerationRequest, raw, strict=True)
        check_served(body.model)
        params = params_of(body, parse_size(body.size))
        return await answer(request, params, "image_generation", body.stream)

    @app.post(
        EDITS_PATH,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"multipart/form-data": {"schema": ImageEditForm.model_json_schema()}},
            }
        },
    )
    async def edit(request: Request):
        fields, files = await read_form(request, settings.max_upload_bytes)
        body = parse(ImageEditForm, fields)
        if "image" not in files:
            raise ApiError(400, "image is required: the picture to edit, as a file",
                           param="image", code="missing_required_parameter")
        check_served(body.model)
        try:
            image, mask = await asyncio.to_thread(
                decode_uploads, files, settings.max_upload_pixels
            )
        except UploadError as exc:
            raise ApiError(400, str(exc), param=exc.field, code="invalid_image") from exc
        size = parse_size(body.size)
        if size[0] is None:
            # The image's own size, down to what the model can make (diffusers does the same).
            multiple = runtime.steps.size_multiple
            size = tuple(side - side % multiple for side in image.size)
        strength = body.strength if body.strength is not None else (0.8 if mask is None else 1.0)
        params = params_of(body, size, EditInput(image, strength, mask))
        return await answer(request, params, "image_edit", body.stream)

    def params_of(body: _ImageRequest, size: tuple[int | None, int | None],
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
                     streamed: bool | None):
        """A stream of events when the request asked for one, else one JSON answer."""
        if streamed:
            return stream(request, params, kind)
        return await serve(request, params)

    def check_served(name: str | None) -> None:
        """503 until the model is ready; 404 when ``name`` (a request's ``model``) is another."""
        if not runtime.ready:
            raise ApiError(
                503, "model is not ready", kind="server_error", headers={"Retry-After": "5"}
            )
        if name not in (None, runtime.model.name):
            raise ApiError(
                404, f"model {name!r} is not served here; use {runtime.model.name!r}",
                param="model", code="model_not_found",
            )

    def submit(params: GenerationParams, on_preview=None):
        """The engine's job for ``params``, or the 400, 429 or 503 that refuses it."""
        try:
            return runtime.engine.submit(params, settings.request_timeout_s, on_preview)
        except InvalidRequest as exc:
            raise ApiError(400, str(exc), param=exc.field, code="invalid_value") from exc
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

    async def serve(request: Request, params: GenerationParams) -> dict:
        """Submit, wait and answer: what generations and edits share once parsed."""
        started = time.monotonic()
        job = submit(params)
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
        encoded = await asyncio.to_thread(_png_base64, images, params, marked(), signer)
        metrics.request_seconds.observe(time.monotonic() - started)
        return {
            "created": int(time.time()),
            "data": [{"b64_json": b, "revised_prompt": None} for b in encoded],
            "seed": params.seed,
        }

    def marked() -> str | None:
        """The model name provenance records, or None when the PNGs carry none."""
        return runtime.model.name if settings.provenance else None

    def stream(request: Request, params: GenerationParams, kind: str) -> EventSourceResponse:
        """Server-sent events as OpenAI streams images: ``{kind}.partial_image`` for each
        preview as it is made, then ``{kind}.completed`` with the final image. Refusals
        (400, 429, 503) come before the stream starts, as plain errors."""
        loop = asyncio.get_running_loop()
        previews: asyncio.Queue = asyncio.Queue()

        def deliver(index: int, images: list) -> None:  # on the preview thread
            loop.call_soon_threadsafe(previews.put_nowait, (index, images))

        job = submit(params, deliver)
        started = time.monotonic()

        async def event(name: str, image, **fields) -> ServerSentEvent:
            (b64,) = await asyncio.to_thread(_png_base64, [image], params, marked(), signer)
            body = {"type": f"{kind}.{name}", "b64_json": b64, "created_at": int(time.time()),
                    "size": f"{params.width}x{params.height}", "quality": "auto",
                    "background": "opaque", "output_format": "png", **fields}
            return ServerSentEvent(json.dumps(body), event=body["type"])

        async def events():
            future = asyncio.wrap_future(job.future)
            deadline = started + settings.request_timeout_s
            sent = 0
            try:
                while not future.done():
                    waiting = asyncio.ensure_future(previews.get())
                    done, _ = await asyncio.wait(
                        {future, waiting}, timeout=max(0.0, deadline - time.monotonic()),
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    if waiting in done:
                        index, images = waiting.result()
                        sent += 1
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
                # Previews the denoise loop handed over before it finished come first, in
                # order; the preview thread may still be making the last of them.
                handed = job.preview.handed if job.preview is not None else 0
                while sent < handed:
                    try:
                        index, preview = await asyncio.wait_for(previews.get(), PREVIEW_WAIT_S)
                    except TimeoutError:
                        break  # a preview that failed; the image does not wait for it
                    sent += 1
                    yield await event("partial_image", preview[0], partial_image_index=index)
                yield await event("completed", images[0], usage=NO_TOKENS)
                metrics.request_seconds.observe(time.monotonic() - started)
            except TimeoutError:
                yield stream_error(JobTimeout("request timed out"))
            finally:
                # A client that left (sse-starlette cancels this generator) frees the work.
                if not job.future.done():
                    job.future.cancel()

        return EventSourceResponse(events(), ping=15)

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
        if runtime.error is not None:
            # A model that cannot load will not load on its own: let the kubelet restart us.
            return error_response(
                500, f"model failed to load: {runtime.error}", None, "server_error"
            )
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if not runtime.ready:
            return error_response(503, "not ready", None, "server_error")
        body = {"status": "ready", "model": runtime.model.name}
        if runtime.report is not None:
            body["optimizations"] = runtime.report.as_dict()
        return body

    @app.get("/metrics")
    async def prometheus_metrics():
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

        if path.startswith("/v1/") and not self.authorized(Request(scope)):
            response = error_response(
                401, "missing or wrong bearer token", "authorization", "authentication_error",
                {"WWW-Authenticate": "Bearer"}, "invalid_api_key",
            )
            await response(scope, receive, send_and_note)
        else:
            await self.app(scope, receive, send_and_note if counted else send)
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


def _png_base64(images, params: GenerationParams, model: str | None,
                signer: provenance.ManifestSigner | None) -> list[str]:
    """Each image as base64 PNG; with ``model`` set, carrying its provenance chunks; with a
    ``signer``, its signed C2PA manifest."""
    out = []
    for index, image in enumerate(images):
        record = None if model is None else provenance.parameters(params, model, index)
        png = provenance.encode_png(image, record, signer)
        out.append(base64.b64encode(png).decode("ascii"))
    return out


class ConfigError(ValueError):
    """A setting the server cannot start with; the message says which and why."""


def _read_token(settings: ServerSettings) -> str | None:
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
        return token
    if settings.auth_token is not None:
        token = settings.auth_token.get_secret_value().strip()
        if not token:
            raise ConfigError("auth_token is set but empty: refusing to serve without auth")
        return token
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
