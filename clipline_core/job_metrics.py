"""Job outcomes and job states, kept in Redis so that one process exports them: the job API.

Jobs are ended by many processes (workers, their housekeeping, the API's cancel), so
their outcome metrics are not process-local counters: whoever wins a job's terminal
transition (:meth:`clipline_core.store.JobStore.finish` and the lease sweeper's
time-outs, through ``JobStore._ended``) calls :func:`record_end` once, which adds the
job to one Redis hash per deployment (:func:`clipline_core.constants.job_stats_key`).
:class:`JobStatsCollector` reads that hash at scrape time and the job API serves it
(:data:`clipline_core.metrics.OWNERS`):

* ``clipline_jobs_total{status}``: jobs that ended, by terminal status;
* ``clipline_job_failures_total{code}``: failed and cancelled jobs by stable error code
  (a code outside :data:`clipline_core.errors.JOB_CODES`, or none, counts as
  ``internal``); every code's series exists from the start, at 0;
* ``clipline_job_latency_seconds{priority,status}``: submit (``created_at``) to the
  terminal transition (``finished_at``), observed once per job;
* ``clipline_jobs_current{state}``: jobs not yet ended, per state. Without a scan of the
  keyspace: the running states come from the leases set (one ``HMGET`` per running job),
  ``queued`` is the jobs created (:func:`record_created`, jobs marked with
  :data:`COUNTED_FIELD`) less those ended and those running, read in one transaction.
  A process killed between a job's atomic transition and its bookkeeping (one round
  trip) leaves that job out of these counts, as it would leave it out of any counter;
  jobs created before the counts began (no mark) are never counted as ``queued``.

Every API replica exports the same deployment-wide values: aggregate with ``max``, not
``sum``. Imports only the ground floor.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Iterator
from typing import Any, Final

import redis
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.metrics_core import Metric as MetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from clipline_core import constants
from clipline_core.constants import (
    LABEL_CODE,
    LABEL_PRIORITY,
    LABEL_STATE,
    LABEL_STATUS,
    Metric,
    PriorityClass,
)
from clipline_core.errors import JOB_CODES, ErrorCode
from clipline_core.job import ACTIVE, TERMINAL, JobState

log = logging.getLogger("clipline.metrics")

#: job-hash field marking a job counted in ``created`` (set when the job is created)
COUNTED_FIELD: Final = "counted"
#: upper bounds (seconds) of ``clipline_job_latency_seconds``
BUCKETS: Final = (0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)

_CREATED = "created"
_CLOSED = "closed"  # counted jobs that ended
_STATUSES: Final = tuple(sorted(s.value for s in TERMINAL))
_OPEN_STATES: Final = (JobState.QUEUED, *sorted(ACTIVE, key=lambda s: list(JobState).index(s)))
_CODES: Final = tuple(sorted(c.value for c in JOB_CODES))


def failure_code(status: str, code: str) -> str:
    """The ``code`` label of an ended job that did not succeed (bounded values)."""
    if status == JobState.CANCELLED.value:
        return ErrorCode.CANCELLED.value
    return code if code in _CODES else ErrorCode.INTERNAL.value


def _priority(value: str) -> str:
    try:
        return PriorityClass(value).value
    except ValueError:
        return constants.DEFAULT_PRIORITY.value


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def record_created(client: redis.Redis, deployment: str) -> None:
    """Count a job that was just created (carrying :data:`COUNTED_FIELD`)."""
    client.hincrby(constants.job_stats_key(deployment), _CREATED, 1)


def record_end(client: redis.Redis, deployment: str, job_id: str, status: str, code: str) -> None:
    """Count a job that just ended with ``status`` (``code``: its error's, '' if none).

    Call once per job, from the process whose terminal transition won.
    """
    raw = client.hmget(
        constants.job_key(deployment, job_id),
        ["created_at", "finished_at", "priority", COUNTED_FIELD],
    )
    created_at, finished_at, priority, counted = (None if v is None else _text(v) for v in raw)
    key = constants.job_stats_key(deployment)
    pipe = client.pipeline(transaction=True)
    pipe.hincrby(key, f"ended:{status}", 1)
    if counted:
        pipe.hincrby(key, _CLOSED, 1)
    if status != JobState.SUCCEEDED.value:
        pipe.hincrby(key, f"failure:{failure_code(status, code)}", 1)
    if created_at:
        end = float(finished_at) if finished_at else time.time()
        latency = max(0.0, end - float(created_at))
        series = f"{_priority(priority or '')}:{status}"
        pipe.hincrby(key, f"latency:{series}:{bisect.bisect_left(BUCKETS, latency)}", 1)
        pipe.hincrbyfloat(key, f"latency_sum:{series}", latency)
    pipe.execute()


class JobStatsCollector(Collector):
    """The job outcome and state families of one deployment, read from Redis per scrape.

    A scrape while Redis is unreachable yields none of them (and logs why).
    """

    def __init__(self, client: redis.Redis, deployment: str) -> None:
        self.client = client
        self.deployment = deployment

    def describe(self) -> list[MetricFamily]:
        return []  # read at scrape time: nothing to check at registration

    def _read(self) -> tuple[dict[str, str], dict[str, int]]:
        tx = self.client.pipeline(transaction=True)
        tx.hgetall(constants.job_stats_key(self.deployment))
        tx.zrange(constants.leases_key(self.deployment), 0, -1)
        raw_stats, members = tx.execute()
        stats = {_text(k): _text(v) for k, v in raw_stats.items()}
        ids = [_text(m) for m in members]
        pipe = self.client.pipeline(transaction=False)
        for job_id in ids:
            pipe.hmget(constants.job_key(self.deployment, job_id), ["state", COUNTED_FIELD])
        current = {s.value: 0 for s in _OPEN_STATES}
        running_counted = 0
        for state, counted in pipe.execute() if ids else []:
            if counted:
                running_counted += 1  # running when the counters were read
            name = _text(state) if state is not None else ""
            if name in current and name != JobState.QUEUED.value:
                current[name] += 1
        open_ = int(stats.get(_CREATED, 0)) - int(stats.get(_CLOSED, 0))
        current[JobState.QUEUED.value] = max(0, open_ - running_counted)
        return stats, current

    def collect(self) -> Iterator[MetricFamily]:
        try:
            stats, current = self._read()
        except redis.RedisError as exc:
            log.warning("job metrics not exported: Redis: %s", exc)
            return
        total = CounterMetricFamily(
            Metric.JOBS_TOTAL, "Jobs that reached a terminal state", labels=[LABEL_STATUS]
        )
        for status in _STATUSES:
            total.add_metric([status], float(stats.get(f"ended:{status}", 0)))
        yield total
        failures = CounterMetricFamily(
            Metric.JOB_FAILURES_TOTAL,
            "Failed and cancelled jobs by stable error code",
            labels=[LABEL_CODE],
        )
        for code in _CODES:
            failures.add_metric([code], float(stats.get(f"failure:{code}", 0)))
        yield failures
        latency = HistogramMetricFamily(
            Metric.JOB_LATENCY_SECONDS,
            "Time from a job's submission to its terminal state",
            labels=[LABEL_PRIORITY, LABEL_STATUS],
        )
        for priority in PriorityClass:
            for status in _STATUSES:
                series = f"{priority.value}:{status}"
                counts = [
                    int(stats.get(f"latency:{series}:{i}", 0)) for i in range(len(BUCKETS) + 1)
                ]
                buckets: list[tuple[str, float]] = []
                running = 0
                for bound, n in zip((*BUCKETS, float("inf")), counts, strict=True):
                    running += n
                    buckets.append((floatToGoString(bound), float(running)))
                latency.add_metric(
                    [priority.value, status],
                    buckets,
                    sum_value=float(stats.get(f"latency_sum:{series}", 0.0)),
                )
        yield latency
        states = GaugeMetricFamily(
            Metric.JOBS_BY_STATE, "Jobs not yet ended, per state", labels=[LABEL_STATE]
        )
        for state in _OPEN_STATES:
            states.add_metric([state.value], float(current[state.value]))
        yield states
