"""Settings: env names the operator renders, parsing, and no torch at import time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from imagegen_server.config import Attention, ServerSettings, StageMode, env_var_name

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("field", "env"),
    [
        ("max_batch_size", "IMAGEGEN_MAX_BATCH_SIZE"),
        ("model", "IMAGEGEN_MODEL"),
        ("compile_cache_dir", "IMAGEGEN_COMPILE_CACHE_DIR"),
        ("stage_mode", "IMAGEGEN_STAGE_MODE"),
        ("auth_token_file", "IMAGEGEN_AUTH_TOKEN_FILE"),
    ],
)
def test_env_var_name(field, env):
    assert env_var_name(field) == env


def test_env_var_name_rejects_unknown_field():
    with pytest.raises(KeyError, match="no_such_field"):
        env_var_name("no_such_field")


def test_settings_read_from_environment(monkeypatch):
    monkeypatch.setenv("IMAGEGEN_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("IMAGEGEN_STAGE_MODE", "Stacked")
    monkeypatch.setenv("IMAGEGEN_ATTENTION", "Flash")
    monkeypatch.setenv("IMAGEGEN_COMPILE_ENABLED", "true")
    s = ServerSettings()
    assert (s.max_batch_size, s.stage_mode, s.attention, s.compile_enabled) == (
        8,
        StageMode.STACKED,
        Attention.FLASH,
        True,
    )


def test_to_env_round_trips(monkeypatch):
    original = ServerSettings(
        model="gs://b/m",
        max_batch_size=2,
        attention="Math",
        compile_enabled=True,
        default_width=512,
    )
    env = original.to_env()
    assert env["IMAGEGEN_ATTENTION"] == "Math"
    assert env["IMAGEGEN_COMPILE_ENABLED"] == "true"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert ServerSettings() == original


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_batch_size", 0),
        ("max_batch_size", 65),
        ("default_width", 100),
        ("attention", "Fast"),
        ("dtype", "int8"),
        ("device", "tpu"),
        ("compile_mode", "fastest"),
        ("log_level", "trace"),  # uvicorn's, not logging's
        ("log_level", "warn"),  # logging's, not uvicorn's
    ],
)
def test_bad_settings_name_the_field(field, value):
    with pytest.raises(ValidationError) as info:
        ServerSettings(**{field: value})
    assert field in str(info.value)


def test_the_command_line_refuses_a_setting_out_of_range_by_name(monkeypatch, capsys):
    from imagegen_server.cli import main

    assert ServerSettings(log_level="DEBUG").log_level == "debug"
    assert main(["serve", "--model", "/nowhere", "--log-level", "trace"]) == 2
    assert "log_level (--log-level or IMAGEGEN_LOG_LEVEL)" in capsys.readouterr().err
    monkeypatch.setenv("IMAGEGEN_PORT", "0")
    assert main(["--model", "/nowhere"]) == 2
    err = capsys.readouterr().err
    assert "port (--port or IMAGEGEN_PORT)" in err and "Traceback" not in err
    monkeypatch.delenv("IMAGEGEN_PORT")
    # A setting with no flag of its own, one whose flag is named otherwise, and a rule
    # between two settings, whose message names both.
    monkeypatch.setenv("IMAGEGEN_MAX_PIXELS", "-1")
    assert main(["--model", "/nowhere"]) == 2
    assert "max_pixels (IMAGEGEN_MAX_PIXELS): " in capsys.readouterr().err
    monkeypatch.delenv("IMAGEGEN_MAX_PIXELS")
    monkeypatch.setenv("IMAGEGEN_COMPILE_ENABLED", "maybe")
    assert main(["--model", "/nowhere"]) == 2
    assert "compile_enabled (--compile or IMAGEGEN_COMPILE_ENABLED): " in capsys.readouterr().err
    monkeypatch.delenv("IMAGEGEN_COMPILE_ENABLED")
    assert main(["--model", "/nowhere", "--batching", "Step", "--stage-mode", "Stacked"]) == 2
    assert capsys.readouterr().err.startswith("imagegen-server: Value error, batching Step")


def test_config_imports_without_torch():
    code = "import sys, imagegen_server.config; assert 'torch' not in sys.modules, 'torch imported'"
    env = {**os.environ, "PYTHONPATH": str(REPO / "inference_image")}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("family", "dtype", "upcast"),
    [("SDXL", "float16", True), ("SD15", "float16", False), ("SD3", "float16", False),
     ("Flux", "float16", False), ("SDXL", "bfloat16", False), ("SDXL", "float32", False)],
)
def test_the_vae_runs_in_float32_where_diffusers_own_pipeline_upcasts_it(family, dtype, upcast):
    # Only SDXL's pipelines read force_upcast; the others decode in the dtype they loaded.
    from types import SimpleNamespace

    import torch

    from imagegen_server.config import Family
    from imagegen_server.loading import upcasts_vae

    vae = SimpleNamespace(config=SimpleNamespace(force_upcast=True))
    assert upcasts_vae(Family(family), getattr(torch, dtype), vae) is upcast


def test_the_readme_names_every_flag_of_imagegen_server_and_no_other():
    import re

    from imagegen_server.cli import serve_parser

    readme = (Path(__file__).parents[2] / "inference_image" / "README.md").read_text()
    section = readme.split("## Settings", 1)[1].split("| variable |", 1)[0]
    named = set(re.findall(r"`--(?:\[no-\])?([a-z-]+)`", section))
    flags = {option.lstrip("-").removeprefix("no-")
             for action in serve_parser()._actions for option in action.option_strings}
    assert named == flags - {"h", "help"}
