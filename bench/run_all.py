"""``make bench``: the CPU benchmarks, then a chart and a summary of every bar.

Each benchmark runs as its own process (a fresh interpreter, torch threads and caches of its
own) and writes its JSON to ``bench/results/``; this script then draws
``bench/results/benchmarks.png`` and writes ``bench/results/SUMMARY.md``: one row per bar with
the measured figure, met or not, and the command that produced it. The GPU benchmark
is not run here; its rows come from ``bench/results/gpu.json`` when a GPU run left one.

    .venv/bin/python bench/run_all.py [--only stage_pipeline ...] [--no-run]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import common

# name -> (script, time limit in seconds). The limits add up to a 44-minute budget; a
# benchmark over its limit is interrupted and reported as such. Streaming's six timed
# rounds alone took 188 s on 2 cores.
BENCHMARKS = {
    "stage_pipeline": ("stage_pipeline.py", 270),
    "stage_machinery": ("stage_machinery.py", 120),
    "server_overhead": ("server_overhead.py", 90),
    "cold_start": ("cold_start.py", 420),
    "operator_scale": ("operator_scale.py", 450),
    "streaming": ("streaming.py", 300),
    "levers": ("levers.py", 360),
    "step_batching": ("step_batching.py", 600),
}
CHART = "benchmarks.png"
RUN_LOG = "run_all.json"  # how long each benchmark of the last run took


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    parser.add_argument(
        "--no-run", action="store_true", help="only redraw the chart and summary from the JSON"
    )
    common.add_output_argument(parser)
    return parser.parse_args(argv)


def run_one(name: str, out_dir: Path) -> dict:
    script, limit = BENCHMARKS[name]
    command = [sys.executable, str(common.ROOT / "bench" / script)]
    if out_dir.resolve() != common.RESULTS.resolve():
        # Only then: the command each result records stays the plain one to copy.
        command += ["--out-dir", str(out_dir)]
    print(f"\n=== {name} (limit {limit}s) ===", flush=True)
    started = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Output goes straight through: a long benchmark shows its progress as it goes.
    process = subprocess.Popen(command, cwd=common.ROOT, env=env)
    try:
        rc = process.wait(timeout=limit)
        error = None if rc == 0 else f"exit status {rc}"
    except subprocess.TimeoutExpired:
        # SIGINT first: the benchmark's finally blocks run, so the operator benchmark still
        # tears its control plane down instead of leaving it running.
        common.stop(process, signal.SIGINT, 60)
        error = f"over its {limit}s limit"
    return {"name": name, "seconds": time.monotonic() - started, "error": error}


def load_results(out_dir: Path) -> dict[str, dict]:
    results = {}
    for name in [*BENCHMARKS, "gpu", "cold_start_gpu"]:  # the last two: from a GPU machine
        path = out_dir / f"{name}.json"
        if path.exists():
            results[name] = json.loads(path.read_text())
    return results


# --- the chart ---------------------------------------------------------------------------------
def draw_chart(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(17, 9.5))
    panels = [
        (_stage_pipeline, "stage_pipeline"),
        (_stage_machinery, "stage_machinery"),
        (_server_overhead, "server_overhead"),
        (_cold_start, "cold_start"),
        (_operator_latency, "operator_scale"),
        (_operator_scale, "operator_scale"),
    ]
    for ax, (draw, name) in zip(axes.flat, panels, strict=True):
        if name in results:
            draw(ax, results[name])
        else:
            ax.text(0.5, 0.5, f"{name}: no result", ha="center", va="center")
            ax.set_axis_off()
    fig.suptitle("imagegen benchmarks (bench/results/SUMMARY.md has the commands)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _stage_pipeline(ax, r: dict) -> None:
    for mode in r["settings"]["modes"]:
        rows = sorted((x for x in r["rows"] if x["mode"] == mode), key=lambda x: x["concurrency"])
        ax.plot(
            [x["concurrency"] for x in rows],
            [x["throughput_per_s"] for x in rows],
            marker="o",
            label=mode,
        )
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)  # from zero: the modes differ by a few percent, not by the axis
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("images / s")
    ax.set_title("stage pipeline: small SD model on 2 CPU cores")
    ax.legend(fontsize=8)


def _stage_machinery(ax, r: dict) -> None:
    for profile, style in (("measured", "-"), ("balanced", "--")):
        p = r["profiles"][profile]
        for mode in ("Stacked", "Pipelined"):
            rows = sorted(
                (x for x in p["rows"] if x["mode"] == mode), key=lambda x: x["concurrency"]
            )
            ax.plot(
                [x["concurrency"] for x in rows],
                [x["throughput_per_s"] for x in rows],
                style,
                marker="o",
                label=f"{mode}, {profile} profile",
            )
        ax.axhline(p["bound_per_s"], color="grey", linestyle=style, linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("requests / s (grey: 1/max(stage))")
    ax.set_title("stage machinery, sleeping stages")
    ax.legend(fontsize=8)


def _server_overhead(ax, r: dict) -> None:
    names = list(r["models"])
    measured = [r["models"][n]["overhead_ms"] for n in names]
    allowed = [r["models"][n]["allowed_ms"] for n in names]
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], measured, 0.4, label="HTTP - direct (median of pairs)")
    ax.bar([i + 0.2 for i in x], allowed, 0.4, label="allowed: 5% + 3 ms")
    ax.set_xticks(list(x), [f"{n} model" for n in names])
    ax.set_ylabel("ms per request")
    ax.set_title("server overhead at concurrency 1")
    ax.legend(fontsize=8)


def _cold_start(ax, r: dict) -> None:
    # One stacked bar per start: where its seconds to /readyz went.
    names = {"no_compile": "no\ncompile", "compile_cold": "empty\ncache",
             "compile_warm": "warm", "compile_cold_precompile": "empty,\nprecompile",
             "compile_warm_precompile": "warm,\nprecompile", "compile_cold_aot": "empty,\nAOT",
             "compile_warm_aot": "warm,\nAOT"}
    starts = {k: r["starts"][k]["phases"] for k in names if k in r["starts"]}
    phases = list(dict.fromkeys(phase for p in starts.values() for phase in p))
    bottom = [0.0] * len(starts)
    for phase in phases:
        heights = [p.get(phase, 0.0) for p in starts.values()]
        ax.bar([names[k] for k in starts], heights, bottom=bottom, label=phase)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    # Over each warm start, the bar: 20% of its own pair's cold start.
    for i, name in enumerate(starts):
        if name.startswith("compile_warm"):
            cold = r["seconds_to_ready"][name.replace("warm", "cold")]
            ax.hlines(0.2 * cold, i - 0.4, i + 0.4, color="black", linestyle="--", linewidth=0.8)
    ax.set_ylabel("seconds to /readyz (dashed: 20% of its cold)")
    ax.set_title(f"cold start, {r['settings']['size']} model on the CPU")
    ax.legend(fontsize=7)


def _operator_latency(ax, r: dict) -> None:
    labels = ["1 service", f"{r['settings']['batch']} at once"]
    p50 = [r["single"]["p50_s"], r["batch"]["p50_s"]]
    p95 = [r["single"]["p95_s"], r["batch"]["p95_s"]]
    ax.bar([0 - 0.2, 1 - 0.2], p50, 0.4, label="p50")
    ax.bar([0 + 0.2, 1 + 0.2], p95, 0.4, label="p95")
    ax.axhline(0.5, color="black", linestyle="--", linewidth=0.8, label="bar: p50 0.5 s")
    ax.set_xticks([0, 1], labels)
    ax.set_ylabel("seconds, apply -> Deployment exists")
    ax.set_title("operator latency")
    ax.legend(fontsize=8)


def _operator_scale(ax, r: dict) -> None:
    fleet = r["settings"]["fleet"]
    ready = r["fleet_ready_s"]
    rss = r["operator_peak_rss_mb"]
    label = (
        f"{fleet} Ready (s)"
        if r.get("fleet_all_ready", True)
        else f"{r['fleet_ready_count']} of {fleet} Ready\nat the timeout (s)"
    )
    ax.bar([label, "peak RSS (MB)"], [ready, rss], color=["tab:blue", "tab:orange"])
    ax.plot([-0.4, 0.4], [60, 60], "k--", linewidth=0.8)
    ax.plot([0.6, 1.4], [200, 200], "k--", linewidth=0.8)
    writes = r["steady_state"]["writes"]
    ax.set_title(f"operator scale (dashed: bars); steady-state writes: {writes}")


# --- the summary -------------------------------------------------------------------------------
def _met(value) -> str:
    return {True: "met", False: "**not met**", None: "not measured"}[value]


def write_summary(results: dict[str, dict], runs: list[dict], path: Path) -> None:
    lines = [
        "# Benchmark results",
        "",
        "Written by `make bench` (`.venv/bin/python bench/run_all.py`); the chart is "
        f"[{CHART}]({CHART}). Every figure was measured side by side with what it is "
        "compared against, in the same run. `bench/README.md` explains each benchmark.",
        "",
    ]
    if runs:
        total = sum(r["seconds"] for r in runs)
        each = ", ".join(f"{r['name']} {r['seconds']:.0f} s" for r in runs)
        untimed = [name for name in BENCHMARKS if name not in {r["name"] for r in runs}]
        also = (f" ({', '.join(untimed)}: run on its own, not timed here)" if untimed else "")
        lines.append(f"Each benchmark's last run took: {each}; {total / 60:.1f} min in all"
                     f"{also}.")
        lines.append("")
    lines += [
        "| benchmark | bar | measured | met | command |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in results.values():
        for b in r.get("bars", []):
            note = f" ({b['note']})" if b.get("note") else ""
            lines.append(
                f"| {b['item']}{note} | {b['bar']} | {b['measured']} | {_met(b['met'])} "
                f"| `{r['command']}` |"
            )
    if "gpu" not in results:
        lines.append(
            "| 6. GPU: SDXL 30 steps at 1024px; Pipelined vs Stacked at c=4 "
            "| < 1.5 s per image; >= 1.3x | not run: no GPU on this machine | not measured "
            "| `.venv/bin/python bench/gpu.py` |"
        )
    failed = [r for r in runs if r["error"]]
    if failed:
        lines += ["", "Benchmarks that produced no result in this run:"]
        lines += [f"- {r['name']}: {r['error']}" for r in failed]
    lines += ["", "## The machine", ""]
    for name, r in results.items():
        m = r["machine"]
        lines.append(
            f"- {name}: finished {r['finished_at']}; {m['cpus']} CPUs, "
            f"1-minute load average {m['load_average_1m_at_start']:.2f} at its start, "
            f"torch {m.get('torch', '?')}"
            + (f", {m['gpu']}" if m.get("gpu") else "")
            + (f", commit {m['git_commit']}" if m.get("git_commit") else "")
            + (" with uncommitted changes" if m.get("git_uncommitted_changes") else "")
        )
    lines += [
        "",
        "A load average near or above the CPU count means other work shared the machine "
        "while that benchmark ran; the side-by-side figures shared it alike.",
    ]
    if "stage_pipeline" in results:
        lines += ["", *_stage_pipeline_table(results["stage_pipeline"])]
    path.write_text("\n".join(lines) + "\n")


def _stage_pipeline_table(r: dict) -> list[str]:
    modes = list(r["settings"]["modes"])
    levels = sorted({x["concurrency"] for x in r["rows"]})
    by = {(x["mode"], x["concurrency"]): x for x in r["rows"]}
    share = r.get("stage_profile_share", {})
    lines = [
        "## Stage pipeline in detail: images/s (p50 / p95 latency in s)",
        "",
        "Stage profile of the small model on this CPU: "
        + ", ".join(f"{k} {v:.1%}" for k, v in share.items())
        + ".",
        "",
        "| mode | " + " | ".join(f"c={c}" for c in levels) + " |",
        "| --- |" + " --- |" * len(levels),
    ]
    for mode in modes:
        cells = []
        for c in levels:
            x = by.get((mode, c))
            cells.append(
                f"{x['throughput_per_s']:.2f} ({x['p50_s']:.1f} / {x['p95_s']:.1f})" if x else "-"
            )
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return lines


def merged_runs(last: list[dict], fresh: list[dict]) -> list[dict]:
    """Each benchmark's timing from its last run, in BENCHMARKS' order: a redraw measures
    nothing itself, and a run of some (--only) leaves the others' as they were."""
    by_name = {r["name"]: r for r in [*last, *fresh]}
    return [by_name[name] for name in BENCHMARKS if name in by_name]


def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir: Path = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / RUN_LOG
    last = json.loads(log.read_text())["runs"] if log.exists() else []
    fresh = [] if args.no_run else [run_one(name, out_dir) for name in args.only]
    runs = merged_runs(last, fresh)
    if fresh:
        log.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    results = load_results(out_dir)
    draw_chart(results, out_dir / CHART)
    write_summary(results, runs, out_dir / "SUMMARY.md")
    print(f"\nwrote {out_dir / 'SUMMARY.md'} and {out_dir / CHART}")
    for r in fresh:
        status = r["error"] or "ok"
        print(f"  {r['name']:<16} {r['seconds']:6.1f}s  {status}")
    if fresh:
        print(f"  total {sum(r['seconds'] for r in fresh) / 60:.1f} min")
    return 1 if any(r["error"] for r in fresh) else 0


if __name__ == "__main__":
    sys.exit(main())
