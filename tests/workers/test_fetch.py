"""Fetch stage: local roots, HTTP with retries and limits, SSRF refusal, sniffing.

URLs are served by a real HTTP server on loopback (``Origin``); the settings allow
loopback explicitly, as the SSRF rules require, except in the tests that check the
refusal itself. Addresses that cannot be served here (private, link-local, metadata)
are refused before any connection is attempted, so the test needs no such network.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from wlib import Clips, Origin

from clipline_core.errors import ClipError, ErrorCode
from clipline_core.settings import Settings
from workers import fetch


def fail(code: ErrorCode, fn: Callable[..., object], *args: Any, **kw: Any) -> ClipError:
    with pytest.raises(ClipError) as e:
        fn(*args, **kw)
    assert e.value.code == code, e.value
    assert e.value.message and "Traceback" not in e.value.message
    return e.value


def test_local_paths_only_under_the_allowed_roots(
    wsettings: Settings, clips: Clips, tmp_path: Path
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    inside = tmp_path / "in.avi"
    inside.write_bytes(clips.tiny.read_bytes())
    path, kind = fetch.fetch_video(str(inside), scratch, wsettings)
    assert kind == "avi" and path.read_bytes() == inside.read_bytes()
    path.unlink()
    fetch.fetch_video("file://" + str(inside), scratch, wsettings)
    (scratch / "video").unlink()
    # clips live in another temporary folder, not under this test's allowed roots
    err = fail(ErrorCode.FORBIDDEN_SOURCE, fetch.fetch_video, str(clips.tiny), scratch, wsettings)
    assert "CLIPLINE_LOCAL_ROOTS" in err.message
    link = tmp_path / "link.avi"
    link.symlink_to(clips.tiny)  # a link inside the root pointing outside it
    fail(ErrorCode.FORBIDDEN_SOURCE, fetch.fetch_video, str(link), scratch, wsettings)
    fail(ErrorCode.NOT_FOUND, fetch.fetch_video, str(tmp_path / "nope.mp4"), scratch, wsettings)
    fail(ErrorCode.INVALID_REQUEST, fetch.fetch_video, "ftp://x/y.mp4", scratch, wsettings)


def test_content_is_sniffed_and_sizes_capped(
    wsettings: Settings, clips: Clips, tmp_path: Path
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    renamed = tmp_path / "movie.mp4"
    renamed.write_text("this is a text file, not a movie\n" * 20)
    err = fail(ErrorCode.NOT_A_VIDEO, fetch.fetch_video, str(renamed), scratch, wsettings)
    assert "not a video" in err.message
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    fail(ErrorCode.EMPTY_FILE, fetch.fetch_video, str(empty), scratch, wsettings)
    big = tmp_path / "big.avi"
    big.write_bytes(clips.tiny.read_bytes())
    small_cap = wsettings.replace(max_video_bytes=1000)
    err = fail(ErrorCode.TOO_LARGE, fetch.fetch_video, str(big), scratch, small_cap)
    assert "1000" in err.message
    # images: own cap, sniffing and a real decode check
    img = tmp_path / "p.jpg"
    img.write_bytes(clips.product.read_bytes())
    assert fetch.fetch_image(str(img), scratch, 0, wsettings).exists()
    fail(ErrorCode.TOO_LARGE, fetch.fetch_image, str(img), scratch, 1, wsettings.replace(
        max_image_bytes=100))  # fmt: skip
    fail(ErrorCode.NOT_AN_IMAGE, fetch.fetch_image, str(clips.tiny.parent / "tiny.avi"), scratch,
         2, wsettings.replace(local_roots=str(clips.tiny.parent)))  # fmt: skip
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(img.read_bytes()[:200])  # a JPEG header and nothing decodable
    fail(ErrorCode.NOT_AN_IMAGE, fetch.fetch_image, str(broken), scratch, 3, wsettings)


def test_decompression_bombs_are_refused(wsettings: Settings, tmp_path: Path) -> None:
    scratch = tmp_path / "s"
    scratch.mkdir()
    bomb = tmp_path / "bomb.png"
    ok, buf = cv2.imencode(".png", np.zeros((9000, 8000), np.uint8))  # 72 Mpx, ~80 kB
    assert ok
    bomb.write_bytes(buf.tobytes())
    assert bomb.stat().st_size < wsettings.max_image_bytes
    err = fail(ErrorCode.TOO_LARGE, fetch.fetch_image, str(bomb), scratch, 0, wsettings)
    assert "8000x9000" in err.message


def test_image_size_parsing(tmp_path: Path, real_media: Path) -> None:
    for name in ("fruits.jpg", "apple.jpg", "orange.jpg", "baboon.jpg"):
        data = (real_media / name).read_bytes()
        img = cv2.imread(str(real_media / name))
        assert img is not None
        assert fetch.image_size(data) == (img.shape[1], img.shape[0]), name


def test_http_download_with_retries(
    wsettings: Settings, origin: Origin, clips: Clips, tmp_path: Path
) -> None:
    scratch = tmp_path / "s"
    scratch.mkdir()
    url = origin.file("/flaky.avi", clips.tiny, fail_first=2, fail_status=503)
    path, kind = fetch.fetch_video(url, scratch, wsettings)
    assert kind == "avi" and path.read_bytes() == clips.tiny.read_bytes()
    assert origin.server.routes["/flaky.avi"].hits == 3
    path.unlink()
    origin.file("/reset.avi", clips.tiny, reset_first=1)
    fetch.fetch_video(origin.base + "/reset.avi", scratch, wsettings)
    assert origin.server.routes["/reset.avi"].hits == 2
    (scratch / "video").unlink()
    # still failing after the retries: transient, so the job retries later
    origin.file("/down.avi", clips.tiny, fail_first=100, fail_status=502)
    err = fail(ErrorCode.FETCH_FAILED, fetch.fetch_video, origin.base + "/down.avi", scratch,
               wsettings)  # fmt: skip
    assert err.transient and "502" in err.message
    assert origin.server.routes["/down.avi"].hits == wsettings.fetch_retries + 1
    # definite answers are not retried
    err = fail(ErrorCode.NOT_FOUND, fetch.fetch_video, origin.base + "/missing", scratch, wsettings)
    assert not err.transient
    origin.add("/forbidden", fail_first=100, fail_status=403)
    err = fail(ErrorCode.FETCH_FAILED, fetch.fetch_video, origin.base + "/forbidden", scratch,
               wsettings)  # fmt: skip
    assert not err.transient and origin.server.routes["/forbidden"].hits == 1
    origin.add("/moved", location="http://169.254.169.254/latest/meta-data")
    err = fail(ErrorCode.FETCH_FAILED, fetch.fetch_video, origin.base + "/moved", scratch,
               wsettings)  # fmt: skip
    assert "redirect" in err.message and not err.transient


def test_http_size_and_time_limits(
    wsettings: Settings, origin: Origin, clips: Clips, tmp_path: Path
) -> None:
    scratch = tmp_path / "s"
    scratch.mkdir()
    capped = wsettings.replace(max_video_bytes=4000)
    data = clips.tiny.read_bytes()
    origin.add("/declared", body=data)
    err = fail(ErrorCode.TOO_LARGE, fetch.fetch_video, origin.base + "/declared", scratch, capped)
    assert "4000" in err.message
    origin.add("/undeclared", body=data, no_length=True)  # the cap holds while streaming
    fail(ErrorCode.TOO_LARGE, fetch.fetch_video, origin.base + "/undeclared", scratch, capped)
    origin.add("/slow", body=data, stall_s=5.0)
    quick = wsettings.replace(fetch_read_timeout_s=0.5, fetch_retries=1)
    start = time.monotonic()
    err = fail(ErrorCode.FETCH_FAILED, fetch.fetch_video, origin.base + "/slow", scratch, quick)
    assert "timed out" in err.message and time.monotonic() - start < 4.5
    assert origin.server.routes["/slow"].hits == 2


def test_ssrf_refusals(settings: Settings, origin: Origin, clips: Clips, tmp_path: Path) -> None:
    scratch = tmp_path / "s"
    scratch.mkdir()
    strict = settings.replace(allow_loopback=False, fetch_retries=0)
    url = origin.file("/ok.avi", clips.tiny)
    for u in (
        url,
        url.replace("127.0.0.1", "localhost"),
        url.replace("127.0.0.1", "[::1]"),
        "http://127.1.2.3/x",
        "http://10.0.0.8/v.mp4",
        "http://192.168.1.1/v.mp4",
        "http://172.16.5.4/v.mp4",
        "http://169.254.10.10/v.mp4",
        "http://169.254.169.254/latest/meta-data/",
        "http://metadata.google.internal/computeMetadata/v1/",
        "http://[fd00:ec2::254]/",
        "http://[::ffff:10.1.2.3]/v.mp4",
        "http://0.0.0.0:80/v.mp4",
        "http://100.64.1.1/v.mp4",
        "https://[fe80::1]/v.mp4",
    ):
        err = fail(ErrorCode.FORBIDDEN_SOURCE, fetch.fetch_video, u, scratch, strict)
        assert "refusing" in err.message, u
    assert origin.server.routes["/ok.avi"].hits == 0  # nothing was ever requested
    # Allowed explicitly: loopback works, private networks still do not.
    allowed = strict.replace(allow_loopback=True)
    fetch.fetch_video(url, scratch, allowed)
    (scratch / "video").unlink()
    fail(ErrorCode.FORBIDDEN_SOURCE, fetch.fetch_video, "http://10.0.0.8/v", scratch, allowed)
    # ... and the metadata address stays refused even with private networks allowed
    both = allowed.replace(allow_private_networks=True)
    fail(ErrorCode.FORBIDDEN_SOURCE, fetch.fetch_video, "http://169.254.169.254/", scratch, both)


def test_check_address_table() -> None:
    s = Settings()
    cases = {
        "8.8.8.8": None,
        "2606:4700:4700::1111": None,
        "127.0.0.1": "loopback",
        "::1": "loopback",
        "10.1.1.1": "private",
        "100.64.0.1": "private",
        "169.254.169.254": "metadata",
        "169.254.1.1": "link-local",
        "224.0.0.1": "reserved",
        "::ffff:127.0.0.1": "loopback",
    }
    for addr, why in cases.items():
        got = fetch.check_address(ipaddress.ip_address(addr), s)
        assert (got is None) if why is None else (got is not None and why in got), (addr, got)
