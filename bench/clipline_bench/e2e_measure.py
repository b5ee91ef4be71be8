"""Measurement helpers of the end-to-end benchmark: busy intervals, /proc sampling, metrics.

* :func:`union_seconds` / :func:`busy_series` — the device busy ratio, defined as in the
  GPU daemon's ``BusyMeter``: the wall time covered by the union of the intervals during
  which model forward passes executed, divided by the wall time (time-weighted).
* :class:`TreeSampler` — CPU time and memory of a process tree, read from ``/proc``
  every ``interval_s`` seconds in a background thread (no psutil needed): CPU seconds
  (user + system, including reaped children such as ffmpeg), peak RSS summed over the
  tree, and peak PSS (RSS with shared pages divided among their users, so the
  shared-memory arena and copy-on-write pages are counted once); CPU seconds are also
  broken down by process role (daemon, worker, service, redis, ffmpeg, ...): a child
  the sampler saw counts under its own role, one too short-lived to be seen under the
  parent that reaped it.
* :class:`BeatSampler` — reads the GPU daemon's Redis heartbeat, which carries its
  cumulative busy seconds (the union of device execution intervals), so the busy ratio
  over any span is ``Δ busy_s / Δt``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

Span = tuple[float, float]
_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
#: full /proc walks happen every this many samples (see TreeSampler._run)
RESCAN_EVERY = 4


# ---------------------------------------------------------------------------
# Intervals.
# ---------------------------------------------------------------------------
def merge(spans: Sequence[Span]) -> list[Span]:
    """The union of ``spans`` as sorted, disjoint intervals."""
    out: list[list[float]] = []
    for s, e in sorted((s, e) for s, e in spans if e > s):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def union_seconds(spans: Sequence[Span], lo: float = -math.inf, hi: float = math.inf) -> float:
    """Seconds of ``[lo, hi]`` covered by at least one of ``spans``."""
    return sum(max(0.0, min(e, hi) - max(s, lo)) for s, e in merge(spans))


def busy_series(
    spans: Sequence[Span], t0: float, t1: float, bin_s: float
) -> list[tuple[float, float]]:
    """``(bin centre - t0, busy ratio)`` per ``bin_s`` bin of ``[t0, t1]``."""
    merged = merge(spans)
    out = []
    n = max(1, math.ceil((t1 - t0) / bin_s))
    for i in range(n):
        lo, hi = t0 + i * bin_s, min(t1, t0 + (i + 1) * bin_s)
        if hi <= lo:
            break
        busy = sum(max(0.0, min(e, hi) - max(s, lo)) for s, e in merged)
        out.append(((lo + hi) / 2 - t0, min(1.0, busy / (hi - lo))))
    return out


def cumulative_series(
    samples: Sequence[tuple[float, float]], t0: float, t1: float, bin_s: float
) -> list[tuple[float, float]]:
    """Busy ratio per bin from samples ``(time, cumulative busy seconds)``.

    The daemon adds a batch's execution time when the batch ends, so a bin's ratio is
    the increase of the counter over the bin (linearly interpolated between samples)
    divided by the bin's length, clipped to 1 (a long batch ending in a bin).
    """
    pts = sorted(samples)
    if len(pts) < 2:
        return []

    def at(t: float) -> float:
        if t <= pts[0][0]:
            return pts[0][1]
        for (ta, va), (tb, vb) in itertools.pairwise(pts):
            if ta <= t <= tb:
                return va + (vb - va) * ((t - ta) / (tb - ta) if tb > ta else 1.0)
        return pts[-1][1]

    out = []
    n = max(1, math.ceil((t1 - t0) / bin_s))
    for i in range(n):
        lo, hi = t0 + i * bin_s, min(t1, t0 + (i + 1) * bin_s)
        if hi <= lo:
            break
        out.append(((lo + hi) / 2 - t0, max(0.0, min(1.0, (at(hi) - at(lo)) / (hi - lo)))))
    return out


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation; NaN when empty."""
    if not values:
        return math.nan
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


# ---------------------------------------------------------------------------
# /proc sampling.
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class _Proc:
    ppid: int
    own: int  # utime + stime (ticks)
    child: int  # cutime + cstime: children it has reaped (ticks)
    rss: int
    pss: int

    @property
    def total(self) -> int:
        return self.own + self.child


