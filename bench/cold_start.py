"""Item 4: time to /readyz with torch.compile on, empty inductor cache vs a persisted one.

Starts the real ``imagegen-server`` process three times on the same tiny model: without
compile (the floor: import, load, warm-up), with compile and an empty cache directory (cold),
then again with the directory the cold start filled (warm), as a pod restarting on a
persistent volume would. The clock runs from process start to the first 200 from /readyz;
warm-up is on, so compilation happens before ready.

    .venv/bin/python bench/cold_start.py [--size tiny]
"""

from __future__ import annotations

import argparse
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


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", "small"], default="tiny")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per start")
    common.add_output_argument(parser)
    return parser.parse_args(argv)


def server_binary() -> list[str]:
    script = Path(sys.executable).parent / "imagegen-server"
    return [str(script)] if script.exists() else [sys.executable, "-m", "imagegen_server"]


def time_to_ready(model: Path, log: Path, extra: list[str], env: dict, timeout: float) -> float:
    port = free_port()
    command = [
        *server_binary(), "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
        "--device", "cpu", "--dtype", "float32", "--default-steps", "2", "--torch-threads", "1",
        "--log-level", "warning", *extra,
    ]  # fmt: skip
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
                        return time.perf_counter() - started
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"not ready after {timeout}s; see {log}")
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main(argv=None) -> dict:
    args = parse_args(argv)
    common.quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="bench-cold-") as tmp:
        tmp_path = Path(tmp)
        model = common.make_model(tmp_path / "model", "sd15", args.size)
        cache = tmp_path / "inductor-cache"
        log = tmp_path / "server.log"
        # Every inductor and Triton cache goes under `cache`, so "empty" really is empty and
        # nothing from earlier runs in /tmp/torchinductor_<user> leaks into the cold start.
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                [str(common.ROOT / "inference_image"), os.environ.get("PYTHONPATH", "")]
            ),
            "TORCHINDUCTOR_CACHE_DIR": str(cache),
            "TRITON_CACHE_DIR": str(cache / "triton"),
            "TRANSFORMERS_VERBOSITY": "error",
        }
        compile_flags = ["--compile", "--compile-cache-dir", str(cache)]
        try:
            eager = time_to_ready(model, log, ["--no-compile"], env, args.timeout)
            print(f"no compile            {eager:6.1f} s to ready", flush=True)
            shutil.rmtree(cache, ignore_errors=True)
            cold = time_to_ready(model, log, compile_flags, env, args.timeout)
            print(f"compile, empty cache  {cold:6.1f} s to ready", flush=True)
            cache_mb = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) / 1e6
            warm = time_to_ready(model, log, compile_flags, env, args.timeout)
            print(f"compile, warm cache   {warm:6.1f} s to ready ({warm / cold:.0%} of cold)")
        except (RuntimeError, TimeoutError):
            print(log.read_text(errors="replace")[-4000:])
            raise
    share = warm / cold
    # What compile itself costs is the part a cache can save; the rest is the same either way.
    result = {
        "settings": {"size": args.size, "warmup_steps": 2, "device": "cpu", "dtype": "float32"},
        "seconds_to_ready": {"no_compile": eager, "compile_cold": cold, "compile_warm": warm},
        "warm_share_of_cold": share,
        "compile_cost_cold_s": cold - eager,
        "compile_cost_warm_s": warm - eager,
        "cache_size_mb": cache_mb,
        "bars": [
            common.bar(
                "4. cold start with torch.compile",
                f"warm-cache start < {BAR_SHARE:.0%} of empty-cache start",
                f"{warm:.1f} s vs {cold:.1f} s = {share:.0%} (no compile: {eager:.1f} s)",
                share < BAR_SHARE,
            )
        ],
    }
    path = common.write_result("cold_start", result, args.out_dir)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
