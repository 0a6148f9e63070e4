"""Helpers shared by the server tests (a unique module name: tests/ has no packages)."""

from __future__ import annotations

import contextlib
import socket

import numpy as np

FAMILIES = ("sd15", "sdxl", "sd3", "flux")
STEPS = 3


def mean_abs_diff(a, b) -> float:
    """Mean absolute pixel difference, in units of 1/255."""
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean())


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
