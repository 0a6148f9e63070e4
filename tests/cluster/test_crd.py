"""The generated CRD on a real API server: examples in, the invalid table out, defaults,
explain, scale, status and strict field validation.

The invalid table is the one tests/unit/test_api_rules.py runs through api.parse, so
the CRD's schema and CEL rules and the Python rules are held to the same cases.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path

import pytest
import yaml

from imagegen_operator import api, crd, gke

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
CASES_FILE = ROOT / "tests" / "data" / "invalid" / "cases.yaml"
FIELD = "test.imagegen.dev/expect-field"
TEXT = "test.imagegen.dev/expect-text"
CASES = [doc for doc in yaml.safe_load_all(CASES_FILE.read_text()) if doc]
EXAMPLES = [
    doc
    for path in sorted((ROOT / "examples").glob("*.yaml"))
    for doc in yaml.safe_load_all(path.read_text())
    if doc and doc.get("kind") == api.KIND
]

MINIMAL = {
    "apiVersion": api.API_VERSION,
    "kind": api.KIND,
    "metadata": {"name": "minimal"},
    "spec": {
        "model": {"uri": "gs://bucket/models/sdxl"},
        "gpu": {"type": "nvidia-l4"},
        "nodePool": {"provider": "Local"},
    },
}


def names_field(message: str, field: str) -> bool:
    return re.search(r"(?<![\w.])" + re.escape(field) + r"(?=[:\"])", message) is not None


@pytest.fixture(scope="module")
def ns(cluster):
    """The CRD installed from crds/, and a namespace of our own for the objects."""
    cluster.kubectl(
        "apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds" / crd.CRD_FILENAME)
    )
    cluster.wait_established(crd.CRD_NAME)
    name = f"crd-test-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    # kubectl caches discovery; the short name resolves once it has seen the new CRD.
    eventually(cluster, "get", "-n", name, "igs")
    yield name
    # Gone before the next module: its examples are real services, and an operator watching
    # every namespace would take them up while the namespace is still being emptied (one
    # shares its simulated pool with the later tests' services).
    cluster.kubectl("delete", "namespace", name, "--wait=true", "--timeout=90s", timeout=100)


def eventually(cluster, *args: str, timeout: float = 30):
    """Run kubectl until it succeeds (discovery and OpenAPI lag a new CRD a little)."""
    deadline = time.monotonic() + timeout
    while True:
        result = cluster.kubectl(*args, check=False)
        if result.returncode == 0 or time.monotonic() > deadline:
            assert result.returncode == 0, result.stderr
            return result
        time.sleep(1)


def create(cluster, ns: str, body: dict, *args: str):
    return cluster.kubectl(
        "create", "-n", ns, "-f", "-", *args, input=json.dumps(body), check=False
    )


def get(cluster, ns: str, name: str) -> dict:
    return json.loads(cluster.kubectl("get", "-n", ns, "igs", name, "-o", "json").stdout)


@pytest.mark.parametrize("example", EXAMPLES, ids=[e["metadata"]["name"] for e in EXAMPLES])
def test_example_is_accepted_with_the_models_defaults(cluster, ns, example):
    result = create(cluster, ns, example)
    assert result.returncode == 0, result.stderr
    stored = get(cluster, ns, example["metadata"]["name"])
    # What the server stored, defaults included, is what api.parse makes of the example.
    python_side = api.parse(example).spec.model_dump(mode="json", exclude_none=True)
    assert stored["spec"] == python_side


@pytest.mark.parametrize("case", CASES, ids=[c["metadata"]["name"] for c in CASES])
def test_invalid_manifest_is_rejected_naming_the_field(cluster, ns, case):
    # kubectl's default --validate=strict: unknown fields are errors, not dropped.
    result = create(cluster, ns, case)
    assert result.returncode != 0, f"{case['metadata']['name']} was accepted"
    annotations = case["metadata"]["annotations"]
    assert names_field(result.stderr, annotations[FIELD]), result.stderr
    if TEXT in annotations:
        assert annotations[TEXT] in result.stderr
    # The same manifest is refused in Python at the same field.
    with pytest.raises(api.InvalidSpec) as err:
        api.parse(case)
    assert names_field(str(err.value), annotations[FIELD])


def boundary_specs() -> list[tuple[str, dict]]:
    """Valid specs at the edges of each rule: every MIG size of every type, min == max,
    the extreme widths, step counts and client counts."""
    base = MINIMAL["spec"]
    specs = [
        (
            f"{gpu_type}-{size}".replace(".", "-"),
            {**base, "gpu": {"type": gpu_type, "partitionSize": size, "countPerNode": 8}},
        )
        for gpu_type in api.MIG_GPU_TYPES
        for size in gke.mig_sizes(gpu_type)
    ]
    specs.append(
        (
            # A zonal cluster's pool may take other zones of its region, all sixteen.
            "zones-of-a-zonal-cluster",
            {
                **base,
                "nodePool": {
                    "provider": "GKE",
                    "cluster": "projects/imagegen-test/locations/us-central1-a/clusters/c",
                    "locations": [f"us-central1-{letter}" for letter in "abcdefghijklmnop"],
                },
            },
        )
    )
    specs.append(
        (
            # Every kind of source; matchLabels: {} is "every namespace".
            "allow-from-every-kind",
            {
                **base,
                "server": {"allowFrom": [
                    {"namespaceSelector": {"matchLabels": {}}},
                    {"podSelector": {"matchExpressions": [
                        {"key": "app", "operator": "In", "values": ["gw"]},
                        {"key": "example.com/canary", "operator": "DoesNotExist"}]}},
                    {"namespaceSelector": {"matchLabels": {"team": "a"}},
                     "podSelector": {"matchLabels": {"app": "gw"}}},
                    {"ipBlock": {"cidr": "0.0.0.0/0"}},
                    {"ipBlock": {"cidr": "2001:db8::/64"}},
                    {"ipBlock": {"cidr": "10.8.1.2/32"}},
                ]},
            },
        )
    )
    specs.append(
        (
            "edges",
            {
                **base,
                "pipeline": {
                    "stages": {"maxBatchSize": 64, "batchWindowMs": 0},
                    "defaults": {"steps": 200, "width": 4096, "height": 64, "guidanceScale": 0},
                },
                "gpu": {
                    "type": "nvidia-l4",
                    "sharing": {"strategy": "MPS", "maxSharedClientsPerGpu": 48},
                },
                "nodePool": {"provider": "Local", "minNodes": 3, "maxNodes": 3},
                "replicas": 0,
                "autoscaling": {"minReplicas": 5, "maxReplicas": 5},
            },
        )
    )
    return specs


@pytest.mark.parametrize(
    ("name", "spec"), boundary_specs(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_boundary_specs_are_accepted_by_both(cluster, ns, name, spec):
    body = {**MINIMAL, "metadata": {"name": name}, "spec": spec}
    result = create(cluster, ns, body, "--dry-run=server")
    assert result.returncode == 0, result.stderr
    api.parse(body)


@pytest.mark.parametrize("name", ["1sdxl", "sdxl.turbo", "a" * 64, "Sdxl"])
def test_a_name_that_cannot_name_the_service_is_refused_by_both(cluster, ns, name):
    """The name is its Service's and its pods' instance label: a dotted or over-long one,
    which a custom resource may have, would be refused only once the node pool is made."""
    body = {**MINIMAL, "metadata": {"name": name}}
    result = create(cluster, ns, body, "--dry-run=server")
    assert result.returncode != 0 and "metadata.name: " in result.stderr, result.stderr
    with pytest.raises(api.InvalidSpec, match="metadata.name: "):
        api.parse(body)
    longest = {**body, "metadata": {"name": "a" * 63}}
    assert create(cluster, ns, longest, "--dry-run=server").returncode == 0
    api.parse(longest)


def test_server_applies_the_documented_defaults(cluster, ns):
    body = {**MINIMAL, "metadata": {"name": "defaults"}}
    assert create(cluster, ns, body).returncode == 0
    spec = get(cluster, ns, "defaults")["spec"]
    assert spec["model"] == {
        "uri": "gs://bucket/models/sdxl",
        "family": "Auto",
        "dtype": "bfloat16",
        "quantization": "None",
    }
    assert spec["pipeline"] == {
        "compile": {"enabled": True, "mode": "max-autotune-no-cudagraphs", "regional": True,
                    "precompileJob": False, "aot": False},
        "attention": "Flash",
        "cache": {"method": "None", "threshold": 0.05, "interval": 2},
        "stages": {"mode": "Pipelined", "batching": "Request", "maxBatchSize": 4,
                   "batchWindowMs": 5, "queueCapacity": 64},
        "defaults": {"steps": 30, "guidanceScale": 7, "width": 1024, "height": 1024},
        "limits": {"maxSteps": 200, "maxImagesPerRequest": 4},
    }
    assert spec["gpu"] == {"type": "nvidia-l4", "countPerNode": 1}
    assert spec["nodePool"] == {"provider": "Local", "spot": False, "flexStart": False,
                                "minNodes": 0, "maxNodes": 4}
    assert spec["replicas"] == 1
    assert spec["server"] == {
        "port": 8080, "logFormat": "Text",
        "provenance": {"metadata": True, "signingAlgorithm": "ES256"}}


def test_explain_shows_the_descriptions(cluster, ns):
    # The OpenAPI document is published a moment after the CRD is established.
    result = eventually(cluster, "explain", "imagegenservice.spec.gpu.sharing", timeout=60)
    text = " ".join(result.stdout.split())
    for model, field in [(api.GpuSpec, "sharing"), (api.GpuSharing, "max_shared_clients_per_gpu")]:
        description = " ".join(model.model_fields[field].description.split())
        assert description in text
    assert "maxSharedClientsPerGpu" in text and "strategy" in text



def test_explain_describes_the_lora_list(cluster, ns):
    result = eventually(cluster, "explain", "imagegenservice.spec.model.loras", timeout=60)
    text = " ".join(result.stdout.split())
    for model, field in [(api.ModelSource, "loras"), (api.LoraAdapter, "uri"),
                         (api.LoraAdapter, "scale")]:
        assert " ".join(model.model_fields[field].description.split()) in text


def test_kubectl_scale_sets_spec_replicas(cluster, ns):
    body = {**MINIMAL, "metadata": {"name": "scaled"}}
    assert create(cluster, ns, body).returncode == 0
    cluster.kubectl("scale", "-n", ns, "igs/scaled", "--replicas=3")
    assert get(cluster, ns, "scaled")["spec"]["replicas"] == 3
    scale = json.loads(
        cluster.kubectl(
            "get",
            "--raw",
            f"/apis/{api.API_VERSION}/namespaces/{ns}/{api.PLURAL}/scaled/scale",
        ).stdout
    )
    assert scale["spec"]["replicas"] == 3


def test_status_subresource_and_printer_columns(cluster, ns):
    body = {**MINIMAL, "metadata": {"name": "columns"}}
    assert create(cluster, ns, body).returncode == 0
    status = {
        "status": {
            "replicas": 1,
            "readyReplicas": 1,
            "selector": "app.kubernetes.io/instance=columns",
            "sharing": "mps:4",
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "Serving",
                    "message": "",
                    "lastTransitionTime": "2026-11-26T10:00:00Z",
                }
            ],
        }
    }
    cluster.kubectl(
        "patch",
        "-n",
        ns,
        "igs/columns",
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(status),
    )
    stored = get(cluster, ns, "columns")
    assert api.parse(stored).status.sharing == "mps:4"
    table = cluster.kubectl("get", "-n", ns, "igs", "columns").stdout.splitlines()
    assert table[0].split() == [
        "NAME",
        "READY",
        "REASON",
        "ACCELERATOR",
        "SHARING",
        "REPLICAS",
        "AVAILABLE",
        "AGE",
    ]
    assert table[1].split()[:7] == ["columns", "True", "Serving", "nvidia-l4", "mps:4", "1", "1"]
    # The short name and the category find it too.
    assert "columns" in eventually(cluster, "get", "-n", ns, "imagegen").stdout
    # Status written through the main resource is ignored (status subresource).
    cluster.kubectl(
        "patch", "-n", ns, "igs/columns", "--type=merge", "-p", '{"status":{"sharing":"x"}}'
    )
    assert get(cluster, ns, "columns")["status"]["sharing"] == "mps:4"


def test_unknown_field_is_refused_by_apply_and_never_kept(cluster, ns):
    body = {**MINIMAL, "metadata": {"name": "typo"}}
    body["spec"] = {**MINIMAL["spec"], "replica": 3}
    result = cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(body), check=False)
    assert result.returncode != 0
    assert 'unknown field "spec.replica"' in result.stderr
    # Even with validation off, the server prunes it: nothing in spec preserves unknowns.
    cluster.kubectl("apply", "-n", ns, "--validate=false", "-f", "-", input=json.dumps(body))
    assert "replica" not in get(cluster, ns, "typo")["spec"]
