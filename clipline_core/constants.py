"""Every wire-level name of clipline in one place.

Queue names, Redis keys, shared-memory segment names and layout identifiers, the
custom-resource group, HTTP headers and Prometheus metric names live here so that the
API, the workers, the GPU daemon, the operator, the Helm chart tests and the Grafana
dashboards all agree. Renaming anything here is a wire-format change.
"""

from __future__ import annotations

import enum
import re
from typing import Final

PROJECT: Final = "clipline"

# ---------------------------------------------------------------------------
# Deployment names. A deployment name namespaces every queue, key and segment so
# that two installations on one node (or two test sessions on one Redis) never
# collide. It must be a DNS-label-like token.
# ---------------------------------------------------------------------------
DEFAULT_DEPLOYMENT: Final = "clipline"
DEPLOYMENT_RE: Final = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")


def check_deployment(name: str) -> str:
    """Return ``name`` if it is a valid deployment name, else raise ``ValueError``."""
    if not DEPLOYMENT_RE.match(name):
        raise ValueError(
            f"invalid deployment name {name!r}: use 1-40 lowercase letters, digits and '-'"
        )
    return name


# ---------------------------------------------------------------------------
# Priority classes. Celery on Redis treats 0 as the highest priority; within a
# class requests are served in arrival order.
# ---------------------------------------------------------------------------
class PriorityClass(enum.StrEnum):
    """Closed set of request priority classes, highest first."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"

    @property
    def rank(self) -> int:
        """0 for the most urgent class; used by the GPU daemon's ordering."""
        return _PRIORITY_RANK[self]

    @property
    def celery_priority(self) -> int:
        """The Celery/Kombu priority number (0 = highest on the Redis transport)."""
        return _CELERY_PRIORITY[self]


_PRIORITY_RANK: Final = {PriorityClass.HIGH: 0, PriorityClass.NORMAL: 1, PriorityClass.LOW: 2}
_CELERY_PRIORITY: Final = {PriorityClass.HIGH: 0, PriorityClass.NORMAL: 4, PriorityClass.LOW: 8}
DEFAULT_PRIORITY: Final = PriorityClass.NORMAL
CELERY_PRIORITY_STEPS: Final = list(range(10))


def queue_name(deployment: str) -> str:
    """Celery queue that carries jobs for ``deployment``."""
    return f"{PROJECT}.{deployment}.jobs"


def callbacks_queue_name(deployment: str) -> str:
    """Celery queue that carries completion-callback deliveries for ``deployment``.

    Consumed by the callback worker alone (a thread pool), never by the job workers.
    """
    return f"{PROJECT}.{deployment}.callbacks"


CELERY_TASK_PROCESS_JOB: Final = "clipline.process_job"
CELERY_TASK_DELIVER_CALLBACK: Final = "clipline.deliver_callback"


# ---------------------------------------------------------------------------
# Redis keys (all under one prefix per deployment).
# ---------------------------------------------------------------------------
def redis_prefix(deployment: str) -> str:
    return f"{PROJECT}:{deployment}"


def job_key(deployment: str, job_id: str) -> str:
    """Hash holding one job's state machine and record."""
    return f"{redis_prefix(deployment)}:job:{job_id}"


def job_events_channel(deployment: str, job_id: str) -> str:
    """Pub/sub channel where each state transition of a job is announced."""
    return f"{redis_prefix(deployment)}:events:{job_id}"


def results_key(deployment: str, job_id: str) -> str:
    """List where the GPU daemon pushes one JSON result per processed chunk."""
    return f"{redis_prefix(deployment)}:results:{job_id}"


def caption_requests_key(deployment: str) -> str:
    """List of caption requests (JSON) the workers push and GPU daemons with a copywriter pop."""
    return f"{redis_prefix(deployment)}:captions"


#: the text model that writes highlight captions (as named in ``Settings.models`` and in
#: the daemon heartbeat's ``models`` field)
CAPTION_MODEL: Final = "copywriter"


