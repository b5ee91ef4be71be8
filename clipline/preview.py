"""A PNG preview of the main Grafana panels, drawn with matplotlib from a real Prometheus.

Grafana is not needed to see what the dashboards show: :func:`render_preview` runs the
same PromQL as the ``main`` panels of :mod:`clipline.dashboards` as range queries against
a Prometheus HTTP API and draws them as Grafana would lay them out: the overview row of
stat panels first (last value, coloured by the panel's thresholds, with a sparkline), then
one small chart per time-series panel (thresholds as dashed lines, the operator's scaling
decisions as vertical marks like Grafana's annotations) and per heatmap (bucket rates over
time). matplotlib draws it so that the picture needs neither Grafana nor a browser.

    python -m clipline.preview --prometheus http://127.0.0.1:9090 --minutes 15 \\
        --out docs/dashboard-preview.png

Imports :mod:`clipline.dashboards` (the panel model) and, when drawing, matplotlib.
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
    "s": (1.0, " s"),
    "ops": (1.0, "/s"),
    "Bps": (1.0, " B/s"),
    "reqps": (1.0, " req/s"),
    "bytes": (1.0, " B"),
    "watt": (1.0, " W"),
    "hertz": (1.0, " Hz"),
    "short": (1.0, ""),
}
#: Grafana's named threshold colours
_COLOURS: Mapping[str, str] = {
    "green": "#56a64b",
    "orange": "#ff9830",
    "red": "#e02f44",
    "blue": "#3274d9",
}


def format_value(value: float, unit: str) -> str:
    """A stat panel's number: ``87%``, ``3.2 s``, ``12``."""
    scale, suffix = _UNITS.get(unit, (1.0, ""))
    shown = value * scale
    if unit == "s" and shown >= 120:
        return f"{shown / 60:.1f} min"
    digits = 0 if abs(shown) >= 100 or shown == int(shown) else (1 if abs(shown) >= 10 else 2)
    return f"{shown:.{digits}f}{suffix}"


def threshold_colour(value: float, steps: Sequence[dashboards.Step]) -> str:
    """The colour of the highest threshold step at or below ``value`` (Grafana's rule)."""
    colour = _COLOURS["blue"]
    for bound, name in steps:
        if bound is None or value >= bound:
            colour = _COLOURS.get(name, name)
    return colour


def _with_gaps(
    points: Sequence[tuple[float, float]], step: float
) -> tuple[list[float], list[float]]:
    """Coordinates with a NaN where samples are missing (e.g. filtered by ``> 0``), so a
    line breaks there as in Grafana instead of bridging the gap."""
    xs: list[float] = []
    ys: list[float] = []
    for t, v in points:
        if xs and t - xs[-1] > step * 1.5:
            xs.append(xs[-1] + step)
            ys.append(math.nan)
        xs.append(t)
        ys.append(v)
    return xs, ys


def _le(labels: Mapping[str, str]) -> float:
    return float(labels.get("le", "inf").replace("+Inf", "inf"))


