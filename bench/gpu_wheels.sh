#!/usr/bin/env bash
# Wheels that bench/gpu.py and bench/cold_start.py need beyond PyTorch, for a GPU machine
# that has PyTorch, transformers, huggingface-hub, safetensors, numpy, Pillow, anyio, h11 and
# click but cannot reach PyPI.
#
#   bench/gpu_wheels.sh [DIR] [PYTHON_VERSION]     # default: .whl and 3.12
#
# On the GPU machine, from the repository root, with DIR copied there:
#   python3 -m pip install --no-index --no-deps --target /tmp/site DIR/*.whl
#   PYTHONPATH=/tmp/site:inference_image python3 bench/gpu.py
# The pins are the versions the test suite runs with (see `pip list` in .venv).
set -euo pipefail
dir=${1:-.whl}
python_version=${2:-3.12}
pins=(
    diffusers==0.42.1 importlib_metadata==10.2.0 zipp==4.1.2
    pydantic==2.14.4 pydantic_core==2.50.5 pydantic-settings==2.16.3
    annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0
    python-dotenv==1.2.4
    fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 sniffio==1.3.1 opentelemetry-api==1.45.2
    sse-starlette==3.7.0 python-multipart==0.0.34
    # Built against another torch than the device's 2.11: its quantization may not load
    # there, which gpu.py then records as skipped, with the error, and goes on.
    torchao==0.18.0
)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    platforms+=(--platform "$p")
done
python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version "$python_version" --implementation cp "${platforms[@]}" \
    -d "$dir" "${pins[@]}"
ls "$dir"