def idempotency_key(deployment: str, key_hash: str) -> str:
    """String mapping a client's Idempotency-Key (hashed) to a job id."""
    return f"{redis_prefix(deployment)}:idem:{key_hash}"


def tenant_jobs_key(deployment: str, tenant: str) -> str:
    """Sorted set of a tenant's job ids scored by ``created_at`` (``GET /v1/jobs``)."""
    return f"{redis_prefix(deployment)}:tenant:{tenant}:jobs"


def rate_limit_key(deployment: str, api_key_id: str) -> str:
    """String holding an API key's rate-limit state (GCRA theoretical arrival time)."""
    return f"{redis_prefix(deployment)}:ratelimit:{api_key_id}"


def daemon_heartbeat_key(deployment: str, node: str) -> str:
    """Hash the GPU daemon refreshes while it is ready (device, models, pid)."""
    return f"{redis_prefix(deployment)}:daemon:{node}"


def worker_heartbeat_key(deployment: str, node: str) -> str:
    return f"{redis_prefix(deployment)}:worker:{node}"


def leases_key(deployment: str) -> str:
    """Sorted set of running jobs scored by lease expiry (the workers' lease sweeper)."""
    return f"{redis_prefix(deployment)}:leases"


def held_key(deployment: str) -> str:
    """Sorted set of queued jobs whose task message a worker process holds in memory (a
    retry waiting on its countdown, a message not started yet), scored by when it is due."""
    return f"{redis_prefix(deployment)}:held"


def worker_alive_key(deployment: str, holder: str) -> str:
    """String a worker's main process (``holder``: its ``host:pid:start``) keeps alive
    with a short time-to-live; the messages of a holder whose key is gone are re-sent."""
    return f"{redis_prefix(deployment)}:alive:{holder}"


def callback_worker_heartbeat_key(deployment: str, node: str) -> str:
    """Hash the callback worker keeps while it consumes the callbacks queue."""
    return f"{redis_prefix(deployment)}:callback-worker:{node}"


def callback_event_key(deployment: str, event_id: str) -> str:
    """Hash of one callback event's delivery: state, attempts, the in-flight holder."""
    return f"{redis_prefix(deployment)}:callback:{event_id}"


def callback_host_key(deployment: str, host: str) -> str:
    """Sorted set of deliveries in flight to one receiver host, scored by lease expiry."""
    return f"{redis_prefix(deployment)}:callback-host:{host}"


def job_stats_key(deployment: str) -> str:
    """Hash of the deployment's job counters (created, ended by status, failures by code,
    the latency histogram) that the job API exports (:mod:`clipline_core.job_metrics`)."""
    return f"{redis_prefix(deployment)}:stats:jobs"


# Where a Celery worker's pool children write their Prometheus samples (one folder per
# worker process under the directory this variable names, when it is set).
ENV_PROMETHEUS_MULTIPROC_DIR: Final = "PROMETHEUS_MULTIPROC_DIR"


# ---------------------------------------------------------------------------
# Shared-memory transport. One arena file per deployment in a node-local
# directory (``/dev/shm`` by default), owner-only, plus a datagram socket the
# producers use to wake the daemon.
# ---------------------------------------------------------------------------
DEFAULT_SHM_DIR: Final = "/dev/shm"
SHM_MAGIC: Final = b"CLIPLNE1"
SHM_LAYOUT_VERSION: Final = 2  # 2: OFD leases, record offsets, recoveries
SHM_FILE_MODE: Final = 0o600


def shm_arena_name(deployment: str) -> str:
    return f"{PROJECT}-{deployment}.arena"


def shm_socket_name(deployment: str) -> str:
    return f"{PROJECT}-{deployment}.sock"


