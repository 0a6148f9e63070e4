"""``imagegen-server``: serve a model, or write a tiny one.

    imagegen-server --model DIR [--host H] [--port P] [...]      (or: imagegen-server serve ...)
    imagegen-server make-tiny-model DIR [--family sd15|sdxl|sd3|flux] [--size tiny|small] [--seed N]
    imagegen-server make-tiny-model DIR --lora-for MODEL_DIR [--rank R] [--seed N]
    imagegen-server bench --model DIR [--requests N] [--concurrency C] [serve flags...]
    imagegen-server precompile --model DIR --compile --compile-cache-dir DIR [serve flags...]

Every serve flag has an ``IMAGEGEN_*`` environment variable (see config.py); flags win.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence

from pydantic import ValidationError

from .config import (
    ENV_PREFIX,
    Attention,
    Batching,
    DType,
    Family,
    ServerSettings,
    StageMode,
)

# flag -> settings field, for the flags whose names differ only by dashes
SERVE_FLAGS: dict[str, dict] = {
    "model": {"help": "model directory or URI (file://, pvc://, gs://, hf://)"},
    "host": {},
    "port": {"type": int},
    "family": {"choices": [f.value for f in Family]},
    "dtype": {"choices": [d.value for d in DType]},
    "device": {"help": "auto, cpu, cuda or cuda:N"},
    "stage_mode": {"choices": [m.value for m in StageMode]},
    "batching": {"choices": [b.value for b in Batching]},
    "max_batch_size": {"type": int},
    "batch_window_ms": {"type": float},
    "queue_capacity": {"type": int},
    "attention": {"choices": [a.value for a in Attention]},
    "compile_mode": {},
    "compile_cache_dir": {},
    "default_steps": {"type": int},
    "default_width": {"type": int},
    "default_height": {"type": int},
    "request_timeout_s": {"type": float},
    "drain_timeout_s": {"type": float},
    "auth_token_file": {},
    "torch_threads": {"type": int},
    "log_level": {},
    "log_format": {"choices": ["text", "json"]},
}


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imagegen-server", description="Serve a diffusers model over the OpenAI Images API."
    )
    for field, options in SERVE_FLAGS.items():
        parser.add_argument("--" + field.replace("_", "-"), dest=field, default=None, **options)
    parser.add_argument(
        "--compile", dest="compile_enabled", action=argparse.BooleanOptionalAction, default=None
    )
    parser.add_argument(
        "--warmup", dest="warmup", action=argparse.BooleanOptionalAction, default=None
    )
    parser.add_argument(
        "--precompile", dest="compile_precompile", action=argparse.BooleanOptionalAction,
        default=None,
    )
    parser.add_argument(
        "--aot", dest="compile_aot", action=argparse.BooleanOptionalAction, default=None,
        help="with --compile: AOTInductor packages instead of torch.compile",
    )
    return parser


def tiny_parser() -> argparse.ArgumentParser:
    from .tiny import FAMILIES, SIZES

    parser = argparse.ArgumentParser(
        prog="imagegen-server make-tiny-model",
        description="Write a tiny random-weight pipeline that diffusers' from_pretrained loads.",
    )
    parser.add_argument("directory")
    parser.add_argument("--family", choices=FAMILIES, default="sd15")
    parser.add_argument(
        "--size", choices=SIZES, default="tiny", help="small: ~1M-parameter denoiser at 128x128"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--lora-for", metavar="MODEL_DIR",
        help="write a random LoRA adapter for the model at MODEL_DIR into DIRECTORY instead",
    )
    parser.add_argument("--rank", type=int, default=4, help="the LoRA's rank (with --lora-for)")
    return parser


def bench(argv: Sequence[str]) -> int:
    import json

    from .benchmark import run_benchmark

    parser = serve_parser()
    parser.prog = "imagegen-server bench"
    parser.description = "Load a model and measure the engine's throughput and latency."
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    load = {k: vars(args).pop(k) for k in ("requests", "concurrency", "steps")}
    settings = settings_from_args(args)
    logging.basicConfig(level=settings.log_level.upper())
    print(json.dumps(run_benchmark(settings, **load), indent=2))
    return 0


def precompile(argv: Sequence[str]) -> int:
    """Compile every admitted shape once and save the artifacts for this key, then exit:
    what a Job runs before a Deployment's replicas start, so each of them starts warm."""
    import json

    from . import cache_volume
    from .runtime import ModelRuntime

    parser = serve_parser()
    parser.prog = "imagegen-server precompile"
    parser.description = precompile.__doc__.splitlines()[0]
    settings = settings_from_args(parser.parse_args(argv))
    logging.basicConfig(level=settings.log_level.upper())
    needed = {
        "IMAGEGEN_COMPILE_ENABLED (--compile)": settings.compile_enabled,
        "IMAGEGEN_COMPILE_CACHE_DIR (--compile-cache-dir)": settings.compile_cache_dir is not None,
        "IMAGEGEN_WARMUP (--warmup)": settings.warmup,
        # What it is for is to write the cache.
        "IMAGEGEN_COMPILE_CACHE_READ_ONLY off": not settings.compile_cache_read_only,
    }
    missing = [name for name, given in needed.items() if not given]
    if missing:
        print(f"imagegen-server precompile: needs {' and '.join(missing)}", file=sys.stderr)
        return 2
    unusable = cache_volume.unusable(settings.compile_cache_dir)
    if unusable is not None:  # before minutes of compiling that could not be saved
        print(f"imagegen-server precompile: {unusable}", file=sys.stderr)
        return 1
    runtime = ModelRuntime(settings).load()
    try:
        report = runtime.report
        if report.compile_artifacts not in ("saved", "loaded"):
            # Compiled, but nothing a replica could load was saved: the Job has failed.
            why = report.compile_cache_skipped or "the cache volume refused the write (logged)"
            print(f"imagegen-server precompile: nothing saved: {why}", file=sys.stderr)
            return 1
        print(json.dumps({
            "key": report.compile_artifacts_key,
            "artifacts": report.compile_artifacts,
            "startup_seconds": runtime.startup_seconds,
        }))
    finally:
        runtime.close(timeout=30)
    return 0


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    given = {k: v for k, v in vars(args).items() if v is not None}
    return ServerSettings(**given)


