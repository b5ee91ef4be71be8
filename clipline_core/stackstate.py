"""Where a local stack records itself, and a read-only look at that record.

Owns :func:`state_file` (``<state_dir>/<deployment>/stack.json``, written by the local
stack's supervisor, :mod:`clipline.stack`) and :func:`running_stack`, which reads the
record of a stack that is up without touching anything: a stale record (its supervisor
is gone) reads as None and is left for :func:`clipline.stack.read_state` to clean up.
Lower floors use it to find the running stack's Redis (``celery -A workers.app ...`` in
a shell without ``CLIPLINE_REDIS_URL``). Imports only the standard library and
:mod:`clipline_core.procs`; must not import any other clipline package.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from clipline_core.procs import same_process


def state_file(state_dir: str | os.PathLike[str], deployment: str) -> Path:
    """The record of the local stack of ``deployment`` under ``state_dir``."""
    return Path(state_dir) / deployment / "stack.json"


def running_stack(state_dir: str | os.PathLike[str], deployment: str) -> dict[str, Any] | None:
    """The record of the local stack of ``deployment`` when its supervisor runs, else None.

    Never raises and never writes: an unreadable, malformed or stale record is None.
    """
    try:
        data = json.loads(state_file(state_dir, deployment).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    try:
        pid = int(data.get("supervisor_pid") or 0)
    except (TypeError, ValueError):
        return None
    if pid <= 0 or not same_process(pid, data.get("supervisor_start")):
        return None
    return data
