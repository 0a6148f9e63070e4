"""Every golden file passes kubeconform, offline and strict.

kubeconform reads JSON schemas from a directory this module writes for the
session, from three offline sources:

- Kubernetes kinds: ``tests/data/kubernetes-openapi/v1.34.4.json``, the
  ``/openapi/v2`` document of the pinned kube-apiserver (hack/versions.env),
  pruned to the definitions the rendered kinds reach. Regenerate it with
  ``python tests/unit/test_render_kubeconform.py refresh-openapi KUBECONFIG``.
- Config Connector and Prometheus operator kinds: their upstream CRDs in
  ``tests/data/crds/`` (openAPIV3Schema of each served version).
- The GKE ``NodePool`` document: a schema generated from the protobuf
  descriptor of ``google.cloud.container_v1.NodePool``, the very message the
  GKE provider sends.

Every object schema is made strict (no properties beyond the schema's), so a
misspelt field fails as it would with ``kubectl apply --validate=strict``.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from support.tools import pinned_tool

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
GOLDEN = DATA / "golden"
OPENAPI = DATA / "kubernetes-openapi" / "v1.34.4.json"
CRDS = DATA / "crds"

# kubeconform's own naming: kind, then the first label of the group, then the version
# (deployment-apps-v1.json, service-v1.json, podmonitor-monitoring-v1.json).
SCHEMA_LOCATION = "{{ .ResourceKind }}{{ .KindSuffix }}.json"


def schema_file(group: str, version: str, kind: str) -> str:
    prefix = f"-{group.split('.')[0]}" if group else ""
    return f"{kind.lower()}{prefix}-{version}.json".lower()


# --- Kubernetes OpenAPI v2 -> standalone JSON schemas -------------------------


def _inline(node: Any, definitions: dict[str, Any], stack: tuple[str, ...] = ()) -> Any:
    """Resolve ``$ref``s (recursively) and turn Kubernetes' formats into JSON Schema."""
    if isinstance(node, list):
        return [_inline(n, definitions, stack) for n in node]
    if not isinstance(node, dict):
        return node
    # Only a string is a reference or a description: a schema may also have
    # *properties* named "$ref" or "description" (the CRD kind's own schema does).
    ref = node.get("$ref")
    if isinstance(ref, str):
        name = ref.rsplit("/", 1)[-1]
        if name in stack:  # a recursive type: accept anything below this point
            return {}
        return _inline(definitions[name], definitions, (*stack, name))
    out = {
        k: _inline(v, definitions, stack)
        for k, v in node.items()
        if not (k == "description" and isinstance(v, str))
    }
    if out.get("format") == "int-or-string":
        out.pop("type", None)
        out["type"] = ["integer", "string"]
    if out.get("type") == "object" and "properties" in out:
        out.setdefault("additionalProperties", False)
    return out