# ---------------------------------------------------------------------------
# Kubernetes custom resource.
# ---------------------------------------------------------------------------
CRD_GROUP: Final = "clipline.dev"
CRD_VERSION: Final = "v1alpha1"
CRD_KIND: Final = "ClipPipeline"
CRD_PLURAL: Final = "clippipelines"
CRD_SINGULAR: Final = "clippipeline"
CRD_SHORT_NAMES: Final = ("clp",)
LABEL_COMPONENT: Final = "app.kubernetes.io/component"
LABEL_NAME: Final = "app.kubernetes.io/name"
LABEL_INSTANCE: Final = "app.kubernetes.io/instance"
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
LABEL_NODE: Final = f"{CRD_GROUP}/node"
#: Pod label: which of its node's GPU daemons (0, 1, ...) a daemon or worker pod belongs to.
LABEL_GPU: Final = f"{CRD_GROUP}/gpu"


# ---------------------------------------------------------------------------
# HTTP.
# ---------------------------------------------------------------------------
API_PREFIX: Final = "/v1"
HEADER_IDEMPOTENCY_KEY: Final = "Idempotency-Key"
HEADER_SIGNATURE: Final = "Clipline-Signature"
HEADER_EVENT_ID: Final = "Clipline-Event-Id"
HEADER_IDEMPOTENT_REPLAYED: Final = "Idempotent-Replayed"
HEADER_PREFER: Final = "Prefer"  # RFC 7240; the API honours ``wait=N``
HEADER_PREFERENCE_APPLIED: Final = "Preference-Applied"
# Completion-callback event types (the ``event`` field of a callback body).
EVENT_JOB_SUCCEEDED: Final = "job.succeeded"
EVENT_JOB_FAILED: Final = "job.failed"
EVENT_JOB_CANCELLED: Final = "job.cancelled"

DEFAULT_API_PORT: Final = 8080
DEFAULT_DAEMON_METRICS_PORT: Final = 9400
DEFAULT_WORKER_METRICS_PORT: Final = 9401
DEFAULT_OPERATOR_METRICS_PORT: Final = 9402

# The non-root user and group the image runs as (the arena directory is owned by them).
CONTAINER_UID: Final = 10001
CONTAINER_GID: Final = 10001


# ---------------------------------------------------------------------------
# Model-execution backends of the GPU daemon: ``Settings.backend`` /
# ``model_backends``, the ClipPipeline's ``spec.models.backend`` and the ``backend``
# metric label. Fallback order: a backend that cannot run here falls back to the ones
# before it, right to left (``tensorrt`` needs the image's TensorRT target).
# ---------------------------------------------------------------------------
BACKENDS: Final[tuple[str, ...]] = ("eager", "channels_last", "compile", "cudagraphs", "tensorrt")


# ---------------------------------------------------------------------------
# Video decode backends of the CPU workers: ``Settings.decode_backend``, the
# ClipPipeline's ``spec.workers.decodeBackend`` and the ``decoder`` of a job's video
# metadata (see :mod:`workers.decoders`). ``opencv`` is the default and the reference;
# ``auto`` picks ``nvdec`` where CUDA and PyNvVideoCodec are available, else ``opencv``.
# ---------------------------------------------------------------------------
DECODE_BACKENDS: Final[tuple[str, ...]] = ("opencv", "pyav", "nvdec")
DECODE_BACKEND_CHOICES: Final[tuple[str, ...]] = (*DECODE_BACKENDS, "auto")


