"""What the ``clipline`` command line shows while a job runs, and how it prints messages.

:class:`JobDisplay` follows one job through its stages (``queued``, ``fetching``,
``decoding``, ``inferring``, ``rendering``, then the end state) with the worker's
``progress`` (:class:`clipline_core.job.JobProgress`: frames decoded, chunks scored):

* ``live``: on a terminal, a rich display with one row per stage (a spinner, then a tick
  and the time it took; frames decoded, and a bar of chunks scored);
* ``plain``: when the output is not a terminal, one line per state change and per
  progress change (at most one a second), e.g. ``  [  1.02 s] decoding: 120 frames
  decoded, 3/8 chunks scored``;
* ``off``: nothing (``--quiet``, ``--json``).

:class:`Output` holds the global ``--quiet``/``--verbose``/``--no-color`` choices and
prints messages (``say`` on stdout unless quiet, ``error``/``warn`` on stderr, coloured
only on a terminal and without ``--no-color`` or ``NO_COLOR``).

Imports rich and the job model of ``clipline_core`` only; must not import the services
(``workers``, ``gpu_service``) or the rest of :mod:`clipline`.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from clipline_core.job import PROGRESSION, TERMINAL, JobProgress, JobState

#: Plain mode prints a progress change at most this often (state changes always).
PLAIN_PROGRESS_EVERY_S = 1.0


class Output:
    """The global output choices of one ``clipline`` run."""

    def __init__(self, quiet: bool = False, verbose: bool = False, color: bool = True) -> None:
        self.quiet = quiet
        self.verbose = verbose and not quiet
        self.color = color and "NO_COLOR" not in os.environ

    def colored(self, stream: TextIO) -> bool:
        return self.color and _isatty(stream)

    def say(self, message: str) -> None:
        """An informational line on stdout (not with ``--quiet``)."""
        if not self.quiet:
            print(message, flush=True)

    def detail(self, message: str) -> None:
        """A line on stderr only with ``--verbose``."""
        if self.verbose:
            print(message, file=sys.stderr, flush=True)

    def error(self, message: str, label: str = "error") -> None:
        self._label(label, "31", message)

    def warn(self, message: str) -> None:
        self._label("warning", "33", message)

    def _label(self, label: str, sgr: str, message: str) -> None:
        head = f"\x1b[1;{sgr}m{label}\x1b[0m" if self.colored(sys.stderr) else label
        print(f"{head}: {message}", file=sys.stderr, flush=True)

    def display(self, enabled: bool = True) -> JobDisplay:
        """A job display for this run: live on a terminal, plain lines otherwise."""
        if self.quiet or not enabled:
            return JobDisplay("off")
        return JobDisplay("live" if _isatty(sys.stdout) else "plain", color=self.color)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def progress_text(p: JobProgress | None) -> str:
    """``120 frames decoded, 3/8 chunks scored`` (empty without progress)."""
    if p is None:
        return ""
    parts = []
    if p.frames or p.stage == JobState.DECODING.value:
        parts.append(f"{p.frames} frames decoded")
    if p.chunks:
        parts.append(f"{p.chunks_done}/{p.chunks} chunks scored")
    return ", ".join(parts)


Entered = Callable[[JobState], float | None]


def _mark_column(color: bool) -> Any:
    """A spinner while a stage runs, a tick once done, a cross when the job ended in it."""
    from rich.progress import ProgressColumn, SpinnerColumn
    from rich.text import Text

    class MarkColumn(ProgressColumn):
        def __init__(self) -> None:
            super().__init__()
            self.spinner = SpinnerColumn()

        def render(self, task: Any) -> Any:
            if task.fields.get("mark") == "x":
                return Text("✗", style="red" if color else "")
            if task.finished:
                return Text("✓", style="green" if color else "")
            return self.spinner.render(task)

    return MarkColumn()


class JobDisplay:
    """Shows one job's way through its states (see the module doc)."""

    def __init__(self, mode: str, *, color: bool = True, stream: TextIO | None = None) -> None:
        if mode not in ("live", "plain", "off"):
            raise ValueError(f"unknown display mode {mode!r}")
        self.mode = mode
        self.stream = stream or sys.stdout
        self.start = time.monotonic()
        self.wall0 = time.time()
        self._seen = -1  # index in PROGRESSION of the latest state shown
        self._retried = False
        self._state: JobState | None = None
        self._progress: JobProgress | None = None
        self._text = ""
        self._last_plain = -math.inf
        self._live: Any = None  # rich.progress.Progress, once a state is shown
        self._rows: dict[str, Any] = {}
        self._color = color

    # -- what callers use -----------------------------------------------------------
    def note(self, message: str) -> None:
        """A line that is not about the stages (``job … queued``)."""
        if self.mode == "off":
            return
        if self._live is not None:
            self._live.console.print(message, markup=False, highlight=False)
        else:
            print(message, file=self.stream, flush=True)

    def update(
        self, state: JobState, progress: JobProgress | None = None, entered: Entered | None = None
    ) -> None:
        """The job as last seen: its state and the worker's progress.

        States the job passed through between two looks are shown too (when the job
        reached a later state or succeeded), timed by ``entered`` (the wall time the job
        entered a state, from its record) when it can tell, else now.
        """
        if state != self._state:
            now = time.monotonic() - self.start
            note = ""
            if state in PROGRESSION and PROGRESSION.index(state) <= self._seen:
                # Back to an earlier state: the attempt failed and the job is retried.
                # The record's stage times are the earlier attempt's from now on.
                self._seen = PROGRESSION.index(state) - 1
                self._retried, note = True, " (retrying)"
            if self._retried:
                entered = None
            if state in PROGRESSION or state == JobState.SUCCEEDED:
                done = state == JobState.SUCCEEDED
                upto = len(PROGRESSION) if done else PROGRESSION.index(state)
                for missed in PROGRESSION[self._seen + 1 : upto]:
                    at = entered(missed) if entered is not None else None
                    t = now if at is None else min(max(at - self.wall0, 0.0), now)
                    self._enter(missed, t)
                self._seen = upto
            self._enter(state, now, note)
            self._state = state
        if state not in TERMINAL:
            self._show_progress(progress)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def __enter__(self) -> JobDisplay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- rendering --------------------------------------------------------------------
    def _enter(self, state: JobState, t: float, note: str = "") -> None:
        if self.mode == "plain":
            print(f"  [{t:6.2f} s] {state.value}{note}", file=self.stream, flush=True)
        elif self.mode == "live":
            self._live_enter(state, note)

    def _show_progress(self, progress: JobProgress | None) -> None:
        text = progress_text(progress)
        if progress is None or text == self._text:
            return
        self._text, self._progress = text, progress
        if self.mode == "plain":
            now = time.monotonic() - self.start
            if now - self._last_plain >= PLAIN_PROGRESS_EVERY_S:
                self._last_plain = now
                print(f"  [{now:6.2f} s] {progress.stage}: {text}", file=self.stream, flush=True)
        elif self.mode == "live":
            self._live_progress(progress, text)

    def _live_start(self) -> Any:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        console = Console(file=self.stream, no_color=not self._color, highlight=False)
        live = Progress(
            _mark_column(self._color),
            TextColumn("{task.description:<10}"),
            BarColumn(bar_width=24),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=console,
            refresh_per_second=8,
        )
        live.start()
        return live

    def _live_enter(self, state: JobState, note: str = "") -> None:
        if self._live is None:
            self._live = self._live_start()
        live = self._live
        ended = state in (JobState.FAILED, JobState.CANCELLED)
        for row in self._rows.values():  # every earlier stage is over
            task = live.tasks[row]
            if task.finished or task.fields.get("mark"):
                continue
            if ended:  # the stage it was in did not finish
                detail = ", ".join(x for x in (task.fields.get("detail"), state.value) if x)
                live.update(row, mark="x", detail=detail)
            else:
                live.update(row, total=task.total or 1, completed=task.total or 1)
            live.stop_task(row)
        if ended:
            return
        if state == JobState.SUCCEEDED:
            row = live.add_task(state.value, total=1, detail="", mark="")
            live.update(row, completed=1)  # finished (add_task alone does not mark it)
            live.stop_task(row)
        else:
            row = live.add_task(state.value + note, total=None, detail="", mark="")
        self._rows[state.value] = row

    def _live_progress(self, progress: JobProgress, text: str) -> None:
        live = self._live
        if live is None or self._state is None:
            return
        row = self._rows.get(self._state.value)
        if row is None:
            return
        if progress.chunks:
            live.update(row, total=progress.chunks, completed=progress.chunks_done, detail=text)
        else:
            live.update(row, detail=text)
