#!/usr/bin/env bash
# The GPU benchmarks on a machine that has PyTorch but cannot reach PyPI, run from the
# repository root with the wheels of bench/gpu_wheels.sh in .whl/:
#
#   bench/gpu_session.sh gpu          # GPU benchmark: bench/gpu.py (stops itself after ~6 minutes)
#   bench/gpu_session.sh cold-start   # cold start on the GPU: full SD 1.5, empty vs warm cache
#
# One part per device call (each fits the 10 minutes a call may run, not both together), and
# with 15 minutes of device time a session, machine start included, one part per session:
# `gpu` first. The call carries the wheels: `carry: [".whl"]`. gpu.py writes its result after
# each variant and part, cold_start.py after each start (cold_start_gpu_partial.json), so a
# part cut short still leaves what it measured; the whole log is $OUT/<part>.log.
#
# Results go to $OUT (default bench/results); copy gpu.json and cold_start_gpu.json into
# bench/results/ here and run `.venv/bin/python bench/run_all.py --no-run`. gpu.json's
# step_rows is the measured step cost: `.venv/bin/python bench/step_batching.py --gpu-json
# bench/results/gpu.json` replays step-level batching on it here, without a GPU.
set -uo pipefail
what=${1:-gpu}
out=${OUT:-bench/results}
site=/tmp/imagegen-site
if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "no wheels in .whl/: run bench/gpu_wheels.sh here and carry .whl" >&2
    exit 1
fi
# Installed afresh unless a whole install is there (a warm machine's): one cut short is redone.
if [ ! -f "$site/.complete" ]; then
    rm -rf "$site"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" .whl/*.whl || exit 1
    touch "$site/.complete"
fi
mkdir -p "$out"
export PYTHONPATH="$site:inference_image" PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
status=0
# The reply keeps only the output's tail: the whole of it goes to a log under $OUT too.
if [ "$what" = gpu ]; then
    timeout 540 python3 bench/gpu.py --out-dir "$out" 2>&1 | tee "$out/gpu.log"
    status=${PIPESTATUS[0]}
fi
if [ "$what" = cold-start ]; then
    # The inductor's default mode: max-autotune would spend the whole session tuning.
    # Two of the three cold/warm pairs fit the session: dynamo's code saved, and AOTInductor.
    timeout 540 python3 bench/cold_start.py --size sd15 --device cuda --compile-mode default \
        --pairs precompile aot --timeout 240 --out-dir "$out" 2>&1 | tee "$out/cold-start.log"
    status=${PIPESTATUS[0]}
fi
exit $status
