"""Runtime configuration, read from ``CLIPLINE_*`` environment variables.

One frozen :class:`Settings` object is shared by the CLI, the workers, the GPU daemon
and the API. Every field has a safe default for a single machine; the Helm chart and
the operator set the variables for a cluster. ``Settings.to_env()`` is the inverse of
``Settings.from_env()`` so a parent process can hand its configuration to children.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_type_hints

from clipline_core import constants

ENV_PREFIX = "CLIPLINE_"


def _default_state_dir() -> str:
    base = os.environ.get("XDG_RUNTIME_DIR") or os.path.join(
        tempfile.gettempdir(), f"clipline-{os.getuid()}"
    )
    return os.path.join(base, "clipline")


@dataclasses.dataclass(frozen=True)
class Settings:
    """All tunables. Field ``foo_bar`` is read from ``CLIPLINE_FOO_BAR``."""

    # Identity and connections.
    deployment: str = constants.DEFAULT_DEPLOYMENT
    node_name: str = "local"
    # Which GPU daemon of the node (0, 1, ...): a node with N GPUs runs N daemons, each
    # with its own arena (its own shm_dir) and its own workers, all with the same index.
    gpu_index: int = 0
    redis_url: str = ""  # empty: the local stack starts an embedded server
    # Address the metrics endpoints of the GPU daemon, workers and callback worker bind:
    # loopback for the local stack; the chart and the operator set 0.0.0.0 in pods.
    metrics_host: str = "127.0.0.1"

    # Shared-memory transport.
    shm_dir: str = constants.DEFAULT_SHM_DIR
    shm_slots: int = 32
    shm_slot_bytes: int = 4 * 1024 * 1024
    shm_reserve_timeout_s: float = 30.0
    shm_starvation_age_s: float = 10.0
    shm_spin_us: int = 2000  # the daemon polls this long for work before sleeping

    # What the workers produce for the daemon (published in the arena header too).
    frames_per_chunk: int = 16
    # Frames are letterboxed into frame_size x frame_size (aspect kept): 288 keeps a
    # product at a quarter of the width about 70 px wide, and 16 frames in a 4 MiB slot.
    frame_size: int = 288
    sample_fps: float = 4.0

    # GPU daemon.
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    max_batch_size: int = 8
    max_queue_delay_ms: float = 5.0
    torch_threads: int = 0  # 0: min(4, cores)
    models: str = "localizer"  # comma-separated registry names run per chunk
    backend: str = "eager"
    weights_dir: str = ""
    model_backends: str = ""  # per-model override, e.g. "saliency:compile,embed:eager"
    # auto: bf16 for non-eager backends on CUDA and on CPUs with native bf16 | fp32 | bf16 | fp16
    precision: str = "auto"
    engine_cache_dir: str = ""  # compiled engines; empty: <state_dir>/engines
    saliency_size: str = ""  # HEIGHTxWIDTH; empty: 224x384 on CUDA, 64x64 on CPU
    saliency_anchors: int = 0  # clips per chunk; 0: 4 on CUDA, 1 on CPU
    embed_arch: str = ""  # vit_ti16 | vit_s16 | vit_b16; empty: vit_b16 on CUDA, vit_ti16 on CPU
    embed_size: int = 0  # input side; 0: 224 on CUDA, 112 on CPU
    embed_heads: int = 0  # 0: width / 64
    copywriter_max_new_tokens: int = 24
    localizer_features: str = "auto"  # auto (kornia on CUDA, else OpenCV) | sift_cv2 | sift_kornia
    localizer_keypoints: int = 512
    daemon_metrics_port: int = 0  # 0: no HTTP endpoint
    result_ttl_s: int = 3600

    # Workers.
    worker_concurrency: int = 2
    decode_segments: int = 2  # parallel segment readers per video (1: sequential)
    # FFmpeg decoding threads per reader; 0: one per parallel reader (each reader is a
    # thread of its own), OpenCV's default (one per core) when reading sequentially.
    decode_threads: int = 0
    # Which library decodes videos (:mod:`workers.decoders`): opencv (the reference) |
    # pyav (FFmpeg through PyAV, CPU) | nvdec (the node's GPU, PyNvVideoCodec) | auto
    # (nvdec where CUDA and PyNvVideoCodec are available, else opencv). A worker whose
    # backend cannot run on its node refuses to start (decoder_unavailable).
    decode_backend: str = "opencv"
    job_lease_s: float = 30.0  # a job whose worker died is recovered about this long after
    worker_metrics_port: int = 0  # 0: none (the job worker's, or the callback worker's)
    scratch_dir: str = ""  # empty: <state_dir>/scratch
    artifacts_dir: str = ""  # empty: <state_dir>/artifacts
    local_roots: str = ""  # os.pathsep-separated directories local paths may come from
    allow_private_networks: bool = False
    allow_loopback: bool = False
    # comma-separated host names whose addresses may be private-network ones (a cluster
    # Service the operator trusts); never loopback, link-local or metadata addresses
    private_hosts: str = ""
    max_video_bytes: int = 512 * 1024 * 1024
    max_image_bytes: int = 20 * 1024 * 1024
    max_duration_s: float = 600.0
    max_resolution: int = 4096
    max_frames: int = 200_000
    min_decoded_frames: int = 2
    fetch_connect_timeout_s: float = 5.0
    fetch_read_timeout_s: float = 30.0
    fetch_retries: int = 3
    # Per source, one job attempt: connect, every retry and the whole body; 0: none.
    fetch_deadline_s: float = 60.0
    # A body slower than this over the last fetch_rate_window_s (measured from that long
    # after the response headers) is refused: source_too_slow; 0: no minimum.
    fetch_min_rate_bps: int = 64 * 1024
    fetch_rate_window_s: float = 5.0
    job_soft_time_limit_s: float = 600.0
    job_time_limit_s: float = 660.0
    inference_timeout_s: float = 120.0
    max_attempts: int = 5
    # Retries of a job after a transient error: Celery's retry_backoff (whole seconds, at
    # least 1: the first retry's countdown; doubles), retry_backoff_max and retry_jitter
    # (a countdown drawn from 0 to the backoff).
    retry_backoff_s: float = 1.0
    retry_backoff_max_s: float = 60.0
    retry_jitter: bool = True
    # A pool child whose resident memory passes this after a job is replaced (Celery's
    # worker_max_memory_per_child); 0: never.
    worker_max_memory_mb: int = 1536
    terminal_ttl_s: int = 7 * 24 * 3600
    visibility_timeout_s: int = 900
    # auto (the imageio-ffmpeg wheel's static ffmpeg, else the PATH's), bundled, system,
    # a path or name; empty disables ffmpeg (OpenCV VP9 fallback, no audio).
    ffmpeg: str = "auto"

    # HTTP job API (``clipline api``).
    api_port: int = 0  # the local stack's API port (`clipline up`); 0: a free one
    api_workers: int = 1  # uvicorn worker processes
    api_threads: int = 4  # threads per API process for Redis and queue calls
    api_keys: str = ""  # comma-separated ID:SHA256HEX[:SCOPES] entries (hashed keys only)
    api_key_file: str = ""  # file with one ID:SHA256HEX[:SCOPES] entry per line
    api_rate_limit: float = 0.0  # requests per second per API key; 0: unlimited
    api_rate_burst: int = 0  # requests a key may send at once; 0: max(1, rate)
    api_max_body_bytes: int = 64 * 1024
    # A client must send a request's headers within api_header_timeout_s (from its first
    # byte, or from the connection's opening) and its whole body within
    # api_body_timeout_s of the headers: 408 and the connection closed past either.
    api_header_timeout_s: float = 10.0
    api_body_timeout_s: float = 15.0
    api_keep_alive_s: int = 30  # an idle keep-alive connection is closed after this
    api_max_connections: int = 1024  # per API process; beyond it uvicorn answers 503
    api_allow_local_paths: bool = False  # accept local paths as job sources (local stack)
    api_access_log: bool = False
    # ``Prefer: wait=N`` holds an answer until the job is terminal or N s passed, N at
    # most api_max_wait_s; at most api_max_waiters requests per process wait at once
    # (each holds a Redis pub/sub connection), beyond that the preference is ignored.
    api_max_wait_s: int = 60
    api_max_waiters: int = 256

    # Where rendered clips are kept (:mod:`clipline_core.artifacts`): a local directory
    # (``artifacts_dir``) or an S3-compatible bucket the workers and the API share.
    artifact_store: str = "local"  # local | s3
    artifact_ttl_s: int = 24 * 3600  # clips (and their succeeded jobs) expire; 0: keep
    artifact_serve: str = "redirect"  # redirect (to a presigned URL) | stream; s3 only
    artifact_url_ttl_s: int = 900  # lifetime of a presigned download URL
    s3_bucket: str = ""
    s3_prefix: str = ""  # key prefix inside the bucket; the deployment name follows it
    s3_endpoint_url: str = ""  # empty: AWS (from s3_region); else e.g. http://minio:9000
    s3_public_endpoint_url: str = ""  # endpoint presigned URLs name; empty: s3_endpoint_url
    s3_region: str = ""  # empty: AWS_REGION / AWS_DEFAULT_REGION, else us-east-1
    s3_access_key_id: str = ""  # empty: AWS_ACCESS_KEY_ID (or the pod's web identity)
    s3_secret_access_key: str = ""  # empty: AWS_SECRET_ACCESS_KEY
    s3_timeout_s: float = 60.0  # one request
    s3_retry_timeout_s: float = 30.0  # how long a failing request is retried

    # Completion callbacks (signed HTTP POSTs on a job's terminal state).
    callback_secret: str = ""  # comma-separated: every secret signs (rotation)
    callback_timeout_s: float = 10.0  # wait for the receiver's answer (first attempt)
    # The wait of every attempt after one whose answer timed out (the receiver may have
    # taken that event): a receiver answering within it gets the event once more at most.
    callback_retry_timeout_s: float = 60.0
    callback_max_attempts: int = 10
    callback_backoff_s: float = 2.0  # first retry delay; doubles per attempt
    callback_backoff_max_s: float = 600.0
    callback_concurrency: int = 8  # threads of one callback worker (deliveries at once)
    callback_host_concurrency: int = 2  # deliveries in flight to one receiver host, at most

    # Local stack.
    state_dir: str = dataclasses.field(default_factory=_default_state_dir)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``env`` (default ``os.environ``), then apply ``overrides``."""
        env = os.environ if env is None else env
        hints = get_type_hints(cls)
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            raw = env.get(ENV_PREFIX + field.name.upper())
            if raw is None:
                continue
            values[field.name] = _parse(hints[field.name], raw, field.name)
        if "redis_url" not in values and env.get("REDIS_URL"):
            values["redis_url"] = env["REDIS_URL"]
        values.update(overrides)
        settings = cls(**values)
        constants.check_deployment(settings.deployment)
        return settings

    def to_env(self) -> dict[str, str]:
        """The environment that makes ``from_env`` rebuild these settings."""
        out: dict[str, str] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[ENV_PREFIX + field.name.upper()] = (
                ("1" if value else "0") if isinstance(value, bool) else str(value)
            )
        return out

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def section(self, name: str) -> dict[str, Any]:
        """The fields of one section (:data:`SECTIONS`) and their values."""
        try:
            fields = SECTIONS[name]
        except KeyError:
            raise KeyError(f"no settings section {name!r}; known: {', '.join(SECTIONS)}") from None
        return {f: getattr(self, f) for f in fields}

    # Derived paths -------------------------------------------------------
    @property
    def scratch_path(self) -> Path:
        return Path(self.scratch_dir or os.path.join(self.state_dir, self.deployment, "scratch"))

    @property
    def artifacts_path(self) -> Path:
        return Path(
            self.artifacts_dir or os.path.join(self.state_dir, self.deployment, "artifacts")
        )

    @property
    def local_root_paths(self) -> list[Path]:
        return [Path(p).resolve() for p in self.local_roots.split(os.pathsep) if p]

    @property
    def daemon_name(self) -> str:
        """This node's GPU daemon as named in Redis (its heartbeat): the node's name for
        GPU 0, ``<node>/gpu<index>`` for the node's other GPU daemons."""
        if self.gpu_index == 0:
            return self.node_name
        return f"{self.node_name}/gpu{self.gpu_index}"

    @property
    def arena_path(self) -> Path:
        return Path(self.shm_dir) / constants.shm_arena_name(self.deployment)

    @property
    def socket_path(self) -> Path:
        return Path(self.shm_dir) / constants.shm_socket_name(self.deployment)


