"""Prometheus metric definitions: one registry per process role, each metric in its owner's.

Every metric clipline exports has exactly one owner (:data:`OWNERS`), a
:class:`~clipline_core.constants.MetricRole`: the job API, the CPU workers, the GPU
daemon, the callback worker or the operator. A metric is declared into its owner's
:class:`~prometheus_client.CollectorRegistry` (:func:`registry`), never into
``prometheus_client``'s global one, and a process serves :func:`exposition` of its own
role only: that role's metrics, ``clipline_build_info{version,python,role}`` and the
process/platform/GC collectors. A metric object of another role may exist in a process
(this module declares them all) but is never served there, so no series is exported
at zero by a process that never updates it, and ``sum``/``avg`` over processes mean what
they say.

Owners, by what the process measures:

* GPU daemon: device busy and NVML utilization, batches, model time, items, the
  arena's slots (in use, total, reclaimed), the publish-to-take hand-off latency and
  ``clipline_arena_wait_seconds`` (a chunk's wait in the arena before its batch);
* workers: stage times, frames decoded, jobs in flight, the producer side of the arena
  (slot reservation wait, bytes handed off) and ``clipline_backlog_jobs{priority}``
  (task messages waiting in the broker, written by each worker's main process; every
  worker reports the same deployment-wide number, aggregate with ``max``);
* job API: its requests, and the job outcomes and states kept in Redis
  (:mod:`clipline_core.job_metrics`: ``clipline_jobs_total{status}``,
  ``clipline_job_failures_total{code}``, ``clipline_job_latency_seconds{priority,status}``,
  ``clipline_jobs_current{state}``), so those have one source whichever process ended
  a job;
* callback worker: delivery outcomes; operator: its autoscaling decisions (declared in
  ``clipline_operator.metrics`` into :func:`registry` ``(OPERATOR)``).

The workers' pool children write their samples to files (``prometheus_client``'s
multiprocess mode, :mod:`workers.monitor`), which the main process merges and filters to
:func:`family_names` of its role. Labels are bounded (priority class, stage, status,
error code, model, backend, node), never a job id. ``_created`` series are off.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable, Iterator, Mapping
from importlib import metadata
from typing import Final

import prometheus_client
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric as MetricFamily
from prometheus_client.registry import Collector

from clipline_core.constants import (
    LABEL_BACKEND,
    LABEL_METHOD,
    LABEL_MODEL,
    LABEL_NODE_METRIC,
    LABEL_OUTCOME,
    LABEL_PRIORITY,
    LABEL_PYTHON,
    LABEL_ROLE,
    LABEL_ROUTE,
    LABEL_STAGE,
    LABEL_STATUS,
    LABEL_VERSION,
    PROJECT,
    Metric,
    MetricRole,
)

prometheus_client.disable_created_metrics()

API: Final = MetricRole.API
WORKERS: Final = MetricRole.WORKERS
GPU_DAEMON: Final = MetricRole.GPU_DAEMON
CALLBACKS: Final = MetricRole.CALLBACKS
OPERATOR: Final = MetricRole.OPERATOR

#: the role that owns (declares and serves) each exported metric
OWNERS: Final[Mapping[str, MetricRole]] = {
    Metric.GPU_UTILIZATION_RATIO: GPU_DAEMON,
    Metric.DEVICE_BUSY_RATIO: GPU_DAEMON,
    Metric.BATCH_SIZE: GPU_DAEMON,
    Metric.ARENA_WAIT_SECONDS: GPU_DAEMON,
    Metric.INFERENCE_SECONDS: GPU_DAEMON,
    Metric.ITEMS_PROCESSED_TOTAL: GPU_DAEMON,
    Metric.SHM_SLOTS_IN_USE: GPU_DAEMON,
    Metric.SHM_SLOTS_TOTAL: GPU_DAEMON,
    Metric.HANDOFF_SECONDS: GPU_DAEMON,
    Metric.SHM_SLOTS_RECLAIMED_TOTAL: GPU_DAEMON,
    Metric.SHM_RESERVE_WAIT_SECONDS: WORKERS,
    Metric.HANDOFF_BYTES_TOTAL: WORKERS,
    Metric.STAGE_SECONDS: WORKERS,
    Metric.FRAMES_DECODED_TOTAL: WORKERS,
    Metric.BACKLOG_JOBS: WORKERS,
    Metric.JOBS_IN_FLIGHT: WORKERS,
    Metric.API_REQUESTS_TOTAL: API,
    Metric.API_REQUEST_SECONDS: API,
    Metric.JOBS_TOTAL: API,
    Metric.JOB_FAILURES_TOTAL: API,
    Metric.JOB_LATENCY_SECONDS: API,
    Metric.JOBS_BY_STATE: API,
    Metric.CALLBACKS_TOTAL: CALLBACKS,
    Metric.AUTOSCALER_DESIRED_WORKERS: OPERATOR,
    Metric.AUTOSCALER_DECISIONS_TOTAL: OPERATOR,
}
#: exported by every role (with the process/platform/GC collectors' ``process_*`` and
#: ``python_*`` families)
COMMON: Final = frozenset({Metric.BUILD_INFO})

_REGISTRIES: Final = {role: CollectorRegistry(auto_describe=True) for role in MetricRole}


def registry(role: MetricRole | str) -> CollectorRegistry:
    """The registry the metrics of ``role`` are declared in (not what it serves)."""
    return _REGISTRIES[MetricRole(role)]


def _of(name: str) -> CollectorRegistry:
    return _REGISTRIES[OWNERS[name]]


def family_names(role: MetricRole | str) -> frozenset[str]:
    """Family names (counters without ``_total``) of the metrics ``role`` owns."""
    role = MetricRole(role)
    return frozenset(family_name(n) for n, owner in OWNERS.items() if owner == role)


def family_name(name: str) -> str:
    """The family name of an exported metric name (``x_total`` -> ``x``)."""
    return name.removesuffix("_total")


def version() -> str:
    try:
        return metadata.version(PROJECT)
    except metadata.PackageNotFoundError:
        return "unknown"


class BuildInfo(Collector):
    """``clipline_build_info{version,python,role} 1`` (no multiprocess file: computed)."""

    def __init__(self, role: MetricRole | str) -> None:
        self.role = MetricRole(role)
        self._labels = [version(), platform.python_version(), self.role.value]

    def collect(self) -> Iterator[MetricFamily]:
        family = GaugeMetricFamily(
            Metric.BUILD_INFO,
            "Always 1: the clipline version, Python version and role of this process",
            labels=[LABEL_VERSION, LABEL_PYTHON, LABEL_ROLE],
        )
        family.add_metric(self._labels, 1.0)
        yield family


def exposition(
    role: MetricRole | str, collectors: Iterable[Collector] = (), *, own: bool = True
) -> CollectorRegistry:
    """What a process of ``role`` serves on ``/metrics``.

    ``role``'s registry (unless ``own`` is False: ``collectors`` stand in for it, e.g. the
    workers' merged multiprocess samples), ``collectors``, build info, and the process,
    platform and GC collectors of this process.
    """
    out = CollectorRegistry()
    if own:
        out.register(registry(role))
    for collector in (*collectors, BuildInfo(role)):
        out.register(collector)
    for standard in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        out.register(standard)
    return out


_FAST = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.5, 1.0)
_SLOW = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

# --- GPU daemon: the arena's consumer side ----------------------------------------
SHM_SLOTS_IN_USE = Gauge(
    Metric.SHM_SLOTS_IN_USE,
    "Arena slots not free (writing, ready or consuming)",
    registry=_of(Metric.SHM_SLOTS_IN_USE),
)
SHM_SLOTS_TOTAL = Gauge(
    Metric.SHM_SLOTS_TOTAL, "Arena slots in total", registry=_of(Metric.SHM_SLOTS_TOTAL)
)
HANDOFF_SECONDS = Histogram(
    Metric.HANDOFF_SECONDS,
    "Publish-to-take latency of a shared-memory hand-off",
    buckets=_FAST,
    registry=_of(Metric.HANDOFF_SECONDS),
)
SHM_SLOTS_RECLAIMED = Counter(
    Metric.SHM_SLOTS_RECLAIMED_TOTAL,
    "Slots the GPU daemon reclaimed from producers that died while writing",
    registry=_of(Metric.SHM_SLOTS_RECLAIMED_TOTAL),
)

# --- GPU daemon ---------------------------------------------------------------------
GPU_UTILIZATION = Gauge(
    Metric.GPU_UTILIZATION_RATIO,
    "GPU utilization reported by NVML (0-1)",
    [LABEL_NODE_METRIC],
    registry=_of(Metric.GPU_UTILIZATION_RATIO),
)
DEVICE_BUSY = Gauge(
    Metric.DEVICE_BUSY_RATIO,
    "Fraction of wall time the device executed work (daemon-measured)",
    [LABEL_NODE_METRIC],
    registry=_of(Metric.DEVICE_BUSY_RATIO),
)
BATCH_SIZE = Histogram(
    Metric.BATCH_SIZE,
    "Items per executed batch",
    [LABEL_MODEL, LABEL_BACKEND],
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
    registry=_of(Metric.BATCH_SIZE),
)
ARENA_WAIT = Histogram(
    Metric.ARENA_WAIT_SECONDS,
    "Time a chunk waited in the shared-memory arena before its batch ran",
    buckets=_SLOW,
    registry=_of(Metric.ARENA_WAIT_SECONDS),
)
INFERENCE_SECONDS = Histogram(
    Metric.INFERENCE_SECONDS,
    "Model execution time per batch",
    [LABEL_MODEL, LABEL_BACKEND],
    buckets=_SLOW,
    registry=_of(Metric.INFERENCE_SECONDS),
)
ITEMS_PROCESSED = Counter(
    Metric.ITEMS_PROCESSED_TOTAL,
    "Items (chunks) processed by the daemon",
    [LABEL_MODEL, LABEL_BACKEND],
    registry=_of(Metric.ITEMS_PROCESSED_TOTAL),
)

# --- workers (pool children write multiprocess files; the main process merges) ------
SHM_RESERVE_WAIT = Histogram(
    Metric.SHM_RESERVE_WAIT_SECONDS,
    "Time a producer waited for a free arena slot",
    buckets=_FAST,
    registry=_of(Metric.SHM_RESERVE_WAIT_SECONDS),
)
HANDOFF_BYTES = Counter(
    Metric.HANDOFF_BYTES_TOTAL,
    "Bytes producers handed off through shared memory",
    registry=_of(Metric.HANDOFF_BYTES_TOTAL),
)
STAGE_SECONDS = Histogram(
    Metric.STAGE_SECONDS,
    "Time spent per job stage",
    [LABEL_STAGE],
    buckets=_SLOW,
    registry=_of(Metric.STAGE_SECONDS),
)
FRAMES_DECODED = Counter(
    Metric.FRAMES_DECODED_TOTAL,
    "Video frames kept by the sampler",
    registry=_of(Metric.FRAMES_DECODED_TOTAL),
)
BACKLOG_JOBS = Gauge(
    Metric.BACKLOG_JOBS,
    "Job task messages waiting in the broker, per priority class (deployment-wide)",
    [LABEL_PRIORITY],
    registry=_of(Metric.BACKLOG_JOBS),
)
JOBS_IN_FLIGHT = Gauge(
    Metric.JOBS_IN_FLIGHT,
    "Jobs being processed by this worker's children",
    registry=_of(Metric.JOBS_IN_FLIGHT),
)

# --- job API (job outcomes and states: clipline_core.job_metrics) ----------------------
API_REQUESTS = Counter(
    Metric.API_REQUESTS_TOTAL,
    "API requests by method, route template and status",
    [LABEL_METHOD, LABEL_ROUTE, LABEL_STATUS],
    registry=_of(Metric.API_REQUESTS_TOTAL),
)
API_REQUEST_SECONDS = Histogram(
    Metric.API_REQUEST_SECONDS,
    "API request latency by method and route template",
    [LABEL_METHOD, LABEL_ROUTE],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
    registry=_of(Metric.API_REQUEST_SECONDS),
)

# --- callback worker ----------------------------------------------------------------
CALLBACKS_DELIVERED = Counter(
    Metric.CALLBACKS_TOTAL,
    "Completion-callback delivery attempts by outcome (delivered, retried, failed), and "
    "task messages of events already delivered or given up (duplicate)",
    [LABEL_OUTCOME],
    registry=_of(Metric.CALLBACKS_TOTAL),
)
