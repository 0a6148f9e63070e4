"""Fixtures of more than one unit test module."""

from __future__ import annotations

from pathlib import Path

import pytest

from support.tools import pinned_tool


@pytest.fixture(scope="session")
def promtool() -> Path:
    """Prometheus' promtool, pinned (hack/versions.env)."""
    return pinned_tool("promtool")
