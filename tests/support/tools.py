"""The pinned Go tools the tests run (hack/build-tools.sh): built once, cached outside the
repository."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def pinned_tool(name: str) -> Path:
    """$NAME (upper case: $HELM, $KUBECONFORM), the one `make cluster-up` links, or the
    pinned build (built once, cached)."""
    if os.environ.get(name.upper()):
        return Path(os.environ[name.upper()])
    linked = ROOT / ".cluster" / "bin" / name
    if linked.exists():
        return linked
    if shutil.which("go") is None:
        pytest.fail(f"{name} is built from source with Go, a prerequisite (README), and Go "
                    "is not installed")
    import localcluster

    return localcluster.build_tools(name) / "bin" / name
