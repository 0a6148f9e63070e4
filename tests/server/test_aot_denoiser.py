"""The denoiser compiled ahead of time (AOTInductor): a start compiles one package per admitted
size, the next start loads them and traces nothing, and both draw what the eager denoiser
draws. The packages hold no weights: another checkpoint of the same architecture reuses them
and draws its own images. Each start is its own process, as a pod's is."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
from pydantic import ValidationError
from server_testlib import assert_same_arithmetic, tiny_settings, volume_state
from server_testlib import start_process as start

from imagegen_server.config import ServerSettings
from imagegen_server.runtime import ModelRuntime
from imagegen_server.tiny import make_tiny_model


def images(settings: dict, **params) -> np.ndarray:
    """One request's images through a runtime in this process."""
    runtime = ModelRuntime(ServerSettings(**settings)).load()
    try:
        got = runtime.engine.generate(runtime.params("a lighthouse", **params), timeout_s=300)
        return np.stack([np.asarray(image) for image in got]).astype(int)
    finally:
        runtime.close(timeout=30)


def eager_image(settings: dict) -> np.ndarray:
    """START's request through the same settings without compile."""
    return images({**settings, "compile_enabled": False, "compile_aot": False}, seed=3)[0]


@pytest.mark.slow
def test_packages_compiled_once_serve_later_starts_and_other_weights(tiny_models, tmp_path):
    cache = tmp_path / "cache"
    settings = {"model": str(tiny_models["sd15"]), "device": "cpu", "dtype": "float32",
                "default_steps": 2, "compile_enabled": True, "compile_aot": True,
                "compile_cache_dir": str(cache), "allowed_sizes": ["96x64"], "max_pixels": 96 * 64,
                "max_batch_size": 2}
    cold = start(settings, tmp_path / "cold.npy")
    assert cold["artifacts"] == "saved" and "aot_compile" in cold["startup"]
    # One package per admitted size (64x64 and 96x64: latents 32x32 and 32x48), and an index.
    packages = sorted(p.name.split("-")[1] for p in (cache / "aot").glob("*.pt2"))
    assert packages == ["4x32x32.pt2", "4x32x48.pt2"]
    index = json.loads((cache / "aot" / f"{cold['key']}.json").read_text())
    assert index["parts"]["sizes"] == ["64x64", "96x64"] and index["complete"] is True

    warm = start(settings, tmp_path / "warm.npy")
    assert warm["key"] == cold["key"] and warm["artifacts"] == "loaded"
    assert "aot_compile" not in warm["startup"] and "aot_load" in warm["startup"]
    assert warm["traced"] == 0 and warm["recompiles"] == 0
    before = volume_state(cache)  # a serving pod that only reads the volume: loads, writes none
    read = start({**settings, "compile_cache_read_only": True}, tmp_path / "read.npy")
    assert (read["key"], read["artifacts"], read["recompiles"]) == (cold["key"], "loaded", 0)
    assert volume_state(cache) == before
    cold_image, warm_image = (np.load(tmp_path / f"{n}.npy").astype(int) for n in ("cold", "warm"))
    assert_same_arithmetic(cold_image, warm_image)
    assert_same_arithmetic(warm_image, eager_image(settings))

    # Warm-up ran each package at 2 rows; the rows dimension is dynamic: 1 row (no guidance)
    # and 8 (4 images with classifier-free guidance) draw what eager draws.
    eager = {**settings, "compile_enabled": False, "compile_aot": False}
    for rows in ({"n": 1, "guidance_scale": 0.0}, {"n": 4, "guidance_scale": 5.0}):
        got = images(settings, seed=5, width=96, height=64, **rows)
        assert_same_arithmetic(got, images(eager, seed=5, width=96, height=64, **rows))

    # Other weights, the same architecture: the same key, the packages loaded, and the image
    # is this checkpoint's own, not the first one's.
    other = {**settings, "model": str(make_tiny_model(tmp_path / "other", "sd15", seed=1))}
    reused = start(other, tmp_path / "other.npy")
    assert reused["key"] == cold["key"] and reused["artifacts"] == "loaded"
    other_image = np.load(tmp_path / "other.npy").astype(int)
    assert_same_arithmetic(other_image, eager_image(other))
    assert np.abs(other_image - warm_image).max() > 10


