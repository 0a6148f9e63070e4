"""requirements.lock pins what pyproject.toml asks for: every extra, every platform, hashed.

`make setup` installs exactly the lock; this test fails when pyproject.toml changed and the
lock was not refreshed with `make lock`.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
PIN = re.compile(r"^(?P<name>[A-Za-z0-9._-]+)==(?P<version>[^\s;\\]+)\s*(?:;\s*(?P<marker>[^\\]+?))?\s*\\?$")


def locked() -> dict[str, list[tuple[Version, Marker | None, int]]]:
    """Package -> [(version, marker, hash count)]: a package may be pinned per platform."""
    pins: dict[str, list] = {}
    current = None
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if match := PIN.match(line):
            marker = Marker(match["marker"]) if match["marker"] else None
            current = [Version(match["version"]), marker, 0]
            pins.setdefault(canonicalize_name(match["name"]), []).append(current)
        elif line.strip().startswith("--hash=sha256:") and current is not None:
            current[2] += 1
    return {name: [tuple(p) for p in entries] for name, entries in pins.items()}


def declared(pyproject: str) -> list[tuple[str, Requirement]]:
    project = tomllib.loads(pyproject)["project"]
    out = [("dependencies", Requirement(r)) for r in project["dependencies"]]
    for extra, reqs in project["optional-dependencies"].items():
        out += [(f"optional-dependencies.{extra}", Requirement(r)) for r in reqs]
    return out


def mismatches(requirements: list[tuple[str, Requirement]], pins: dict) -> list[str]:
    """What pyproject.toml asks for that the lock does not pin, one line each."""
    out = []
    for where, requirement in requirements:
        entries = pins.get(canonicalize_name(requirement.name))
        if not entries:
            out.append(f"{requirement.name} ({where}) is not in requirements.lock")
        for version, _marker, _hashes in entries or []:
            if not requirement.specifier.contains(version, prereleases=True):
                out.append(f"{requirement.name}=={version} is outside {requirement.specifier} ({where})")
    return out


def test_pyproject_and_the_lock_agree():
    problems = mismatches(declared((ROOT / "pyproject.toml").read_text()), locked())
    assert problems == [], "run `make lock`: " + "; ".join(problems)


def test_every_pin_has_a_hash_and_torch_is_among_them():
    pins = locked()
    assert "torch" in pins and "nvidia-ml-py" in pins
    unhashed = [name for name, entries in pins.items() for *_, hashes in entries if hashes == 0]
    assert unhashed == []


def test_a_changed_pyproject_is_caught():
    pins = locked()
    torch = pins["torch"][0][0]
    changed = (ROOT / "pyproject.toml").read_text().replace('"torch>=', f'"torch>{torch},<99,>=')
    changed = changed.replace('"PyYAML>=6",', '"PyYAML>=6",\n  "not-a-locked-package>=1",')
    problems = mismatches(declared(changed), pins)
    assert any(p.startswith(f"torch=={torch} is outside") for p in problems), problems
    assert any(p.startswith("not-a-locked-package ") for p in problems), problems


def test_setup_is_a_no_op_once_installed():
    """`make cluster-up`, `make demo` and the rest depend on setup: with nothing changed
    it must not install again (a stamp newer than pyproject.toml and the lock)."""
    import shutil
    import subprocess

    if not (ROOT / ".venv" / ".installed").exists() or shutil.which("make") is None:
        pytest.skip("needs `make setup` to have run (make test and make unit do)")
    dry = subprocess.run(["make", "-n", "setup", "cluster-up"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert "uv pip" not in dry and "venv" not in dry.replace(".venv/bin/python", ""), dry