def _read_stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, own cpu ticks, reaped children's ticks) of ``pid``, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw[raw.rfind(")") + 2 :].split()
    # fields[0] is state (field 3 of stat(5)); ppid is field 4, utime..cstime 14..17.
    return int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])


def _read_mem(pid: int, with_pss: bool) -> tuple[int, int]:
    """(rss bytes, pss bytes) of ``pid`` (0, 0 if it is gone)."""
    if with_pss:
        try:
            rss = pss = 0
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
            return rss, pss
        except (FileNotFoundError, ProcessLookupError, PermissionError, ValueError):
            pass
    try:
        resident = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
        return 0, 0
    return resident, resident


def role(pid: int) -> str:
    """A short label for a process: what it is in either system (for the CPU breakdown)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return "?"
    text = b" ".join(argv).decode(errors="replace")
    for needle, label in (
        ("gpu_service", "daemon"),
        ("celery", "worker"),
        ("clipline_bench.baseline", "service"),
        ("valkey", "redis"),
        ("redis-server", "redis"),
    ):
        if needle in text:
            return label
    return Path(argv[0].decode(errors="replace")).name or "?"


def descendants(root: int) -> set[int]:
    """Every live process below ``root`` (not ``root`` itself)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        st = _read_stat(int(entry.name))
        if st is not None:
            children.setdefault(st[0], []).append(int(entry.name))
    out: set[int] = set()
    todo = [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def machine_cpu_ticks() -> tuple[int, int]:
    """(busy ticks, total ticks) of the whole machine from /proc/stat."""
    parts = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    vals = [int(v) for v in parts]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    total = sum(vals[:8])
    return total - idle, total


@dataclasses.dataclass
class TreeUsage:
    cpu_s: float
    wall_s: float
    cores: int
    peak_rss_bytes: int
    peak_pss_bytes: int
    machine_cpu_util: float
    cpu_by_role: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def cpu_util(self) -> float:
        """CPU seconds of the tree / (wall seconds x cores), in [0, 1]."""
        return self.cpu_s / (self.wall_s * self.cores) if self.wall_s > 0 else 0.0


class TreeSampler:
    """Samples the processes below ``root`` until stopped (see module doc)."""

    def __init__(
        self,
        root: int | None = None,
        interval_s: float = 0.25,
        cores: int | None = None,
        exclude: Callable[[], set[int]] = set,
    ) -> None:
        self.root = os.getpid() if root is None else root
        self.interval_s = interval_s
        self.cores = cores or len(os.sched_getaffinity(0))
        self.exclude = exclude
        self._seen: dict[int, _Proc] = {}
        self._known: set[int] = set()
        self._roles: dict[int, str] = {}
        self._start: dict[int, _Proc] = {}
        self._peak_rss = 0
        self._peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-sampler", daemon=True)
        self._t0 = self._t1 = 0.0
        self._m0 = self._m1 = (0, 0)

    def _sample(self, with_pss: bool, rescan: bool = True) -> dict[int, _Proc]:
        now: dict[int, _Proc] = {}
        if rescan or not self._known:
            self._known = descendants(self.root) - self.exclude()
        for pid in self._known:
            st = _read_stat(pid)
            if st is None:
                continue
            rss, pss = _read_mem(pid, with_pss)
            now[pid] = _Proc(st[0], st[1], st[2], rss, pss)
            if pid not in self._roles:
                self._roles[pid] = role(pid)
        self._known = set(now)
        self._peak_rss = max(self._peak_rss, sum(p.rss for p in now.values()))
        self._peak_pss = max(self._peak_pss, sum(p.pss for p in now.values()))
        self._seen.update(now)
        return now

    def _run(self) -> None:
        # Walking all of /proc is the expensive part: do it every RESCAN_EVERY samples.
        # Short-lived children missed in between (ffmpeg) still count: their parent's
        # cutime/cstime include them once reaped.
        n = 0
        while not self._stop.wait(self.interval_s):
            n += 1
            self._sample(with_pss=True, rescan=n % RESCAN_EVERY == 0)

    def _ticks(self, final: dict[int, _Proc]) -> dict[int, int]:
        """CPU ticks of the tree since :meth:`start`, each process counted once.

        A process's own time is its last sample. Its reaped children's time (cutime)
        counts only for children this sampler never saw (short-lived ones such as
        ffmpeg): the time of children it saw, and that died, is already counted through
        their own samples, so it is taken out of the parent's cutime.
        """
        zero = _Proc(0, 0, 0, 0, 0)
        dead_kids: dict[int, int] = {}
        for pid, p in self._seen.items():
            if pid not in final:
                base = self._start.get(pid, zero)
                dead_kids[p.ppid] = dead_kids.get(p.ppid, 0) + p.total - base.total
        ticks: dict[int, int] = {}
        for pid, p in self._seen.items():
            base = self._start.get(pid, zero)
            unseen = (p.child - base.child) - dead_kids.get(pid, 0)
            ticks[pid] = (p.own - base.own) + max(0, unseen)
        return ticks

    def start(self) -> TreeSampler:
        self._t0 = time.monotonic()
        self._m0 = machine_cpu_ticks()
        first = self._sample(with_pss=True)
        self._start = dict(first)
        self._thread.start()
        return self

    def stop(self) -> TreeUsage:
        self._stop.set()
        self._thread.join()
        final = self._sample(with_pss=False)
        self._t1 = time.monotonic()
        self._m1 = machine_cpu_ticks()
        per_pid = self._ticks(final)
        by_role: dict[str, float] = {}
        for pid, t in per_pid.items():
            label = self._roles.get(pid, "?")
            by_role[label] = round(by_role.get(label, 0.0) + t / _TICKS, 2)
        ticks = sum(per_pid.values())
        busy = self._m1[0] - self._m0[0]
        total = self._m1[1] - self._m0[1]
        return TreeUsage(
            cpu_s=ticks / _TICKS,
            wall_s=self._t1 - self._t0,
            cores=self.cores,
            peak_rss_bytes=self._peak_rss,
            peak_pss_bytes=self._peak_pss,
            machine_cpu_util=busy / total if total > 0 else 0.0,
            cpu_by_role=by_role,
        )


# ---------------------------------------------------------------------------
# The daemon's heartbeat.
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Beat:
    """One daemon heartbeat: its monotonic time and cumulative counters."""

    ts: float
    busy_s: float
    items: float
    batches: float


def read_beat(client: Any, key: str) -> Beat | None:
    """The daemon's latest heartbeat (``busy_s`` is its ``BusyMeter`` total), or None."""
    raw = client.hgetall(key)
    fields = {k.decode(): v.decode() for k, v in raw.items()}
    if "busy_s" not in fields or "ts" not in fields:
        return None
    return Beat(
        ts=float(fields["ts"]),
        busy_s=float(fields["busy_s"]),
        items=float(fields.get("items", 0)),
        batches=float(fields.get("batches", 0)),
    )


class BeatSampler:
    """Keeps the daemon's heartbeats (refreshed about once a second) until stopped.

    The daemon's cumulative busy seconds are the union of its device execution
    intervals (its ``BusyMeter``), so the busy ratio over any span is the increase of
    ``busy_s`` over that span divided by its length.
    """

    def __init__(self, client: Any, key: str, interval_s: float = 0.5) -> None:
        self.client = client
        self.key = key
        self.interval_s = interval_s
        self.beats: list[Beat] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="beat-sampler", daemon=True)

    def sample(self) -> Beat | None:
        beat = read_beat(self.client, self.key)
        if beat is not None and (not self.beats or beat.ts > self.beats[-1].ts):
            self.beats.append(beat)
        return beat

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            with contextlib.suppress(Exception):
                self.sample()

    def start(self) -> BeatSampler:
        if self.sample() is None:
            raise RuntimeError(f"the daemon's heartbeat {self.key} has no busy_s/ts fields")
        self._thread.start()
        return self

    def stop(self, after: float, timeout_s: float = 5.0) -> Beat:
        """Stop once a heartbeat written after monotonic time ``after`` was seen."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.beats[-1].ts <= after:
            time.sleep(0.1)
        self._stop.set()
        self._thread.join()
        self.sample()
        return self.beats[-1]
