"""Stage pipeline: the real stage pipeline on the CPU, Stacked vs Pipelined vs Pipelined + batching.

A small random-weight SD 1.5 pipeline (``make-tiny-model --size small``: a ~1M-parameter UNet
at 128x128) serves requests from a closed loop of 1, 2, 4 and 8 clients. Every engine is
loaded up front and the modes take turns at each concurrency, so machine load from elsewhere
hits all of them alike. Stacked + batching is measured too: it separates what batching buys
from what overlapping the stages buys.

    .venv/bin/python bench/stage_pipeline.py [--steps 8] [--concurrency 1 2 4 8]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import common

MODES = {
    "Stacked": {"stage_mode": "Stacked", "max_batch_size": 1},
    "Pipelined": {"stage_mode": "Pipelined", "max_batch_size": 1},
    "Pipelined+batching": {"stage_mode": "Pipelined", "max_batch_size": 8},
    "Stacked+batching": {"stage_mode": "Stacked", "max_batch_size": 8},
}
BAR_RATIO = 2.0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="denoising steps per request")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument(
        "--requests-per-client", type=int, default=3, help="requests = max(6, this x concurrency)"
    )
    parser.add_argument("--batch-window-ms", type=float, default=10.0)
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="intra-op threads; 1 keeps the stage threads from fighting over 2 cores",
    )
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--size", choices=["tiny", "small"], default="small")
    common.add_output_argument(parser)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    common.quiet_libraries()
    import torch

    torch.set_num_threads(args.torch_threads)
    with tempfile.TemporaryDirectory(prefix="bench-stage-") as tmp:
        model = common.make_model(Path(tmp) / "sd15", "sd15", args.size)
        runtimes = {
            name: common.runtime_for(
                model,
                default_steps=args.steps,
                batch_window_ms=args.batch_window_ms,
                torch_threads=args.torch_threads,
                **overrides,
            )
            for name, overrides in MODES.items()
            if name in args.modes
        }
        try:
            profile = measure_profile(runtimes)
            rows = run_grid(runtimes, args)
        finally:
            for runtime in runtimes.values():
                runtime.close(timeout=60)
    result = summarize(rows, profile, args)
    path = common.write_result("stage_pipeline", result, args.out_dir)
    print(f"wrote {path}")
    return result


def measure_profile(runtimes: dict) -> dict[str, float]:
    """The real encode : denoise : decode split, from one Stacked request at a time."""
    runtime = runtimes.get("Stacked") or next(iter(runtimes.values()))
    for i in range(3):
        runtime.engine.generate(runtime.params(f"profile {i}", seed=i))
    means = common.stage_means(runtime.metrics)
    return {k: means[k] for k in ("encode", "denoise", "decode") if k in means}


def run_grid(runtimes: dict, args) -> list[dict]:
    rows = []
    names = list(runtimes)
    # Two untimed requests each first, so that no mode's first timed requests pay for a cold
    # start (the load-time warm-up runs only 2 steps).
    for runtime in runtimes.values():
        for i in range(2):
            runtime.engine.generate(runtime.params(f"warm {i}", seed=i))
    for level, concurrency in enumerate(args.concurrency):
        requests = max(6, args.requests_per_client * concurrency)
        # The modes take turns in a rotating order, so none always runs first after a pause.
        turn = level % len(names)
        for name in names[turn:] + names[:turn]:
            runtime = runtimes[name]

            def call(i: int, runtime=runtime) -> None:
                runtime.engine.generate(runtime.params(f"a small red house {i}", seed=i))

            load = common.closed_loop(call, concurrency, requests)
            row = {"mode": name, **load.as_dict()}
            rows.append(row)
            print(
                f"c={concurrency:<2} {name:<19} {row['throughput_per_s']:6.2f} img/s  "
                f"p50 {row['p50_s']:6.2f}s  p95 {row['p95_s']:6.2f}s",
                flush=True,
            )
    return rows


def summarize(rows: list[dict], profile: dict[str, float], args) -> dict:
    by = {(r["mode"], r["concurrency"]): r for r in rows}
    ratios = {}
    for (mode, concurrency), row in by.items():
        stacked = by.get(("Stacked", concurrency))
        if stacked:
            ratios.setdefault(mode, {})[concurrency] = (
                row["throughput_per_s"] / stacked["throughput_per_s"]
            )
    top = max(args.concurrency)
    ratio = ratios.get("Pipelined+batching", {}).get(top)
    bars = []
    if ratio is not None:
        bars.append(
            common.bar(
                "stage pipeline (CPU, small SD model)",
                f"Pipelined+batching >= {BAR_RATIO:g}x Stacked throughput at concurrency {top}",
                f"{ratio:.2f}x",
                ratio >= BAR_RATIO,
            )
        )
    total = sum(profile.values()) or 1.0
    print("throughput relative to Stacked at the same concurrency:")
    for mode, per in ratios.items():
        print(f"  {mode:<19} " + "  ".join(f"c={c}: {v:.2f}x" for c, v in sorted(per.items())))
    return {
        "settings": {
            "steps": args.steps,
            "size": args.size,
            "torch_threads": args.torch_threads,
            "batch_window_ms": args.batch_window_ms,
            "modes": {m: MODES[m] for m in args.modes},
        },
        "stage_profile_s": profile,
        "stage_profile_share": {k: v / total for k, v in profile.items()},
        "rows": rows,
        "ratio_vs_stacked": ratios,
        "bars": bars,
    }


if __name__ == "__main__":
    main()
