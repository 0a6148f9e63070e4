"""Large request: small requests' latency while one large request is in the server.

Three ways one large request can meet the server, side by side in one run, each on a fresh
engine (tiny SD model, Pipelined, CPU):

- ``admitted, runs to the end``: the request is within the limits and has no deadline; the
  small requests queue behind its denoising steps (what every request beyond the native size
  did before the server had limits or cancellation).
- ``admitted, deadline``: the same request with a short deadline: dropped at the first denoising
  step boundary after it, so the small requests after that run at their usual latency.
- ``refused by max_pixels``: the default limit (the model's native size): a 400 before any work.

A closed loop of small requests (one at a time) runs while the large one is in flight; the
figures are their p50 and p95, next to the same loop with no large request at all.

    .venv/bin/python bench/large_request.py [--size 512] [--small 16]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import common


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="side of the large request, px")
    parser.add_argument("--large-steps", type=int, default=4)
    parser.add_argument("--deadline", type=float, default=1.0, help="s, in the deadline case")
    parser.add_argument("--small", type=int, default=16, help="small requests per case")
    common.add_output_argument(parser)
    return parser.parse_args(argv)


def run_case(model: Path, args, case: str) -> dict:
    from imagegen_server.engine import InvalidRequest

    limit = None if case == "refused by max_pixels" else args.size * args.size
    runtime = common.runtime_for(model, max_pixels=limit, default_steps=3, max_batch_size=4)
    engine = runtime.engine
    large_outcome = "none"
    try:
        large = None
        if case != "no large request":
            params = runtime.params("large", width=args.size, height=args.size,
                                    steps=args.large_steps, seed=1)
            deadline = args.deadline if case == "admitted, deadline" else None
            try:
                large = engine.submit(params, deadline)
            except InvalidRequest:
                large_outcome = "refused (400)"
            time.sleep(0.05)  # it has reached the denoiser before the small ones come
        latencies = []
        for i in range(args.small):
            started = time.perf_counter()
            engine.generate(runtime.params(f"small {i}", seed=100 + i), timeout_s=600)
            latencies.append(time.perf_counter() - started)
        if large is not None:
            try:
                large.future.result(600)
                large_outcome = "finished"
            except Exception as exc:  # noqa: BLE001 - the outcome is the figure
                large_outcome = f"dropped: {exc}"
    finally:
        runtime.close(timeout=600)
    return {"large": large_outcome, "small": common.latency_summary(latencies)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    common.quiet_libraries()
    import torch

    torch.set_num_threads(1)
    cases = ["no large request", "admitted, runs to the end", "admitted, deadline",
             "refused by max_pixels"]
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-large-") as tmp:
        model = common.make_model(Path(tmp) / "tiny", "sd15", "tiny")
        for case in cases:
            r = results[case] = run_case(model, args, case)
            s = r["small"]
            print(f"{case:<27} small p50 {s['p50_s'] * 1000:8.1f} ms  p95 "
                  f"{s['p95_s'] * 1000:8.1f} ms  large: {r['large']}", flush=True)
    base = results["no large request"]["small"]["p95_s"]
    ratios = {case: r["small"]["p95_s"] / base for case, r in results.items()}
    for case, ratio in ratios.items():
        print(f"  p95 vs no large request: {case:<27} {ratio:6.2f}x")
    result = {"args": vars(args) | {"out_dir": str(args.out_dir)}, "cases": results,
              "p95_ratio_to_no_large_request": ratios}
    path = common.write_result("large_request", result, args.out_dir)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
