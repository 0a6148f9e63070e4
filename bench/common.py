"""Helpers the benchmark scripts share: paths, load generators, percentiles, result files.

Every script measures the things it compares side by side in one process and one run, so
that a busy machine slows all of them alike, and writes one JSON file to ``bench/results/``
holding the figures, the bars with met / not met, the exact command and the machine.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

# The scripts run from a checkout: make the server, the operator and the test helpers
# importable the same way tests/conftest.py does, installed or not.
for _path in (ROOT / "inference_image", ROOT / "operator", ROOT / "hack", ROOT / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


# --- statistics --------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linearly interpolated, as numpy's default does."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def psnr_db(a, b) -> float:
    """Peak signal-to-noise ratio of two 8-bit images in dB; inf when they are identical."""
    import numpy as np

    mse = float(((np.asarray(a, dtype=float) - np.asarray(b, dtype=float)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * float(np.log10(255**2 / mse))


def latency_summary(seconds: list[float]) -> dict[str, float]:
    return {
        "p50_s": percentile(seconds, 50),
        "p95_s": percentile(seconds, 95),
        "mean_s": sum(seconds) / len(seconds) if seconds else float("nan"),
        "count": len(seconds),
    }


# --- load --------------------------------------------------------------------------------------
@dataclass
class LoadResult:
    concurrency: int
    requests: int
    wall_s: float
    latencies_s: list[float]

    @property
    def throughput(self) -> float:
        return self.requests / self.wall_s

    def as_dict(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "requests": self.requests,
            "wall_s": self.wall_s,
            "throughput_per_s": self.throughput,
            **latency_summary(self.latencies_s),
        }


def closed_loop(call: Callable[[int], Any], concurrency: int, requests: int) -> LoadResult:
    """``concurrency`` clients, each sending its next request as soon as the last is answered.

    A closed loop keeps exactly ``concurrency`` requests in flight, which is what "concurrency
    N" means in the bars; ``call(i)`` gets a distinct index so seeds and prompts differ.
    """
    counter = iter(range(requests))
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[BaseException] = []
    start_together = threading.Barrier(concurrency + 1)

    def client() -> None:
        start_together.wait()
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            started = time.perf_counter()
            try:
                call(i)
            except BaseException as exc:  # reported after the run, never swallowed
                errors.append(exc)
                return
            with lock:
                latencies.append(time.perf_counter() - started)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    start_together.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if errors:
        raise errors[0]
    return LoadResult(concurrency, requests, wall, latencies)


def stage_means(metrics) -> dict[str, float]:
    """Mean seconds per batch of each stage, read from the server's own stage histogram."""
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            stage = sample.labels.get("stage")
            if sample.name == "imagegen_stage_duration_seconds_sum":
                sums[stage] = sample.value
            elif sample.name == "imagegen_stage_duration_seconds_count":
                counts[stage] = sample.value
    return {stage: sums[stage] / counts[stage] for stage in sums if counts.get(stage)}


# --- results -----------------------------------------------------------------------------------
def bar(item: str, target: str, measured: str, met: bool | None, note: str = "") -> dict:
    """One row of SUMMARY.md. ``met`` is None when the figure could not be measured here."""
    return {"item": item, "bar": target, "measured": measured, "met": met, "note": note}


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average_1m_at_start": os.getloadavg()[0],
    }
    info["git_commit"] = _git("rev-parse", "--short", "HEAD")
    # Uncommitted changes outside bench/results mean the commit alone does not reproduce it.
    changed = _git("status", "--porcelain", "--", ".", ":(exclude)bench/results")
    info["git_uncommitted_changes"] = bool(changed)
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    return info


def _git(*args: str) -> str:
    try:
        done = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip()


def command_line() -> str:
    """The command that reproduces this run, relative to the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_text = str(script.relative_to(ROOT))
    except ValueError:
        script_text = str(script)
    return shlex.join([".venv/bin/python", script_text, *sys.argv[1:]])


def write_result(name: str, payload: dict[str, Any], out_dir: Path | None = None) -> Path:
    """Write ``<name>.json`` with the command and the machine next to the figures."""
    out_dir = out_dir or RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    document = {
        "benchmark": name,
        "command": command_line(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        **payload,
    }
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    return path


def stop(process: subprocess.Popen, sig: int, grace_s: float) -> None:
    """Send ``sig`` so the process can clean up; kill it if it has not exited in ``grace_s``."""
    process.send_signal(sig)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def add_output_argument(parser) -> None:
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where the JSON result goes")


def quiet_libraries() -> None:
    """Keep progress bars and import warnings out of the benchmark's own output."""
    import logging
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    logging.getLogger("imagegen_server").setLevel(logging.WARNING)
    try:
        import diffusers.utils.logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
    except ImportError:  # the operator benchmark runs without diffusers
        pass


def make_model(directory: Path, family: str = "sd15", size: str = "small") -> Path:
    """A random-weight pipeline written offline by the server's own make-tiny-model."""
    from imagegen_server.tiny import make_tiny_model

    quiet_libraries()
    return Path(make_tiny_model(directory, family, seed=0, size=size))


def runtime_for(model: Path, **overrides):
    """A loaded ModelRuntime on the CPU in float32 (bfloat16 is slow on most CPUs)."""
    from imagegen_server.config import ServerSettings
    from imagegen_server.runtime import ModelRuntime

    values = {"model": str(model), "dtype": "float32", "device": "cpu"}
    values.update(overrides)
    return ModelRuntime(ServerSettings(**values)).load()
