"""Cold start: time to /readyz with torch.compile on, empty inductor cache vs a persisted one.

Starts the real ``imagegen-server`` process on the same model: without compile (the floor:
import, load, warm-up), then in pairs, with compile and an empty cache directory (cold) and
again with the directory the cold start filled (warm), as a pod restarting on a persistent
volume would. Three pairs, one per way of keeping what was compiled: torch.compile's artifacts
(``compiled_artifacts.py``), the same with dynamo's traced code (``--precompile``), and
AOTInductor packages (``--aot``, ``aot_denoiser.py``). The clock runs from process start to the
first 200 from /readyz; warm-up is on, so compilation happens before ready.

    .venv/bin/python bench/cold_start.py [--size small]          # on the CPU
    python3 bench/cold_start.py --size sd15 --device cuda         # the same on a GPU

``--size sd15`` writes the full SD 1.5 architecture with random weights (the configs of
``gpu.py``, saved in float16) and loads it the way a real model is loaded; a result from a
device other than the CPU goes to ``cold_start_gpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import common
from server_overhead import free_port

BAR_SHARE = 0.20
# Each cold/warm pair: its name, the suffix of its starts' names, its server flags.
PAIRS = {
    "artifacts": ("", ["--no-precompile"]),
    "precompile": ("_precompile", ["--precompile"]),
    "aot": ("_aot", ["--aot"]),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # The small model by default: the one the bar is stated on.
    parser.add_argument("--size", choices=["tiny", "small", "sd15"], default="small")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    parser.add_argument("--dtype", help="default: float32 on the CPU, bfloat16 elsewhere")
    parser.add_argument("--compile-mode", help="default: the server's")
    parser.add_argument(
        "--smoke", action="store_true", help="with --size sd15: its toy-width twin (for tests)"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per start")
    parser.add_argument(
        "--pairs", nargs="+", choices=list(PAIRS), default=list(PAIRS),
        help="which cold/warm pairs to run (a GPU session has time for two)",
    )
    common.add_output_argument(parser)
    return parser.parse_args(argv)


def server_binary() -> list[str]:
    script = Path(sys.executable).parent / "imagegen-server"
    return [str(script)] if script.exists() else [sys.executable, "-m", "imagegen_server"]


def write_model(directory: Path, size: str, smoke: bool) -> Path:
    """The model the starts load: a make-tiny-model pipeline, or SD 1.5's architecture."""
    if size != "sd15":
        return common.make_model(directory, "sd15", size)
    import gpu
    import torch

    common.quiet_libraries()
    pipe = gpu.build_pipeline("sd15", "cpu", smoke)
    pipe.to(torch.float16).save_pretrained(directory, safe_serialization=True)
    return directory


def time_to_ready(model: Path, log: Path, extra: list[str], env: dict, args) -> dict:
    """Seconds from process start to the first 200 from /readyz, and where they went: the
    server's own phases (its /readyz ``startup_seconds``) and the rest, the interpreter
    starting and importing torch and diffusers before the server can time anything."""
    port = free_port()
    command = [
        *server_binary(), "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
        "--device", args.device, "--dtype", args.dtype, "--default-steps", "2",
        "--log-level", "warning", *extra,
    ]  # fmt: skip
    if args.device == "cpu":
        command += ["--torch-threads", "1"]
    if args.compile_mode and "--compile" in extra:
        command += ["--compile-mode", args.compile_mode]
    timeout = args.timeout
    started = time.perf_counter()
    with open(log, "ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = started + timeout
        while time.perf_counter() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited {process.returncode}; see {log}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                    if r.status == 200:
                        seconds = time.perf_counter() - started
                        body = json.load(r)
                        phases = body["startup_seconds"]
                        return {
                            "seconds": seconds,
                            "phases": {"start_and_imports": seconds - sum(phases.values()),
                                       **phases},
                            "compile_artifacts": body["optimizations"]["compile_artifacts"],
                        }
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"not ready after {timeout}s; see {log}")
    finally:
        common.stop(process, signal.SIGTERM, 30)


PHASE_WORDS = {
    "start_and_imports": "interpreter, torch and the server",
    "imports": "diffusers, transformers, peft and torch._dynamo",
    "load": "reading the weights",
    "optimize": "compile set-up and loading the artifacts",
    "aot_load": "loading the AOTInductor packages",
    "aot_compile": "recording and compiling the AOTInductor packages",
    "warmup": "warm-up",
}
# How each pair of starts keeps what it compiled.
VARIANT_WORDS = {
    "": "torch.compile's artifacts",
    "_precompile": "torch.compile's artifacts with dynamo's code",
    "_aot": "AOTInductor packages",
}


def where_it_went(start: dict) -> str:
    """A start's phases in words, the largest first."""
    phases = sorted(start["phases"].items(), key=lambda kv: -kv[1])
    return ", ".join(f"{PHASE_WORDS.get(k, k)} {v:.1f} s" for k, v in phases if v >= 0.05)


