"""Fetch stage: local roots, HTTP with retries and limits, SSRF refusal, sniffing.

URLs are served by a real HTTP server on loopback (``Origin``); the settings allow
loopback explicitly, as the SSRF rules require, except in the tests that check the
refusal itself. Addresses that cannot be served here (private, link-local, metadata)
are refused before any connection is attempted, so the test needs no such network.
Sources that stall, trickle or lie about their length are real TCP servers on loopback
(``RawOrigin``) writing HTTP by hand; the settings shrink the deadline and the rate
window so each such test takes a few seconds.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import redis
from wlib import Clips, Origin

from clipline_core.errors import ClipError, ErrorCode
from clipline_core.job import JobSpec, JobState
from clipline_core.settings import Settings
from workers import fetch
from workers.pipeline import JobRunner, Outcome


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
    assert "CLIPLINE_LOCAL_ROOTS" in err.message and "--allow-dir" in err.message
    # a missing file there gets the same answer: the error does not tell what exists
    missing = clips.tiny.with_name("missing.avi")
    gone = fail(ErrorCode.FORBIDDEN_SOURCE, fetch.fetch_video, str(missing), scratch, wsettings)
    assert gone.message.replace(str(missing), "P") == err.message.replace(str(clips.tiny), "P")
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
    # No data for the read timeout: retried within the fetch, then source_timeout, which
    # the job does not retry (min rate off: only the read timeout sees the stall).
    origin.add("/slow", body=data, stall_s=5.0)
    quick = wsettings.replace(fetch_read_timeout_s=0.5, fetch_retries=1, fetch_min_rate_bps=0)
    start = time.monotonic()
    err = fail(ErrorCode.SOURCE_TIMEOUT, fetch.fetch_video, origin.base + "/slow", scratch, quick)
    assert "timed out" in err.message and time.monotonic() - start < 4.5
    assert not err.transient and origin.server.routes["/slow"].hits == 2
    # Retries never outlast the deadline, however many are allowed.
    origin.add("/slower", body=data, stall_s=5.0)
    bounded = quick.replace(fetch_retries=20, fetch_deadline_s=2.0)
    start = time.monotonic()
    err = fail(ErrorCode.SOURCE_TIMEOUT, fetch.fetch_video, origin.base + "/slower", scratch,
               bounded)  # fmt: skip
    assert time.monotonic() - start < bounded.fetch_deadline_s + 1.0
    assert 2 <= origin.server.routes["/slower"].hits <= 4


# ---------------------------------------------------------------------------
# Sources that stall, trickle or lie about their length.
# ---------------------------------------------------------------------------
Behave = Callable[[socket.socket, threading.Event], None]


class RawOrigin:
    """A real TCP server on loopback answering every request with ``behave(conn, stop)``.

    ``behave`` writes the HTTP answer by hand (headers, some body, pauses); ``stop`` is
    set when the test ends, so a source that "stalls forever" ends with it.
    """

    def __init__(self, behave: Behave) -> None:
        self.behave = behave
        self.hits = 0
        self.stop = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._serve, daemon=True)
        self._accept.start()

    def url(self, path: str = "/v.avi") -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}{path}"

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.hits += 1
            t = threading.Thread(target=self._one, args=(conn,), daemon=True)
            t.start()
            self.threads.append(t)

    def _one(self, conn: socket.socket) -> None:
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                request += chunk
            with contextlib.suppress(OSError):  # the client hung up: what the tests want
                self.behave(conn, self.stop)

    def close(self) -> None:
        self.stop.set()
        self._accept.join(5)
        self.sock.close()
        for t in self.threads:
            t.join(5)


@pytest.fixture
def raw() -> Iterator[Callable[[Behave], RawOrigin]]:
    made: list[RawOrigin] = []

    def make(behave: Behave) -> RawOrigin:
        made.append(RawOrigin(behave))
        return made[-1]

    yield make
    for o in made:
        o.close()


def head(length: int) -> bytes:
    return f"HTTP/1.1 200 OK\r\nContent-Length: {length}\r\n\r\n".encode()


@pytest.fixture
def quick(wsettings: Settings) -> Settings:
    """A 5 s deadline, and 64 KiB/s over a 1 s window (so a stall shows within ~1 s)."""
    return wsettings.replace(
        fetch_deadline_s=5.0, fetch_rate_window_s=1.0, fetch_min_rate_bps=64 * 1024
    )


def timed(fn: Callable[[], object]) -> float:
    start = time.monotonic()
    fn()
    return time.monotonic() - start


def test_a_stalled_source_is_source_timeout_within_the_deadline(
    raw: Callable[[Behave], RawOrigin], quick: Settings, clips: Clips, tmp_path: Path
) -> None:
    # 400 KiB: the half sent at once keeps the rate above 64 KiB/s until the stall shows
    data = clips.tiny.read_bytes().ljust(400 * 1024, b"\0")

    def half_then_stall(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(head(len(data)) + data[: len(data) // 2])
        stop.wait(30)

    src = raw(half_then_stall)
    errs: list[ClipError] = []
    took = timed(lambda: errs.append(fail(ErrorCode.SOURCE_TIMEOUT, fetch.fetch_video, src.url(),
                                          tmp_path, quick)))  # fmt: skip
    err = errs[0]
    assert "stalled" in err.message and f"{len(data) // 2} of {len(data)} bytes" in err.message
    assert not err.transient  # the job does not try it again
    assert src.hits == 1  # a stall mid-body is not retried within the fetch either
    assert took < quick.fetch_deadline_s
    # Without a minimum rate, the deadline ends the read that the read timeout lets block.
    src = raw(half_then_stall)
    only_deadline = quick.replace(
        fetch_min_rate_bps=0, fetch_read_timeout_s=30.0, fetch_deadline_s=1.5
    )
    took = timed(lambda: errs.append(fail(ErrorCode.SOURCE_TIMEOUT, fetch.fetch_video, src.url(),
                                          tmp_path, only_deadline)))  # fmt: skip
    assert "deadline of 1.5 s" in errs[-1].message and not errs[-1].transient
    assert took < only_deadline.fetch_deadline_s + 1.0 and src.hits == 1


def test_a_trickling_source_is_too_slow_and_a_paced_one_passes(
    raw: Callable[[Behave], RawOrigin], quick: Settings, clips: Clips, tmp_path: Path
) -> None:
    data = clips.tiny.read_bytes()

    def trickle(conn: socket.socket, stop: threading.Event) -> None:  # 10 KiB/s
        conn.sendall(head(len(data)))
        for i in range(0, len(data), 1024):
            conn.sendall(data[i : i + 1024])
            if stop.wait(0.1):
                return

    src = raw(trickle)
    errs: list[ClipError] = []
    took = timed(lambda: errs.append(fail(ErrorCode.SOURCE_TOO_SLOW, fetch.fetch_video, src.url(),
                                          tmp_path, quick)))  # fmt: skip
    assert "too slow" in errs[0].message and "minimum is 64 KiB/s" in errs[0].message
    assert not errs[0].transient and src.hits == 1
    assert took < quick.fetch_deadline_s
    # 500 KiB in 25 KiB pieces every 0.1 s (~250 KiB/s): above the minimum, accepted.
    body = data + bytes(500 * 1024 - len(data))

    def paced(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(head(len(body)))
        for i in range(0, len(body), 25 * 1024):
            conn.sendall(body[i : i + 25 * 1024])
            if stop.wait(0.1):
                return

    src = raw(paced)
    path, kind = fetch.fetch_video(src.url(), tmp_path, quick)
    assert kind == "avi" and path.read_bytes() == body and src.hits == 1


def test_a_wrong_content_length_is_source_truncated_or_a_stall(
    raw: Callable[[Behave], RawOrigin], quick: Settings, clips: Clips, tmp_path: Path
) -> None:
    data = clips.tiny.read_bytes().ljust(400 * 1024, b"\0")

    def lie_then_close(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(head(2 * len(data)) + data)

    src = raw(lie_then_close)
    err = fail(ErrorCode.SOURCE_TRUNCATED, fetch.fetch_video, src.url(), tmp_path, quick)
    assert f"after {len(data)} of the {2 * len(data)} bytes it declared" in err.message
    assert not err.transient
    assert src.hits == quick.fetch_retries + 1  # a cut transfer may be a blip: retried
    assert not (tmp_path / "video").exists() or (tmp_path / "video").stat().st_size < 2 * len(data)

    def lie_then_stall(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(head(2 * len(data)) + data)
        stop.wait(30)

    src = raw(lie_then_stall)
    errs: list[ClipError] = []
    took = timed(lambda: errs.append(fail(ErrorCode.SOURCE_TIMEOUT, fetch.fetch_video, src.url(),
                                          tmp_path, quick)))  # fmt: skip
    assert f"{len(data)} of {2 * len(data)} bytes received" in errs[0].message
    assert took < quick.fetch_deadline_s and src.hits == 1


def test_a_trickling_source_fails_the_job_at_its_first_attempt(
    raw: Callable[[Behave], RawOrigin],
    quick: Settings,
    redis_client: redis.Redis,
    clips: Clips,
    tmp_path: Path,
) -> None:
    def trickle(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(head(1 << 20))
        while not stop.wait(0.2):
            conn.sendall(b"\0" * 512)

    src = raw(trickle)
    img = tmp_path / "p.jpg"
    img.write_bytes(clips.product.read_bytes())
    runner = JobRunner(quick.replace(max_attempts=5), redis_client)
    try:
        job_id = runner.store.create(JobSpec(video_url=src.url(), image_urls=[str(img)]))[0]
        result = runner.run(job_id)
        assert result.outcome == Outcome.FAILED and result.attempt == 1
        job = runner.store.get(job_id)
        assert job is not None and job.state == JobState.FAILED and job.attempt == 1
        assert job.error is not None and job.error.code == "source_too_slow"
        assert src.hits == 1
    finally:
        runner.gpu.producer.close()


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
        # IPv6 forms that embed a refused IPv4 address
        "http://[2002:a9fe:a9fe::]/latest/meta-data/",
        "http://[64:ff9b::a9fe:a9fe]/",
        "http://[2001:0:4136:e378:8000:63bf:5601:5601]/",
        "http://[2606:4700::200:5efe:a9fe:a9fe]/",
        "http://[::a9fe:a9fe]/",
        # numeric host names: decimal, hex, octal, short forms of 169.254.169.254
        "http://2852039166/latest/meta-data/",
        "http://0xA9FEA9FE/",
        "http://0251.0376.0251.0376/",
        "http://169.254.43518/",
        "http://0x7f.1/v.mp4",
    ):
        err = fail(ErrorCode.FORBIDDEN_SOURCE, fetch.fetch_video, u, scratch, strict)
        assert "refusing" in err.message, u
    assert origin.server.routes["/ok.avi"].hits == 0  # nothing was ever requested
    # Allowed explicitly: loopback works, private networks still do not.
    allowed = strict.replace(allow_loopback=True)
    fetch.fetch_video(url, scratch, allowed)
    (scratch / "video").unlink()
    # a numeric host is the address it spells, checked and then connected to
    fetch.fetch_video(url.replace("127.0.0.1", "0x7f000001"), scratch, allowed)
    (scratch / "video").unlink()
    fetch.fetch_video(url.replace("127.0.0.1", "017700000001"), scratch, allowed)
    (scratch / "video").unlink()
    assert origin.server.routes["/ok.avi"].hits == 3
    fail(ErrorCode.FORBIDDEN_SOURCE, fetch.fetch_video, "http://10.0.0.8/v", scratch, allowed)
    # ... and the metadata address stays refused even with private networks allowed
    both = allowed.replace(allow_private_networks=True)
    fail(ErrorCode.FORBIDDEN_SOURCE, fetch.fetch_video, "http://169.254.169.254/", scratch, both)
    for u in ("http://[2002:a9fe:a9fe::]/", "http://2852039166/", "http://[64:ff9b:1::a9fe:a9fe]/"):
        err = fail(ErrorCode.FORBIDDEN_SOURCE, fetch.fetch_video, u, scratch, both)
        assert "metadata" in err.message, u
    # a host that looks numeric but is no address is a bad request, not a DNS lookup
    for u in ("http://256.1.1.1/v.mp4", "http://09.1.1.1/v.mp4", "http://4294967296/"):
        fail(ErrorCode.INVALID_REQUEST, fetch.fetch_video, u, scratch, both)
    fail(ErrorCode.INVALID_REQUEST, fetch.fetch_video, "http://127.0.0.1:99999/", scratch, both)


def test_named_private_hosts_only_open_their_own_private_addresses() -> None:
    """``private_hosts`` lets one trusted name (a cluster Service) resolve to a private
    address; other names and literal private addresses stay refused, and the name never
    opens loopback or metadata addresses (no DNS involved: literals and /etc/hosts'
    ``localhost``)."""
    s = Settings(private_hosts="media.ns.svc, localhost")
    with pytest.raises(ClipError) as err:
        fetch.resolve_checked("10.0.0.8", 80, s)  # a literal is no trusted name
    assert err.value.code == ErrorCode.FORBIDDEN_SOURCE
    with pytest.raises(ClipError) as err:
        fetch.resolve_checked("localhost", 80, s)  # loopback stays loopback
    assert err.value.code == ErrorCode.FORBIDDEN_SOURCE and "loopback" in err.value.message
    assert fetch._named_private("MEDIA.ns.svc.", s) and not fetch._named_private("media.ns", s)
    assert not fetch._named_private("", Settings())
    # a trusted name judged by the private-network rule only: 10/8 passes, metadata not
    relaxed = s.replace(allow_private_networks=True)
    assert fetch.check_address(ipaddress.ip_address("10.0.0.8"), relaxed) is None
    assert fetch.check_address(ipaddress.ip_address("169.254.169.254"), relaxed)


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
        "64:ff9b::8.8.8.8": None,  # NAT64 to a public address
        "2606:4700::200:5efe:808:808": None,  # ISATAP with a public address
    }
    for addr, why in cases.items():
        got = fetch.check_address(ipaddress.ip_address(addr), s)
        assert (got is None) if why is None else (got is not None and why in got), (addr, got)
    assert fetch.check_address(ipaddress.ip_address("::1"), s.replace(allow_loopback=True)) is None


def test_ipv6_forms_embedding_a_refused_ipv4_address_are_refused() -> None:
    """Each transition form, with private networks allowed: the embedded address decides."""
    lenient = Settings(allow_private_networks=True)
    metadata = {
        "::ffff:169.254.169.254": "IPv4-mapped",
        "::ffff:0:a9fe:a9fe": "IPv4-translated",
        "::a9fe:a9fe": "IPv4-compatible",
        "2002:a9fe:a9fe::": "6to4",
        "2002:a9fe:a9fe:1:2:3:4:5": "6to4 with a subnet and host",
        "2001:0:4136:e378:8000:63bf:5601:5601": "Teredo client (bits inverted)",
        "2001:0:a9fe:a9fe::f7f7:f7f7": "Teredo server",
        "64:ff9b::a9fe:a9fe": "NAT64 well-known prefix",
        "64:ff9b:1::a9fe:a9fe": "NAT64 local-use, /96",
        "64:ff9b:1:0:a9:fea9:fe00:0": "NAT64 local-use, /64",
        "64:ff9b:1:a9:fe:a9fe::": "NAT64 local-use, /56",
        "64:ff9b:1:a9fe:a9:fe00::": "NAT64 local-use, /48",
        "2606:4700::5efe:a9fe:a9fe": "ISATAP (local)",
        "2606:4700::200:5efe:a9fe:a9fe": "ISATAP (global)",
    }
    for addr, form in metadata.items():
        got = fetch.check_address(ipaddress.ip_address(addr), lenient)
        assert got is not None and "metadata" in got and "169.254.169.254" in got, (form, got)
    for addr in ("2002:7f00:1::", "64:ff9b::127.0.0.1", "2606:4700::200:5efe:7f00:1"):
        got = fetch.check_address(ipaddress.ip_address(addr), lenient)
        assert got is not None and "loopback" in got, (addr, got)
    for addr in ("2002:a00:1::", "64:ff9b::10.0.0.1", "2001:0:4136:e378:8000:63bf:f5ff:fefe"):
        got = fetch.check_address(ipaddress.ip_address(addr), Settings())
        assert got is not None and "private" in got, (addr, got)
    # local-use NAT64 to a public address: a private network of its own
    assert fetch.check_address(ipaddress.ip_address("64:ff9b:1::808:808"), lenient) is None
    assert "private" in (fetch.check_address(ipaddress.ip_address("64:ff9b:1::808:808"), Settings())
                         or "")  # fmt: skip


def test_numeric_host_names_are_the_addresses_they_spell() -> None:
    forms = {
        "2852039166": "169.254.169.254",
        "0xA9FEA9FE": "169.254.169.254",
        "0xa9.0xfe.0xa9.0xfe": "169.254.169.254",
        "0251.0376.0251.0376": "169.254.169.254",
        "169.254.43518": "169.254.169.254",
        "169.16689662": "169.254.169.254",
        "0x7f.1": "127.0.0.1",
        "127.1": "127.0.0.1",
        "017700000001": "127.0.0.1",
        "10.0.0.1.": "10.0.0.1",
    }
    for host, want in forms.items():
        assert str(fetch.numeric_ipv4(host)) == want, host
        # the system resolver reads them the same way (so do browsers: WHATWG URL rules);
        # with a trailing dot it asks DNS instead, which the check no longer needs
        if not host.endswith("."):
            assert socket.getaddrinfo(host, 80, type=socket.SOCK_STREAM)[0][4][0] == want, host
        err = fail(ErrorCode.FORBIDDEN_SOURCE, fetch.resolve_checked, host, 80, Settings())
        assert want in err.message
    for name in ("example.com", "1e100.net", "1.2.3.4.5", "0x1.example"):
        assert fetch.numeric_ipv4(name) is None, name