def kubernetes_schemas(openapi: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``group/kind_version.json`` -> schema, for each kind in the OpenAPI document."""
    definitions = copy.deepcopy(openapi["definitions"])
    # YAML writes quantities as numbers too (`nvidia.com/gpu: 1`); the API server accepts both.
    definitions["io.k8s.apimachinery.pkg.api.resource.Quantity"] = {"type": ["string", "number"]}
    schemas = {}
    for name, definition in definitions.items():
        for gvk in definition.get("x-kubernetes-group-version-kind", []):
            path = schema_file(gvk["group"], gvk["version"], gvk["kind"])
            schemas[path] = _inline(definition, definitions, (name,))
    return schemas


# --- CRDs -> JSON schemas -----------------------------------------------------


def _strict_crd_schema(node: Any) -> Any:
    if isinstance(node, list):
        return [_strict_crd_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict_crd_schema(v) for k, v in node.items() if k != "description"}
    if out.pop("x-kubernetes-int-or-string", False):
        out["type"] = ["integer", "string"]
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if (
        out.get("type") == "object"
        and "properties" in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out.setdefault("additionalProperties", False)
    return out


def crd_schemas(crd: dict[str, Any]) -> dict[str, dict[str, Any]]:
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    out = {}
    for version in crd["spec"]["versions"]:
        schema = _strict_crd_schema(version["schema"]["openAPIV3Schema"])
        out[schema_file(group, version["name"], kind)] = schema
    return out


# --- protobuf message -> JSON schema (proto3 JSON mapping) -------------------


def _repeated(field: Any) -> bool:
    # protobuf 6 has is_repeated; older releases only the label.
    if hasattr(field, "is_repeated"):
        return field.is_repeated
    return field.label == field.LABEL_REPEATED


def _proto_schema(descriptor: Any, stack: tuple[str, ...] = ()) -> dict[str, Any]:
    from google.protobuf.descriptor import FieldDescriptor as F

    if descriptor.full_name in stack:
        return {}
    stack = (*stack, descriptor.full_name)
    wellknown = {
        "google.protobuf.Timestamp": {"type": "string"},
        "google.protobuf.Duration": {"type": "string"},
        "google.protobuf.Struct": {"type": "object"},
        "google.protobuf.Value": {},
    }
    if descriptor.full_name in wellknown:
        return wellknown[descriptor.full_name]

    def scalar(field: Any) -> dict[str, Any]:
        if field.type == F.TYPE_MESSAGE:
            return _proto_schema(field.message_type, stack)
        if field.type == F.TYPE_ENUM:
            return {"enum": [v.name for v in field.enum_type.values]}
        if field.type in (F.TYPE_INT64, F.TYPE_UINT64, F.TYPE_SINT64, F.TYPE_FIXED64):
            # 64-bit integers are strings in proto3 JSON; parsers take numbers too.
            return {"type": ["string", "integer"], "pattern": "^-?[0-9]+$"}
        if field.type in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
            return {"type": "number"}
        if field.type == F.TYPE_BOOL:
            return {"type": "boolean"}
        if field.type in (F.TYPE_STRING, F.TYPE_BYTES):
            return {"type": "string"}
        return {"type": "integer"}

    properties = {}
    for field in descriptor.fields:
        entry = field.message_type.GetOptions().map_entry if field.message_type else False
        if entry:
            value_field = field.message_type.fields_by_name["value"]
            schema = {"type": "object", "additionalProperties": scalar(value_field)}
        elif _repeated(field):
            schema = {"type": "array", "items": scalar(field)}
        else:
            schema = scalar(field)
        properties[field.json_name] = schema
    return {"type": "object", "properties": properties, "additionalProperties": False}


def gke_nodepool_schema() -> dict[str, dict[str, Any]]:
    from google.cloud import container_v1

    from imagegen_operator.render.nodepool import GKE_DOC_API_VERSION, PARENT_ANNOTATION

    group, version = GKE_DOC_API_VERSION.split("/")
    schema = {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": GKE_DOC_API_VERSION},
            "kind": {"const": "NodePool"},
            "metadata": {
                "type": "object",
                "required": ["name", "annotations"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string"},
                    "annotations": {
                        "type": "object",
                        "required": [PARENT_ANNOTATION],
                        "additionalProperties": {"type": "string"},
                    },
                },
            },
            "spec": _proto_schema(container_v1.NodePool.pb().DESCRIPTOR),
        },
    }
    return {schema_file(group, version, "NodePool"): schema}


# --- the tests ---------------------------------------------------------------


def write_schemas(directory: Path) -> None:
    schemas = kubernetes_schemas(json.loads(OPENAPI.read_text()))
    for crd_file in sorted(CRDS.glob("*.yaml")):
        schemas.update(crd_schemas(yaml.safe_load(crd_file.read_text())))
    schemas.update(gke_nodepool_schema())
    for relative, schema in schemas.items():
        path = directory / relative
        assert not path.exists(), f"two kinds map to the schema file {relative}"
        path.write_text(json.dumps(schema))


@pytest.fixture(scope="module")
def kubeconform(tmp_path_factory: pytest.TempPathFactory):
    """Run kubeconform over files, strict and offline; returns the CompletedProcess."""
    binary = pinned_tool("kubeconform")
    schemas = tmp_path_factory.mktemp("schemas")
    write_schemas(schemas)

    def run(*files: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                str(binary),
                "-strict",
                "-summary",
                "-output",
                "text",
                "-schema-location",
                f"{schemas}/{SCHEMA_LOCATION}",
                *map(str, files),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )

    return run


GOLDEN_FILES = sorted(GOLDEN.glob("*/expected.yaml"))


def test_there_are_golden_files_to_check() -> None:
    assert len(GOLDEN_FILES) >= 6


@pytest.mark.parametrize("golden", GOLDEN_FILES, ids=lambda p: p.parent.name)
def test_golden_file_is_valid(kubeconform, golden: Path) -> None:
    result = kubeconform(golden)
    assert result.returncode == 0, result.stdout + result.stderr
    # Every document was checked against a schema, none skipped for want of one.
    documents = [d for d in yaml.safe_load_all(golden.read_text()) if d]
    assert f"Valid: {len(documents)}" in result.stdout, result.stdout


def test_monitors_are_valid(kubeconform, tmp_path: Path) -> None:
    from test_render_golden import load_input

    from imagegen_operator.render.monitoring import render_monitor

    resource = load_input(GOLDEN / "mig-timesharing-gke" / "input.yaml")
    path = tmp_path / "monitors.yaml"
    path.write_text(
        yaml.safe_dump_all([render_monitor(resource, k) for k in ("ServiceMonitor", "PodMonitor")])
    )
    result = kubeconform(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Valid: 2" in result.stdout


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: d["spec"]["template"]["spec"].update(hostIpc=True), "hostIpc"),
        (lambda d: d["spec"].update(replicas="two"), "replicas"),
    ],
    ids=["misspelt-field", "wrong-type"],
)
def test_kubeconform_catches_a_broken_deployment(kubeconform, tmp_path: Path, mutate, expected):
    """The schemas are strict enough to fail: a check that cannot fail checks nothing."""
    docs = list(yaml.safe_load_all((GOLDEN / "mps-configconnector" / "expected.yaml").read_text()))
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    mutate(deployment)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(deployment))
    result = kubeconform(path)
    assert result.returncode != 0
    assert expected in result.stdout


def test_kubeconform_catches_a_broken_nodepool(kubeconform, tmp_path: Path) -> None:
    docs = yaml.safe_load_all((GOLDEN / "mig-timesharing-gke" / "expected.yaml").read_text())
    pool = next(d for d in docs if d["kind"] == "NodePool")
    pool["spec"]["config"]["accelerators"][0]["gpuSharingConfig"]["gpuSharingStrategy"] = "MIG"
    path = tmp_path / "pool.yaml"
    path.write_text(yaml.safe_dump(pool))
    result = kubeconform(path)
    assert result.returncode != 0 and "gpuSharingStrategy" in result.stdout


# --- refreshing the Kubernetes OpenAPI snapshot --------------------------------

RENDERED_KINDS = {
    ("apps", "v1", "Deployment"),
    ("", "v1", "Service"),
    ("", "v1", "Node"),
    ("policy", "v1", "PodDisruptionBudget"),
    ("autoscaling", "v2", "HorizontalPodAutoscaler"),
    ("batch", "v1", "Job"),
    ("networking.k8s.io", "v1", "NetworkPolicy"),
}


def prune_openapi(openapi: dict[str, Any]) -> dict[str, Any]:
    """The definitions the rendered kinds reach, without descriptions (size)."""
    definitions = openapi["definitions"]
    keep: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if ref and (name := ref.rsplit("/", 1)[-1]) not in keep:
                keep.add(name)
                walk(definitions[name])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    for name, definition in definitions.items():
        gvks = {
            (g["group"], g["version"], g["kind"])
            for g in definition.get("x-kubernetes-group-version-kind", [])
        }
        if gvks & RENDERED_KINDS:
            keep.add(name)
            walk(definition)

    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k != "description"}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    return {
        "swagger": openapi["swagger"],
        "info": openapi["info"],
        "definitions": {k: strip(definitions[k]) for k in sorted(keep)},
    }


if __name__ == "__main__":
    # python tests/unit/test_render_kubeconform.py refresh-openapi KUBECONFIG [KUBECTL]
    if len(sys.argv) < 3 or sys.argv[1] != "refresh-openapi":
        sys.exit(__doc__)
    kubectl = sys.argv[3] if len(sys.argv) > 3 else "kubectl"
    raw = subprocess.run(
        [kubectl, "--kubeconfig", sys.argv[2], "get", "--raw", "/openapi/v2"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    OPENAPI.write_text(json.dumps(prune_openapi(json.loads(raw)), indent=1, sort_keys=True) + "\n")
    print(f"wrote {OPENAPI}")
