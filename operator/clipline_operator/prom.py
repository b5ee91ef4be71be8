"""Prometheus HTTP API queries for the autoscaler, with explicit "no data"/"down" results.

:func:`build_queries` turns a pipeline's ``spec.autoscaling.prometheus`` into three
PromQL instant queries (GPU utilization per GPU daemon averaged over the window, the
queue depth, seconds-per-second spent waiting for arena slots per GPU daemon's workers;
a daemon is its ``node`` and ``gpu`` labels, ``gpu`` coming from the pods' label
``clipline.dev/gpu``); :class:`PromClient`
runs them against ``/api/v1/query``; :func:`observe` combines the answers into an
:class:`Observations` whose ``ok`` is False when Prometheus could not be asked at all
(connection refused, timeout, HTTP or API error). Missing series are ``None`` and NaN
values are kept as NaN: the decision function holds on either.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Final

import aiohttp

from clipline_core import constants
from clipline_core.constants import Metric

NODE_LABEL: Final = constants.LABEL_NODE_METRIC
GPU_LABEL: Final = constants.LABEL_GPU_METRIC
#: ``{selector}`` becomes the label matchers in braces, ``{window}`` e.g. ``60s``.
DEFAULT_UTILIZATION_QUERY: Final = (
    f"avg by ({NODE_LABEL}, {GPU_LABEL}) "
    f"(avg_over_time({Metric.GPU_UTILIZATION_RATIO}{{selector}}[{{window}}]))"
)
#: A GPU daemon: ``(node, gpu index)``.
Daemon = tuple[str, int]


class PromError(Exception):
    """Prometheus could not answer (down, timed out, HTTP or query error)."""


@dataclasses.dataclass(frozen=True)
class Queries:
    utilization: str
    queue_depth: str
    slot_wait: str


def _fmt(template: str, **values: str) -> str:
    out = template
    for key, value in values.items():
        out = out.replace("{" + key + "}", value)
    return out


def build_queries(
    prometheus: Mapping[str, Any], namespace: str, name: str, window_s: int
) -> Queries:
    """The PromQL the operator runs for one pipeline (see the module docstring)."""
    selector = _fmt(str(prometheus.get("selector", "")), namespace=namespace, name=name)
    window = f"{int(window_s)}s"
    braces = "{" + selector + "}"
    utilization_tpl = prometheus.get("utilizationQuery") or DEFAULT_UTILIZATION_QUERY
    utilization = _fmt(utilization_tpl, selector=braces, window=window)
    queue_depth = f"sum(max by ({constants.LABEL_PRIORITY}) ({Metric.BACKLOG_JOBS}{braces}))"
    slot_wait = (
        f"sum by ({NODE_LABEL}, {GPU_LABEL}) "
        f"(rate({Metric.SHM_RESERVE_WAIT_SECONDS}_sum{braces}[{window}]))"
    )
    return Queries(utilization=utilization, queue_depth=queue_depth, slot_wait=slot_wait)


class PromClient:
    """A minimal async client of the Prometheus HTTP API (instant queries)."""

    def __init__(
        self,
        url: str,
        timeout_s: float = 5.0,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session = session

    async def query(self, promql: str) -> list[tuple[dict[str, str], float]]:
        """Run an instant query; return ``[(labels, value)]`` for a vector or scalar."""
        session = self._session or aiohttp.ClientSession()
        try:
            async with session.get(
                f"{self.url}/api/v1/query", params={"query": promql}, timeout=self.timeout
            ) as rsp:
                try:
                    payload = await rsp.json(content_type=None)
                except ValueError as exc:
                    raise PromError(f"HTTP {rsp.status}: not JSON") from exc
                if rsp.status != 200 or payload.get("status") != "success":
                    detail = payload.get("error") if isinstance(payload, dict) else None
                    raise PromError(f"HTTP {rsp.status}: {detail or 'query failed'}")
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise PromError(f"{type(exc).__name__}: {exc}".rstrip(": ")) from exc
        finally:
            if self._session is None:
                await session.close()
        data = payload.get("data", {})
        kind = data.get("resultType")
        if kind == "vector":
            return [
                (dict(item.get("metric", {})), _num(item["value"][1])) for item in data["result"]
            ]
        if kind == "scalar":
            return [({}, _num(data["result"][1]))]
        raise PromError(f"unexpected result type {kind!r}")


def _num(raw: Any) -> float:
    try:
        return float(raw)
    except (TypeError, ValueError):
        return math.nan


@dataclasses.dataclass(frozen=True)
class Observations:
    """One round of queries for a pipeline.

    ``utilization`` and ``slot_wait_s`` are keyed by ``(node, gpu)``; a series without a
    ``gpu`` label (a scrape that does not add it, a single-GPU setup) is keyed
    ``(node, None)`` and counts for every GPU daemon of its node without its own series.
    """

    ok: bool
    error: str | None = None
    utilization: Mapping[tuple[str, int | None], float] = dataclasses.field(default_factory=dict)
    queue_depth: float | None = None
    slot_wait_s: Mapping[tuple[str, int | None], float] = dataclasses.field(default_factory=dict)
    queries: Queries | None = None

    @staticmethod
    def _lookup(
        values: Mapping[tuple[str, int | None], float], node: str, gpu: int
    ) -> float | None:
        if (node, gpu) in values:
            return values[(node, gpu)]
        return values.get((node, None))

    def gpu_utilization(self, node: str, gpu: int = 0) -> float | None:
        """GPU daemon ``gpu`` of ``node``'s utilization (None: no series)."""
        return self._lookup(self.utilization, node, gpu)

    def slot_wait_ratio(self, node: str, worker_processes: int, gpu: int = 0) -> float:
        """Fraction of worker-process time spent waiting for a slot (0 without series)."""
        waited = self._lookup(self.slot_wait_s, node, gpu)
        if waited is None or not math.isfinite(waited) or worker_processes <= 0:
            return 0.0
        return max(0.0, min(1.0, waited / worker_processes))


def _gpu_index(raw: str | None) -> int | None:
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        return None


def _by_daemon(samples: list[tuple[dict[str, str], float]]) -> dict[tuple[str, int | None], float]:
    out: dict[tuple[str, int | None], float] = {}
    for labels, value in samples:
        node = labels.get(NODE_LABEL)
        if node is not None:
            out[(node, _gpu_index(labels.get(GPU_LABEL)))] = value
    return out


async def observe(client: PromClient, queries: Queries) -> Observations:
    """Run the three queries concurrently; ``ok=False`` if any could not be answered."""
    try:
        util, queue, wait = await asyncio.gather(
            client.query(queries.utilization),
            client.query(queries.queue_depth),
            client.query(queries.slot_wait),
        )
    except PromError as exc:
        return Observations(ok=False, error=str(exc), queries=queries)
    return Observations(
        ok=True,
        utilization=_by_daemon(util),
        queue_depth=queue[0][1] if queue else None,
        slot_wait_s=_by_daemon(wait),
        queries=queries,
    )
