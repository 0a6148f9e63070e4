"""Shared fixtures: tiny models built once per session, runtimes and diffusers references."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from server_testlib import FAMILIES, tiny_settings

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
