"""Shared fixtures: tiny models built once per session, runtimes, diffusers references, and
the app behind a test client or a live server on 127.0.0.1."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient
from server_testlib import FAMILIES, free_port, tiny_settings

from imagegen_server.api import create_app
from imagegen_server.runtime import ModelRuntime
from imagegen_server.tiny import make_tiny_model

# Two shared cores: one intra-op thread per stage thread keeps the stages from fighting.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {family: make_tiny_model(root / family, family, seed=0) for family in FAMILIES}


@pytest.fixture(scope="session")
def reference_pipeline(tiny_models) -> Callable:
    """diffusers' own pipeline for a family, loaded fresh (none of the server's optimizations)."""
    from diffusers import DiffusionPipeline

    cache = {}

    def get(family: str):
        if family not in cache:
            pipe = DiffusionPipeline.from_pretrained(tiny_models[family], dtype=torch.float32)
            pipe.set_progress_bar_config(disable=True)
            cache[family] = pipe
        return cache[family]

    return get


@pytest.fixture
def make_runtime(tiny_models) -> Iterator[Callable[..., ModelRuntime]]:
    """Build and load runtimes; every one made is closed at the end of the test."""
    made: list[ModelRuntime] = []

    def make(family: str = "sd15", **overrides) -> ModelRuntime:
        runtime = ModelRuntime(tiny_settings(tiny_models[family], **overrides)).load()
        made.append(runtime)
        return runtime

    yield make
    for runtime in made:
        runtime.close(timeout=30)


@pytest.fixture
def compile_cache(request, monkeypatch) -> Iterator[str]:
    """An inductor cache dir for compiled runtimes, kept between runs (pytest's cache), so
    only a first run pays for compilation. The server sets process-wide state for it, which
    is put back for whatever test runs next."""
    import os

    for name in ("TORCHINDUCTOR_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE",
                 "TORCHINDUCTOR_AUTOGRAD_CACHE", "TRITON_CACHE_DIR"):
        monkeypatch.setenv(name, os.environ.get(name, ""))
    dynamo = torch._dynamo.config
    precompile = dynamo.caching_precompile
    yield str(request.config.cache.mkdir("imagegen-inductor"))
    dynamo.caching_precompile = precompile
    # Dynamo learns which dimensions vary (its profile-guided dynamic shapes) per code object,
    # in this process: what one test's shapes taught it must not spare the next a recompile.
    torch._dynamo.reset()


@pytest.fixture
def client_for(make_runtime):
    clients = []

    def make(**overrides) -> TestClient:
        runtime = make_runtime("sd15", **overrides)
        client = TestClient(create_app(runtime.settings, runtime))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def serve_live() -> Iterator[Callable[[ModelRuntime], str]]:
    """Serve a runtime's app with uvicorn on 127.0.0.1; returns its base URL."""
    servers = []

    def serve(runtime: ModelRuntime) -> str:
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(
            create_app(runtime.settings, runtime), host="127.0.0.1", port=port,
            log_level="warning",
        ))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.started
        return f"http://127.0.0.1:{port}"

    yield serve
    for server, thread in servers:
        server.should_exit = True
        thread.join(30)


@pytest.fixture
def live_server(make_runtime, serve_live, tmp_path):
    """The sd15 tiny model behind a bearer token ("client-token"), on a real socket."""
    token_file = tmp_path / "token"
    token_file.write_text("client-token")
    runtime = make_runtime("sd15", auth_token_file=str(token_file), max_batch_size=2)
    return serve_live(runtime), runtime


@pytest.fixture
def references(reference_pipeline):
    """diffusers' edit pipelines for a family, built from the components of its text one (and
    the text one itself, for a request without an image)."""
    import diffusers

    classes = {"sd15": ("StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"),
               "sdxl": ("StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")}
    built = {}

    def reference(runtime, params, family="sd15"):
        if family not in built:
            components = reference_pipeline(family).components
            built[family] = [getattr(diffusers, name)(**components) for name in classes[family]]
            for pipe in built[family]:
                pipe.set_progress_bar_config(disable=True)
        img2img, inpaint = built[family]
        if params.edit is None:
            chosen = reference_pipeline(family)
        else:
            chosen = img2img if params.edit.mask is None else inpaint
        return chosen(**runtime.steps.reference_kwargs(params)).images

    return reference
