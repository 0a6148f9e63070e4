"""requirements.lock pins what pyproject.toml asks for: every extra, every platform, hashed.

`make setup` installs exactly the lock; this test fails when pyproject.toml changed and the
lock was not refreshed with `make lock`.
"""

from __future__ import annotations

import os
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


def locked(path: str = "requirements.lock") -> dict[str, list[tuple[Version, Marker | None, int]]]:
    """Package -> [(version, marker, hash count)]: a package may be pinned per platform."""
    pins: dict[str, list] = {}
    current = None
    for line in (ROOT / path).read_text().splitlines():
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


def test_setup_is_a_no_op_once_installed(tmp_path):
    """`make cluster-up`, `make demo` and the rest depend on setup: with nothing changed
    since the last install (its stamp is newer than pyproject.toml and the lock) it must
    not install again."""
    import shutil
    import subprocess

    if shutil.which("make") is None:
        pytest.fail("make is needed (the README's two commands are make targets)")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "uv").touch(mode=0o755)
    (venv / ".installed").touch()  # installed just now

    def dry(*targets: str) -> str:
        return subprocess.run(["make", "-n", f"VENV={venv}", *targets], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout

    assert "uv pip" not in dry("setup", "cluster-up")
    old = (ROOT / "pyproject.toml").stat().st_mtime - 10
    os.utime(venv / ".installed", (old, old))  # older than pyproject.toml: install again
    assert "uv pip sync" in dry("setup")


@pytest.mark.parametrize(("lock", "extra", "has", "lacks"), [
    ("inference_image/requirements.lock", "server", {"torch", "diffusers", "fastapi"},
     {"pytest", "ruff"}),
    ("operator/requirements.lock", "operator",
     {"kopf", "kubernetes", "google-cloud-container", "pydantic"}, {"torch", "pytest"}),
])
def test_each_images_lock_is_its_extra_at_the_main_locks_versions(lock, extra, has, lacks):
    main, image = locked(), locked(lock)
    assert has <= set(image) and not lacks & set(image)  # that extra only
    differ = [name for name, entries in image.items()
              if {v for v, *_ in entries} - {v for v, *_ in main.get(name, [])}]
    assert differ == [], "run `make lock`: " + ", ".join(differ)
    reqs = [r for r in declared((ROOT / "pyproject.toml").read_text())
            if r[0] in ("dependencies", f"optional-dependencies.{extra}")]
    assert mismatches(reqs, image) == []


def test_the_operator_images_build_backend_is_locked_at_the_main_locks_version():
    """The operator image installs its package with no build isolation: setuptools comes from
    operator/build-requirements.lock, hashed, at the version the main lock has."""
    build, main = locked("operator/build-requirements.lock"), locked()
    assert set(build) == {"setuptools"}
    assert {v for v, *_ in build["setuptools"]} <= {v for v, *_ in main["setuptools"]}
    assert all(hashes for _, _, hashes in build["setuptools"])
    dockerfile = (ROOT / "operator" / "Dockerfile").read_text()
    assert "-r /tmp/build-requirements.lock" in dockerfile and "--no-build-isolation" in dockerfile
