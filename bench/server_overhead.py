"""Server overhead: what HTTP adds: a POST through uvicorn on 127.0.0.1 vs calling the same engine.

One ModelRuntime serves both paths, one request at a time; the two paths alternate request by
request so that load from elsewhere lands on both alike. The HTTP figure is everything a client
sees: JSON parsing, admission, the PNG and base64 encoding of the answer and the socket. The
small model gives the bar; the tiny model, whose requests take a few milliseconds, shows the
fixed cost in milliseconds.

    .venv/bin/python bench/server_overhead.py [--pairs 20] [--steps 4]
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import threading
import time
from contextlib import closing, contextmanager
from pathlib import Path

import common

BAR_SHARE = 0.05
BAR_FIXED_MS = 3.0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=20, help="direct/HTTP pairs per model")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--sizes", nargs="+", choices=["small", "tiny"], default=["small", "tiny"])
    common.add_output_argument(parser)
    return parser.parse_args(argv)


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(runtime):
    """uvicorn in a thread of this process, as the server runs it: one process, one engine."""
    import uvicorn

    from imagegen_server.api import create_app

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(runtime.settings, runtime),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            access_log=False,
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def measure(model: Path, args) -> dict:
    import httpx

    runtime = common.runtime_for(
        model, default_steps=args.steps, max_batch_size=1, batch_window_ms=0, torch_threads=1
    )
    direct: list[float] = []
    http: list[float] = []
    try:
        with serving(runtime) as base_url, httpx.Client(base_url=base_url, timeout=120) as client:
            for i in range(args.pairs + 2):
                body = {"prompt": f"a lighthouse {i}", "seed": i, "steps": args.steps}
                params = runtime.params(body["prompt"], seed=i, steps=args.steps)

                started = time.perf_counter()
                images = runtime.engine.generate(params)
                direct_s = time.perf_counter() - started

                started = time.perf_counter()
                response = client.post("/v1/images/generations", json=body)
                response.raise_for_status()
                assert response.json()["data"][0]["b64_json"]
                http_s = time.perf_counter() - started
                assert images
                if i >= 2:  # the first pairs warm the connection and the PNG encoder
                    direct.append(direct_s)
                    http.append(http_s)
    finally:
        runtime.close(timeout=30)
    d50 = common.percentile(direct, 50)
    # The median of paired differences: each pair ran back to back under the same load.
    overhead = common.percentile([h - d for h, d in zip(http, direct, strict=True)], 50)
    allowed = BAR_SHARE * d50 + BAR_FIXED_MS / 1000
    return {
        "size": runtime.default_size,
        "direct": common.latency_summary(direct),
        "http": common.latency_summary(http),
        "overhead_ms": overhead * 1000,
        "overhead_share": overhead / d50,
        "allowed_ms": allowed * 1000,
        "met": overhead < allowed,
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    common.quiet_libraries()
    import torch

    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-http-") as tmp:
        for size in args.sizes:
            model = common.make_model(Path(tmp) / size, "sd15", size)
            r = results[size] = measure(model, args)
            print(
                f"{size:<5} direct p50 {r['direct']['p50_s'] * 1000:8.1f} ms  "
                f"HTTP p50 {r['http']['p50_s'] * 1000:8.1f} ms  "
                f"overhead {r['overhead_ms']:6.1f} ms ({r['overhead_share']:.1%}); "
                f"allowed {r['allowed_ms']:.1f} ms",
                flush=True,
            )
    bars = [
        common.bar(
            f"server overhead ({size} model, c=1)",
            f"HTTP - direct (median of pairs) < {BAR_SHARE:.0%} + {BAR_FIXED_MS:g} ms",
            f"+{r['overhead_ms']:.1f} ms ({r['overhead_share']:.1%} of "
            f"{r['direct']['p50_s'] * 1000:.0f} ms); allowed {r['allowed_ms']:.1f} ms",
            r["met"],
            "bar model" if size == "small" else "extra: shows the fixed cost",
        )
        for size, r in results.items()
    ]
    result = {
        "settings": {"pairs": args.pairs, "steps": args.steps, "stage_mode": "Pipelined"},
        "models": results,
        "bars": bars,
    }
    path = common.write_result("server_overhead", result, args.out_dir)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
