"""Prometheus metrics from one registry per server, plus GPU figures from NVML (MIG aware).

On a shared GPU the node exporter cannot tell pods apart; these series come from the pod itself:
its queue, its stages, and the GPU or MIG slice it was given.
"""

from __future__ import annotations

import logging
import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger(__name__)

STAGES = ("encode", "denoise", "decode")
# Up to past the longest a request may take (request_timeout_s, 300 s by default), so a p99
# near the timeout is not capped at the last bucket.
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 180, 300,
            600)
_BATCH = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


class ServerMetrics:
    """Every series the server exports. Routes for health and metrics are not counted."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "imagegen_requests", "Generation and edit requests by route and outcome.",
            ["route", "status"], registry=r
        )
        self.stream_errors = Counter(
            "imagegen_stream_errors",
            "Streamed requests that ended in an error event after their 200, by error type.",
            ["type"], registry=r
        )
        self.request_seconds = Histogram(
            "imagegen_request_duration_seconds",
            "Time from admission to response for successful generations.",
            buckets=_SECONDS,
            registry=r,
        )
        self.stage_seconds = Histogram(
            "imagegen_stage_duration_seconds",
            "Time one batch spends in a stage (device time when on a GPU); under step-level "
            "batching, the denoise stage's series times each step of its running batch.",
            ["stage"],
            buckets=_SECONDS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "imagegen_stage_queue_depth", "Jobs waiting in front of a stage.", ["stage"], registry=r
        )
        self.batch_size = Histogram(
            "imagegen_stage_batch_size",
            "Requests per batch a stage ran (their images are at most max_batch_size, or "
            "one request's); under step-level batching, the denoise stage's series counts "
            "the requests in each step.",
            ["stage"],
            buckets=_BATCH,
            registry=r,
        )
        self.denoise_joins = Counter(
            "imagegen_denoise_joins",
            "Requests that joined a denoise batch already under way (step-level batching).",
            registry=r,
        )
        self.batches_retried = Counter(
            "imagegen_stage_batches_retried",
            "Batches that failed and whose requests each ran again on their own.",
            ["stage"],
            registry=r,
        )
        self.images = Counter("imagegen_images_generated", "Images generated.", registry=r)
        self.in_flight = Gauge(
            "imagegen_requests_in_flight", "Accepted requests not yet answered.", registry=r
        )
        self.ready = Gauge(
            "imagegen_ready", "1 while the server takes requests: loaded, warmed up, every "
            "stage working, not draining.", registry=r
        )
        self.info = Info("imagegen_server", "Model and speed settings in effect.", registry=r)
        for stage in STAGES:
            # Present from the start, so dashboards and tests see every phase before traffic;
            # the queues and batches are those of the stages there are (stages.Stage).
            self.stage_seconds.labels(stage=stage)
        r.register(GpuCollector())
        self.recompiles = RecompileCollector()
        r.register(self.recompiles)


class RecompileCollector:
    """``imagegen_recompiles_total``: graphs torch.compile made after the server turned ready.

    Every graph dynamo makes, a recompile for a new shape or a changed guard too, counts in
    its ``unique_graphs`` statistic; the figure is how far it moved since ``mark_ready``.
    In service it should stay 0: each one is a request that waited for a compiler.
    """

    def __init__(self) -> None:
        self._baseline: int | None = None

    @staticmethod
    def _graphs() -> int:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])

    def mark_ready(self) -> None:
        self._baseline = self._graphs()

    @property
    def since_ready(self) -> int:
        return 0 if self._baseline is None else self._graphs() - self._baseline

    HELP = "Graphs torch.compile made after the server turned ready."

    def describe(self):
        return [CounterMetricFamily("imagegen_recompiles", self.HELP)]

    def collect(self):
        yield CounterMetricFamily("imagegen_recompiles", self.HELP, value=self.since_ready)


class GpuCollector:
    """GPU utilisation and memory via NVML, read at scrape time; silent where there is no GPU."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nvml = None
        self._tried = False

    def _init(self):
        with self._lock:
            if not self._tried:
                self._tried = True
                try:
                    import pynvml

                    pynvml.nvmlInit()
                    self._nvml = pynvml
                except Exception as exc:  # no driver, no library, no device: all mean "no GPU"
                    log.info("NVML unavailable, no GPU metrics: %s", exc)
            return self._nvml

    def describe(self):
        return []

    def collect(self):
        nvml = self._init()
        util = GaugeMetricFamily(
            "imagegen_gpu_utilization_ratio",
            "GPU busy fraction over the last sample period (not reported per MIG slice).",
            labels=["gpu", "uuid"],
        )
        used = GaugeMetricFamily(
            "imagegen_gpu_memory_used_bytes",
            "Memory used on the GPU, or on the MIG slice when the GPU is partitioned.",
            labels=["gpu", "uuid", "mig"],
        )
        total = GaugeMetricFamily(
            "imagegen_gpu_memory_total_bytes",
            "Memory of the GPU, or of the MIG slice when the GPU is partitioned.",
            labels=["gpu", "uuid", "mig"],
        )
        if nvml is not None:
            try:
                self._sample(nvml, util, used, total)
            except Exception as exc:
                log.warning("NVML sample failed: %s", exc)
        yield util
        yield used
        yield total
        yield from _torch_memory()

    @staticmethod
    def _sample(nvml, util, used, total) -> None:
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            uuid = _text(nvml.nvmlDeviceGetUUID(handle))
            try:
                mig_on = nvml.nvmlDeviceGetMigMode(handle)[0] == nvml.NVML_DEVICE_MIG_ENABLE
            except nvml.NVMLError:
                mig_on = False
            if not mig_on:
                rates = nvml.nvmlDeviceGetUtilizationRates(handle)
                util.add_metric([str(index), uuid], rates.gpu / 100.0)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                used.add_metric([str(index), uuid, ""], memory.used)
                total.add_metric([str(index), uuid, ""], memory.total)
                continue
            # On a MIG slice the pod sees its own MIG device under the parent GPU.
            for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
                try:
                    mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
                except nvml.NVMLError:
                    continue
                mig_uuid = _text(nvml.nvmlDeviceGetUUID(mig))
                profile = _text(nvml.nvmlDeviceGetName(mig)).rsplit(" ", 1)[-1]
                memory = nvml.nvmlDeviceGetMemoryInfo(mig)
                used.add_metric([str(index), mig_uuid, profile], memory.used)
                total.add_metric([str(index), mig_uuid, profile], memory.total)


def _torch_memory():
    import sys

    torch = sys.modules.get("torch")
    family = GaugeMetricFamily(
        "imagegen_torch_cuda_allocated_bytes",
        "Device memory this process's tensors hold (the pod's own share of a shared GPU).",
        labels=["device"],
    )
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        for index in range(torch.cuda.device_count()):
            family.add_metric([str(index)], torch.cuda.memory_allocated(index))
    yield family


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
