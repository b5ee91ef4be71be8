"""Plots of the end-to-end benchmark (PNG, matplotlib's non-interactive Agg backend)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

COLORS = {"baseline": "#c0504d", "clipline": "#4f81bd"}


def plot_busy(
    series: Mapping[str, Sequence[Sequence[float]]],
    path: Path,
    title: str,
    overall: Mapping[str, float],
) -> Path:
    """Device busy ratio over time, one line per run (``series[name] = [(t, ratio)]``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=110)
    for name, pts in series.items():
        if not pts:
            continue
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts]
        label = f"{name} (run: {overall.get(name, float('nan')):.2f})"
        ax.step(xs, ys, where="mid", color=COLORS.get(name), label=label, linewidth=1.6)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("seconds since the jobs were submitted")
    ax.set_ylabel("device busy ratio")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_sweep(rows: Sequence[Mapping[str, Any]], path: Path, title: str, knee: int | None) -> Path:
    """Throughput, busy ratio and clipline/baseline ratios against the number of workers.

    The third panel pairs each run with the baseline run made just before it, which is
    what stays comparable on a machine whose other load changes between runs; jobs per
    CPU-minute also discounts the share of the CPU the run happened to get.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(12, 3.6), dpi=110)
    ws = [int(r["workers"]) for r in rows]
    for name in ("baseline", "clipline"):
        tp = [r[name]["jobs_per_min"] for r in rows]
        busy = [r[name]["device_busy_ratio"] for r in rows]
        ax1.plot(ws, tp, "o-", color=COLORS[name], label=name)
        ax2.plot(ws, busy, "o-", color=COLORS[name], label=name)
    for key, label, style in (
        ("throughput", "jobs/min", "o-"),
        ("jobs_per_cpu_min", "jobs/CPU-min", "s--"),
    ):
        vals = [r["ratio"].get(key) for r in rows]
        pts = [(w, v) for w, v in zip(ws, vals, strict=True) if v is not None]
        if pts:
            ax3.plot([p[0] for p in pts], [p[1] for p in pts], style, color="#555555", label=label)
    ax3.axhline(1.0, color="grey", linewidth=0.8)
    if knee is not None:
        for ax in (ax1, ax2, ax3):
            ax.axvline(knee, color="grey", linestyle="--", linewidth=1)
        lo, hi = ax1.get_ylim()
        ax1.text(knee, lo + 0.05 * (hi - lo), f" knee W={knee}", fontsize=8, color="grey")
    ax1.set_ylabel("jobs / min")
    ax2.set_ylabel("device busy ratio")
    ax2.set_ylim(0, 1.05)
    ax3.set_ylabel("clipline / baseline")
    for ax in (ax1, ax2, ax3):
        ax.set_xlabel("workers W")
        ax.set_xticks(ws)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
