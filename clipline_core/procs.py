"""Process helpers shared by the local stack, the workers' housekeeping and the tests.

Owns :func:`pid_alive`. Imports only the standard library; must not import any other
clipline package.
"""

from __future__ import annotations

import os


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
