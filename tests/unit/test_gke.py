"""gke.py holds GKE's facts; these tests pin them to GKE's published tables and each other.

Sources: GKE's "Running multi-instance GPUs" page (MIG sizes per GPU,
cloud.google.com/kubernetes-engine/docs/how-to/gpus-multi), NVIDIA's MIG user guide
("Supported MIG profiles") and Google Cloud's accelerator-optimized machine family page
(machine types per GPU, cloud.google.com/compute/docs/accelerator-optimized-machines).
"""

from __future__ import annotations

import pytest

from imagegen_operator import gke

# MIG sizes and partitions per GPU, row by row.
MIG_TABLE = {
    "nvidia-tesla-a100": {"1g.5gb": 7, "2g.10gb": 3, "3g.20gb": 2, "7g.40gb": 1},
    "nvidia-a100-80gb": {"1g.10gb": 7, "2g.20gb": 3, "3g.40gb": 2, "7g.80gb": 1},
    "nvidia-h100-80gb": {"1g.10gb": 7, "1g.20gb": 4, "2g.20gb": 3, "3g.40gb": 2, "7g.80gb": 1},
    "nvidia-h200-141gb": {"1g.18gb": 7, "1g.35gb": 4, "2g.35gb": 3, "3g.71gb": 2, "7g.141gb": 1},
    "nvidia-tesla-t4": {},
    "nvidia-l4": {},
}

# The 1-GPU machine shape (H200: the only shape, 8 GPUs).
SMALLEST_MACHINE = {
    "nvidia-h100-80gb": (1, "a3-highgpu-1g"),
    "nvidia-h200-141gb": (8, "a3-ultragpu-8g"),
    "nvidia-a100-80gb": (1, "a2-ultragpu-1g"),
    "nvidia-tesla-a100": (1, "a2-highgpu-1g"),
    "nvidia-l4": (1, "g2-standard-8"),
    "nvidia-tesla-t4": (1, "n1-standard-8"),
}


def test_the_six_gpu_types_are_the_api_values() -> None:
    assert set(gke.ACCELERATORS) == set(MIG_TABLE)
    for name, acc in gke.ACCELERATORS.items():
        assert acc.name == name


@pytest.mark.parametrize("gpu_type, sizes", MIG_TABLE.items())
def test_mig_sizes_follow_the_table(gpu_type: str, sizes: dict[str, int]) -> None:
    assert gke.mig_sizes(gpu_type) == sizes
    assert gke.ACCELERATORS[gpu_type].mig_capable == bool(sizes)


def test_mig_sizes_returns_a_copy() -> None:
    gke.mig_sizes("nvidia-h100-80gb")["9g.99gb"] = 1
    assert "9g.99gb" not in gke.ACCELERATORS["nvidia-h100-80gb"].mig_partitions


@pytest.mark.parametrize("gpu_type", [t for t, s in MIG_TABLE.items() if s])
def test_every_slice_fits_in_its_gpu(gpu_type: str) -> None:
    acc = gke.ACCELERATORS[gpu_type]
    for size, partitions in acc.mig_partitions.items():
        memory = gke.mig_slice_memory_gib(size)
        # Eight memory units per GPU: slices never add up to more than the GPU has
        # (names round to whole GB, so 2 x 3g.71gb is 142 of 141: allow one per slice).
        assert partitions * memory <= acc.memory_gib + partitions
        assert gke.mig_compute_units(size) * partitions <= gke.MIG_COMPUTE_UNITS


@pytest.mark.parametrize(
    "size, memory, units", [("1g.10gb", 10, 1), ("3g.71gb", 71, 3), ("7g.141gb", 141, 7)]
)
def test_mig_size_parsing(size: str, memory: int, units: int) -> None:
    assert gke.mig_slice_memory_gib(size) == memory
    assert gke.mig_compute_units(size) == units


@pytest.mark.parametrize("bad", ["10gb", "1g10gb", "", "1g.10GB"])
def test_mig_size_parsing_rejects_other_strings(bad: str) -> None:
    with pytest.raises(ValueError, match="not a MIG partition size"):
        gke.mig_slice_memory_gib(bad)


def test_unknown_gpu_type_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match="nvidia-l4"):
        gke.mig_sizes("nvidia-v100")


@pytest.mark.parametrize("gpu_type, shape", SMALLEST_MACHINE.items())
def test_machine_types(gpu_type: str, shape: tuple[int, str]) -> None:
    count, machine = shape
    assert gke.machine_type(gpu_type, count) == machine
    assert min(gke.ACCELERATORS[gpu_type].machine_types) == count


def test_l4_shapes_and_missing_shapes() -> None:
    assert [gke.machine_type("nvidia-l4", n) for n in (2, 4, 8)] == [
        "g2-standard-24",
        "g2-standard-48",
        "g2-standard-96",
    ]
    assert gke.machine_type("nvidia-h200-141gb", 1) is None
    assert gke.machine_type("nvidia-tesla-t4", 8) is None


def test_every_machine_type_has_a_price_and_spot_is_cheaper() -> None:
    for acc in gke.ACCELERATORS.values():
        assert 0 < acc.gpu_spot_usd_hour < acc.gpu_usd_hour
        for machine in acc.machine_types.values():
            price = gke.machine_price(machine)
            assert price is not None, machine
            assert 0 < price.spot < price.on_demand
    assert gke.PRICE_TABLE_DATE and gke.PRICE_REGION == "us-central1"


def test_label_keys_and_values_are_gkes() -> None:
    assert gke.LABEL_ACCELERATOR == "cloud.google.com/gke-accelerator"
    assert gke.LABEL_PARTITION_SIZE == "cloud.google.com/gke-gpu-partition-size"
    assert gke.LABEL_SHARING_STRATEGY == "cloud.google.com/gke-gpu-sharing-strategy"
    assert gke.LABEL_MAX_SHARED_CLIENTS == "cloud.google.com/gke-max-shared-clients-per-gpu"
    assert gke.SHARING_LABEL_VALUES == {"TimeSharing": "time-sharing", "MPS": "mps"}
    assert gke.SHARING_API_VALUES == {"TimeSharing": "TIME_SHARING", "MPS": "MPS"}
    assert (gke.GPU_TAINT_KEY, gke.GPU_TAINT_VALUE, gke.GPU_TAINT_EFFECT) == (
        "nvidia.com/gpu",
        "present",
        "NoSchedule",
    )


def test_sharing_strategy_names_match_the_gke_client_enum() -> None:
    from google.cloud import container_v1

    enum = container_v1.GPUSharingConfig.GPUSharingStrategy
    assert {e.name for e in enum} >= set(gke.SHARING_API_VALUES.values())


@pytest.mark.parametrize(
    "name, valid",
    [
        ("igs-h100x1-mig1g10gb-ts2", True),
        ("a" * 40, True),
        ("a" * 41, False),
        ("1pool", False),
        ("pool-", False),
        ("Pool", False),
    ],
)
def test_nodepool_name_rule(name: str, valid: bool) -> None:
    assert bool(gke.NODEPOOL_NAME_RE.match(name)) is valid


@pytest.mark.parametrize(
    "size, limit", [(None, 48), ("7g.80gb", 48), ("3g.40gb", 20), ("1g.10gb", 6)]
)
def test_mps_client_limit_shrinks_with_the_slice(size: str | None, limit: int) -> None:
    assert gke.mps_client_limit(size) == limit
