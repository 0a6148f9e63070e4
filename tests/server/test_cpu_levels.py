"""The exact-equality tests (single requests and single edits) again, under every lower CPU kernel level this machine supports.

PyTorch picks its CPU kernels by the best instruction set it finds, so a suite that passes on
one CPU can fail on another. Each level is capped per process: ``ATEN_CPU_CAPABILITY`` for
ATen's own vectorized kernels, ``ONEDNN_MAX_CPU_ISA`` for oneDNN (convolutions) and
``MKL_ENABLE_INSTRUCTIONS`` for MKL (GEMMs). The machine's own best level is the one the rest
of the suite runs at; here the levels below it run too, so the next CPU is already covered.
"""

from __future__ import annotations

import os
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

# ATen's level, then the matching caps of oneDNN and MKL (their documented names).
LEVELS = {
    "default": {"ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "avx512": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
}
PROBE = "import torch; print(torch.backends.cpu.get_cpu_capability().lower())"


def level_env(level: str) -> dict[str, str]:
    return {**os.environ, "ATEN_CPU_CAPABILITY": level, **LEVELS[level]}


@cache
def capability(level: str | None) -> str:
    """The level torch runs at when asked for ``level`` (None: the machine's best)."""
    env = level_env(level) if level else os.environ
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def test_every_level_can_be_asked_for():
    # A level torch does not know falls back to the best one silently: catch a renamed level.
    assert capability(None) in LEVELS, capability(None)
    assert capability("default") == "default"


def levels_below_this_machines() -> list[str]:
    """The levels under the machine's best: the rest of the suite runs at the best one, and
    a CPU runs every level below its own (so none is skipped; an x86 CPU without AVX2, with
    no level below its own, has none to run)."""
    import torch

    names = list(LEVELS)
    best = torch.backends.cpu.get_cpu_capability().lower()
    return names[:names.index(best)] if best in names else names


@pytest.mark.slow
@pytest.mark.parametrize("level", levels_below_this_machines())
def test_single_requests_equal_diffusers_exactly_at_level(level):
    assert capability(level) == level  # the caps took: torch runs at the level asked for
    result = subprocess.run(
        [
            sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=0",
            str(HERE / "test_engine.py"), str(HERE / "test_edits.py"),
            "-k", "equal_diffusers_exactly",
        ],
        env=level_env(level),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout, result.stdout[-2000:]