#: The settings by section (one field in exactly one; ``tests`` check): what each part of
#: the system reads. The environment names stay flat (``CLIPLINE_<FIELD>``).
SECTIONS: dict[str, tuple[str, ...]] = {
    "identity": (
        "deployment",
        "node_name",
        "gpu_index",
        "redis_url",
        "metrics_host",
        "state_dir",
    ),
    "shm": (
        "shm_dir",
        "shm_slots",
        "shm_slot_bytes",
        "shm_reserve_timeout_s",
        "shm_starvation_age_s",
        "shm_spin_us",
        "frames_per_chunk",
        "frame_size",
        "sample_fps",
    ),
    "daemon": (
        "device",
        "max_batch_size",
        "max_queue_delay_ms",
        "torch_threads",
        "daemon_metrics_port",
        "result_ttl_s",
    ),
    "models": (
        "models",
        "backend",
        "weights_dir",
        "model_backends",
        "precision",
        "engine_cache_dir",
        "saliency_size",
        "saliency_anchors",
        "embed_arch",
        "embed_size",
        "embed_heads",
        "copywriter_max_new_tokens",
        "localizer_features",
        "localizer_keypoints",
    ),
    "worker": (
        "worker_concurrency",
        "decode_segments",
        "decode_threads",
        "decode_backend",
        "job_lease_s",
        "worker_metrics_port",
        "scratch_dir",
        "artifacts_dir",
        "local_roots",
        "allow_private_networks",
        "allow_loopback",
        "private_hosts",
        "max_video_bytes",
        "max_image_bytes",
        "max_duration_s",
        "max_resolution",
        "max_frames",
        "min_decoded_frames",
        "fetch_connect_timeout_s",
        "fetch_read_timeout_s",
        "fetch_retries",
        "fetch_deadline_s",
        "fetch_min_rate_bps",
        "fetch_rate_window_s",
        "job_soft_time_limit_s",
        "job_time_limit_s",
        "inference_timeout_s",
        "max_attempts",
        "retry_backoff_s",
        "retry_backoff_max_s",
        "retry_jitter",
        "worker_max_memory_mb",
        "terminal_ttl_s",
        "visibility_timeout_s",
        "ffmpeg",
    ),
    "api": (
        "api_port",
        "api_workers",
        "api_threads",
        "api_keys",
        "api_key_file",
        "api_rate_limit",
        "api_rate_burst",
        "api_max_body_bytes",
        "api_header_timeout_s",
        "api_body_timeout_s",
        "api_keep_alive_s",
        "api_max_connections",
        "api_allow_local_paths",
        "api_access_log",
        "api_max_wait_s",
        "api_max_waiters",
    ),
    "artifacts": (
        "artifact_store",
        "artifact_ttl_s",
        "artifact_serve",
        "artifact_url_ttl_s",
        "s3_bucket",
        "s3_prefix",
        "s3_endpoint_url",
        "s3_public_endpoint_url",
        "s3_region",
        "s3_access_key_id",
        "s3_secret_access_key",
        "s3_timeout_s",
        "s3_retry_timeout_s",
    ),
    "callbacks": (
        "callback_secret",
        "callback_timeout_s",
        "callback_retry_timeout_s",
        "callback_max_attempts",
        "callback_backoff_s",
        "callback_backoff_max_s",
        "callback_concurrency",
        "callback_host_concurrency",
    ),
}


def _parse(kind: Any, raw: str, name: str) -> Any:
    try:
        if kind is bool:
            lowered = raw.strip().lower()
            if lowered in {"1", "true", "yes", "on"}:
                return True
            if lowered in {"0", "false", "no", "off", ""}:
                return False
            raise ValueError(raw)
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        return raw
    except ValueError as exc:
        raise ValueError(
            f"{ENV_PREFIX}{name.upper()}={raw!r} is not a valid {kind.__name__}"
        ) from exc
