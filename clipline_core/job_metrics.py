"""The job-outcome metric, the only metric every process that ends jobs registers.

Owns ``clipline_jobs_total{status,code}``, counted by :meth:`clipline_core.store.JobStore.finish`
(workers, their housekeeping and the API all end jobs). Kept apart from
:mod:`clipline_core.metrics` so that importing the job store does not register the
transport's and the daemon's metrics in processes that never update them (the API would
export them at zero). Imports only the ground floor's constants.
"""

from __future__ import annotations

from prometheus_client import Counter

from clipline_core.constants import LABEL_CODE, LABEL_STATUS, Metric

JOBS = Counter(Metric.JOBS_TOTAL, "Jobs that reached a terminal state", [LABEL_STATUS, LABEL_CODE])


def init_job_series() -> None:
    """Create every ``jobs_total{status,code}`` series at 0.

    A labelled counter series that first appears at 1 hides that first increment from
    ``rate()``/``increase()``; starting all bounded label combinations at 0 makes the
    first failure of each code visible to dashboards and alerts.
    """
    from clipline_core.errors import JOB_CODES, ErrorCode

    JOBS.labels("succeeded", "")
    JOBS.labels("cancelled", "cancelled")
    for code in sorted(JOB_CODES - {ErrorCode.CANCELLED}):
        JOBS.labels("failed", code.value)
