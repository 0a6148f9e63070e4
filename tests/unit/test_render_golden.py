"""Golden files: each example ImageGenService and everything ``render`` prints for it.

One case per sharing mode and provider under ``tests/data/golden/<case>/``:
``input.yaml`` (the CR) and ``expected.yaml`` (the rendered stream, byte for
byte). After an intended change, regenerate them and review the diff (the cases whose file
that run rewrites fail, so that it is never taken for a pass: run once more without it)::

    IMAGEGEN_UPDATE_GOLDEN=1 PYTHONPATH=operator:inference_image \\
        .venv/bin/python -m pytest tests/unit/test_render_golden.py
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import yaml

from imagegen_operator import api
from imagegen_operator.cli import main

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden"
CASES = sorted(p.parent for p in GOLDEN.glob("*/input.yaml"))
UPDATE = os.environ.get("IMAGEGEN_UPDATE_GOLDEN") == "1"


def load_input(path: Path) -> api.ImageGenService:
    return api.parse(yaml.safe_load(path.read_text()))


def render_file(path: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = main(["render", "-f", str(path)], out=out, err=err)
    return status, out.getvalue(), err.getvalue()


def test_cases_cover_every_sharing_mode_and_provider() -> None:
    resources = [load_input(case / "input.yaml") for case in CASES]
    providers = {r.spec.node_pool.provider for r in resources}
    modes = {r.spec.gpu.sharing_summary().split(":")[0] for r in resources}
    combined = {
        r.spec.gpu.sharing_summary() for r in resources if "+" in r.spec.gpu.sharing_summary()
    }
    assert providers == {"GKE", "ConfigConnector", "Existing", "Local"}
    assert modes >= {"exclusive", "mig", "ts", "mps"}
    assert any("+ts:" in s for s in combined) and any("+mps:" in s for s in combined)


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.name)
def test_render_matches_golden(case: Path) -> None:
    status, rendered, errors = render_file(case / "input.yaml")
    assert status == 0, errors
    expected = case / "expected.yaml"
    if UPDATE and (not expected.exists() or expected.read_text() != rendered):
        # Written, and still a failure: a stray IMAGEGEN_UPDATE_GOLDEN=1 cannot pass them all.
        expected.write_text(rendered)
        pytest.fail(f"{expected} updated: review the diff, commit it, and run again")
    assert expected.exists(), (
        f"no golden file; run with IMAGEGEN_UPDATE_GOLDEN=1 to create {expected}"
    )
    assert rendered == expected.read_text(), (
        f"render output differs from {expected}; if intended, regenerate with "
        "IMAGEGEN_UPDATE_GOLDEN=1 and review the diff"
    )


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.name)
def test_render_is_deterministic(case: Path) -> None:
    first = render_file(case / "input.yaml")[1]
    second = render_file(case / "input.yaml")[1]
    assert first == second and first.startswith("---\n")


def test_render_of_several_files_is_the_concatenation() -> None:
    a, b = CASES[0] / "input.yaml", CASES[1] / "input.yaml"
    out = io.StringIO()
    assert main(["render", "-f", str(a), "-f", str(b)], out=out, err=io.StringIO()) == 0
    assert out.getvalue() == render_file(a)[1] + render_file(b)[1]
