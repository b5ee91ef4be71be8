"""The daemon's wake-up datagram socket: bind it owner-only, replacing a dead daemon's.

Owns :func:`_bind_socket`. Must not import the producer or consumer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
from pathlib import Path

from clipline_core import constants
from clipline_core.errors import ClipError, ErrorCode

log = logging.getLogger("gpu_service.shm")


def _bind_socket(path: Path) -> tuple[socket.socket, tuple[int, int]]:
    """Bind the wake-up datagram socket (0600), replacing a stale one from a crash.

    Only the daemon holding the arena lock calls this, so a socket already at ``path``
    belongs to a dead daemon.
    """
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if stat.S_ISSOCK(st.st_mode):
            os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise ClipError(
            ErrorCode.GPU_UNAVAILABLE, f"cannot bind the wake-up socket {path}: {exc}"
        ) from exc
    finally:
        os.umask(old)
    os.chmod(path, constants.SHM_FILE_MODE)
    sock.setblocking(False)
    st = os.lstat(path)
    return sock, (st.st_dev, st.st_ino)
