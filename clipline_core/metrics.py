"""Prometheus metric objects shared by every clipline process.

Names come from :class:`clipline_core.constants.Metric`; labels are bounded (priority
class, stage, status, error code, model, backend, node), never a job id. Each process
exposes the metrics it updates; the rest stay at zero or without samples. The
operator's autoscaler metrics live in its own package.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from clipline_core.constants import (
    LABEL_BACKEND,
    LABEL_MODEL,
    LABEL_NODE_METRIC,
    LABEL_PRIORITY,
    LABEL_STAGE,
    Metric,
)
from clipline_core.job_metrics import JOBS, init_job_series  # noqa: F401 - re-exported

_FAST = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.5, 1.0)
_SLOW = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

# --- shared-memory transport ------------------------------------------------
SHM_SLOTS_IN_USE = Gauge(
    Metric.SHM_SLOTS_IN_USE, "Arena slots not free (writing, ready or consuming)"
)
SHM_SLOTS_TOTAL = Gauge(Metric.SHM_SLOTS_TOTAL, "Arena slots in total")
SHM_RESERVE_WAIT = Histogram(
    Metric.SHM_RESERVE_WAIT_SECONDS, "Time a producer waited for a free slot", buckets=_FAST
)
HANDOFF_SECONDS = Histogram(
    Metric.HANDOFF_SECONDS, "Publish-to-take latency of a shared-memory hand-off", buckets=_FAST
)
HANDOFF_BYTES = Counter(Metric.HANDOFF_BYTES_TOTAL, "Bytes handed off through shared memory")
SHM_SLOTS_RECLAIMED = Counter(
    Metric.SHM_SLOTS_RECLAIMED_TOTAL, "Slots reclaimed from producers that died while writing"
)

# --- GPU daemon ---------------------------------------------------------------
GPU_UTILIZATION = Gauge(
    Metric.GPU_UTILIZATION_RATIO, "GPU utilization reported by NVML (0-1)", [LABEL_NODE_METRIC]
)
DEVICE_BUSY = Gauge(
    Metric.DEVICE_BUSY_RATIO,
    "Fraction of wall time the device executed work (daemon-measured)",
    [LABEL_NODE_METRIC],
)
BATCH_SIZE = Histogram(
    Metric.BATCH_SIZE,
    "Items per executed batch",
    [LABEL_MODEL, LABEL_BACKEND],
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
)
QUEUE_WAIT = Histogram(
    Metric.QUEUE_WAIT_SECONDS,
    "Time an item waited in the arena before its batch ran",
    buckets=_SLOW,
)
INFERENCE_SECONDS = Histogram(
    Metric.INFERENCE_SECONDS,
    "Model execution time per batch",
    [LABEL_MODEL, LABEL_BACKEND],
    buckets=_SLOW,
)
ITEMS_PROCESSED = Counter(
    Metric.ITEMS_PROCESSED_TOTAL,
    "Items (chunks) processed by the daemon",
    [LABEL_MODEL, LABEL_BACKEND],
)

# --- workers --------------------------------------------------------------------
STAGE_SECONDS = Histogram(
    Metric.STAGE_SECONDS, "Time spent per job stage", [LABEL_STAGE], buckets=_SLOW
)
FRAMES_DECODED = Counter(Metric.FRAMES_DECODED_TOTAL, "Video frames kept by the sampler")
QUEUE_DEPTH = Gauge(Metric.QUEUE_DEPTH, "Jobs waiting in the queue", [LABEL_PRIORITY])
JOBS_IN_FLIGHT = Gauge(Metric.JOBS_IN_FLIGHT, "Jobs being processed by workers")
