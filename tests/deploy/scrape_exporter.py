"""A stand-in pod for the scrape-label test: one clipline process's real metric objects.

``python scrape_exporter.py ROLE PORT NODE`` imports the metric objects the named process
registers (``gpu-daemon``, ``workers``, ``api``: :mod:`clipline_core.metrics`;
``operator``: :mod:`clipline_operator.metrics`), gives them known values, labelling with
``NODE`` exactly where that process does (the daemon's own ``node`` label, the
operator's GPU node), and serves that role's exposition
(:func:`clipline_core.metrics.exposition`) on ``127.0.0.1:PORT`` until killed. The workers'
slot-wait histogram keeps growing so that ``rate()`` over it is positive.
"""

from __future__ import annotations

import sys
import time

from prometheus_client import start_http_server

from clipline_core import metrics as m

WORKER_WAIT_S = 0.05
WORKER_EVERY_S = 0.1


def main(role: str, port: int, node: str) -> None:
    if role == "gpu-daemon":
        m.DEVICE_BUSY.labels(node).set(0.5)
        m.GPU_UTILIZATION.labels(node).set(0.8)
        m.SHM_SLOTS_IN_USE.set(3)
        m.SHM_SLOTS_TOTAL.set(32)
        m.ITEMS_PROCESSED.labels("features", "eager").inc(5)
        start_http_server(port, addr="127.0.0.1", registry=m.exposition(role))
    elif role == "workers":
        from clipline_core.constants import PriorityClass

        m.BACKLOG_JOBS.labels(PriorityClass.HIGH.value).set(4)
        m.FRAMES_DECODED.inc()
        start_http_server(port, addr="127.0.0.1", registry=m.exposition(role))
        while True:
            m.SHM_RESERVE_WAIT.observe(WORKER_WAIT_S)
            time.sleep(WORKER_EVERY_S)
    elif role == "api":
        from clipline.api import middleware

        middleware.REQUESTS.labels("GET", "/v1/jobs/{job_id}", "200").inc()
        start_http_server(port, addr="127.0.0.1", registry=m.exposition(role))
    elif role == "operator":
        from clipline_operator import metrics as om

        om.DESIRED_WORKERS.labels(node, "video/demo").set(3)
        om.DECISIONS.labels("hold", "at_target").inc()
        om.serve(port, addr="127.0.0.1")
    else:
        raise SystemExit(f"unknown role {role!r}")
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
