"""Streaming: what streamed previews cost in throughput, over HTTP, side by side.

One runtime (the small SD model, Pipelined with batching) behind uvicorn on 127.0.0.1; a
closed loop of clients at one concurrency, in rounds that alternate two modes so load from
elsewhere lands on both alike:

- ``plain``: ``POST /v1/images/generations``, one JSON answer;
- ``stream, 3 previews``: the same request with ``stream: true, partial_images: 3``, every
  server-sent event read (three previews, then the image).

The figure is images per second in each mode and their ratio.

    .venv/bin/python bench/streaming.py [--concurrency 4] [--requests 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import common
from server_overhead import serving

BAR = 0.9  # streaming with 3 previews keeps at least this share of plain throughput
MODES = ("plain", "stream, 3 previews")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--requests", type=int, default=16, help="per mode and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", choices=["small", "tiny"], default="small")
    common.add_output_argument(parser)
    return parser.parse_args(argv)


def request(client, mode: str, i: int, steps: int) -> int:
    """One request in ``mode``; returns how many previews came."""
    body = {"prompt": f"a harbour {i}", "seed": i, "steps": steps}
    if mode == "plain":
        response = client.post("/v1/images/generations", json=body)
        response.raise_for_status()
        return 0
    body |= {"stream": True, "partial_images": 3}
    previews = completed = 0
    with client.stream("POST", "/v1/images/generations", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            previews += line == "event: image_generation.partial_image"
            completed += line == "event: image_generation.completed"
    if completed != 1:
        raise RuntimeError(f"a stream ended with {completed} completed events")
    return previews


def main(argv=None) -> dict:
    args = parse_args(argv)
    common.quiet_libraries()
    import httpx
    import torch

    torch.set_num_threads(1)
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    previews: dict[str, list[int]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as tmp:
        model = common.make_model(Path(tmp) / args.size, "sd15", args.size)
        runtime = common.runtime_for(model, default_steps=args.steps, max_batch_size=4,
                                     batch_window_ms=5)
        try:
            with serving(runtime) as base, httpx.Client(base_url=base, timeout=600) as client:
                for round_ in range(args.rounds):
                    for mode in MODES:
                        def call(i, mode=mode):
                            # list.append is atomic; += on a shared int is not.
                            previews[mode].append(request(client, mode, i, args.steps))

                        load = common.closed_loop(call, args.concurrency, args.requests)
                        runs[mode].append(load.as_dict())
                        print(f"round {round_ + 1} {mode:<20} {load.throughput:6.2f} images/s  "
                              f"p50 {load.as_dict()['p50_s'] * 1000:7.1f} ms", flush=True)
        finally:
            runtime.close(timeout=60)
    throughput = {mode: sum(r["throughput_per_s"] for r in rs) / len(rs)
                  for mode, rs in runs.items()}
    ratio = throughput[MODES[1]] / throughput[MODES[0]]
    print(f"streaming / plain throughput: {ratio:.2f}x "
          f"({sum(previews[MODES[1]])} previews over {len(previews[MODES[1]])} streams)")
    result = {
        "settings": vars(args) | {"out_dir": str(args.out_dir)},
        "runs": runs,
        "throughput_per_s": throughput,
        "previews_per_stream": previews[MODES[1]],
        "ratio_stream_to_plain": ratio,
        "bars": [common.bar(
            f"streaming cost ({args.size} model, c={args.concurrency}, {args.steps} steps)",
            f"stream with 3 previews >= {BAR:.0%} of plain throughput",
            f"{ratio:.0%} ({throughput[MODES[1]]:.2f} vs {throughput[MODES[0]]:.2f} images/s)",
            ratio >= BAR,
        )],
    }
    path = common.write_result("streaming", result, args.out_dir)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
