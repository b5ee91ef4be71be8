"""Process helpers shared by the local stack, the workers' housekeeping and the tests.

Owns :func:`pid_alive`, the identity of a process across pid reuse (:func:`start_time`,
:func:`same_process`), the ``PR_SET_PDEATHSIG`` pre-exec hook children of a supervisor
run (:func:`child_preexec`), owner-only files and directories (:func:`private_dir`,
:func:`open_private`) and the reaping of a dead stack's process groups
(:func:`reap_groups`). Linux only where ``/proc`` is read. Imports only the standard
library; must not import any other clipline package.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import stat
import time
from collections.abc import Callable, Iterable
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one we may not signal counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of ``/proc/<pid>/stat`` (after the command name), or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """When the process started, in clock ticks since boot (None: no such process).

    Together with the pid it names one process: a pid reused later has a later start.
    """
    fields = _stat_fields(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def same_process(pid: int, started: int | None) -> bool:
    """Whether ``pid`` is alive and is the process that started at ``started``.

    ``started`` None (a record without it) falls back to :func:`pid_alive`.
    """
    if not pid_alive(pid):
        return False
    if started is None:
        return True
    now = start_time(pid)
    return now is None or now == started


def group_members(pgid: int, not_before: int | None = None) -> list[int]:
    """Pids in process group ``pgid`` that started at or after ``not_before`` ticks."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if not fields or len(fields) <= 19 or int(fields[2]) != pgid or fields[0] == "Z":
            continue  # not in the group, or a zombie (gone, not yet reaped)
        if not_before is None or int(fields[19]) >= not_before:
            found.append(int(entry.name))
    return found


def reap_groups(groups: Iterable[tuple[int, int | None]], grace_s: float = 0.0) -> list[int]:
    """End what is left of process groups ``(pgid, leader start time)``.

    A stack's children lead their own sessions (pgid = their pid), so what remains of
    one after its parent died (pool children, a server that outlived its parent) is
    found by group; processes that started before the leader are never touched, so a
    reused number does not name someone else's processes. Members get ``grace_s``
    seconds to finish on their own (a death signal may be shutting them down), then
    SIGKILL. Returns the pids killed.
    """
    wanted = [(g, s) for g, s in groups if g > 0 and g != os.getpgrp()]

    def members() -> list[int]:
        return [pid for g, s in wanted for pid in group_members(g, s)]

    deadline = time.monotonic() + grace_s
    left = members()
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = members()
    killed = []
    for pid in left:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    return killed


def child_preexec(
    death_signal: int | None = signal.SIGTERM, umask: int | None = 0o077
) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets ``death_signal`` when its parent dies (None: no
    such signal) and ``umask`` (None: the parent's).

    If the parent died between the fork and the ``prctl`` (the signal would never
    come), the child exits at once. The signal is tied to the forking thread: spawn
    from a thread that lives as long as the parent (the main thread).
    """
    parent = os.getpid()

    def run() -> None:
        if umask is not None:
            os.umask(umask)
        if death_signal is None:
            return
        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, death_signal)
        if os.getppid() != parent:
            os._exit(1)

    return run


def private_dir(path: Path, *, tighten: bool = True) -> Path:
    """Create ``path`` (and missing parents) owner-only (0700); return it.

    With ``tighten``, an existing directory must be ours (``PermissionError``
    otherwise: a state directory under a shared /tmp could be planted by someone else)
    and is made 0700; without, an existing one is left as it is.
    """
    path = Path(path)
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir(mode=0o700)
        os.chmod(d, 0o700)
    st = path.stat()
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(f"{path} is not a directory")
    if not tighten:
        return path
    if st.st_uid != os.getuid():
        raise PermissionError(f"{path} belongs to another user (uid {st.st_uid})")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def open_private(path: Path, mode: str = "ab") -> int:
    """Open ``path`` for writing, owner-only (0600, tightened if it existed); an fd."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if mode.startswith("a") else os.O_TRUNC)
    fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), 0o600)
    with contextlib.suppress(OSError):
        os.fchmod(fd, 0o600)
    return fd
