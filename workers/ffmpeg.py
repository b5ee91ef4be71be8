"""Which ffmpeg renders the clips, and what a media file holds, without ffprobe.

The ``ffmpeg`` setting (``CLIPLINE_FFMPEG``) chooses the executable:

* ``auto`` (the default): the static ffmpeg shipped in the ``imageio-ffmpeg`` wheel (a
  base dependency, so a plain ``pip install`` renders H.264/AAC on any Linux machine
  that has that wheel), else the ``ffmpeg`` on ``PATH``;
* ``bundled``: only the one from ``imageio-ffmpeg``;
* ``system``: only the ``ffmpeg`` on ``PATH``;
* any other value: that path or executable name;
* empty: no ffmpeg (clips are VP9 without audio, written by OpenCV).

A candidate counts only when it runs and has the ``libx264`` and ``aac`` encoders (some
distributions ship an ffmpeg without libx264); a choice that names no usable ffmpeg is
logged once and renders through OpenCV. Each executable is examined once per process.

:func:`streams` reads a file's streams from ``ffmpeg -i`` (the bundled ffmpeg has no
ffprobe next to it), so nothing here needs a system ffprobe.

Imports only the standard library and the optional ``imageio_ffmpeg``; nothing of the
project (the render stage, the sample-media helpers, tests and benchmarks use it).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

log = logging.getLogger("clipline.worker")

AUTO = "auto"
BUNDLED = "bundled"
SYSTEM = "system"
REQUIRED_ENCODERS = ("libx264", "aac")


@dataclasses.dataclass(frozen=True)
class Ffmpeg:
    """A usable ffmpeg executable."""

    path: str
    version: str  # e.g. "9.0.2" or "5.1.9-0+deb12u1" (the word after "ffmpeg version")
    origin: str  # "bundled" or "system" (a configured path or name counts as system)
    # ``-fps_mode`` (ffmpeg >= 5.1), else the older spelling ``-vsync``.
    fps_mode_flag: str = "-fps_mode"


@dataclasses.dataclass(frozen=True)
class Stream:
    """One stream of a media file as ``ffmpeg -i`` lists it."""

    index: int
    kind: str  # "video", "audio", "subtitle", "data", "attachment"
    codec: str  # e.g. "h264", "aac", "ac3", "vp9"
    detail: str  # the rest of ffmpeg's line (pixel format, size, rate, ...)


def bundled_path() -> str | None:
    """The executable shipped in the ``imageio-ffmpeg`` wheel, if it is installed.

    Read from the wheel's ``binaries`` folder rather than ``get_ffmpeg_exe()``, which
    may answer with ``IMAGEIO_FFMPEG_EXE`` or the ``PATH``'s ffmpeg instead.
    """
    try:
        folder = importlib.resources.files("imageio_ffmpeg.binaries")
        entries = sorted(folder.iterdir(), key=lambda e: e.name)
    except (ImportError, OSError, TypeError):
        return None
    for entry in entries:
        path = Path(str(entry))
        if entry.name.startswith("ffmpeg") and path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return None


def find(choice: str) -> Ffmpeg | None:
    """The ffmpeg for the ``ffmpeg`` setting ``choice``, or None (render with OpenCV)."""
    choice = choice.strip()
    if not choice:
        return None
    found = _find(choice)
    if found is None:
        _warn_once(choice)
    return found


def _find(choice: str) -> Ffmpeg | None:
    if choice in (AUTO, BUNDLED):
        bundled = bundled_path()
        tool = examine(bundled, BUNDLED) if bundled else None
        if tool is not None or choice == BUNDLED:
            return tool
        choice = SYSTEM
    name = "ffmpeg" if choice == SYSTEM else choice
    path = shutil.which(name)
    return examine(path, SYSTEM) if path else None


@functools.lru_cache(maxsize=16)
def _examine(path: str, origin: str, mtime_ns: int) -> Ffmpeg | None:
    del mtime_ns  # part of the cache key only: a replaced binary is examined again
    try:
        version = _run([path, "-hide_banner", "-version"]) or _run([path, "-version"])
        encoders = _run([path, "-hide_banner", "-encoders"])
        options = _run([path, "-hide_banner", "-h", "long"])
    except (OSError, subprocess.SubprocessError):
        return None
    names = {line.split()[1] for line in encoders.splitlines() if len(line.split()) > 1}
    missing = [e for e in REQUIRED_ENCODERS if e not in names]
    if missing:
        log.warning("%s has no %s encoder: not used for clips", path, " or ".join(missing))
        return None
    m = re.search(r"ffmpeg version (\S+)", version)
    number = m.group(1) if m else "unknown"
    if number.startswith("n") and number[1:2].isdigit():
        number = number[1:].split("-", 1)[0]  # "n9.0.2-17-g2a571b6068-20260930" -> "9.0.2"
    flag = "-fps_mode" if "-fps_mode" in options else "-vsync"
    return Ffmpeg(path, number, origin, flag)


def examine(path: str, origin: str = SYSTEM) -> Ffmpeg | None:
    """``path`` as a usable ffmpeg (runs, has libx264 and aac), or None."""
    try:
        mtime = os.stat(path).st_mtime_ns
    except OSError:
        return None
    return _examine(os.path.realpath(path), origin, mtime)


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(
        cmd, capture_output=True, text=True, errors="replace", timeout=30, check=False
    )
    return proc.stdout + proc.stderr


@functools.lru_cache(maxsize=16)
def _warn_once(choice: str) -> None:
    log.warning(
        "no usable ffmpeg for ffmpeg=%r (needs libx264 and aac): clips are VP9 without audio",
        choice,
    )


_STREAM = re.compile(
    r"^\s*Stream #0:(?P<index>\d+)\S*?: (?P<kind>Video|Audio|Subtitle|Data|Attachment):"
    r" (?P<codec>[\w-]+)(?P<detail>.*)$",
    re.MULTILINE,
)


def streams(ffmpeg: str, path: Path, timeout_s: float = 30.0) -> list[Stream]:
    """The streams of ``path`` as ``ffmpeg -i`` lists them (empty if it cannot read it)."""
    try:
        proc = subprocess.run(
            [ffmpeg, "-hide_banner", "-nostdin", "-i", str(path)],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout_s,
            check=False,  # exits 1: no output file was named
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [
        Stream(int(m["index"]), m["kind"].lower(), m["codec"], m["detail"].strip())
        for m in _STREAM.finditer(proc.stderr)
    ]


def has_audio(ffmpeg: str, path: Path) -> bool:
    """Whether ``path`` has an audio stream."""
    return any(s.kind == "audio" for s in streams(ffmpeg, path))
