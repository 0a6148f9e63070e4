"""The generated CRD: in sync with the models, structural, and carrying every rule."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from imagegen_operator import api, crd, gke
from imagegen_operator.schema import KubeModel

ROOT = Path(__file__).resolve().parents[2]
CHECKED_IN = ROOT / "crds" / crd.CRD_FILENAME
CHART_COPY = ROOT / crd.CHART_CRD_DIR / crd.CRD_FILENAME


def version() -> dict[str, Any]:
    return crd.crd()["spec"]["versions"][0]


def openapi() -> dict[str, Any]:
    return version()["schema"]["openAPIV3Schema"]


def walk(node: dict[str, Any], path: str = ""):
    """Every schema node with its dotted path."""
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}" if path else name)
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}.*")
    if "items" in node:
        yield from walk(node["items"], f"{path}[]")


# --- in sync, deterministic -------------------------------------------------------------


def test_checked_in_crd_matches_generator():
    assert CHECKED_IN.read_text() == crd.render(), "run `make crds` and commit the result"


def test_chart_copy_matches_generator():
    assert (ROOT / crd.CHART_DIR).is_dir(), f"no chart at {crd.CHART_DIR}"
    assert CHART_COPY.is_file(), "the chart has no copy of the CRD: run `make crds`"
    assert CHART_COPY.read_text() == crd.render(), "run `make crds` and commit the result"


def test_generator_is_byte_identical_across_processes():
    # Separate interpreters with different hash seeds: no set or dict ordering leaks out.
    outputs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT / "operator")}
        result = subprocess.run(
            [sys.executable, "-m", "imagegen_operator.crd"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        )
        outputs.add(result.stdout)
    assert outputs == {crd.render()}


def test_write_targets_crds_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert crd.main(["--write"]) == 0
    assert (tmp_path / "crds" / crd.CRD_FILENAME).read_text() == crd.render()
    # The chart's copy is written only once the chart is there.
    assert not (tmp_path / "charts").exists()
    (tmp_path / "charts" / "imagegen-operator").mkdir(parents=True)
    assert crd.main(["--write"]) == 0
    assert (tmp_path / crd.CHART_CRD_DIR / crd.CRD_FILENAME).read_text() == crd.render()


# --- names, subresources, columns --------------------------------------------------------


def test_names_scope_and_version():
    spec = crd.crd()["spec"]
    assert crd.crd()["metadata"]["name"] == "imagegenservices.imagegen.dev"
    assert spec["group"] == "imagegen.dev"
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == "ImageGenService"
    assert spec["names"]["plural"] == "imagegenservices"
    assert spec["names"]["shortNames"] == ["igs"]
    assert spec["names"]["categories"] == ["imagegen"]
    assert [v["name"] for v in spec["versions"]] == ["v1alpha1"]


def test_status_and_scale_subresources():
    assert version()["subresources"] == {
        "status": {},
        "scale": {
            "specReplicasPath": ".spec.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector",
        },
    }


def test_printer_columns_point_at_existing_fields():
    columns = {c["name"]: c for c in version()["additionalPrinterColumns"]}
    assert {"Ready", "Reason", "Accelerator", "Sharing", "Replicas", "Age"} <= set(columns)
    paths = {p for p, _ in walk(openapi())}
    for column in columns.values():
        json_path = column["jsonPath"]
        if json_path.startswith(".metadata"):
            continue
        field = json_path.lstrip(".").split("[")[0]
        assert field in paths, f"column {column['name']} reads {json_path}, not in the schema"


# --- structural ----------------------------------------------------------------------


def test_schema_is_structural():
    for path, node in walk(openapi()):
        assert "$ref" not in node, path
        assert "title" not in node, path
        assert node.get("additionalProperties") is not False, path
        assert not node.get("x-kubernetes-preserve-unknown-fields"), path
        assert "nullable" not in node, path
        if "anyOf" in node:
            # The one allowed use: int-or-string quantities.
            assert node.get("x-kubernetes-int-or-string") is True, path
        else:
            assert "type" in node, f"{path} has no type"
        if isinstance(node.get("exclusiveMinimum"), bool):
            assert "minimum" in node, path


def test_every_field_has_a_description():
    missing = [
        path
        for path, node in walk(openapi())
        if path.startswith(("spec", "status"))
        and not path.endswith(("*", "[]"))
        and not node.get("description")
    ]
    assert missing == []


def test_strings_are_bounded_for_cel_cost():
    # The API server estimates a rule's cost from maxLength; unbounded strings cost most.
    unbounded = [
        path
        for path, node in walk(openapi())
        if path.startswith("spec")
        and node.get("type") == "string"
        and "maxLength" not in node
        and "enum" not in node
    ]
    assert unbounded == []


def test_enums_come_from_the_gke_table():
    gpu = openapi()["properties"]["spec"]["properties"]["gpu"]["properties"]
    assert gpu["type"]["enum"] == list(gke.ACCELERATORS)
    all_sizes = {s for t in gke.ACCELERATORS for s in gke.mig_sizes(t)}
    assert set(gpu["partitionSize"]["enum"]) == all_sizes
    assert gpu["countPerNode"]["enum"] == list(gke.GPU_COUNTS_PER_NODE)
    clients = gpu["sharing"]["properties"]["maxSharedClientsPerGpu"]
    assert (clients["minimum"], clients["maximum"]) == (2, 48)


def test_mig_rules_list_each_types_sizes():
    rules = openapi()["properties"]["spec"]["properties"]["gpu"]["x-kubernetes-validations"]
    for gpu_type in gke.ACCELERATORS:
        sizes = gke.mig_sizes(gpu_type)
        per_type = [r for r in rules if f"self.type != '{gpu_type}'" in r["rule"]]
        if not sizes:
            assert per_type == []
            continue
        (rule,) = per_type
        assert all(f"r'{size}'" in rule["rule"] for size in sizes)
        assert all(size in rule["message"] for size in sizes)


def test_every_python_rule_is_in_the_crd_with_its_field():
    emitted = [
        (path, v)
        for path, node in walk(openapi())
        for v in node.get("x-kubernetes-validations", [])
    ]
    models = [m for m in vars(api).values() if isinstance(m, type) and issubclass(m, KubeModel)]
    rules = [r for m in models for r in m.rules]
    assert len(rules) >= 8
    # Beside them, at the root, the one rule on metadata.name (ObjectMeta's in Python).
    (name_rule,) = [v for path, v in emitted if path == ""]
    assert "self.metadata.name" in name_rule["rule"]
    assert name_rule["message"].startswith("metadata.name: ")
    # A model used in two places (a selector of pods and one of namespaces) has its rules
    # at each: one entry per rule and place.
    places = {m: sum(1 for _, node in walk(openapi())
                     if set(node.get("properties") or {}) == set(m.model_json_schema(
                         by_alias=True)["properties"])) for m in models if m.rules}
    assert len(emitted) == sum(len(m.rules) * places[m] for m in models if m.rules) + 1
    for model in (m for m in models if m.rules):
        for rule in model.rules:
            # Two rules may share an expression (the model's and the adapters' URI rules),
            # never a message.
            entries = [v for _, v in emitted
                       if (v["rule"], v["message"]) == (rule.cel, rule.message)]
            assert len(entries) == places[model] >= 1, rule.message
            for entry in entries:
                assert entry["fieldPath"] == rule.field
                assert "\n" not in entry["message"]


def apply_schema_defaults(schema: dict[str, Any], value: Any) -> Any:
    """What the API server does with `default`s: fill absent fields, then recurse."""
    if not isinstance(value, dict) or "properties" not in schema:
        return value
    value = dict(value)
    for name, child in schema["properties"].items():
        if name not in value and "default" in child:
            value[name] = copy.deepcopy(child["default"])
        if name in value:
            value[name] = apply_schema_defaults(child, value[name])
    return value


@pytest.mark.parametrize("provider", ["Local", "GKE"])
def test_schema_defaults_equal_model_defaults(provider):
    spec = {
        "model": {"uri": "gs://bucket/sdxl"},
        "gpu": {"type": "nvidia-l4"},
        "nodePool": {"provider": provider, "cluster": "projects/proj-1/locations/l/clusters/c"},
        "autoscaling": {"maxReplicas": 3},
        "server": {"authSecretRef": {"name": "s"}},
    }
    server_side = apply_schema_defaults(openapi()["properties"]["spec"], spec)
    python_side = api.parse({"spec": spec}).spec.model_dump(mode="json", exclude_none=True)
    assert server_side == python_side
