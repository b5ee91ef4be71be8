"""Slot leases as byte-range locks on the arena file (``F_OFD_SETLK`` where available).

Owns :func:`_lock` / :func:`_unlock`. Must not import anything of the arena beyond the
standard library: the arena, producer and consumer build on it.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import sys

log = logging.getLogger("gpu_service.shm")

_FLOCK = struct.Struct("@hhqqi4x")
_OFD = sys.platform.startswith("linux") and hasattr(fcntl, "F_OFD_SETLK") and _FLOCK.size == 32


def _lock(fd: int, offset: int) -> bool:
    """Try to take the exclusive one-byte lease at ``offset``; False if someone holds it."""
    try:
        if _OFD:
            fcntl.fcntl(
                fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0)
            )
        else:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
        return True
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EAGAIN):
            return False
        raise


def _unlock(fd: int, offset: int) -> None:
    if _OFD:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, offset, 1, 0))
    else:
        fcntl.lockf(fd, fcntl.LOCK_UN, 1, offset)
