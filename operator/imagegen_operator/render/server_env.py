"""The inference server's configuration, as the Deployment's environment.

The variable names and value spellings come from the server's own settings
model (``imagegen_server.config.ServerSettings``): a renamed or retyped setting
fails here, at render time and in the unit tests, instead of in a pod. Values
are validated by that model too, read from the spec only: the environment of
the process that renders is never consulted, so output is reproducible.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from imagegen_operator.api import ImageGenService
from imagegen_operator.render.common import server_port, value
from imagegen_server.config import ServerSettings

# Where the Deployment mounts things the settings point at.
MODEL_PVC_ROOT = "/mnt/models"
MODEL_GCS_ROOT = "/mnt/gcs"
HF_CACHE_DIR = "/var/cache/imagegen/huggingface"
COMPILE_CACHE_DIR = "/var/cache/imagegen/compile"
AUTH_TOKEN_DIR = "/var/run/secrets/imagegen"
AUTH_TOKEN_FILE = f"{AUTH_TOKEN_DIR}/token"
C2PA_DIR = "/var/run/secrets/imagegen-c2pa"
HF_TOKEN_DIR = "/var/run/secrets/imagegen-hf"
HF_TOKEN_FILE = f"{HF_TOKEN_DIR}/token"

# Shutdown: the kubelet runs the preStop pause first, so the pod leaves the Service's
# endpoints before the server hears SIGTERM; the server then drains for DRAIN_TIMEOUT_S (new
# requests 503, accepted ones finish or are cancelled at the deadline) and writes its last
# answers. The Deployment's grace period holds all of it (render/deployment.py).
PRESTOP_PAUSE_S = 5
DRAIN_TIMEOUT_S = 120


class _SpecOnlySettings(ServerSettings):
    """ServerSettings validated from explicit values only, never from os.environ."""

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, *args, **kwargs):
        return (init_settings,)


def settings_values(resource: ImageGenService) -> dict[str, Any]:
    """ServerSettings field -> value, derived from spec.model, spec.pipeline and spec.server."""
    spec = resource.spec
    model, pipeline = spec.model, spec.pipeline
    compile_, stages, defaults = pipeline.compile, pipeline.stages, pipeline.defaults
    values: dict[str, Any] = {
        "model": model.uri,
        "family": value(model.family),
        "dtype": value(model.dtype),
        "device": "cuda",
        "port": server_port(resource),
        "pvc_root": MODEL_PVC_ROOT,
        "gcs_root": MODEL_GCS_ROOT,
        "hf_cache_dir": HF_CACHE_DIR,
        "compile_enabled": compile_.enabled,
        "attention": value(pipeline.attention),
        "stage_mode": value(stages.mode),
        "batching": value(stages.batching),
        "max_batch_size": stages.max_batch_size,
        "batch_window_ms": stages.batch_window_ms,
        "queue_capacity": stages.queue_capacity,
        "default_steps": defaults.steps,
        "default_guidance_scale": defaults.guidance_scale,
        "default_width": defaults.width,
        "default_height": defaults.height,
        "drain_timeout_s": DRAIN_TIMEOUT_S,
        "max_steps": pipeline.limits.max_steps,
        "max_images_per_request": pipeline.limits.max_images_per_request,
        "provenance": spec.server.provenance.metadata,
    }
    if pipeline.limits.max_pixels is not None:
        values["max_pixels"] = pipeline.limits.max_pixels
    if pipeline.limits.sizes is not None:
        values["allowed_sizes"] = pipeline.limits.sizes
    if compile_.enabled:
        values["compile_mode"] = value(compile_.mode)
        values["compile_regional"] = compile_.regional
        if compile_.aot:
            values["compile_aot"] = True
        if compile_.cache is not None:
            values["compile_cache_dir"] = COMPILE_CACHE_DIR
            if compile_.precompile_job:
                # The Job writes the cache (precompile.py); the serving pods, which take
                # uploads from the network, only load from it.
                values["compile_cache_read_only"] = True
    if model.quantization != "None":
        values["quantization"] = model.quantization
    if pipeline.cache.method != "None":
        values["cache"] = pipeline.cache.method
        values["cache_threshold"] = pipeline.cache.threshold
        values["cache_interval"] = pipeline.cache.interval
    if model.loras:
        values["loras"] = [{"name": lora.name, "uri": lora.uri, "scale": lora.scale}
                           for lora in model.loras]
    if spec.server.provenance.signing_secret_ref is not None:
        values["c2pa_cert_file"] = f"{C2PA_DIR}/tls.crt"
        values["c2pa_key_file"] = f"{C2PA_DIR}/tls.key"
        values["c2pa_algorithm"] = spec.server.provenance.signing_algorithm.lower()
    if spec.server.auth_secret_ref is not None:
        values["auth_token_file"] = AUTH_TOKEN_FILE
    if model.token_secret_ref is not None:
        values["hf_token_file"] = HF_TOKEN_FILE
    if spec.server.log_format == "JSON":
        values["log_format"] = "json"
    return values


def settings_problem(resource: ImageGenService) -> str | None:
    """Why the server would refuse the settings this spec gives it, or None. The API's own
    rules should have said it first; this keeps a gap between the two a condition on the
    service instead of a reconcile that fails for ever (and a pod that never loads)."""
    try:
        _SpecOnlySettings(**settings_values(resource))
    except ValidationError as exc:
        return "the inference server would refuse its settings: " + "; ".join(
            ": ".join(filter(None, (".".join(map(str, e["loc"])),
                                    e["msg"].removeprefix("Value error, "))))
            for e in exc.errors())
    return None


def server_env(resource: ImageGenService) -> list[dict[str, str]]:
    """The container's env entries for the server settings, sorted by name."""
    settings = _SpecOnlySettings(**settings_values(resource))
    return [{"name": k, "value": v} for k, v in sorted(settings.to_env(only_set=True).items())]