def main(argv=None) -> dict:
    args = parse_args(argv)
    common.quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="bench-cold-") as tmp:
        tmp_path = Path(tmp)
        args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
        model = write_model(tmp_path / "model", args.size, args.smoke)
        cache = tmp_path / "inductor-cache"
        log = tmp_path / "server.log"
        # Every inductor and Triton cache goes under `cache`, so "empty" really is empty and
        # nothing from earlier runs in /tmp/torchinductor_<user> leaks into the cold start.
        env = {
            # No token from the caller's environment: /readyz tells its phases to token
            # holders only, and this server is the benchmark's own, on 127.0.0.1.
            **{k: v for k, v in os.environ.items()
               if k not in ("IMAGEGEN_AUTH_TOKEN", "IMAGEGEN_AUTH_TOKEN_FILE")},
            "PYTHONPATH": os.pathsep.join(
                [str(common.ROOT / "inference_image"), os.environ.get("PYTHONPATH", "")]
            ),
            "TORCHINDUCTOR_CACHE_DIR": str(cache),
            "TRITON_CACHE_DIR": str(cache / "triton"),
            "TRANSFORMERS_VERBOSITY": "error",
        }
        compile_flags = ["--compile", "--compile-cache-dir", str(cache)]
        # (name, flags, whether the cache starts empty); each warm start follows its cold one.
        plan = [("no_compile", ["--no-compile"], False)]
        variants = [PAIRS[pair] for pair in args.pairs]
        for variant, flags in variants:
            plan += [(f"compile_cold{variant}", [*compile_flags, *flags], True),
                     (f"compile_warm{variant}", [*compile_flags, *flags], False)]
        starts, cache_mb = {}, {}
        try:
            for name, flags, empty in plan:
                if empty:
                    shutil.rmtree(cache, ignore_errors=True)
                starts[name] = time_to_ready(model, log, flags, env, args)
                print(f"{name:<24} {starts[name]['seconds']:6.1f} s to ready: " + ", ".join(
                    f"{k} {v:.1f}" for k, v in starts[name]["phases"].items()), flush=True)
                if empty:
                    cache_mb[name] = sum(f.stat().st_size for f in cache.rglob("*")
                                         if f.is_file()) / 1e6
                # Each start as it is measured: a session cut short keeps those it had.
                common.write_result(partial_name(args), {
                    "starts": starts, "cache_size_mb": cache_mb, "complete": False},
                    args.out_dir)
        except (RuntimeError, TimeoutError):
            print(log.read_text(errors="replace")[-4000:])
            raise
    seconds = {name: start["seconds"] for name, start in starts.items()}
    eager = seconds["no_compile"]
    shares = {v: seconds[f"compile_warm{v}"] / seconds[f"compile_cold{v}"]
              for v, _ in variants}
    best = min(shares, key=shares.get)
    cold, warm, share = seconds[f"compile_cold{best}"], seconds[f"compile_warm{best}"], shares[best]
    # A way of compiling may start warm faster partly because it starts cold slower.
    fastest_cold = min(seconds[f"compile_cold{v}"] for v in shares)
    for variant, value in shares.items():
        print(f"warm start{variant or ''}: {value:.0%} of cold")
    # What compile itself costs is the part a cache can save; the rest is the same either way.
    result = {
        "settings": {
            "size": args.size + (" (smoke)" if args.smoke else ""),
            "warmup_steps": 2,
            "device": args.device,
            "dtype": args.dtype,
            "compile_mode": args.compile_mode or "the server's default",
        },
        "seconds_to_ready": seconds,
        # Where each start's seconds went; a warm start loads what its cold start saved:
        # torch.compile's artifacts (with dynamo's traced code too in the _precompile pair), or
        # the AOTInductor packages (_aot).
        "starts": starts,
        **{f"warm_share_of_cold{v}": share for v, share in shares.items()},
        "warm_share_of_fastest_cold": warm / fastest_cold,
        "compile_cost_cold_s": seconds[f"compile_cold{best}"] - eager,
        "compile_cost_warm_s": seconds[f"compile_warm{best}"] - eager,
        "no_compile_share_of_cold": eager / cold,
        "cache_size_mb": cache_mb,
        "bars": [
            common.bar(
                "cold start with torch.compile"
                + ("" if args.device == "cpu" else f" ({args.size} on {args.device})"),
                f"warm-cache start < {BAR_SHARE:.0%} of empty-cache start",
                f"{warm:.1f} s vs {cold:.1f} s = {share:.0%} with {VARIANT_WORDS[best]} ("
                + "".join(f"{VARIANT_WORDS[v]}: {shares[v]:.0%}; " for v in shares if v != best)
                + f"no compile at all: {eager:.1f} s = {eager / cold:.0%}; this warm start "
                f"against the fastest cold start, {fastest_cold:.1f} s: {warm / fastest_cold:.0%}"
                "); the warm start's "
                f"seconds: {where_it_went(starts[f'compile_warm{best}'])}",
                None if args.smoke else share < BAR_SHARE,
                "smoke: toy shapes, measures nothing" if args.smoke else "",
            )
        ],
    }
    path = common.write_result(result_name(args), result, args.out_dir)
    (args.out_dir or common.RESULTS).joinpath(f"{partial_name(args)}.json").unlink(
        missing_ok=True)
    print(f"wrote {path}")
    return result


def result_name(args) -> str:
    name = "cold_start" if args.device == "cpu" else "cold_start_gpu"
    return name + "_smoke" if args.smoke else name


def partial_name(args) -> str:
    return result_name(args) + "_partial"


if __name__ == "__main__":
    main()