# Asked every few seconds by the kubelet's probes and Prometheus: about twenty access lines a
# minute a pod that say nothing, unless the answer is an error.
QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class QuietProbes(logging.Filter):
    """Drops uvicorn's access lines of probes and scrapes answered without an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        # uvicorn's access record: (client, method, path with query, HTTP version, status).
        if not isinstance(args, tuple) or len(args) != 5:
            return True
        path, status = str(args[2]).split("?", 1)[0], args[4]
        return not (path in QUIET_PATHS and isinstance(status, int) and status < 400)


class JsonLines(logging.Formatter):
    """One JSON object a line, with the fields Cloud Logging reads: ``severity``, ``message``
    (a traceback within it), ``time``; and the logger's name."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message = f"{message}\n{self.formatException(record.exc_info)}"
        return json.dumps({
            "severity": record.levelname,
            "message": message,
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{record.msecs:03.0f}Z",
            "logger": record.name,
        })


JsonLines.converter = time.gmtime  # the "Z" above


def configure_logging(settings: ServerSettings) -> dict | None:
    """The root logger as the settings ask; returns uvicorn's log_config: its own for text,
    None for JSON (its loggers then go to the root's handler, in JSON too)."""
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if settings.log_format == "text":
        import uvicorn.config

        return uvicorn.config.LOGGING_CONFIG
    _every_handler_in_json()
    return None  # uvicorn still sets its loggers' levels from log_level


def _every_handler_in_json() -> None:
    """torch, diffusers and transformers write through handlers of their own, set up as they
    are imported: those too, or their lines would be plain ones among the JSON. Warnings go
    through logging; progress bars (written straight to the terminal) are off."""
    import torch  # noqa: F401  (its handlers are made at import)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.get_logger(library.__name__.split(".")[0])  # its handler, made now
        library.disable_progress_bar()
    logging.captureWarnings(True)
    loggers = [logging.getLogger(), *(logger for logger in logging.root.manager.loggerDict.values()
                                      if isinstance(logger, logging.Logger))]
    for logger in loggers:
        for handler in logger.handlers:
            handler.setFormatter(JsonLines())


def serve(argv: Sequence[str]) -> int:
    settings = settings_from_args(serve_parser().parse_args(argv))
    log_config = configure_logging(settings)
    import uvicorn

    from .api import ConfigError, create_app
    from .config import SHUTDOWN_FLUSH_S
    from .shutdown import DrainingServer

    try:
        app = create_app(settings)
    except ConfigError as exc:
        print(f"imagegen-server: {exc}", file=sys.stderr)
        return 2
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        log_config=log_config,
        # The drain is over when uvicorn is told to exit: this is only for the last answers.
        timeout_graceful_shutdown=SHUTDOWN_FLUSH_S,
    )
    # After uvicorn's Config, which sets up its loggers.
    logging.getLogger("uvicorn.access").addFilter(QuietProbes())
    DrainingServer(config, app.state.runtime, settings.drain_timeout_s).run()
    return 0


def make_tiny(argv: Sequence[str]) -> int:
    from .tiny import make_tiny_lora, make_tiny_model

    args = tiny_parser().parse_args(argv)
    if args.lora_for:
        path = make_tiny_lora(args.directory, args.lora_for, seed=args.seed, rank=args.rank)
    else:
        path = make_tiny_model(args.directory, args.family, seed=args.seed, size=args.size)
    print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = {"make-tiny-model": make_tiny, "bench": bench, "precompile": precompile,
               "serve": serve}.get(argv[0] if argv else "")
    if command is None:
        command, argv = serve, ["serve", *argv]
    try:
        return command(argv[1:])
    except ValidationError as exc:  # a flag or an IMAGEGEN_ variable out of its range
        for error in exc.errors(include_url=False):
            print(f"imagegen-server: {_named(error['loc'])}{error['msg']}", file=sys.stderr)
        return 2


def _named(loc: tuple) -> str:
    """A setting as a user gives it: its flag, where it has one, and its variable."""
    if not loc:
        return ""  # a rule between settings: its message names them
    field = str(loc[0])
    flags = [option for action in serve_parser()._actions if action.dest == field
             for option in action.option_strings if option.startswith("--")]
    given = " or ".join([*flags[:1], f"{ENV_PREFIX}{field.upper()}"])
    return f"{'.'.join(str(part) for part in loc)} ({given}): "


if __name__ == "__main__":
    sys.exit(main())
