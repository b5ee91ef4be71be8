"""A PNG preview of the main Grafana panels, drawn with matplotlib from a real Prometheus.

Grafana is not needed to see what the dashboards show: :func:`render_preview` runs the
same PromQL as the ``main`` panels of :mod:`clipline.dashboards` as range queries against
a Prometheus HTTP API and draws one small time-series chart per panel, with the
operator's scaling decisions marked on the workers panel like Grafana's annotations.

    python -m clipline.preview --prometheus http://127.0.0.1:9090 --minutes 15 \\
        --out docs/dashboard-preview.png
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from clipline import dashboards

Series = tuple[dict[str, str], list[tuple[float, float]]]


class PrometheusError(RuntimeError):
    """The Prometheus HTTP API refused or failed a query."""


def query_range(
    url: str, expr: str, start: float, end: float, step: float, timeout_s: float = 10.0
) -> list[Series]:
    """``/api/v1/query_range``: ``[(labels, [(t, value), ...]), ...]`` (NaN kept)."""
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    try:
        with urllib.request.urlopen(
            f"{url.rstrip('/')}/api/v1/query_range?{params}", timeout=timeout_s
        ) as rsp:
            body: dict[str, Any] = json.load(rsp)
    except OSError as exc:  # URLError, HTTPError, timeouts
        raise PrometheusError(f"{expr}: {exc}") from exc
    if body.get("status") != "success":
        raise PrometheusError(f"{expr}: {body.get('error', body)}")
    return [
        (dict(item["metric"]), [(float(t), float(v)) for t, v in item["values"]])
        for item in body["data"]["result"]
    ]


def legend(template: str, labels: Mapping[str, str]) -> str:
    """A Grafana legend format (``{{node}}``) filled in from ``labels``."""
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template)
    return text.strip() or "value"


_UNITS: Mapping[str, tuple[float, str]] = {
    "percentunit": (100.0, "%"),
    "s": (1.0, "s"),
    "ops": (1.0, "/s"),
    "Bps": (1.0, "B/s"),
    "reqps": (1.0, "req/s"),
    "short": (1.0, ""),
}


def render_preview(
    prometheus: str,
    start: float,
    end: float,
    out: Path,
    *,
    step: float | None = None,
    substitutions: Mapping[str, str] | None = None,
    panels: Sequence[dashboards.Panel] | None = None,
    title: str = "clipline / overview (main panels)",
    subtitle: str = "",
    empty_notes: Mapping[str, str] | None = None,
) -> dict[str, int]:
    """Draw ``panels`` (default: the main ones) to ``out``; return series count per panel.

    ``empty_notes`` gives, by panel title, the text shown instead of "no data".
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = list(panels if panels is not None else dashboards.main_panels())
    step = step or max(1.0, (end - start) / 240)
    cols = 2
    rows = math.ceil(len(chosen) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(13, 2.8 * rows), squeeze=False)
    counts: dict[str, int] = {}
    t0 = start
    for index, panel in enumerate(chosen):
        ax = axes[index // cols][index % cols]
        scale, suffix = _UNITS.get(panel.unit, (1.0, ""))
        drawn = 0
        for query in panel.queries:
            expr = dashboards.instantiate(query.expr, substitutions)
            for labels, points in query_range(prometheus, expr, start, end, step):
                xs = [t - t0 for t, v in points if math.isfinite(v)]
                ys = [v * scale for _, v in points if math.isfinite(v)]
                if not xs:
                    continue
                ax.plot(xs, ys, linewidth=1.4, label=legend(query.legend, labels))
                drawn += 1
        if panel.annotate_decisions:
            expr = dashboards.instantiate(dashboards.DECISIONS_ANNOTATION_EXPR, substitutions)
            for labels, points in query_range(prometheus, expr, start, end, step):
                for t, v in points:
                    if math.isfinite(v) and v > 0 and labels.get("direction") != "hold":
                        ax.axvline(t - t0, color="orange", alpha=0.5, linewidth=0.8)
        counts[panel.title] = drawn
        ax.set_title(panel.title, fontsize=10, loc="left")
        ax.set_xlim(0, max(end - start, 1.0))
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        if suffix:
            ax.yaxis.set_major_formatter(
                matplotlib.ticker.FuncFormatter(lambda v, _p, s=suffix: f"{v:g}{s}")
            )
        if panel.max_value is not None:
            ax.set_ylim(0, panel.max_value * scale * 1.05)
        else:
            ax.set_ylim(bottom=0)
        if drawn:
            ax.legend(fontsize=7, loc="upper left", ncol=2, frameon=False)
        else:
            note = (empty_notes or {}).get(panel.title, "no data")
            ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes)
    for index in range(len(chosen), rows * cols):
        axes[index // cols][index % cols].axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("seconds since the start of the range", fontsize=8)
    fig.suptitle(f"{title}\n{subtitle}" if subtitle else title, fontsize=12, x=0.01, ha="left")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clipline.preview", description=__doc__)
    parser.add_argument("--prometheus", required=True, help="Prometheus base URL")
    parser.add_argument("--minutes", type=float, default=15.0, help="time range ending now")
    parser.add_argument("--start", type=float, help="range start (unix seconds)")
    parser.add_argument("--end", type=float, help="range end (unix seconds)")
    parser.add_argument("--rate-interval", default="1m", help="value of $__rate_interval")
    parser.add_argument("--out", type=Path, default=Path("docs/dashboard-preview.png"))
    parser.add_argument("--subtitle", default="", help="a second title line (data source)")
    args = parser.parse_args(argv)
    end = args.end or time.time()
    start = args.start or end - args.minutes * 60
    subs = {**dashboards.DEFAULT_SUBSTITUTIONS, dashboards.VAR_RATE: args.rate_interval}
    try:
        counts = render_preview(
            args.prometheus, start, end, args.out, substitutions=subs, subtitle=args.subtitle
        )
    except PrometheusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name, count in counts.items():
        print(f"{count:3d} series  {name}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
