"""In-process load test of one engine: throughput and latency for a settings object.

No HTTP in the loop, so Pipelined vs Stacked (or batch sizes, compile, attention) compare on the
engine alone. ``imagegen-server bench`` prints the result as JSON.
"""

from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from .config import ServerSettings
from .runtime import ModelRuntime


def run_benchmark(
    settings: ServerSettings,
    *,
    requests: int = 32,
    concurrency: int = 8,
    steps: int | None = None,
    width: int | None = None,
    height: int | None = None,
) -> dict:
    """Load, warm up, then send ``requests`` generations from ``concurrency`` client threads."""
    load_started = time.perf_counter()
    runtime = ModelRuntime(settings).load()
    load_seconds = time.perf_counter() - load_started
    try:
        start_together = threading.Barrier(concurrency)
        latencies: list[float] = []
        lock = threading.Lock()

        def client(worker: int) -> None:
            start_together.wait()
            for i in range(worker, requests, concurrency):
                params = runtime.params(
                    f"benchmark request {i}", seed=i, steps=steps, width=width, height=height
                )
                started = time.perf_counter()
                runtime.engine.generate(params)
                with lock:
                    latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            list(pool.map(client, range(concurrency)))
        wall = time.perf_counter() - started
    finally:
        runtime.close(timeout=60)
    ordered = sorted(latencies)
    return {
        "model": runtime.model.name,
        "family": runtime.model.family.value,
        "stage_mode": settings.stage_mode.value,
        "batching": settings.batching.value,
        "max_batch_size": settings.max_batch_size,
        "requests": requests,
        "concurrency": concurrency,
        "load_and_warmup_s": round(load_seconds, 3),
        "warmup_s": round(runtime.warmup_seconds or 0.0, 3),
        "wall_s": round(wall, 3),
        "images_per_s": round(requests / wall, 3),
        "latency_p50_s": round(statistics.median(ordered), 4),
        "latency_p95_s": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 4),
        "optimizations": runtime.report.as_dict(),
    }
