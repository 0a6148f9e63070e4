"""The ImageGenService models: defaults, examples, status, the parse() contract."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from imagegen_operator import api, gke

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))

MINIMAL = {
    "apiVersion": "imagegen.dev/v1alpha1",
    "kind": "ImageGenService",
    "metadata": {"name": "sdxl", "namespace": "team-a", "generation": 3},
    "spec": {
        "model": {"uri": "gs://bucket/models/sdxl"},
        "gpu": {"type": "nvidia-l4"},
        "nodePool": {"cluster": "projects/proj-1/locations/us-central1/clusters/c"},
    },
}


def example_services() -> list[tuple[str, dict]]:
    return [
        (f"{path.name}#{i}", doc)
        for path in EXAMPLES
        for i, doc in enumerate(yaml.safe_load_all(path.read_text()))
        if doc and doc.get("kind") == api.KIND
    ]


def test_defaults_are_the_documented_ones():
    spec = api.parse(MINIMAL).spec
    assert (spec.model.family, spec.model.dtype, spec.model.memory_gib) == (
        "Auto",
        "bfloat16",
        None,
    )
    compile_ = spec.pipeline.compile
    assert (compile_.enabled, compile_.mode, compile_.regional, compile_.cache) == (
        True,
        "max-autotune-no-cudagraphs",
        True,
        None,
    )
    assert spec.pipeline.attention == "Flash"
    stages = spec.pipeline.stages
    assert (stages.mode, stages.max_batch_size, stages.batch_window_ms, stages.queue_capacity) == (
        "Pipelined",
        4,
        5,
        64,
    )
    d = spec.pipeline.defaults
    assert (d.steps, d.guidance_scale, d.width, d.height) == (30, 7.0, 1024, 1024)
    assert (spec.gpu.count_per_node, spec.gpu.partition_size, spec.gpu.sharing) == (1, None, None)
    pool = spec.node_pool
    assert (pool.provider, pool.spot, pool.min_nodes, pool.max_nodes) == ("GKE", False, 0, 4)
    assert (spec.replicas, spec.autoscaling, spec.server.port) == (1, None, 8080)


def test_wire_names_are_camel_case():
    wire = api.parse(MINIMAL).model_dump(mode="json", exclude_none=True)
    assert wire["apiVersion"] == "imagegen.dev/v1alpha1"
    assert wire["spec"]["nodePool"]["maxNodes"] == 4
    assert wire["spec"]["pipeline"]["defaults"]["guidanceScale"] == 7.0
    body = {
        **MINIMAL,
        "spec": {**MINIMAL["spec"], "model": {"uri": "gs://bucket-1/m", "memoryGiB": 12}},
    }
    assert api.parse(body).spec.model.memory_gib == 12


def test_python_names_are_accepted_too():
    spec = api.ImageGenServiceSpec(
        model=api.ModelSource(uri="hf://org/name@v1"),
        gpu=api.GpuSpec(type="nvidia-l4"),
        node_pool=api.NodePoolSpec(provider="Local"),
    )
    assert spec.node_pool.provider == "Local"


@pytest.mark.parametrize(
    ("name", "body"), example_services(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_example_parses_and_round_trips(name, body):
    service = api.parse(body)
    wire = service.model_dump(mode="json", exclude_none=True)
    assert api.parse(wire) == service
    # The wire form keeps every field the example set.
    assert _contains(wire["spec"], body["spec"]), name


def _contains(full, part) -> bool:
    if isinstance(part, dict):
        return isinstance(full, dict) and all(
            k in full and _contains(full[k], v) for k, v in part.items()
        )
    return full == part


def test_examples_cover_the_sharing_modes():
    summaries = {api.parse(body).spec.gpu.sharing_summary() for _, body in example_services()}
    assert {"exclusive", "mig:1g.10gb", "mig:1g.10gb+ts:2", "mps:4"} <= summaries
    providers = {api.parse(body).spec.node_pool.provider for _, body in example_services()}
    assert {"Local", "GKE", "ConfigConnector"} <= providers
    assert any(api.parse(body).spec.autoscaling for _, body in example_services())


@pytest.mark.parametrize(
    ("gpu", "summary"),
    [
        ({"type": "nvidia-l4"}, "exclusive"),
        ({"type": "nvidia-h100-80gb", "partitionSize": "1g.10gb"}, "mig:1g.10gb"),
        (
            {"type": "nvidia-l4", "sharing": {"strategy": "MPS", "maxSharedClientsPerGpu": 4}},
            "mps:4",
        ),
        (
            {
                "type": "nvidia-h100-80gb",
                "partitionSize": "1g.10gb",
                "sharing": {"strategy": "TimeSharing", "maxSharedClientsPerGpu": 2},
            },
            "mig:1g.10gb+ts:2",
        ),
    ],
)
def test_sharing_summary(gpu, summary):
    assert api.GpuSpec.model_validate(gpu).sharing_summary() == summary


@settings(deadline=None)  # a loaded CI machine's pause is not a failure
@given(gpu_type=st.sampled_from(list(gke.ACCELERATORS)), size=st.sampled_from(api.ALL_MIG_SIZES))
def test_mig_size_accepted_exactly_when_the_type_offers_it(gpu_type, size):
    body = {
        **MINIMAL,
        # Local: which machine carries the GPUs is no question here.
        "spec": {**MINIMAL["spec"], "gpu": {"type": gpu_type, "partitionSize": size},
                 "nodePool": {"provider": "Local"}},
    }
    offered = size in gke.mig_sizes(gpu_type)
    if offered:
        assert api.parse(body).spec.gpu.partition_size == size
    else:
        with pytest.raises(api.InvalidSpec) as err:
            api.parse(body)
        assert err.value.problems[0].startswith("spec.gpu.partitionSize: ")


def test_parse_names_every_broken_field():
    body = {
        "spec": {
            "model": {"uri": "gs://bucket/m", "dtype": "int8"},
            "gpu": {"type": "nvidia-l4", "countPerNode": 3},
            "nodePool": {"provider": "Local"},
            "replicas": -1,
        }
    }
    with pytest.raises(api.InvalidSpec) as err:
        api.parse(body)
    paths = sorted(p.split(":")[0] for p in err.value.problems)
    assert paths == ["spec.gpu.countPerNode", "spec.model.dtype", "spec.replicas"]
    assert isinstance(err.value, ValueError)


def test_parse_is_strict_about_types_like_the_server():
    body = {**MINIMAL, "spec": {**MINIMAL["spec"], "replicas": "2"}}
    with pytest.raises(api.InvalidSpec, match=r"spec\.replicas: "):
        api.parse(body)


def test_status_round_trips_and_tolerates_newer_fields():
    status = {
        "observedGeneration": 3,
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "Serving",
                "message": "2/2 replicas ready",
                "lastTransitionTime": "2026-11-26T10:00:00Z",
                "observedGeneration": 3,
            }
        ],
        "replicas": 2,
        "readyReplicas": 2,
        "selector": "app.kubernetes.io/instance=sdxl",
        "sharing": "mig:1g.10gb+ts:2",
        "nodePool": {"name": "h100-mig1g-ts2", "provider": "GKE", "readyNodes": 1},
        "capacity": {"slotsPerGpu": 14, "gpus": 4, "slots": 56},
        "endpoint": "http://sdxl.team-a.svc.cluster.local:8080",
        "addedByANewerOperator": True,
    }
    service = api.parse({**MINIMAL, "status": status})
    assert service.status.conditions[0].last_transition_time.year == 2026
    assert service.status.capacity.slots == 56
    wire = service.status.model_dump(mode="json", exclude_none=True)
    assert wire["conditions"][0]["lastTransitionTime"] == "2026-11-26T10:00:00Z"
    assert "addedByANewerOperator" not in wire
    assert {k: v for k, v in status.items() if k != "addedByANewerOperator"} == wire


def test_metadata_is_read_not_validated():
    body = {**MINIMAL, "metadata": {**MINIMAL["metadata"], "managedFields": [{}], "uid": "u-1"}}
    meta = api.parse(body).metadata
    assert (meta.name, meta.namespace, meta.generation, meta.uid) == ("sdxl", "team-a", 3, "u-1")


def test_parse_takes_read_only_mappings_like_kopf_bodies():
    from types import MappingProxyType

    def frozen(value):
        if isinstance(value, dict):
            return MappingProxyType({k: frozen(v) for k, v in value.items()})
        return value

    assert api.parse(frozen(MINIMAL)) == api.parse(MINIMAL)


@pytest.mark.parametrize("model, field, limit", [
    ("RequestLimits", "max_steps", "max_steps"),
    ("RequestLimits", "max_pixels", "max_pixels"),
    ("RequestLimits", "max_images_per_request", "max_images_per_request"),
    ("GenerationDefaults", "steps", "default_steps"),
    ("GenerationDefaults", "guidance_scale", "default_guidance_scale"),
    ("StagesSpec", "max_batch_size", "max_batch_size"),
    ("StagesSpec", "queue_capacity", "queue_capacity"),
])
def test_the_api_and_the_server_take_limits_from_one_table(model, field, limit) -> None:
    """spec.pipeline's limits and the server settings they become agree on every bound."""
    from imagegen_server.config import LIMITS, ServerSettings

    def bounds(info) -> tuple:
        ge = next((m.ge for m in info.metadata if hasattr(m, "ge")), None)
        le = next((m.le for m in info.metadata if hasattr(m, "le")), None)
        return info.default, ge, le

    expected = (LIMITS[limit].default, LIMITS[limit].ge, LIMITS[limit].le)
    assert bounds(getattr(api, model).model_fields[field]) == expected
    assert bounds(ServerSettings.model_fields[limit]) == expected


@pytest.mark.parametrize("name", ["sdxl\n", "sdxl-", "-sdxl", "sd_xl", "a" * 64])
def test_a_name_that_cannot_name_the_service_is_refused(name):
    """As the CRD's rule on metadata.name (tests/cluster/test_crd.py checks it there)."""
    with pytest.raises(api.InvalidSpec, match=r"metadata\.name: "):
        api.parse({**MINIMAL, "metadata": {"name": name}})
    api.parse({**MINIMAL, "metadata": {"name": "a" * 63}})
