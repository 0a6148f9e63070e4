"""The planner's arithmetic and findings, case by case."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest
import yaml

from imagegen_operator import api, gke
from imagegen_operator.planner import (
    CUDA_CONTEXT_GIB,
    FOOTPRINT_TABLE,
    FootprintEstimated,
    MigNotSupported,
    ModelDoesNotFitSlice,
    ModelFitsTightly,
    MpsClientsAboveSliceLimit,
    NoMachineType,
    PlanInputs,
    PoolTooSmall,
    QuantizationUnsupported,
    RequestsExceedNode,
    SharingClientsOutOfRange,
    TooManyPodsPerNode,
    UnknownGpuType,
    UnknownPartitionSize,
    default_nodepool_name,
    estimate_footprint_gib,
    inputs_from_spec,
    make_plan,
    plan,
)


def inputs(gpu_type: str, **kw) -> PlanInputs:
    kw.setdefault("memory_gib", 2)
    return PlanInputs(gpu_type=gpu_type, **kw)


def reasons(p) -> list[str]:
    return [f.reason for f in p.findings]


# What each GPU reports as its memory (nvidia-smi's memory.total, MiB) over what its name says:
# a slot's memory is what CUDA gives, not the decimal GB the GPU is sold by.
H100, L4, H200 = 81559 / (80 * 1024), 23034 / (24 * 1024), 143771 / (141 * 1024)
# A MIG slice: its memory units' eighths of that, less what the driver keeps (NVIDIA's A100
# 40GB profile list: 1g.5gb 4.75 GiB, 3g.20gb 19.62, of 40; an H100's 1g.10gb: 9.75 GiB).
H200_EIGHTH = 143771 / 1024 / 8

# gpu config -> (partitions per GPU, clients, slots per GPU, slot memory GiB)
SLOT_CASES = [
    (
        dict(
            gpu_type="nvidia-h100-80gb",
            partition_size="1g.10gb",
            sharing_strategy="TimeSharing",
            max_shared_clients=2,
        ),
        (7, 2, 14, 9.75 / 2),
    ),
    (dict(gpu_type="nvidia-l4", sharing_strategy="MPS", max_shared_clients=4),
     (1, 4, 4, 6.0 * L4)),
    (dict(gpu_type="nvidia-tesla-a100", partition_size="1g.5gb"), (7, 1, 7, 4.75)),
    (dict(gpu_type="nvidia-tesla-a100", partition_size="3g.20gb"), (2, 1, 2, 19.62)),
    (dict(gpu_type="nvidia-a100-80gb", partition_size="3g.40gb"), (2, 1, 2, 40.0 * 0.981)),
    (
        dict(
            gpu_type="nvidia-h200-141gb",
            count_per_node=8,
            partition_size="3g.71gb",
            sharing_strategy="MPS",
            max_shared_clients=3,
        ),
        (2, 3, 6, 4 * H200_EIGHTH * 0.991 / 3),
    ),
    (dict(gpu_type="nvidia-tesla-t4"), (1, 1, 1, 15.0)),
    (
        dict(gpu_type="nvidia-l4", sharing_strategy="TimeSharing", max_shared_clients=48),
        (1, 48, 48, 0.5 * L4),
    ),
]


@pytest.mark.parametrize("config, expected", SLOT_CASES, ids=lambda v: str(v)[:40])
def test_slots_and_slot_memory(config: dict, expected: tuple) -> None:
    partitions, clients, slots, slot_gib = expected
    p = make_plan(PlanInputs(memory_gib=0.25, **config))
    assert (p.partitions_per_gpu, p.clients_per_gpu, p.slots_per_gpu) == (
        partitions,
        clients,
        slots,
    )
    assert p.slot_memory_gib == pytest.approx(slot_gib, abs=2e-3)
    assert p.slots_per_node == slots * p.count_per_node


def test_h100_mig_1g10gb_time_sharing_2_gives_14_slots() -> None:
    """Issue 4, must show: H100 80GB, 1g.10gb, time-sharing 2 -> 14 slots per GPU."""
    p = make_plan(
        inputs(
            "nvidia-h100-80gb",
            partition_size="1g.10gb",
            sharing_strategy="TimeSharing",
            max_shared_clients=2,
            spot=True,
        )
    )
    assert p.slots_per_gpu == 14
    assert p.sharing == "mig:1g.10gb+ts:2"
    assert p.workable


def test_l4_mps_4_gives_a_quarter_of_threads_and_memory() -> None:
    """Issue 4, must show: L4 MPS 4 -> 25% threads, a quarter of its memory pinned (of
    what CUDA reports, 23034 MiB: four limits that add up to the card, not to its name)."""
    p = make_plan(inputs("nvidia-l4", sharing_strategy="MPS", max_shared_clients=4))
    assert p.mps_thread_percentage == 25
    assert p.mps_pinned_memory_mib == 23034 // 4
    assert p.sharing == "mps:4"


def test_time_sharing_has_no_mps_limits() -> None:
    p = make_plan(inputs("nvidia-l4", sharing_strategy="TimeSharing", max_shared_clients=4))
    assert p.mps_thread_percentage is None and p.mps_pinned_memory_mib is None


@pytest.mark.parametrize("clients, percent", [(2, 50), (3, 33), (7, 14), (48, 2)])
def test_mps_thread_percentage_is_an_equal_share(clients: int, percent: int) -> None:
    p = make_plan(
        inputs("nvidia-l4", sharing_strategy="MPS", max_shared_clients=clients, memory_gib=0.1)
    )
    assert p.mps_thread_percentage == percent
    assert p.mps_thread_percentage * clients <= 100


def test_model_that_does_not_fit_its_slice_is_a_blocking_finding() -> None:
    """Issue 4, must show: a model that does not fit its slice yields a finding."""
    p = make_plan(
        inputs(
            "nvidia-h100-80gb",
            partition_size="1g.10gb",
            sharing_strategy="TimeSharing",
            max_shared_clients=2,
            memory_gib=6,
        )
    )
    [finding] = [f for f in p.findings if isinstance(f, ModelDoesNotFitSlice)]
    assert finding.blocking and not p.workable
    assert "spec.model.memoryGiB" in finding.fields
    assert "spec.gpu.partitionSize" in finding.fields
    assert "6 GiB" in finding.message and "4.87 GiB" in finding.message
    # What would make it fit, of what this spec may still change: a measured figure stays
    # as it is until measured again.
    assert "Int8WeightOnly" in finding.message and "measure spec.model.memoryGiB again" in (
        finding.message)
    assert "maxBatchSize" not in finding.message
    assert finding.to_dict()["reason"] == "ModelDoesNotFitSlice"
    assert finding.to_dict()["severity"] == "error"


def test_a_model_that_does_not_fit_is_offered_only_the_levers_its_spec_may_take() -> None:
    def advice(**given) -> str:
        p = make_plan(inputs("nvidia-l4", family="SDXL", memory_gib=None, **given))
        [finding] = [f for f in p.findings if isinstance(f, ModelDoesNotFitSlice)]
        return finding.message

    alone = advice(sharing_strategy="TimeSharing", max_shared_clients=4)
    assert "larger spec.gpu.type" in alone and "maxSharedClientsPerGpu" in alone
    assert "Int8WeightOnly" in alone and "maxBatchSize" in alone
    assert "partitionSize" not in alone
    # Not beside LoRA adapters, nor with an ahead-of-time compiled denoiser: refused there.
    assert "Int8WeightOnly" not in advice(sharing_strategy="TimeSharing", max_shared_clients=4,
                                          quantizable=False)
    assert "maxSharedClientsPerGpu" not in advice(max_batch_size=64)


def test_model_fitting_with_little_headroom_is_a_warning() -> None:
    p = make_plan(inputs("nvidia-l4", memory_gib=21))
    assert reasons(p) == ["ModelFitsTightly"] and p.workable
    assert isinstance(p.findings[0], ModelFitsTightly)
    # "24GB" is 22.5 GiB to CUDA: a 23 GiB model does not fit an L4.
    assert reasons(make_plan(inputs("nvidia-l4", memory_gib=23))) == ["ModelDoesNotFitSlice"]


def test_estimated_footprint_is_reported_and_follows_the_table() -> None:
    p = make_plan(
        PlanInputs(
            gpu_type="nvidia-h100-80gb",
            family="SDXL",
            dtype="bfloat16",
            max_batch_size=1,
            width=1024,
            height=1024,
        )
    )
    weights, activations = FOOTPRINT_TABLE["SDXL"]
    assert p.footprint_gib == pytest.approx(weights + activations + CUDA_CONTEXT_GIB)
    assert p.footprint_source == "estimate:SDXL/bfloat16"
    assert any(isinstance(f, FootprintEstimated) and not f.blocking for f in p.findings)


def test_footprint_estimate_grows_with_dtype_batch_and_pixels() -> None:
    base = estimate_footprint_gib("SD15", "float16", 1, 512 * 512)
    assert estimate_footprint_gib("SD15", "float32", 1, 512 * 512) > base
    assert estimate_footprint_gib("SD15", "float16", 4, 512 * 512) > base
    assert estimate_footprint_gib("SD15", "float16", 1, 1024 * 1024) > base
    assert estimate_footprint_gib("Flux", "bfloat16", 1, 1024 * 1024) > estimate_footprint_gib(
        "SDXL", "bfloat16", 1, 1024 * 1024
    )


def _sdxl(**kw) -> PlanInputs:
    return PlanInputs(**{"gpu_type": "nvidia-h100-80gb", "family": "SDXL", "dtype": "bfloat16",
                         "width": 1024, "height": 1024, **kw})


@pytest.mark.parametrize(("batch", "per_request", "images"), [(4, 1, 4), (2, 8, 8), (8, 8, 8)])
def test_the_estimate_holds_the_most_images_one_batch_does(batch, per_request, images) -> None:
    # The server fills a batch up to maxBatchSize images and runs a request of more alone.
    p = make_plan(_sdxl(max_batch_size=batch, max_images_per_request=per_request))
    assert p.footprint_gib == estimate_footprint_gib("SDXL", "bfloat16", images, 1024 * 1024)
    [note] = [f for f in p.findings if isinstance(f, FootprintEstimated)]
    assert f"a batch of {images} images at 1024x1024" in note.message


@pytest.mark.parametrize(("limits", "pixels", "words"), [
    # The largest listed size, or the default where it is larger.
    ({"sizes": ("512x512", "1536x1024")}, 1536 * 1024, "1536x1024"),
    ({"sizes": ("512x512",)}, 1024 * 1024, "1024x1024"),
    # No list, uncompiled: any size up to maxPixels; compiled: the default size only.
    ({"max_pixels": 2048 * 2048}, 2048 * 2048, "4194304 pixels"),
    ({"max_pixels": 2048 * 2048, "compiled": True}, 1024 * 1024, "1024x1024"),
    # Neither, uncompiled: up to the native size, where it is larger than the default.
    ({"width": 512, "height": 512}, 1024 * 1024, "the native size of SDXL"),
    ({"width": 512, "height": 512, "compiled": True}, 512 * 512, "512x512"),
    ({"width": 512, "height": 512, "family": "Auto"}, 1024 * 1024, "the native size of SDXL"),
    ({"width": 512, "height": 512, "family": "SD15"}, 512 * 512, "512x512"),
])
def test_the_estimate_is_for_the_largest_size_a_request_may_ask_for(limits, pixels, words):
    spec = {"family": "SDXL", "width": 1024, "height": 1024, **limits}
    p = make_plan(PlanInputs(gpu_type="nvidia-h100-80gb", dtype="bfloat16", max_batch_size=2,
                             max_images_per_request=2, **spec))
    family = spec["family"] if spec["family"] != "Auto" else "SDXL"
    assert p.footprint_gib == estimate_footprint_gib(family, "bfloat16", 2, pixels)
    [note] = [f for f in p.findings if isinstance(f, FootprintEstimated)]
    assert f"a batch of 2 images at {words}" in note.message


@pytest.mark.parametrize(("limits", "lever"), [
    ({"max_batch_size": 8, "max_images_per_request": 1},
     "a smaller spec.pipeline.stages.maxBatchSize or a smaller spec.pipeline.defaults size"),
    ({"max_batch_size": 1, "max_images_per_request": 8, "sizes": ("1024x1536",)},
     "a smaller spec.pipeline.limits.maxImagesPerRequest or a smaller largest of "
     "spec.pipeline.limits.sizes"),
    ({"max_batch_size": 8, "max_images_per_request": 8, "max_pixels": 2048 * 2048},
     "a smaller spec.pipeline.stages.maxBatchSize and spec.pipeline.limits.maxImagesPerRequest"
     " or a smaller spec.pipeline.limits.maxPixels"),
    ({"max_batch_size": 8, "max_images_per_request": 1, "width": 512, "height": 512},
     "a smaller spec.pipeline.stages.maxBatchSize or a smaller spec.pipeline.limits.maxPixels"),
])
def test_a_model_that_does_not_fit_names_what_sizes_its_batch(limits, lever) -> None:
    p = make_plan(replace(_sdxl(**limits), partition_size="1g.10gb", spot=True))
    [finding] = [f for f in p.findings if f.reason == "ModelDoesNotFitSlice"]
    assert lever in finding.message


def test_a_model_that_fits_a_mig_slice_only_quantized_is_planned_to_fit() -> None:
    # SDXL, batch 2 at 1024x1024 on an H100 1g.10gb slice: 11.75 GiB with 16-bit weights;
    # the denoiser's 75% of 7 GiB in 8 bits saves 2.6 GiB, which brings it under 10.
    config = dict(partition_size="1g.10gb", family="SDXL", max_batch_size=2, memory_gib=None,
                  spot=True)
    plain = make_plan(inputs("nvidia-h100-80gb", **config))
    quantized = make_plan(inputs("nvidia-h100-80gb", quantization="Int8WeightOnly", **config))
    assert "ModelDoesNotFitSlice" in reasons(plain) and not plain.workable
    assert "ModelDoesNotFitSlice" not in reasons(quantized) and quantized.workable
    assert quantized.footprint_gib == pytest.approx(plain.footprint_gib - 7.0 * 0.75 * 0.5, abs=0.01)
    assert quantized.footprint_source == "estimate:SDXL/bfloat16/Int8WeightOnly"
    # The same figure for FP8, which also stores a byte per weight.
    fp8 = make_plan(inputs("nvidia-h100-80gb", quantization="Float8", **config))
    assert fp8.footprint_gib == quantized.footprint_gib and fp8.workable


@pytest.mark.parametrize("gpu_type", ["nvidia-tesla-t4", "nvidia-tesla-a100", "nvidia-a100-80gb"])
def test_fp8_on_a_gpu_without_fp8_tensor_cores_is_refused_naming_both_fields(gpu_type) -> None:
    p = make_plan(inputs(gpu_type, quantization="Float8"))
    [finding] = [f for f in p.findings if isinstance(f, QuantizationUnsupported)]
    assert finding.blocking and not p.workable
    assert finding.fields == ("spec.model.quantization", "spec.gpu.type")
    assert "nvidia-l4, nvidia-h100-80gb, nvidia-h200-141gb" in finding.message
    assert make_plan(inputs(gpu_type, quantization="Int8WeightOnly")).workable


@pytest.mark.parametrize("gpu_type", ["nvidia-l4", "nvidia-h100-80gb", "nvidia-h200-141gb"])
def test_fp8_on_ada_and_hopper_is_planned(gpu_type) -> None:
    p = make_plan(inputs(gpu_type, quantization="Float8"))
    assert "QuantizationUnsupported" not in reasons(p)


def test_auto_family_assumes_sdxl_and_says_so() -> None:
    p = make_plan(PlanInputs(gpu_type="nvidia-l4", family="Auto"))
    assert p.footprint_source.startswith("estimate:SDXL")
    [note] = [f for f in p.findings if isinstance(f, FootprintEstimated)]
    assert "Auto" in note.message and "spec.model.memoryGiB" in note.fields


def test_replicas_gpus_nodes_and_capacity_at_max_nodes() -> None:
    p = make_plan(
        inputs(
            "nvidia-a100-80gb", count_per_node=2, partition_size="3g.40gb", replicas=5, max_nodes=4
        )
    )
    assert (p.slots_per_node, p.gpus_needed, p.nodes_needed) == (4, 3, 2)
    assert p.replicas_at_max_nodes == 16
    assert p.slots == 8


def test_autoscaling_maximum_drives_the_size() -> None:
    p = make_plan(inputs("nvidia-l4", replicas=1, max_replicas=9, max_nodes=10))
    assert (p.target_replicas, p.nodes_needed) == (9, 9)


def test_pool_too_small_warns_and_names_the_fields() -> None:
    p = make_plan(inputs("nvidia-l4", replicas=1, max_replicas=9, max_nodes=4))
    [finding] = [f for f in p.findings if isinstance(f, PoolTooSmall)]
    assert not finding.blocking
    assert finding.fields == ("spec.autoscaling.maxReplicas", "spec.nodePool.maxNodes")
    assert "spec.nodePool.maxNodes to 9" in finding.message


def test_a_pool_of_zero_nodes_cannot_serve() -> None:
    p = make_plan(inputs("nvidia-l4", replicas=1, max_nodes=0))
    assert [f.reason for f in p.blocking] == ["PoolTooSmall"]


def test_no_machine_type_blocks_only_providers_that_create_pools() -> None:
    gke_plan = make_plan(inputs("nvidia-h200-141gb", count_per_node=1, provider="GKE"))
    local_plan = make_plan(inputs("nvidia-h200-141gb", count_per_node=1, provider="Local"))
    assert [f.reason for f in gke_plan.blocking] == ["NoMachineType"]
    assert "8" in gke_plan.blocking[0].message
    assert local_plan.workable and "NoMachineType" in reasons(local_plan)
    assert gke_plan.machine_type is None


def test_explicit_machine_type_wins() -> None:
    p = make_plan(inputs("nvidia-l4", machine_type="g2-standard-16"))
    assert p.machine_type == "g2-standard-16"
    assert not any(isinstance(f, NoMachineType) for f in p.findings)


@pytest.mark.parametrize(
    "config, finding",
    [
        (dict(gpu_type="nvidia-l4", partition_size="1g.10gb"), MigNotSupported),
        (dict(gpu_type="nvidia-tesla-a100", partition_size="1g.10gb"), UnknownPartitionSize),
        (
            dict(gpu_type="nvidia-l4", sharing_strategy="MPS", max_shared_clients=49),
            SharingClientsOutOfRange,
        ),
        (
            dict(gpu_type="nvidia-l4", sharing_strategy="MPS", max_shared_clients=None),
            SharingClientsOutOfRange,
        ),
        (dict(gpu_type="nvidia-v100"), UnknownGpuType),
    ],
    ids=["mig-on-l4", "size-of-another-type", "too-many-clients", "no-clients", "unknown-type"],
)
def test_configs_the_api_forbids_are_blocking_findings(config: dict, finding: type) -> None:
    p = make_plan(PlanInputs(memory_gib=1, **config))
    assert any(isinstance(f, finding) and f.blocking for f in p.findings), reasons(p)


def test_mps_on_a_small_slice_warns_about_the_client_limit() -> None:
    p = make_plan(
        inputs(
            "nvidia-h100-80gb",
            partition_size="1g.10gb",
            sharing_strategy="MPS",
            max_shared_clients=8,
            memory_gib=1,
        )
    )
    [finding] = [f for f in p.findings if isinstance(f, MpsClientsAboveSliceLimit)]
    assert not finding.blocking and "6" in finding.message


def test_cost_is_nodes_times_gpus_and_host() -> None:
    p = make_plan(inputs("nvidia-l4", count_per_node=2, replicas=3, max_nodes=5))
    acc, host = gke.ACCELERATORS["nvidia-l4"], gke.MACHINE_PRICES["g2-standard-24"]
    assert p.cost.nodes == 2
    assert p.cost.on_demand == pytest.approx(2 * (2 * acc.gpu_usd_hour + host.on_demand), abs=0.01)
    assert p.cost.spot == pytest.approx(2 * (2 * acc.gpu_spot_usd_hour + host.spot), abs=0.01)
    assert p.cost_at_max_nodes.nodes == 5 and p.cost_at_max_nodes.on_demand > p.cost.on_demand


def test_an_autoscaled_service_costs_its_floor_and_at_most_its_max_nodes() -> None:
    p = make_plan(inputs("nvidia-l4", count_per_node=1, replicas=1, min_replicas=1,
                         max_replicas=4, max_nodes=4))
    assert p.nodes_needed == 4  # capacity for the autoscaler's maximum
    assert p.cost.nodes == 1  # what runs whatever the load
    assert p.cost_at_max_nodes.nodes == 4
    assert p.cost_at_max_nodes.on_demand == pytest.approx(4 * p.cost.on_demand)


def test_quantities_read_as_the_kubernetes_client_reads_them() -> None:
    from kubernetes.utils import parse_quantity

    from imagegen_operator.api import quantity_value

    for value in ("2", "1500m", "8Gi", "6G", "512Mi", ".5", "1e3", "1E-3", "2.5Ki", "100u", 7):
        assert quantity_value(value) == parse_quantity(value), value


def test_gke_reserves_what_its_docs_say_of_a_node() -> None:
    # g2-standard-8: 8 vCPUs, 32 GiB. CPU: 6% of one core, 1% of one, 0.5% of two; memory:
    # 25% of 4 GiB, 20% of 4, 10% of 8, 6% of 16, and 100 MiB for eviction.
    cpu, memory = gke.node_allocatable("g2-standard-8")
    assert cpu == pytest.approx(8 - 0.06 - 0.01 - 0.01 - 4 * 0.0025)
    assert memory == pytest.approx(32 - 1 - 0.8 - 0.8 - 0.96 - 100 / 1024)
    assert gke.node_allocatable("no-such-machine") is None


def test_a_nodes_pods_that_ask_for_more_than_it_offers_are_a_warning() -> None:
    mps4 = dict(sharing_strategy="MPS", max_shared_clients=4, provider="GKE", replicas=4)
    p = make_plan(inputs("nvidia-l4", cpu_request=2, memory_request_gib=8, **mps4))
    [finding] = [f for f in p.findings if isinstance(f, RequestsExceedNode)]
    assert not finding.blocking and p.workable
    assert "4 x 2 CPU = 8 CPU" in finding.message and "g2-standard-8" in finding.message
    assert "spec.server.resources" in finding.fields
    fits = make_plan(inputs("nvidia-l4", cpu_request=1.5, memory_request_gib=6, **mps4))
    assert not any(isinstance(f, RequestsExceedNode) for f in fits.findings)
    # A pool that is not made for the spec (Existing) has machines of its own.
    existing = make_plan(inputs("nvidia-l4", cpu_request=2, memory_request_gib=8,
                                **{**mps4, "provider": "Existing"}))
    assert not any(isinstance(f, RequestsExceedNode) for f in existing.findings)


def test_hub_downloads_count_against_the_local_disk_of_gke_s_default_boot_disk() -> None:
    # Seven SDXL pods a node (MIG 1g.10gb), each downloading 13 GiB into its own emptyDir:
    # 91 GiB, of the 43.83 GiB a node on GKE's default 100 GB boot disk offers pods.
    spec = dict(partition_size="1g.10gb", spot=True, provider="GKE", replicas=7)
    p = make_plan(inputs("nvidia-h100-80gb", disk_request_gib=13, **spec))
    [finding] = [f for f in p.findings if isinstance(f, RequestsExceedNode)]
    assert "7 x 13 GiB = 91 GiB of the 43.83 GiB of local disk" in finding.message
    assert "gs://" in finding.message and "spec.model.uri" in finding.fields
    assert not finding.blocking and p.workable
    assert (p.slots_per_node, p.nodes_needed) == (7, 3)  # 3 pods a node: 3 nodes for 7
    assert make_plan(inputs("nvidia-h100-80gb", **spec)).nodes_needed == 1  # nothing downloads
    # Where the table has no machine for the GPUs (Local pools take any), still said.
    local = make_plan(inputs("nvidia-tesla-t4", count_per_node=8, provider="Local",
                             disk_request_gib=13, replicas=8))
    [finding] = [f for f in local.findings if isinstance(f, RequestsExceedNode)]
    assert finding.message.startswith("a node has 8 slot(s)")
    # Existing pools have boot disks of their own, which the plan does not know.
    existing = make_plan(inputs("nvidia-h100-80gb", disk_request_gib=13,
                                **{**spec, "provider": "Existing"}))
    assert "RequestsExceedNode" not in reasons(existing)


def test_a_limit_given_alone_is_planned_as_the_request_kubernetes_makes_of_it() -> None:
    resource = api.parse({"apiVersion": "imagegen.dev/v1alpha1", "kind": "ImageGenService",
                          "metadata": {"name": "s", "namespace": "n"},
                          "spec": {"model": {"uri": "gs://models/sd15"},
                                   "gpu": {"type": "nvidia-l4"},
                                   "server": {"resources": {
                                       "requests": {"cpu": "2"},
                                       "limits": {"cpu": "4", "memory": "48Gi"}}}}})
    got = inputs_from_spec(resource.spec)
    assert (got.cpu_request, got.memory_request_gib) == (2, 48)


@pytest.mark.parametrize(("model", "resources", "gib"), [
    ({"uri": "hf://org/sdxl", "family": "SDXL"}, None, 13),
    ({"uri": "hf://org/flux", "family": "Flux"}, None, 32),
    ({"uri": "hf://org/any"}, None, 13),  # Auto: planned as SDXL
    ({"uri": "hf://org/sd15", "family": "SD15",
      "loras": [{"name": "a", "uri": "hf://org/lora"}, {"name": "b", "uri": "gs://loras/l.safetensors"}]},
     None, 7),
    ({"uri": "gs://bucket/sdxl", "family": "SDXL"}, None, None),
    # The user's own figure wins; a limit given alone is the request too.
    ({"uri": "hf://org/sdxl", "family": "SDXL"}, {"requests": {"ephemeral-storage": "20Gi"}}, 20),
    ({"uri": "hf://org/sdxl", "family": "SDXL"}, {"limits": {"ephemeral-storage": "10Gi"}}, 10),
])
def test_the_disk_a_pod_asks_for_is_its_download_or_the_user_s(model, resources, gib) -> None:
    server = {"resources": resources} if resources else {}
    resource = api.parse({"apiVersion": "imagegen.dev/v1alpha1", "kind": "ImageGenService",
                          "metadata": {"name": "s", "namespace": "n"},
                          "spec": {"model": model, "gpu": {"type": "nvidia-l4"},
                                   "server": server}})
    assert inputs_from_spec(resource.spec).disk_request_gib == gib


def test_a_pool_is_made_for_its_pods_per_node_up_to_gkes_limit() -> None:
    # 8 H100s x 7 slices x 2 clients: 112 slots, past GKE's default of 110 pods a node.
    mig_ts = dict(partition_size="1g.10gb", sharing_strategy="TimeSharing",
                  max_shared_clients=2, spot=True)
    made = make_plan(inputs("nvidia-h100-80gb", count_per_node=8, provider="GKE", **mig_ts))
    # 112 and GKE's own, rounded up to a power of two: the /24 of pod addresses that 110 takes.
    assert made.max_pods_per_node == 128
    assert not any(isinstance(f, TooManyPodsPerNode) for f in made.findings)
    # A pool that is not the operator's keeps whatever maximum it has: 110 by default.
    existing = make_plan(inputs("nvidia-h100-80gb", count_per_node=8, provider="Existing",
                                **mig_ts))
    [finding] = [f for f in existing.findings if isinstance(f, TooManyPodsPerNode)]
    assert not finding.blocking and existing.workable
    assert "112 slot(s)" in finding.message and "110 pods" in finding.message
    assert "spec.gpu.sharing.maxSharedClientsPerGpu" in finding.fields
    # 8 x 7 x 5 = 280: past the 256 any pool may be made with.
    crowded = make_plan(inputs("nvidia-h100-80gb", count_per_node=8, provider="GKE",
                               **{**mig_ts, "max_shared_clients": 5}))
    assert crowded.max_pods_per_node == gke.MAX_PODS_PER_NODE_LIMIT
    [finding] = [f for f in crowded.findings if isinstance(f, TooManyPodsPerNode)]
    assert "280 slot(s)" in finding.message and "256 pods" in finding.message
    # Within GKE's default, the default: set all the same, as a cluster's may be lower.
    roomy = make_plan(inputs("nvidia-h100-80gb", count_per_node=4, provider="GKE", **mig_ts))
    assert roomy.max_pods_per_node == gke.DEFAULT_MAX_PODS_PER_NODE  # 56 slots
    assert not any(isinstance(f, TooManyPodsPerNode) for f in roomy.findings)


# --- node-pool names -------------------------------------------------------------


@pytest.mark.parametrize(
    "args, name",
    [
        (("nvidia-h100-80gb", 1, "1g.10gb", "TimeSharing", 2, False), "igs-h100x1-mig1g10gb-ts2"),
        (("nvidia-l4", 1, None, "MPS", 4, True), "igs-l4x1-mps4-spot"),
        (("nvidia-tesla-t4", 1, None, None, None, False), "igs-t4x1"),
        (("nvidia-h200-141gb", 8, "7g.141gb", "MPS", 48, True), "igs-h200x8-mig7g141gb-mps48-spot"),
    ],
)
def test_default_nodepool_names(args: tuple, name: str) -> None:
    assert default_nodepool_name(*args) == name
    assert gke.NODEPOOL_NAME_RE.match(name)


def test_a_non_default_machine_type_gets_its_own_pool() -> None:
    base = default_nodepool_name("nvidia-l4", 1, None, None, None, False)
    same = default_nodepool_name("nvidia-l4", 1, None, None, None, False, "g2-standard-8")
    other = default_nodepool_name("nvidia-l4", 1, None, None, None, False, "g2-standard-16")
    assert base == same != other
    assert other.startswith(base + "-") and gke.NODEPOOL_NAME_RE.match(other)


def test_zones_get_their_own_pool_and_a_machine_type_alone_keeps_its_name() -> None:
    base = default_nodepool_name("nvidia-l4", 1, None, None, None, False)
    zoned = default_nodepool_name("nvidia-l4", 1, None, None, None, False,
                                  locations=("us-east4-c", "us-east4-a"))
    assert zoned == default_nodepool_name("nvidia-l4", 1, None, None, None, False,
                                          locations=("us-east4-a", "us-east4-c"))
    assert zoned.startswith(base + "-") and zoned != base
    # The names pools were made under before zones existed stay theirs.
    machine = default_nodepool_name("nvidia-l4", 1, None, None, None, False, "g2-standard-16")
    assert machine == "igs-l4x1-" + hashlib.sha256(b"g2-standard-16").hexdigest()[:6]
    both = default_nodepool_name("nvidia-l4", 1, None, None, None, False, "g2-standard-16",
                                 locations=("us-east4-a",))
    assert both not in (machine, zoned) and len(both) == len(machine)


def test_explicit_pool_name_wins() -> None:
    assert make_plan(inputs("nvidia-l4", nodepool_name="mine")).nodepool_name == "mine"


# --- from the API model -----------------------------------------------------------

CR = """
apiVersion: imagegen.dev/v1alpha1
kind: ImageGenService
metadata: {name: sdxl, namespace: team-a}
spec:
  model: {uri: gs://bucket/models/sdxl, family: SDXL, dtype: float16}
  pipeline:
    stages: {maxBatchSize: 2}
    defaults: {width: 768, height: 768}
    limits: {maxImagesPerRequest: 3, sizes: ["1024x768"], maxPixels: 1048576}
    compile: {enabled: false}
  gpu:
    type: nvidia-h100-80gb
    countPerNode: 2
    partitionSize: 3g.40gb
    sharing: {strategy: MPS, maxSharedClientsPerGpu: 2}
  nodePool:
    provider: ConfigConnector
    cluster: projects/demo-project/locations/us-central1/clusters/c
    spot: true
    minNodes: 1
    maxNodes: 3
  replicas: 3
  autoscaling: {minReplicas: 2, maxReplicas: 12}
"""


def test_plan_reads_every_field_of_the_api_model() -> None:
    resource = api.parse(yaml.safe_load(CR))
    expected = PlanInputs(
        gpu_type="nvidia-h100-80gb",
        count_per_node=2,
        partition_size="3g.40gb",
        sharing_strategy="MPS",
        max_shared_clients=2,
        replicas=3,
        min_replicas=2,
        max_replicas=12,
        provider="ConfigConnector",
        spot=True,
        min_nodes=1,
        max_nodes=3,
        monitored=False,
        guarded=False,
        family="SDXL",
        dtype="float16",
        max_batch_size=2,
        max_images_per_request=3,
        width=768,
        height=768,
        sizes=("1024x768",),
        max_pixels=1048576,
        compiled=False,
    )
    assert plan(resource.spec) == make_plan(expected)
    assert "AutoscalingUnscraped" in reasons(make_plan(expected))
    assert "AutoscalingUnscraped" not in reasons(make_plan(replace(expected, monitored=True)))
    assert "ServingUnauthenticated" in reasons(make_plan(expected))
    assert "ServingUnauthenticated" not in reasons(make_plan(replace(expected, guarded=True)))
    p = plan(resource.spec)
    assert (p.slots_per_gpu, p.slots_per_node, p.nodes_needed) == (4, 8, 2)
    assert p.nodepool_name == "igs-h100x2-mig3g40gb-mps2-spot"
    assert p.sharing == resource.spec.gpu.sharing_summary()


def test_a3_machines_compute_engine_sells_otherwise_are_not_planned_on_demand() -> None:
    """a3-highgpu-1g/2g/4g come only as Spot or Flex-start VMs; A3 Ultra (H200) on demand
    only on a reservation (Compute Engine's "GPU machine types" page)."""
    on_demand = make_plan(inputs("nvidia-h100-80gb", partition_size="1g.10gb"))
    [finding] = [f for f in on_demand.findings if f.reason == "MachineNeedsSpot"]
    assert finding.blocking and not on_demand.workable
    assert "a3-highgpu-1g only as Spot" in finding.message
    assert "spec.gpu.countPerNode 8" in finding.message
    assert finding.fields == ("spec.nodePool.spot", "spec.nodePool.flexStart",
                              "spec.gpu.countPerNode")
    for workable in (inputs("nvidia-h100-80gb", partition_size="1g.10gb", spot=True),
                     inputs("nvidia-h100-80gb", partition_size="1g.10gb", flex_start=True),
                     inputs("nvidia-h100-80gb", count_per_node=8),
                     inputs("nvidia-h100-80gb", provider="Local")):
        plan_ = make_plan(workable)
        assert "MachineNeedsSpot" not in reasons(plan_) and plan_.workable
    h200 = make_plan(inputs("nvidia-h200-141gb", count_per_node=8))
    [finding] = [f for f in h200.findings if f.reason == "MachineNeedsSpot"]
    assert not finding.blocking and h200.workable and "reservation" in finding.message
    flex = make_plan(inputs("nvidia-h200-141gb", count_per_node=8, flex_start=True))
    assert "MachineNeedsSpot" not in reasons(flex)


@pytest.mark.parametrize(("provider", "workable"), [
    ("GKE", True), ("Local", True), ("ConfigConnector", False), ("Existing", False)])
def test_flex_start_pools_are_made_by_the_gke_provider(provider, workable) -> None:
    p = make_plan(inputs("nvidia-h100-80gb", partition_size="1g.10gb", flex_start=True,
                         provider=provider, min_nodes=2))
    assert p.workable == workable
    assert p.nodepool_name == "igs-h100x1-mig1g10gb-flex" and p.flex_start
    if not workable:
        [finding] = [f for f in p.findings if f.reason == "FlexStartNeedsGke"]
        assert finding.fields == ("spec.nodePool.flexStart", "spec.nodePool.provider")


@pytest.mark.parametrize(("gpu_type", "count", "machine", "why"), [
    ("nvidia-l4", 1, "n1-standard-8", "comes only on g2-standard-*"),
    ("nvidia-tesla-a100", 1, "a2-highgpu-8g", "comes with 8 GPU(s), not 1"),
    ("nvidia-h200-141gb", 1, "a3-ultragpu-8g", "comes with 8 GPU(s), not 1"),
    ("nvidia-l4", 1, "g2-standard-24", "comes with 2 GPU(s), not 1"),
    ("nvidia-tesla-t4", 2, "n1-standard-64", "at most 48 vCPUs"),
    ("nvidia-tesla-t4", 1, "custom-64-245760", "at most 48 vCPUs"),
    ("nvidia-h100-80gb", 2, "a3-highgpu-two", "no machine type a3-highgpu-two"),
])
def test_a_machine_type_that_cannot_carry_the_gpus_is_refused(gpu_type, count, machine,
                                                              why) -> None:
    p = make_plan(inputs(gpu_type, count_per_node=count, machine_type=machine, spot=True))
    [finding] = [f for f in p.findings if f.reason == "MachineTypeMismatch"]
    assert finding.blocking and not p.workable
    assert why in finding.message and machine in finding.message
    assert finding.fields[0] == "spec.nodePool.machineType"


@pytest.mark.parametrize(("gpu_type", "count", "machine"), [
    ("nvidia-l4", 1, "g2-standard-16"), ("nvidia-h100-80gb", 8, "a3-megagpu-8g"),
    ("nvidia-tesla-t4", 4, "n1-highmem-96"), ("nvidia-tesla-t4", 1, "n1-standard-4"),
    ("nvidia-tesla-t4", 1, "custom-8-30720"), ("nvidia-tesla-t4", 2, "n1-custom-16-61440"),
    ("nvidia-a100-80gb", 2, "a2-ultragpu-2g"),
])
def test_a_machine_type_that_carries_the_gpus_is_planned_on(gpu_type, count, machine) -> None:
    p = make_plan(inputs(gpu_type, count_per_node=count, machine_type=machine, spot=True))
    assert "MachineTypeMismatch" not in reasons(p) and p.machine_type == machine


def test_a_named_spot_only_machine_type_is_named_in_the_advice() -> None:
    p = make_plan(inputs("nvidia-h100-80gb", machine_type="a3-highgpu-1g"))
    [finding] = [f for f in p.findings if f.reason == "MachineNeedsSpot"]
    assert "spec.nodePool.machineType" in finding.fields
    assert "without spec.nodePool.machineType" in finding.message


def test_a_node_holds_no_more_serving_pods_than_gke_runs_on_it() -> None:
    """8 H100s cut in 1g.10gb slices, 48 clients each: 2688 slots a node, of which a pool
    made for GKE's 256 pods a node runs 246 (GKE's own take the rest)."""
    p = make_plan(inputs("nvidia-h100-80gb", count_per_node=8, partition_size="1g.10gb",
                         sharing_strategy="TimeSharing", max_shared_clients=48,
                         memory_gib=0.1, replicas=1000, max_nodes=4, spot=True))
    assert (p.slots_per_node, p.pods_per_node) == (2688, 246)
    assert p.nodes_needed == 5 and p.replicas_at_max_nodes == 4 * 246
    [short] = [f for f in p.findings if f.reason == "PoolTooSmall"]
    assert "holds 984 replica(s)" in short.message
    assert "TooManyPodsPerNode" in reasons(p)
    assert p.slots == 4 * 2688  # no more nodes than maxNodes: status.capacity
    assert p.cost.nodes == 4


def test_a_node_holds_no_more_serving_pods_than_its_cpu_takes() -> None:
    """A g2-standard-8 offers about 7.9 cores: two pods asking 3.5 each, not the four slots."""
    p = make_plan(inputs("nvidia-l4", sharing_strategy="MPS", max_shared_clients=4,
                         cpu_request=3.5, replicas=4, max_nodes=4))
    assert (p.slots_per_node, p.pods_per_node, p.nodes_needed) == (4, 2, 2)
    assert "RequestsExceedNode" in reasons(p)


def test_an_existing_pool_is_not_bounded_by_max_nodes() -> None:
    """The operator makes no Existing pool: spec.nodePool.maxNodes (4 by default) says
    nothing of its size, so more replicas than 4 nodes hold is no PoolTooSmall."""
    p = make_plan(inputs("nvidia-l4", provider="Existing", replicas=6, max_nodes=4))
    assert "PoolTooSmall" not in reasons(p) and p.replicas_at_max_nodes is None
    assert p.nodes_needed == 6 and p.cost.nodes == 6 and p.cost_at_max_nodes is None
    assert p.slots == 6


def test_the_cost_counts_no_more_nodes_than_max_nodes() -> None:
    p = make_plan(inputs("nvidia-l4", replicas=5, max_nodes=2))
    assert p.cost.nodes == 2 and p.cost == p.cost_at_max_nodes
    assert p.slots == 2


def test_a_pool_too_small_names_the_field_whose_count_it_cannot_hold() -> None:
    scaled = make_plan(inputs("nvidia-l4", replicas=2, min_replicas=1, max_replicas=4,
                              max_nodes=2))
    [short] = [f for f in scaled.findings if f.reason == "PoolTooSmall"]
    assert "spec.autoscaling.maxReplicas=4" in short.message
    above = make_plan(inputs("nvidia-l4", replicas=10, min_replicas=1, max_replicas=4,
                             max_nodes=2))
    [short] = [f for f in above.findings if f.reason == "PoolTooSmall"]
    assert "spec.replicas=10" in short.message and "maxReplicas=10" not in short.message


def test_a_pod_no_node_can_take_is_refused() -> None:
    """A g2-standard-8 offers about 7.9 cores: a pod asking 9 fits none of its nodes."""
    p = make_plan(inputs("nvidia-l4", cpu_request=9, replicas=2))
    [finding] = [f for f in p.findings if f.reason == "RequestsExceedNode"]
    assert finding.blocking and not p.workable
    assert "no serving pod fits a node" in finding.message