# ---------------------------------------------------------------------------
# Prometheus metric names (base units; counters end in _total). Labels are
# bounded: never a job id.
# ---------------------------------------------------------------------------
class Metric:
    """Exposed metric names. Exporters, dashboards and alert rules import these."""

    GPU_UTILIZATION_RATIO: Final = "clipline_gpu_utilization_ratio"
    DEVICE_BUSY_RATIO: Final = "clipline_device_busy_ratio"
    BATCH_SIZE: Final = "clipline_batch_size"
    INFERENCE_SECONDS: Final = "clipline_inference_seconds"
    ITEMS_PROCESSED_TOTAL: Final = "clipline_items_processed_total"
    SHM_SLOTS_IN_USE: Final = "clipline_shm_slots_in_use"
    SHM_SLOTS_TOTAL: Final = "clipline_shm_slots"
    SHM_RESERVE_WAIT_SECONDS: Final = "clipline_shm_reserve_wait_seconds"
    HANDOFF_SECONDS: Final = "clipline_handoff_seconds"
    HANDOFF_BYTES_TOTAL: Final = "clipline_handoff_bytes_total"
    SHM_SLOTS_RECLAIMED_TOTAL: Final = "clipline_shm_slots_reclaimed_total"
    JOBS_TOTAL: Final = "clipline_jobs_total"
    STAGE_SECONDS: Final = "clipline_stage_seconds"
    FRAMES_DECODED_TOTAL: Final = "clipline_frames_decoded_total"
    JOBS_IN_FLIGHT: Final = "clipline_jobs_in_flight"
    AUTOSCALER_DESIRED_WORKERS: Final = "clipline_autoscaler_desired_workers"
    AUTOSCALER_DECISIONS_TOTAL: Final = "clipline_autoscaler_decisions_total"
    API_REQUESTS_TOTAL: Final = "clipline_api_requests_total"
    API_REQUEST_SECONDS: Final = "clipline_api_request_seconds"
    CALLBACKS_TOTAL: Final = "clipline_callbacks_total"
    #: task messages waiting in the broker, by priority class (the workers export it)
    BACKLOG_JOBS: Final = "clipline_backlog_jobs"
    #: time a chunk waited in the shared-memory arena before its batch ran (the GPU daemon)
    ARENA_WAIT_SECONDS: Final = "clipline_arena_wait_seconds"
    #: submit-to-terminal latency of a job, by priority class and final status
    JOB_LATENCY_SECONDS: Final = "clipline_job_latency_seconds"
    #: failed and cancelled jobs by stable error code
    JOB_FAILURES_TOTAL: Final = "clipline_job_failures_total"
    #: jobs not yet ended, per state, right now (the job API exports it). Not
    #: ``clipline_jobs``: that is the OpenMetrics family name of ``clipline_jobs_total``.
    JOBS_BY_STATE: Final = "clipline_jobs_current"
    #: 1, labelled with the version, the Python version and the process's role
    BUILD_INFO: Final = "clipline_build_info"


# Label names (bounded value sets).
LABEL_STATUS: Final = "status"
LABEL_CODE: Final = "code"
LABEL_STAGE: Final = "stage"
LABEL_PRIORITY: Final = "priority"
LABEL_MODEL: Final = "model"
LABEL_BACKEND: Final = "backend"
LABEL_NODE_METRIC: Final = "node"
#: Series label (from the pod label :data:`LABEL_GPU`): the GPU daemon of the node.
LABEL_GPU_METRIC: Final = "gpu"
LABEL_DIRECTION: Final = "direction"
LABEL_REASON: Final = "reason"
LABEL_METHOD: Final = "method"
LABEL_ROUTE: Final = "route"
LABEL_OUTCOME: Final = "outcome"
#: the job state of ``clipline_jobs_current`` (a :class:`clipline_core.job.JobState` value)
LABEL_STATE: Final = "state"
#: which clipline process exports ``clipline_build_info`` (api, workers, gpu-daemon, ...)
LABEL_ROLE: Final = "role"
LABEL_VERSION: Final = "version"
LABEL_PYTHON: Final = "python"


class MetricRole(enum.StrEnum):
    """The kinds of clipline process that serve metrics (``role`` of ``clipline_build_info``).

    Each metric has exactly one owner (:data:`clipline_core.metrics.OWNERS`), declared in
    that role's registry and served by that role's processes only. The values are the
    pods' ``app.kubernetes.io/component`` labels.
    """

    API = "api"
    WORKERS = "workers"
    GPU_DAEMON = "gpu-daemon"
    CALLBACKS = "callbacks"
    OPERATOR = "operator"
