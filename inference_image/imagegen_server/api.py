"""HTTP routes: the OpenAI Images API plus health, readiness and metrics.

Errors follow OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with
``param`` naming the offending field.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import logging
import time
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from .config import ServerSettings
from .engine import EngineClosedError, InvalidRequest, QueueFullError
from .request import JobTimeout
from .runtime import ModelRuntime

log = logging.getLogger(__name__)

GENERATIONS_PATH = "/v1/images/generations"


class ImageGenerationRequest(BaseModel):
    """OpenAI's ``images.generate`` body plus seed, steps, guidance_scale and negative_prompt."""

    # OpenAI clients send fields this server has no use for (quality, style, user): ignore them.
    model_config = ConfigDict(extra="ignore")

    prompt: StrictStr = Field(min_length=1)
    model: StrictStr | None = None
    # null means "the default" for the optional OpenAI fields, as OpenAI itself treats them.
    n: StrictInt | None = Field(default=1, ge=1, le=64)
    size: StrictStr | None = Field(default=None, pattern=r"^[0-9]{2,4}x[0-9]{2,4}$")
    response_format: Literal["b64_json"] | None = "b64_json"
    seed: StrictInt | None = Field(default=None, ge=0, le=2**63 - 1)
    steps: StrictInt | None = Field(default=None, ge=1, le=200)
    guidance_scale: float | None = Field(default=None, ge=0, le=100)
    negative_prompt: StrictStr | None = None


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, *, param: str | None = None, kind: str = "", headers=None
    ):
        super().__init__(message)
        self.status = status
        self.param = param
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}


def error_response(status: int, message: str, param: str | None, kind: str, headers=None):
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(settings: ServerSettings, runtime: ModelRuntime | None = None) -> FastAPI:
    """The ASGI app. Without ``runtime`` the model loads in the background at startup."""
    runtime = runtime or ModelRuntime(settings)
    metrics = runtime.metrics
    token = _read_token(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if runtime.engine is None and runtime.error is None:
            runtime.load_in_background()
        yield
        # uvicorn runs this after SIGTERM once in-flight HTTP requests are answered; whatever
        # was accepted but is still queued inside the engine finishes here.
        drained = await asyncio.to_thread(runtime.close, settings.drain_timeout_s)
        log.info("shutdown: %s", "drained" if drained else "drain timed out")

    app = FastAPI(title="imagegen-server", lifespan=lifespan)
    app.state.runtime = runtime

    def require_token(request: Request) -> None:
        if token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
            raise ApiError(
                401,
                "missing or wrong bearer token",
                param="authorization",
                kind="authentication_error",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError):
        return error_response(exc.status, str(exc), exc.param, exc.kind, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        # A JSON syntax error's location is a character offset, not a field.
        param = "body" if first.get("type") == "json_invalid" else ".".join(loc) or "body"
        return error_response(422, f"{param}: {first.get('msg')}", param, "invalid_request_error")

    @app.middleware("http")
    async def count_generations(request: Request, call_next):
        # Only the generation route is counted: probes and scrapes would drown the signal.
        if request.url.path != GENERATIONS_PATH:
            return await call_next(request)
        response = await call_next(request)
        metrics.requests.labels(status=str(response.status_code)).inc()
        return response

    @app.post(GENERATIONS_PATH, dependencies=[Depends(require_token)])
    async def generate(body: ImageGenerationRequest):
        if not runtime.ready:
            raise ApiError(
                503, "model is not ready", kind="server_error", headers={"Retry-After": "5"}
            )
        model = runtime.model
        if body.model not in (None, model.name):
            raise ApiError(
                404, f"model {body.model!r} is not served here; use {model.name!r}", param="model"
            )
        width = height = None
        if body.size is not None:
            width, height = (int(v) for v in body.size.split("x"))
        params = runtime.params(
            body.prompt,
            n=body.n or 1,
            width=width,
            height=height,
            steps=body.steps,
            guidance_scale=body.guidance_scale,
            seed=body.seed,
            negative_prompt=body.negative_prompt,
        )
        started = time.monotonic()
        try:
            job = runtime.engine.submit(params, settings.request_timeout_s)
        except InvalidRequest as exc:
            raise ApiError(422, f"{exc.field}: {exc}", param=exc.field) from exc
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
        try:
            images = await asyncio.wait_for(
                asyncio.wrap_future(job.future), settings.request_timeout_s
            )
        except (TimeoutError, JobTimeout) as exc:
            job.future.cancel()
            raise ApiError(504, "request timed out", kind="timeout_error") from exc
        except Exception as exc:
            log.exception("generation failed")
            raise ApiError(500, f"generation failed: {type(exc).__name__}") from exc
        encoded = await asyncio.to_thread(_png_base64, images)
        metrics.request_seconds.observe(time.monotonic() - started)
        return {
            "created": int(time.time()),
            "data": [{"b64_json": b, "revised_prompt": None} for b in encoded],
            "seed": params.seed,
        }

    @app.get("/v1/models", dependencies=[Depends(require_token)])
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


def _png_base64(images) -> list[str]:
    out = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        out.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return out


def _read_token(settings: ServerSettings) -> str | None:
    if settings.auth_token_file is not None:
        return settings.auth_token_file.read_text().strip() or None
    if settings.auth_token is not None:
        return settings.auth_token.get_secret_value() or None
    return None
