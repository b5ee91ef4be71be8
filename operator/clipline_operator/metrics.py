"""The operator's own Prometheus metrics.

``clipline_autoscaler_desired_workers{node,pipeline}`` (gauge: the worker pods wanted on
the node, all its GPU daemons together; ``pipeline`` is ``<namespace>/<name>`` of the
ClipPipeline, so two pipelines never overwrite each other) and
``clipline_autoscaler_decisions_total{direction,reason}`` (counter, one per GPU daemon per
period, holds included). Both live in the operator's registry
(:func:`clipline_core.metrics.registry`) served by
:func:`serve` on ``DEFAULT_OPERATOR_METRICS_PORT``; label values are bounded (node
names, three directions, the reasons in :class:`~decide.Reason`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from prometheus_client import Counter, Gauge, start_http_server

from clipline_core import constants
from clipline_core import metrics as core_metrics
from clipline_core.constants import Metric, MetricRole
from clipline_operator.decide import Decision

#: the operator's registry (:func:`clipline_core.metrics.registry`; served with the build
#: info and process collectors, :func:`clipline_core.metrics.exposition`)
REGISTRY: Final = core_metrics.registry(MetricRole.OPERATOR)
LABEL_PIPELINE: Final = "pipeline"

DESIRED_WORKERS: Final = Gauge(
    Metric.AUTOSCALER_DESIRED_WORKERS,
    "Worker pods the autoscaler wants on a GPU node.",
    [constants.LABEL_NODE_METRIC, LABEL_PIPELINE],
    registry=REGISTRY,
)
DECISIONS: Final = Counter(
    Metric.AUTOSCALER_DECISIONS_TOTAL.removesuffix("_total"),
    "Autoscaling decisions, by direction (up, down, hold) and reason.",
    [constants.LABEL_DIRECTION, constants.LABEL_REASON],
    registry=REGISTRY,
)


def record(pipeline: str, node: str, decisions: Sequence[Decision]) -> None:
    """Record one period of ``node``: the decisions of its GPU daemons."""
    DESIRED_WORKERS.labels(node, pipeline).set(sum(d.desired for d in decisions))
    for decision in decisions:
        DECISIONS.labels(decision.direction, decision.reason).inc()


def serve(port: int = constants.DEFAULT_OPERATOR_METRICS_PORT, addr: str = "0.0.0.0") -> None:
    """Expose :data:`REGISTRY` (and the build info, process collectors) over HTTP
    (``port`` 0 disables it)."""
    if port:
        start_http_server(port, addr=addr, registry=core_metrics.exposition(MetricRole.OPERATOR))
