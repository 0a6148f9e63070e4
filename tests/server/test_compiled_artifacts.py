"""Compiled artifacts: a start saves them per key, the next start loads them and compiles
nothing, and its images are the same. Each start is its own process, as a pod's is."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import diffusers
import numpy as np
import pytest
import torch
from server_testlib import start_process as start
from server_testlib import volume_state

from imagegen_server.compiled_artifacts import artifact_key, cpu_features, key_parts
from imagegen_server.config import ServerSettings


@pytest.mark.slow
@pytest.mark.parametrize("precompile", [False, True])
def test_a_second_start_loads_the_artifacts_and_draws_the_same(tiny_models, tmp_path, precompile):
    cache = tmp_path / "cache"
    settings = {"model": str(tiny_models["sd15"]), "device": "cpu", "dtype": "float32",
                "default_steps": 2, "compile_enabled": True, "compile_mode": "default",
                "compile_cache_dir": str(cache), "channels_last": False,
                "allowed_sizes": ["96x64"], "max_batch_size": 2,
                "compile_precompile": precompile}
    cold = start(settings, tmp_path / "cold.npy")
    assert cold["artifacts"] == "saved" and cold["traced"] > 0
    bundle = cache / "artifacts" / f"{cold['key']}.bin"
    assert bundle.stat().st_size > 0
    described = json.loads(bundle.with_suffix(".json").read_text())
    assert described["sizes"] == ["64x64", "96x64"] and described["most_rows"] == 8

    warm = start(settings, tmp_path / "warm.npy")
    assert warm["key"] == cold["key"]
    assert warm["artifacts"] == "loaded"
    if precompile:
        # dynamo's traced code came from the bundle: warm-up traced no graph at all.
        assert warm["traced"] == 0
    else:
        # dynamo traced again; what inductor made of the graphs came from the bundle.
        assert warm["traced"] == cold["traced"] > 0
    assert warm["recompiles"] == 0
    cold_image = np.load(tmp_path / "cold.npy").astype(int)
    warm_image = np.load(tmp_path / "warm.npy").astype(int)
    assert np.abs(cold_image - warm_image).max() <= 1
    if not precompile:
        # A serving pod whose precompile Job writes the volume: it loads, and writes nothing
        # there (no inductor cache, no mark of use).
        before = volume_state(cache)
        read = start({**settings, "compile_cache_read_only": True}, tmp_path / "read.npy")
        assert (read["key"], read["artifacts"], read["recompiles"]) == (cold["key"], "loaded", 0)
        assert volume_state(cache) == before
        read_image = np.load(tmp_path / "read.npy").astype(int)
        assert np.abs(read_image - warm_image).max() <= 1


def test_the_key_changes_with_what_the_compiled_code_depends_on(make_runtime, tmp_path):
    runtime = make_runtime("sd15", warmup=False)
    steps, dtype = runtime.steps, runtime.model.dtype
    base = {"model": runtime.settings.model, "device": "cpu", "dtype": "float32",
            "compile_enabled": True, "compile_cache_dir": str(tmp_path)}

    def key(**changes) -> str:
        return artifact_key(key_parts(steps, ServerSettings(**base, **changes), dtype))

    assert key() == key()
    # CPU code is vectorized for this CPU's instruction set: another one gets another key.
    parts = key_parts(steps, ServerSettings(**base), dtype)
    # Inductor's CPU code is built with -march=native: every feature flag counts.
    assert parts["cpu_capability"] == [torch.backends.cpu.get_cpu_capability(), cpu_features()]
    assert cpu_features() != hashlib.sha256(b"").hexdigest()[:16]  # flags were read
    # The denoiser's code is diffusers': an ahead-of-time package holds its trace.
    assert parts["diffusers"] == diffusers.__version__
    # The order a size list is written in compiles nothing else.
    assert key(allowed_sizes=["96x64", "64x96"]) == key(allowed_sizes=["64x96", "96x64"])
    # The weights are not in the key: a retrained model of the same shape reuses its code.
    changed = [key(compile_mode="max-autotune"), key(compile_regional=False),
               key(allowed_sizes=["96x64"]), key(max_batch_size=8), key(channels_last=False),
               key(loras=[{"name": "ink", "uri": "/x.safetensors"}]), key(attention="Math")]
    assert len({key(), *changed}) == 1 + len(changed)


def test_a_volume_that_refuses_the_bundle_or_holds_a_broken_index_only_costs_a_head_start(
        make_runtime, tmp_path, monkeypatch, caplog):
    """A full or read-only volume, or an index cut short by a node that died mid-write: the
    start compiles and serves, and says why it saved or loaded nothing."""
    from imagegen_server.aot_denoiser import AotDenoiser
    from imagegen_server.compiled_artifacts import CompiledArtifacts

    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"compiled", None))
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    assert CompiledArtifacts(blocked / "bundle.bin", {}).save() == 0
    assert "not saved" in caplog.text

    runtime = make_runtime("sd15", warmup=False)
    settings = runtime.settings.model_copy(update={
        "compile_enabled": True, "compile_aot": True, "compile_cache_dir": tmp_path / "cache"})
    aot = AotDenoiser.for_server(runtime.steps, settings, runtime.model.dtype)
    aot.directory.mkdir(parents=True)
    (aot.directory / f"{aot.key}.json").write_text("")  # empty: cut short
    aot.load()
    assert aot.packages == {} and "unreadable, compiling instead" in caplog.text


def test_precompile_needs_compile_and_a_cache_dir_and_names_what_is_missing(tiny_models, capsys):
    from imagegen_server.cli import main

    assert main(["precompile", "--model", str(tiny_models["sd15"]), "--compile"]) == 2
    message = capsys.readouterr().err
    assert "IMAGEGEN_COMPILE_CACHE_DIR (--compile-cache-dir)" in message
    assert "IMAGEGEN_COMPILE_ENABLED" not in message


@pytest.mark.slow
def test_precompile_saves_the_artifacts_a_server_start_then_loads(tiny_models, tmp_path):
    cache = tmp_path / "cache"
    flags = ["--model", str(tiny_models["sd15"]), "--device", "cpu", "--dtype", "float32",
             "--default-steps", "2", "--compile", "--compile-mode", "default",
             "--compile-cache-dir", str(cache), "--torch-threads", "1"]
    done = subprocess.run([sys.executable, "-m", "imagegen_server", "precompile", *flags],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["artifacts"] == "saved" and report["startup_seconds"]["warmup"] > 0
    assert (cache / "artifacts" / f"{report['key']}.bin").is_file()
    settings = {"model": str(tiny_models["sd15"]), "device": "cpu", "dtype": "float32",
                "default_steps": 2, "compile_enabled": True, "compile_mode": "default",
                "compile_cache_dir": str(cache)}
    served = start(settings, tmp_path / "image.npy")
    assert (served["artifacts"], served["key"]) == ("loaded", report["key"])


def test_a_cache_volume_that_cannot_take_a_compile_is_named_and_left_out_of_the_start(
        make_runtime, compile_cache, tmp_path, caplog):
    """A full or read-only volume would fail the compile mid-way: the start compiles in its
    own scratch space instead, and says why."""
    import os

    from imagegen_server import cache_volume

    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    assert "cannot write to" in cache_volume.unusable(blocked / "cache")
    full = cache_volume.unusable(tmp_path, min_free=1 << 60)
    assert full is not None and "MiB free, less than the" in full
    assert cache_volume.unusable(tmp_path) is None
    assert [p.name for p in tmp_path.iterdir()] == ["not-a-folder"]  # the check left nothing

    runtime = make_runtime("sd15", warmup=False, compile_enabled=True,
                           compile_cache_dir=blocked / "cache")
    report = runtime.report
    assert report.compiled and report.compile_cache_skipped.startswith("cannot write to")
    assert report.compile_artifacts is None and report.compile_cache_dir is None
    # Read for what it holds (here nothing), written nothing.
    assert report.compile_cache_read == str(blocked / "cache")
    assert runtime.settings.compile_cache_dir is None
    assert str(blocked) not in os.environ.get("TORCHINDUCTOR_CACHE_DIR", "")
    assert "compile cache not written" in caplog.text


def test_precompile_refuses_a_cache_volume_it_could_not_save_to(tiny_models, tmp_path, capsys):
    from imagegen_server.cli import main

    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    flags = ["--model", str(tiny_models["sd15"]), "--compile", "--compile-cache-dir",
             str(blocked / "cache")]
    assert main(["precompile", *flags]) == 1
    assert f"cannot write to {blocked / 'cache'}" in capsys.readouterr().err
    # Nor one it is told to leave as it is.
    flags = ["--model", str(tiny_models["sd15"]), "--compile", "--compile-cache-dir",
             str(tmp_path / "cache")]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("IMAGEGEN_COMPILE_CACHE_READ_ONLY", "true")
        assert main(["precompile", *flags]) == 2
    assert "IMAGEGEN_COMPILE_CACHE_READ_ONLY off" in capsys.readouterr().err


def test_a_start_removes_other_keys_unused_for_the_retention_and_marks_its_own(
        make_runtime, compile_cache, tmp_path):
    """An upgrade changes the key (the torch version is in it): the old key's files go once
    no start has used them for compile_cache_retention_days; the current key's stay."""
    import os
    import time

    cache = tmp_path / "cache"
    settings = {"warmup": False, "compile_enabled": True, "compile_cache_dir": cache}
    first = make_runtime("sd15", **settings).report
    key = first.compile_artifacts_key
    assert first.compile_artifacts is None  # no warm-up: nothing compiled, nothing saved
    month_ago = time.time() - 31 * 86400
    files = {"artifacts": [f"{key}.bin", "0ld.bin", "0ld.json", "recent.bin"],
             "aot": ["0ld-4x32x32.pt2", "0ld.json"]}
    for sub, names in files.items():
        (cache / sub).mkdir(parents=True, exist_ok=True)
        for name in names:
            path = cache / sub / name
            path.write_bytes(b"x")
            if name != "recent.bin":
                os.utime(path, (month_ago, month_ago))

    make_runtime("sd15", **settings)
    left = {f"{p.parent.name}/{p.name}" for p in cache.glob("*/*") if p.is_file()}
    assert left == {"artifacts/recent.bin", f"artifacts/{key}.bin"}
    assert (cache / "artifacts" / f"{key}.bin").stat().st_mtime > month_ago + 86400  # used now

    for name in ("0ld.bin", "older.bin"):
        path = cache / "artifacts" / name
        path.write_bytes(b"x")
        os.utime(path, (month_ago, month_ago))
    make_runtime("sd15", **settings, compile_cache_retention_days=0)  # 0 keeps them all
    assert (cache / "artifacts" / "older.bin").is_file()


