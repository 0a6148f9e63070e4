"""Stage machinery: the stage machinery alone, with stages that release the GIL the way GPU work does.

The server's own ``PipelinedEngine`` and ``StackedEngine`` (real ``Stage`` threads, queues,
admission and futures) drive synthetic steps that ``time.sleep``: the host thread waits and
holds no GIL, as it does while a GPU runs a kernel. The stage costs keep the ratio of a real
profile, measured first from the small SD model's Stacked engine (encode : denoise : decode),
scaled to ``--total-ms`` per request. A balanced 1:1:1 profile shows how much overlap the
machinery can deliver when no single stage dominates.

Bars: throughput >= 90% of the bound 1/max(stage) at concurrency >= 4, and a per-request
machinery overhead under 1 ms (no-op stages, one request at a time, minus calling the three
no-op steps directly).

    .venv/bin/python bench/stage_machinery.py [--total-ms 40] [--requests 100]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import common

STAGES = ("encode", "denoise", "decode")
BOUND_SHARE = 0.90
OVERHEAD_BAR_MS = 1.0


class SleepSteps:
    """Stand-in for ``FamilySteps``: the engine calls encode/denoise/decode and the keys.

    Each step waits ``cost`` seconds per job with the GIL released. Batching is off in this
    benchmark (max_batch_size 1), so a step always sees one job.
    """

    size_multiple = 8
    native_size = (64, 64)  # what the engine's request limits read; the requests are 64x64
    latent_rgb = None  # no streamed previews, so the engine starts no preview thread

    def __init__(self, costs_s: dict[str, float]):
        import torch

        self.device = torch.device("cpu")
        self.costs = costs_s

    def encode_key(self, job):
        return None

    def denoise_key(self, job):
        return None

    def decode_key(self, job):
        return None

    def _wait(self, stage: str, jobs: list) -> None:
        cost = self.costs[stage] * len(jobs)
        if cost > 0:
            time.sleep(cost)

    def encode(self, jobs: list) -> None:
        self._wait("encode", jobs)

    def denoise(self, jobs: list) -> None:
        self._wait("denoise", jobs)

    def decode(self, jobs: list) -> list:
        self._wait("decode", jobs)
        return [["image"] for _ in jobs]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--total-ms", type=float, default=40.0, help="stage cost per request")
    parser.add_argument("--requests", type=int, default=100, help="requests per measurement")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--overhead-requests", type=int, default=2000)
    parser.add_argument(
        "--profile",
        nargs=3,
        type=float,
        metavar=("ENCODE", "DENOISE", "DECODE"),
        help="use this encode/denoise/decode ratio instead of measuring the small model",
    )
    common.add_output_argument(parser)
    return parser.parse_args(argv)


def engine_for(mode: str, costs_s: dict[str, float]):
    from imagegen_server.config import ServerSettings
    from imagegen_server.engine import PipelinedEngine, StackedEngine
    from imagegen_server.metrics import ServerMetrics

    settings = ServerSettings(
        model="unused", device="cpu", max_batch_size=1, batch_window_ms=0, queue_capacity=64
    )
    cls = PipelinedEngine if mode == "Pipelined" else StackedEngine
    return cls(SleepSteps(costs_s), settings, ServerMetrics()).start()


def params(i: int):
    from imagegen_server.request import GenerationParams

    return GenerationParams(
        prompt=f"p{i}", width=64, height=64, steps=1, guidance_scale=1.0, seed=i
    )


def measured_profile() -> dict[str, float]:
    """encode : denoise : decode of the small SD model, one Stacked request at a time."""
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
        model = common.make_model(Path(tmp) / "sd15", "sd15", "small")
        runtime = common.runtime_for(
            model, stage_mode="Stacked", max_batch_size=1, default_steps=8, torch_threads=1
        )
        try:
            for i in range(3):
                runtime.engine.generate(runtime.params(f"profile {i}", seed=i))
            means = common.stage_means(runtime.metrics)
        finally:
            runtime.close(timeout=30)
    return {stage: means[stage] for stage in STAGES}


def scaled(profile: dict[str, float], total_s: float) -> dict[str, float]:
    whole = sum(profile.values())
    return {stage: total_s * profile[stage] / whole for stage in STAGES}


def throughput_rows(costs_s: dict[str, float], args) -> list[dict]:
    bound = 1.0 / max(costs_s.values())
    stacked_bound = 1.0 / sum(costs_s.values())
    rows = []
    for concurrency in args.concurrency:
        for mode in ("Stacked", "Pipelined"):
            engine = engine_for(mode, costs_s)
            try:
                load = common.closed_loop(
                    lambda i, engine=engine: engine.generate(params(i)), concurrency, args.requests
                )
            finally:
                engine.close(timeout=30)
            row = {
                "mode": mode,
                **load.as_dict(),
                "share_of_pipeline_bound": load.throughput / bound,
                "share_of_stacked_bound": load.throughput / stacked_bound,
            }
            rows.append(row)
            print(
                f"  c={concurrency:<2} {mode:<9} {load.throughput:7.1f}/s  "
                f"{row['share_of_pipeline_bound']:6.1%} of 1/max(stage)  "
                f"{row['share_of_stacked_bound']:6.1%} of 1/sum(stages)",
                flush=True,
            )
    return rows


def machinery_overhead(args) -> dict[str, float]:
    """Milliseconds a request spends in the machinery: no-op stages, one at a time."""
    noop = dict.fromkeys(STAGES, 0.0)
    steps = SleepSteps(noop)
    jobs = [object()]
    started = time.perf_counter()
    for _ in range(args.overhead_requests):
        steps.encode(jobs)
        steps.denoise(jobs)
        steps.decode(jobs)
    direct = (time.perf_counter() - started) / args.overhead_requests
    out = {"direct_call_ms": direct * 1000}
    for mode in ("Stacked", "Pipelined"):
        engine = engine_for(mode, noop)
        try:
            for i in range(50):  # threads and queues warm
                engine.generate(params(i))
            load = common.closed_loop(
                lambda i, engine=engine: engine.generate(params(i)), 1, args.overhead_requests
            )
        finally:
            engine.close(timeout=30)
        out[f"{mode}_p50_ms"] = (load.as_dict()["p50_s"] - direct) * 1000
        out[f"{mode}_mean_ms"] = (load.as_dict()["mean_s"] - direct) * 1000
        print(
            f"machinery overhead {mode:<9} p50 {out[f'{mode}_p50_ms']:.3f} ms  "
            f"mean {out[f'{mode}_mean_ms']:.3f} ms per request",
            flush=True,
        )
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    common.quiet_libraries()
    if args.profile:
        real = dict(zip(STAGES, args.profile, strict=True))
        source = "given on the command line"
    else:
        real = measured_profile()
        source = "measured: small SD model, Stacked engine, 8 steps, 1 thread"
    share = {stage: real[stage] / sum(real.values()) for stage in STAGES}
    print("profile " + "  ".join(f"{s} {share[s]:.1%}" for s in STAGES) + f" ({source})")
    total_s = args.total_ms / 1000.0
    profiles = {"measured": scaled(real, total_s), "balanced": dict.fromkeys(STAGES, total_s / 3)}
    results = {}
    for name, costs in profiles.items():
        print(
            f"{name} profile, ms per request: "
            + "  ".join(f"{s} {costs[s] * 1000:.2f}" for s in STAGES),
            flush=True,
        )
        results[name] = {
            "stage_costs_ms": {s: c * 1000 for s, c in costs.items()},
            "bound_per_s": 1.0 / max(costs.values()),
            "stacked_bound_per_s": 1.0 / sum(costs.values()),
            "rows": throughput_rows(costs, args),
        }
    overhead = machinery_overhead(args)

    bars = []
    for name in ("measured", "balanced"):
        rows = [
            r for r in results[name]["rows"] if r["mode"] == "Pipelined" and r["concurrency"] >= 4
        ]
        if rows:
            worst = min(r["share_of_pipeline_bound"] for r in rows)
            bars.append(
                common.bar(
                    f"stage machinery ({name} profile)",
                    f">= {BOUND_SHARE:.0%} of 1/max(stage) at concurrency >= 4",
                    f"{worst:.1%} (worst of c>=4)",
                    worst >= BOUND_SHARE,
                    "" if name == "measured" else "extra: no stage dominates",
                )
            )
    worst_overhead = max(overhead["Stacked_p50_ms"], overhead["Pipelined_p50_ms"])
    bars.append(
        common.bar(
            "stage machinery overhead",
            f"< {OVERHEAD_BAR_MS:g} ms per request",
            f"{overhead['Pipelined_p50_ms']:.3f} ms Pipelined, "
            f"{overhead['Stacked_p50_ms']:.3f} ms Stacked (p50)",
            worst_overhead < OVERHEAD_BAR_MS,
        )
    )
    result = {
        "settings": {
            "total_ms": args.total_ms,
            "requests": args.requests,
            "max_batch_size": 1,
            "profile_source": source,
        },
        "real_profile_s": real,
        "real_profile_share": share,
        "profiles": results,
        "overhead_ms": overhead,
        "bars": bars,
    }
    path = common.write_result("stage_machinery", result, args.out_dir)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
