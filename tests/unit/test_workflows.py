"""The release workflow passes actionlint (it cannot run here: no registry is reachable), and
the versions it releases agree."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import yaml

from support.tools import pinned_tool

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yaml"))


def actionlint(*paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(pinned_tool("actionlint")), "-no-color", *map(str, paths)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_workflows_pass_actionlint() -> None:
    assert WORKFLOWS, "no workflow under .github/workflows"
    result = actionlint(*WORKFLOWS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_would_catch_a_broken_workflow(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("on: push\njobs:\n  x:\n    runs-on: ubuntu-24.04\n"
                      "    steps:\n      - run: echo ${{ github.nope }}\n")
    result = actionlint(broken)
    assert result.returncode != 0 and "nope" in result.stdout


def test_release_pushes_both_images_with_sbom_and_provenance_and_the_chart() -> None:
    release = yaml.safe_load((ROOT / ".github" / "workflows" / "release.yaml").read_text())
    assert release[True]["push"]["tags"] == ["v*.*.*"]  # YAML reads the key `on` as True
    images = release["jobs"]["images"]
    names = {m["name"]: m["dockerfile"] for m in images["strategy"]["matrix"]["include"]}
    assert names == {"imagegen-operator": "operator/Dockerfile",
                     "imagegen-server": "inference_image/Dockerfile"}
    build = next(s for s in images["steps"] if s.get("id") == "build")["with"]
    assert build["sbom"] is True and build["provenance"] == "mode=max"
    assert "helm push" in release["jobs"]["chart"]["steps"][-1]["run"]
    # Nothing is pushed before the sources are shown to name the tag's version.
    assert images["needs"] == "versions"
    assert "hack/check-version.sh" in release["jobs"]["versions"]["steps"][-1]["run"]


def test_every_action_is_pinned_to_a_commit() -> None:
    # A tag can be moved to other code after review; a commit cannot (GitHub's "Security
    # hardening for GitHub Actions": pin actions to a full-length commit SHA). The comment
    # names the release, for people and for Dependabot's updates.
    pinned = re.compile(r"^[\w.-]+/[\w./-]+@[0-9a-f]{40}  # v\d+\.\d+\.\d+$")
    uses = [line.split("uses:", 1)[1].strip() for path in WORKFLOWS
            for line in path.read_text().splitlines() if line.strip().lstrip("- ").startswith("uses:")]
    assert uses, "no action found"
    assert [use for use in uses if not pinned.match(use)] == []


def test_the_sources_name_one_release_version() -> None:
    check = ROOT / "hack" / "check-version.sh"
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    ok = subprocess.run([str(check), version], capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr  # the chart and the default server image agree
    other = subprocess.run([str(check), version + "1"], capture_output=True, text=True,
                           timeout=30)
    assert other.returncode == 1
    assert {"pyproject.toml", "Chart.yaml", "deployment.py"} <= {
        line.split()[1].rsplit("/", 1)[-1].rstrip(":") for line in other.stderr.splitlines()}
