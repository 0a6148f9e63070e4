"""Helpers shared by the server tests (a unique module name: tests/ has no packages)."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from imagegen_server.config import ServerSettings

FAMILIES = ("sd15", "sdxl", "sd3", "flux")
STEPS = 3


def mean_abs_diff(a, b) -> float:
    """Mean absolute pixel difference, in units of 1/255."""
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean())


def max_level_diff(a, b) -> int:
    """The largest per-pixel difference, in levels of 255."""
    return int(np.abs(np.asarray(a, dtype=np.int64) - np.asarray(b, dtype=np.int64)).max())


def assert_same_arithmetic(got, want, levels: int = 2) -> None:
    """The same computation in another order (compiled code, another CPU kernel level): a
    pixel may round a level or two apart, the image as a whole does not move."""
    assert max_level_diff(got, want) <= levels, max_level_diff(got, want)
    assert mean_abs_diff(got, want) < 0.05, mean_abs_diff(got, want)


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The engines the equality tests run through: the two stage modes, and the Pipelined one with
# step-level batching in its denoise stage.
MODES = {
    "Pipelined": {"stage_mode": "Pipelined"},
    "Stacked": {"stage_mode": "Stacked"},
    "Step": {"stage_mode": "Pipelined", "batching": "Step"},
}


def tiny_settings(model, **overrides) -> ServerSettings:
    values = {
        "model": str(model),
        "dtype": "float32",
        "device": "cpu",
        "default_steps": STEPS,
        "default_guidance_scale": 5.0,
        "batch_window_ms": 2,
        # The tiny models' native size is 64x64 (Flux's pipeline says 256x256 whatever its
        # weights: named here, as a service's spec names it); the tests also ask for a few
        # larger sizes.
        "default_width": 64,
        "default_height": 64,
        "max_pixels": 128 * 128,
    }
    values.update(overrides)
    return ServerSettings(**values)


def wait_until(condition, timeout_s: float = 30.0) -> None:
    """Poll ``condition`` until it holds; fail, rather than hang, after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.005)


def count_calls(module):
    """A forward hook that counts a module's calls; returns a function reading the count."""
    calls = [0]

    def hook(*_):
        calls[0] += 1

    module.register_forward_hook(hook)
    return lambda: calls[0]


def source_image(size: int = 64, seed: int = 7) -> Image.Image:
    """A picture with structure (a gradient and a square), not flat noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    rgb = np.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size], axis=-1)
    rgb[size // 4 : size // 2, size // 4 : size // 2] = rng.integers(0, 255, 3)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def left_half_mask(size: int = 64) -> Image.Image:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[:, : size // 2] = 255
    return Image.fromarray(mask, "L")


class Gate:
    """Holds the denoiser's ``at``-th call (counted from now) until ``release``."""

    def __init__(self, runtime, at: int = 1, hold_s: float | None = None):
        pipe = runtime.steps.pipeline
        denoiser = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer
        self.calls = 0
        self.at = at
        self.hold_s = hold_s
        self.entered = threading.Event()
        self.released = threading.Event()
        self._handle = denoiser.register_forward_pre_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1
        if self.calls == self.at:
            self.entered.set()
            if self.hold_s is not None:
                time.sleep(self.hold_s)
            else:
                assert self.released.wait(60), "the test never released the gate"

    def close(self) -> None:
        self.released.set()
        self._handle.remove()


# One server start in a process of its own, as a pod's: load, warm up (saving or loading what
# it compiled), one image; prints what it saw.
START = """
import json, sys
import numpy as np
import torch
from torch._dynamo.utils import counters
from imagegen_server.config import ServerSettings
from imagegen_server.runtime import ModelRuntime

torch.set_num_threads(1)
settings = ServerSettings(**json.loads(sys.argv[1]))
runtime = ModelRuntime(settings).load()
traced = int(counters["stats"]["unique_graphs"])
image = runtime.engine.generate(runtime.params("a lighthouse", seed=3), timeout_s=300)[0]
np.save(sys.argv[2], np.asarray(image))
print(json.dumps({"artifacts": runtime.report.compile_artifacts,
                  "key": runtime.report.compile_artifacts_key, "traced": traced,
                  "recompiles": runtime.metrics.recompiles.since_ready,
                  "startup": runtime.startup_seconds}))
runtime.close(timeout=30)
"""


def volume_state(directory) -> dict:
    """Every file and folder under ``directory``: its modification time and size."""
    return {str(p.relative_to(directory)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in Path(directory).rglob("*")}


def start_process(settings: dict, image_path) -> dict:
    """Run START with ``settings``; its image goes to ``image_path`` (.npy)."""
    done = subprocess.run([sys.executable, "-c", START, json.dumps(settings), str(image_path)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