def _heatmap(
    series: list[Series], start: float
) -> tuple[list[float], list[str], list[list[float]]]:
    """Times, bucket labels and per-bucket rates (de-accumulated ``le`` buckets)."""
    ordered = sorted(series, key=lambda item: _le(item[0]))
    times = sorted({t for _, points in ordered for t, _ in points})
    index = {t: i for i, t in enumerate(times)}
    cumulative = []
    for _, points in ordered:
        row = [math.nan] * len(times)
        for t, v in points:
            row[index[t]] = v
        cumulative.append(row)
    rows = []
    for i, row in enumerate(cumulative):
        below = cumulative[i - 1] if i else [0.0] * len(times)
        rows.append(
            [
                max(v - (b if math.isfinite(b) else 0.0), 0.0) if math.isfinite(v) else math.nan
                for v, b in zip(row, below, strict=True)
            ]
        )
    labels = [item[0].get("le", "") for item in ordered]
    return [t - start for t in times], labels, rows


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

    Stat panels come first, six to a row; the others follow two to a row.
    ``empty_notes`` gives, by panel title, the text shown instead of "no data".
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    chosen = list(panels if panels is not None else dashboards.main_panels())
    stats = [p for p in chosen if p.kind == "stat"]
    charts = [p for p in chosen if p.kind in ("timeseries", "heatmap")]
    step = step or max(1.0, (end - start) / 240)
    stat_rows = math.ceil(len(stats) / 6)
    chart_rows = math.ceil(len(charts) / 2)
    fig = plt.figure(figsize=(13, 1.9 * stat_rows + 2.8 * chart_rows + 1.2))
    grid = fig.add_gridspec(
        stat_rows + chart_rows,
        6,
        height_ratios=[1.9] * stat_rows + [2.8] * chart_rows,
        hspace=0.75,
        wspace=0.45,
    )
    counts: dict[str, int] = {}
    notes = empty_notes or {}
    span = max(end - start, 1.0)

    def fetch(expr: str) -> list[Series]:
        return query_range(
            prometheus, dashboards.instantiate(expr, substitutions), start, end, step
        )

    for index, panel in enumerate(stats):
        ax = fig.add_subplot(grid[index // 6, index % 6])
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_visible(False)
        ax.set_facecolor("#f4f5f5")
        ax.set_title(panel.title, fontsize=9, loc="left")
        points = [
            (t, v) for _, pts in fetch(panel.queries[0].expr) for t, v in pts if math.isfinite(v)
        ]
        counts[panel.title] = 1 if points else 0
        if not points:
            ax.text(0.5, 0.5, notes.get(panel.title, "no data"), ha="center", va="center",
                    transform=ax.transAxes, fontsize=9, color="grey")  # fmt: skip
            continue
        points.sort()
        last = points[-1][1]
        colour = threshold_colour(last, panel.thresholds)
        spark = ax.twinx()
        spark.set_axis_off()
        spark.fill_between([t - start for t, _ in points], [v for _, v in points],
                           color=colour, alpha=0.18, linewidth=0)  # fmt: skip
        spark.plot([t - start for t, _ in points], [v for _, v in points], color=colour,
                   linewidth=1)  # fmt: skip
        low = min(0.0, min(v for _, v in points))
        high = max(v for _, v in points)
        spark.set_ylim(low, (high - low) * 2.2 + low if high > low else low + 1)
        spark.set_xlim(0, span)
        ax.text(0.5, 0.58, format_value(last, panel.unit), ha="center", va="center",
                transform=ax.transAxes, fontsize=20, fontweight="bold", color=colour,
                zorder=5)  # fmt: skip

    for index, panel in enumerate(charts):
        row = stat_rows + index // 2
        ax = fig.add_subplot(grid[row, 0:3] if index % 2 == 0 else grid[row, 3:6])
        scale, suffix = _UNITS.get(panel.unit, (1.0, ""))
        drawn = 0
        if panel.kind == "heatmap":
            series = fetch(panel.queries[0].expr)
            if series:
                xs, labels, rows = _heatmap(series, start)
                if xs and any(math.isfinite(v) and v > 0 for r in rows for v in r):
                    mesh = ax.pcolormesh(
                        xs, range(len(labels)), rows, cmap="Oranges", shading="nearest",
                        norm=matplotlib.colors.PowerNorm(0.5),
                    )  # fmt: skip
                    ax.set_yticks(range(len(labels)))
                    ax.set_yticklabels(
                        [f"≤{lb}{suffix}" if lb != "+Inf" else "+Inf" for lb in labels], fontsize=6
                    )
                    fig.colorbar(mesh, ax=ax, pad=0.01).ax.tick_params(labelsize=6)
                    drawn = len(series)
        else:
            for query in panel.queries:
                for labels_, points in fetch(query.expr):
                    xs, ys = _with_gaps(
                        [(t - start, v * scale) for t, v in points if math.isfinite(v)], step
                    )
                    if not xs:
                        continue
                    ax.plot(xs, ys, linewidth=1.4, label=legend(query.legend, labels_))
                    drawn += 1
            if panel.show_thresholds:
                for bound, name in panel.thresholds:
                    if bound is not None:
                        ax.axhline(bound * scale, color=_COLOURS.get(name, name),
                                   linestyle="--", linewidth=0.9, alpha=0.8)  # fmt: skip
            if panel.max_value is not None:
                ax.set_ylim(0, panel.max_value * scale * 1.05)
            else:
                ax.set_ylim(bottom=0)
            tick_suffix = suffix.strip()
            if tick_suffix:
                ax.yaxis.set_major_formatter(
                    ticker.FuncFormatter(lambda v, _p, s=tick_suffix: f"{v:g}{s}")
                )
        if panel.annotate_decisions:
            # One mark where each run of decisions starts (Grafana, stepping by the
            # annotation's 1m, shows one per minute with a change).
            for labels_, points in fetch(dashboards.DECISIONS_ANNOTATION_EXPR):
                previous = -math.inf
                for t, v in points:
                    if math.isfinite(v) and v > 0 and t - previous > step * 1.5:
                        ax.axvline(t - start, color="orange", alpha=0.8, linewidth=1.0)
                        arrow = "↑" if labels_.get("direction") == "up" else "↓"
                        ax.annotate(
                            f"{arrow} {labels_.get('reason', '')}",
                            (t - start, 1.0),
                            xycoords=("data", "axes fraction"),
                            fontsize=6,
                            color="darkorange",
                            xytext=(2, -8),
                            textcoords="offset points",
                        )
                    if math.isfinite(v) and v > 0:
                        previous = t
        counts[panel.title] = drawn
        ax.set_title(panel.title, fontsize=10, loc="left")
        ax.set_xlim(0, span)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        if drawn and panel.kind != "heatmap":
            ax.legend(fontsize=7, loc="upper left", ncol=2, frameon=False)
        elif not drawn:
            ax.text(0.5, 0.5, notes.get(panel.title, "no data"), ha="center", va="center",
                    transform=ax.transAxes)  # fmt: skip
        if index // 2 == (len(charts) - 1) // 2:
            ax.set_xlabel("seconds since the start of the range", fontsize=8)
    height = fig.get_figheight()
    fig.suptitle(
        f"{title}\n{subtitle}" if subtitle else title,
        fontsize=12,
        x=0.01,
        y=1 - 0.12 / height,
        ha="left",
        va="top",
    )
    fig.subplots_adjust(left=0.06, right=0.97, top=1 - 1.05 / height, bottom=0.5 / height)
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