def test_a_serving_key_stays_marked_as_used_however_long_the_server_runs(tmp_path):
    """Pruning goes by the marks alone: a server up for longer than the retention marks its
    key again while it serves, so another service's start does not remove its files."""
    import os
    import time

    from imagegen_server.cache_volume import KeepMarked, prune

    (tmp_path / "aot").mkdir()
    mine = tmp_path / "aot" / "mine-4x32x32.pt2"
    mine.write_bytes(b"x")
    month_ago = time.time() - 31 * 86400
    os.utime(mine, (month_ago, month_ago))
    marks = KeepMarked(tmp_path, "mine", every_s=0.05)
    try:
        deadline = time.monotonic() + 30
        while mine.stat().st_mtime < month_ago + 86400 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        marks.stop()
    assert prune(tmp_path, keep="another", days=30) == []
    assert mine.is_file()


def test_a_write_cut_short_leaves_a_partial_file_that_goes_within_the_hour(tmp_path,
                                                                           monkeypatch):
    """A start killed mid-write (its startup probe, the OOM killer) leaves the partial
    bundle: named as such, and removed an hour later whatever the retention, where it
    would otherwise fill the volume for a month."""
    import os
    import time

    from imagegen_server import compiled_artifacts
    from imagegen_server.cache_volume import PARTIAL_PREFIX, prune

    target = tmp_path / "artifacts" / "k.bin"
    target.parent.mkdir()

    seen = []

    def killed(fd):
        seen.extend(p.name for p in target.parent.iterdir())  # as a kill would leave it
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        compiled_artifacts.write_atomically(target, b"x" * 1000)
    monkeypatch.undo()
    assert len(seen) == 1 and seen[0].startswith(PARTIAL_PREFIX) and not target.exists()
    left = target.parent / seen[0]  # what a real kill leaves behind
    left.write_bytes(b"x")
    fresh = target.parent / f"{PARTIAL_PREFIX}def"
    fresh.write_bytes(b"x")
    two_hours_ago = time.time() - 7200
    os.utime(left, (two_hours_ago, two_hours_ago))
    assert prune(tmp_path, keep="k", days=0) == [f"artifacts/{left.name}"]
    assert fresh.is_file()