@pytest.mark.parametrize(("complete", "warms_up"), [(True, False), (False, True)])
def test_a_complete_index_is_enough_when_sizes_share_an_input_shape(tmp_path, monkeypatch,
                                                                    complete, warms_up):
    # Flux's 768x1344 and 1344x768 make one token count, so one package for two sizes: a
    # complete index with every package loaded needs no eager warm-up at the next start.
    from imagegen_server import aot_denoiser

    aot = aot_denoiser.AotDenoiser(module=None, directory=tmp_path, parts={"sizes": 2},
                                   most_rows=2, inductor_configs={})
    (tmp_path / f"{aot.key}.json").write_text(json.dumps(
        {"parts": aot.parts, "signatures": [[4032, 64]], "complete": complete}))
    aot.packages[(4032, 64)] = object()
    ran = []
    monkeypatch.setattr(aot_denoiser, "admitted_sizes", lambda steps, settings: ["a", "b"])
    monkeypatch.setattr(aot_denoiser, "warm_up", lambda steps, settings: ran.append(1))
    monkeypatch.setattr(aot, "capture", contextlib.nullcontext)
    monkeypatch.setattr(aot, "build", lambda: None)
    aot.compile_missing(steps=None, settings=None)
    assert bool(ran) is warms_up


def test_a_package_from_other_denoiser_code_is_not_loaded(tmp_path, caplog):
    """A package holds the trace of the code it was compiled from (a diffusers release): one
    whose weights differ in names or shapes from this denoiser's is compiled anew, not run."""
    import torch

    from imagegen_server import aot_denoiser

    module = torch.nn.Sequential(torch.nn.Linear(4, 4))
    aot = aot_denoiser.AotDenoiser(module=module, directory=tmp_path, parts={},
                                   most_rows=2, inductor_configs={})
    same = {name: aot_denoiser._layout(t) for name, t in aot._weights().items()}
    renamed = {k.replace("0.", "proj."): v for k, v in same.items()}
    reshaped = {**same, "module.0.weight": [[4, 8], "torch.float32"]}
    for i, weights in enumerate((renamed, reshaped)):
        signature = (4, i)
        (tmp_path / f"{aot.key}.json").write_text(json.dumps(
            {"parts": {}, "signatures": [signature], "complete": True}))
        package = tmp_path / aot._name(signature)
        package.write_bytes(b"not reached")
        package.with_suffix(".json").write_text(json.dumps({"constants": {}, "weights": weights}))
        aot.load()
        assert aot.packages == {}
    assert caplog.text.count("weights differ in names or shapes") == 2


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"compile_enabled": False}, "compile_enabled false"),
        ({"quantization": "Int8WeightOnly"}, "quantization Int8WeightOnly"),
        ({"cache": "FirstBlockCache"}, "cache FirstBlockCache"),
        ({"loras": [{"name": "ink", "uri": "/x.safetensors"}]}, "loras"),
    ],
)
def test_aot_with_what_changes_the_denoisers_graph_is_refused_by_the_settings(
    tiny_models, overrides, named
):
    settings = {"compile_enabled": True, "compile_aot": True, **overrides}
    with pytest.raises(ValidationError, match=f"compile_aot does not go with {named}"):
        tiny_settings(tiny_models["sd15"], **settings)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_transformer_denoiser_compiled_ahead_of_time_draws_what_eager_draws(
    tiny_models, family
):
    # No cache dir: the packages live in a scratch directory for this runtime only.
    settings = {"model": str(tiny_models[family]), "device": "cpu", "dtype": "float32",
                "default_steps": 2, "compile_enabled": True, "compile_aot": True}
    runtime = ModelRuntime(ServerSettings(**settings)).load()
    try:
        assert runtime.report.compile_artifacts is None  # compiled, and nowhere to save it
        assert "AOTInductor" in runtime.report.compiled[0]
        got = [np.asarray(image).astype(int) for image in runtime.engine.generate(
            runtime.params("a lighthouse", seed=3, n=3), timeout_s=300)]
    finally:
        runtime.close(timeout=30)
    want = images({**settings, "compile_enabled": False, "compile_aot": False}, seed=3, n=3)
    assert_same_arithmetic(np.stack(got), want)


@pytest.mark.slow
def test_a_volume_that_refuses_the_packages_costs_the_next_start_not_this_one(
        tiny_models, tmp_path, monkeypatch, caplog):
    """The volume passes the start's check, then fills up: the package is served from local
    scratch and no index names what the volume does not hold."""
    import errno

    from imagegen_server import aot_denoiser

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(aot_denoiser, "write_atomically", full)
    cache = tmp_path / "cache"
    settings = {"model": str(tiny_models["sd15"]), "device": "cpu", "dtype": "float32",
                "default_steps": 2, "compile_enabled": True, "compile_aot": True,
                "compile_cache_dir": str(cache)}
    runtime = ModelRuntime(ServerSettings(**settings)).load()
    try:
        assert runtime.report.compile_artifacts is None
        assert "served from local scratch: [Errno 28]" in caplog.text
        got = runtime.engine.generate(runtime.params("a lighthouse", seed=3), timeout_s=300)
    finally:
        runtime.close(timeout=30)
    assert list((cache / "aot").iterdir()) == []
    assert_same_arithmetic(np.asarray(got[0]).astype(int), eager_image(settings))
