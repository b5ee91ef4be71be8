"""Fetch stage: bring a job's video and product images into node-local scratch files.

Sources are http(s) URLs or local paths (plain or ``file://``). Local paths are
accepted only under the configured roots (``CLIPLINE_LOCAL_ROOTS``); a path outside
them is ``forbidden_source`` whether or not it exists. URLs are streamed
with a size cap and connect/read timeouts, retried with exponential backoff on
transient errors (5xx, 429, connection resets), and checked against SSRF: a host that
resolves to a loopback, private, link-local, reserved or cloud-metadata address is
refused unless configuration allows it (``CLIPLINE_ALLOW_LOOPBACK``,
``CLIPLINE_ALLOW_PRIVATE_NETWORKS``). An IPv6 address that embeds an IPv4 address
(IPv4-mapped, -compatible and -translated, 6to4, Teredo, NAT64, ISATAP) is refused when
the embedded address is; a numeric host in any form ``inet_aton`` reads
(``2852039166``, ``0xA9FEA9FE``, ``0251.0376.0251.0376``) is that address. The checked
address is the one connected to, so a DNS answer cannot change between the check and
the request.

Each source has a deadline (``fetch_deadline_s``) covering its connects, retries and
whole body, and a body must keep up a minimum rate (``fetch_min_rate_bps``) over a
sliding window (``fetch_rate_window_s``, also the grace after the response headers): a
watchdog thread ends the request when either is missed. A source that stalls or misses
the deadline fails with ``source_timeout``, one that trickles with ``source_too_slow``,
one that closes before the length it declared with ``source_truncated``. Read timeouts
and truncations are retried within the deadline; none of the three is retried by the
job (:data:`clipline_core.errors.TRANSIENT_CODES`), so a bad source holds a worker for
at most one deadline.

Content is sniffed from its first bytes: a video must be a known container (a renamed
text file is ``not_a_video``), an image a known image format. A product image must
also decode, and its header may not announce more than :data:`MAX_IMAGE_PIXELS`
pixels (a small compressed file can expand to gigabytes): ``too_large``.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import ipaddress
import math
import os
import re
import shutil
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from clipline_core.errors import ClipError, ErrorCode
from clipline_core.settings import Settings

_METADATA_HOSTS = {"metadata.google.internal", "metadata", "instance-data"}
_METADATA_IPS = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
SNIFF_BYTES = 64


def sniff_video(head: bytes) -> str | None:
    """Container name for a video's first bytes, or None if it is not one we know."""
    if len(head) >= 12 and head[4:8] == b"ftyp":
        return "mp4"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if head[:3] == b"FLV":
        return "flv"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:4] == b"\x00\x00\x01\xba":
        return "mpeg-ps"
    if len(head) >= 1 and head[0] == 0x47 and (len(head) < 189 or head[188] == 0x47):
        return "mpeg-ts" if len(head) >= 189 else None
    if len(head) >= 8 and head[4:8] in (b"moov", b"mdat", b"wide", b"free", b"skip"):
        return "quicktime"
    if head[:4] == b"\x30\x26\xb2\x75":
        return "asf"
    return None


def sniff_image(head: bytes) -> str | None:
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:2] == b"BM":
        return "bmp"
    return None


def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def local_path(source: str) -> Path | None:
    """The local path a source names, or None if it is a URL."""
    if source.startswith("file://"):
        return Path(urllib.parse.unquote(urllib.parse.urlparse(source).path))
    if _is_url(source):
        return None
    if "://" in source:
        raise ClipError(
            ErrorCode.INVALID_REQUEST, f"unsupported URL scheme in {source!r}; use http(s)"
        )
    return Path(source)


_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64_WELL_KNOWN = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052
_NAT64_LOCAL_USE = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")  # never an address NAT64 translates to
_LOW32 = 0xFFFFFFFF


def _rfc6052_ipv4(n: int, prefix_len: int) -> ipaddress.IPv4Address:
    """The IPv4 address an RFC 6052 address with a ``prefix_len`` prefix embeds."""
    if prefix_len >= 96:
        return ipaddress.IPv4Address(n & _LOW32)
    stream = ((n >> 64) << 56) | (n & ((1 << 56) - 1))  # bits 64-71 (the "u" octet) out
    return ipaddress.IPv4Address((stream >> (120 - prefix_len - 32)) & _LOW32)


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """Every IPv4 address ``ip`` carries in a standard IPv6 transition form."""
    n = int(ip)
    found: list[ipaddress.IPv4Address] = []
    if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d
        found.append(ip.ipv4_mapped)
    if n >> 32 == 0xFFFF0000:  # IPv4-translated ::ffff:0:a.b.c.d (RFC 2765)
        found.append(ipaddress.IPv4Address(n & _LOW32))
    if n >> 32 == 0 and n > 1:  # IPv4-compatible ::a.b.c.d (not :: or ::1)
        found.append(ipaddress.IPv4Address(n & _LOW32))
    if ip.sixtofour is not None:  # 2002:AABB:CCDD::/48
        found.append(ip.sixtofour)
    if ip.teredo is not None:  # 2001::/32: server, and the client (its bits inverted)
        found.extend(ip.teredo)
    if ip in _NAT64_WELL_KNOWN:
        found.append(ipaddress.IPv4Address(n & _LOW32))
    if ip in _NAT64_LOCAL_USE:  # any RFC 6052 prefix inside the /48 may be in use
        for length in (48, 56, 64, 96):
            inner = _rfc6052_ipv4(n, length)
            if inner not in _THIS_NETWORK:  # zero bits read at the wrong length
                found.append(inner)
    if (n >> 32) & 0xFCFFFFFF == 0x00005EFE:  # ISATAP interface id ::0:5efe:a.b.c.d
        found.append(ipaddress.IPv4Address(n & _LOW32))
    return found


def _translated(ip: ipaddress.IPv6Address) -> bool:
    """Whether ``ip`` stands for its embedded IPv4 address alone (mapping, NAT64)."""
    return ip.ipv4_mapped is not None or int(ip) >> 32 == 0xFFFF0000 or ip in _NAT64_WELL_KNOWN


def _check_one(ip: _IPAddress, settings: Settings) -> str | None:
    if ip in _METADATA_IPS:
        return "a cloud metadata address"
    if ip.is_loopback:
        return None if settings.allow_loopback else "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip in _NAT64_LOCAL_USE:
        return None if settings.allow_private_networks else "a private-network address"
    if ip.is_multicast or ip.is_unspecified or ip.is_reserved:
        return "a reserved address"
    if ip.is_private or not ip.is_global:
        return None if settings.allow_private_networks else "a private-network address"
    return None


def check_address(ip: _IPAddress, settings: Settings) -> str | None:
    """Why connecting to ``ip`` is refused, or None if it is allowed.

    An IPv6 address is refused when any IPv4 address it embeds is; one that only
    translates to IPv4 (IPv4-mapped, NAT64's well-known prefix) is judged by that
    address alone, the others (6to4, Teredo, ISATAP, ...) by both.
    """
    if isinstance(ip, ipaddress.IPv6Address):
        for inner in embedded_ipv4(ip):
            why = _check_one(inner, settings)
            if why:
                return f"{why} ({inner}) embedded in an IPv6 address"
        if _translated(ip):
            return None
    return _check_one(ip, settings)


_NUMERIC_PART = re.compile(r"0x[0-9a-f]*|[0-9]+", re.IGNORECASE)


def numeric_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address a numeric host spells, in any form ``inet_aton`` reads, or None.

    One to four parts, each decimal, octal (leading 0) or hex (``0x``), the last one
    filling the remaining bytes: ``2852039166``, ``0xA9FEA9FE``, ``0251.0376.0251.0376``
    and ``169.254.43518`` are all 169.254.169.254 (the WHATWG URL rules read them the
    same way). A host that looks numeric but does not fit is an invalid request.
    """
    parts = host.split(".")
    if len(parts) > 1 and parts[-1] == "":
        parts.pop()  # one trailing dot, as in a fully qualified name
    if not 1 <= len(parts) <= 4 or not all(_NUMERIC_PART.fullmatch(p) for p in parts):
        return None
    invalid = ClipError(ErrorCode.INVALID_REQUEST, f"{host!r} is not a valid IPv4 address")
    try:
        values = [
            int(p[2:] or "0", 16) if p[:2].lower() == "0x" else int(p, 8 if p[0] == "0" else 10)
            for p in parts
        ]
    except ValueError:  # e.g. "09": a malformed octal part
        raise invalid from None
    *head, last = values
    if any(v > 255 for v in head) or last >> (8 * (5 - len(values))):
        raise invalid
    n = last
    for i, v in enumerate(head):
        n |= v << (8 * (3 - i))
    return ipaddress.IPv4Address(n)


def _literal(host: str) -> _IPAddress | None:
    """The address a host names literally (IPv6, or IPv4 in any numeric form), or None."""
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host)
        except ValueError:
            return None
    return numeric_ipv4(host)


def _named_private(host: str, settings: Settings) -> bool:
    """Whether ``host`` is one of the names allowed to resolve to private networks."""
    names = {n.strip().lower().rstrip(".") for n in settings.private_hosts.split(",")}
    return host.lower().rstrip(".") in names - {""}


def resolve_checked(host: str, port: int, settings: Settings) -> str:
    """Resolve ``host`` and return an address that passes the SSRF rules."""
    if host.lower().rstrip(".") in _METADATA_HOSTS:
        raise ClipError(
            ErrorCode.FORBIDDEN_SOURCE, f"refusing to fetch from metadata host {host!r}"
        )
    if not settings.allow_private_networks and _named_private(host, settings):
        settings = settings.replace(allow_private_networks=True)
    literal = _literal(host)
    if literal is not None:
        ips: list[_IPAddress] = [literal]
    else:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ClipError(
                ErrorCode.FETCH_FAILED, f"cannot resolve host {host!r}: {exc}", transient=False
            ) from exc
        ips = [ipaddress.ip_address(info[4][0]) for info in infos]
    addrs = []
    for ip in ips:
        why = check_address(ip, settings)
        if why:
            raise ClipError(
                ErrorCode.FORBIDDEN_SOURCE,
                f"refusing to fetch from {host!r}: it resolves to {why} ({ip})",
            )
        addrs.append(str(ip))
    if not addrs:
        raise ClipError(ErrorCode.FETCH_FAILED, f"host {host!r} has no address", transient=False)
    return addrs[0]


def check_url(url: str, settings: Settings) -> str:
    """Validate an outbound URL (fetch, callback, upload); return the checked address."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ClipError(ErrorCode.INVALID_REQUEST, f"not an http(s) URL: {url!r}")
    try:
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
    except ValueError as exc:  # a port out of range or not a number
        raise ClipError(ErrorCode.INVALID_REQUEST, f"bad port in {url!r}: {exc}") from None
    return resolve_checked(parsed.hostname, port, settings)


def pinned(url: str, settings: Settings) -> tuple[str, dict[str, str], dict[str, Any]]:
    """Check ``url`` (SSRF rules) and aim it at the checked address.

    Returns the URL to request (host replaced by the checked IP address), the headers
    that keep the original ``Host``, and the httpx extensions that keep the original
    name for TLS (SNI and certificate checks).
    """
    address = check_url(url, settings)
    parsed = urllib.parse.urlparse(url)
    host = f"[{address}]" if ":" in address else address
    netloc = host + (f":{parsed.port}" if parsed.port else "")
    target = urllib.parse.urlunparse(parsed._replace(netloc=netloc))
    headers = {"Host": parsed.netloc.rsplit("@", 1)[-1]}
    extensions: dict[str, Any] = (
        {"sni_hostname": parsed.hostname} if parsed.scheme == "https" else {}
    )
    return target, headers, extensions


def _copy_local(path: Path, dest: Path, settings: Settings, cap: int, what: str) -> Path:
    # The roots are checked before the file is looked at, on the path with its existing
    # links followed: a path outside them is refused the same way (code and message)
    # whether or not it exists, so the answer cannot probe the filesystem.
    roots = settings.local_root_paths

    def inside(p: Path) -> bool:
        return any(p == r or r in p.parents for r in roots)

    outside = ClipError(
        ErrorCode.FORBIDDEN_SOURCE,
        f"{what} path {str(path)!r} is outside the directories local files are accepted "
        "from (allow one with `clipline up --allow-dir DIR` or CLIPLINE_LOCAL_ROOTS)",
    )
    if not inside(path.resolve()):
        raise outside
    try:
        resolved = path.resolve(strict=True)
    except (FileNotFoundError, NotADirectoryError):
        raise ClipError(ErrorCode.NOT_FOUND, f"{what} file {str(path)!r} does not exist") from None
    except OSError as exc:
        raise ClipError(
            ErrorCode.NOT_FOUND, f"cannot open {what} file {str(path)!r}: {exc}"
        ) from None
    if not inside(resolved):  # a link changed between the two looks
        raise outside
    if not resolved.is_file():
        raise ClipError(ErrorCode.NOT_FOUND, f"{what} path {str(path)!r} is not a regular file")
    size = resolved.stat().st_size
    if size > cap:
        raise ClipError(ErrorCode.TOO_LARGE, f"{what} is {size} bytes; the limit is {cap} bytes")
    try:
        os.link(resolved, dest)  # same filesystem: no copy at all
    except OSError:
        shutil.copyfile(resolved, dest)
    return dest


_TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}


class _TryAgain(Exception):
    """A failure the fetch retries within its deadline; ``error`` if it cannot."""

    def __init__(self, error: ClipError) -> None:
        super().__init__(error.message)
        self.error = error


def _download(url: str, dest: Path, settings: Settings, cap: int, what: str) -> Path:
    limit = settings.fetch_deadline_s
    deadline = time.monotonic() + limit if limit > 0 else math.inf
    attempts = max(1, settings.fetch_retries + 1)
    last: ClipError | None = None
    for attempt in range(attempts):
        if attempt:
            pause = min(8.0, 0.25 * 2 ** (attempt - 1))
            if time.monotonic() + pause >= deadline:
                break  # no time left for another try: the last error stands
            time.sleep(pause)
        target, headers, extensions = pinned(url, settings)
        try:
            _stream(target, headers, extensions, dest, settings, cap, what, deadline)
            return dest
        except _TryAgain as again:
            last = again.error
        except ClipError as exc:
            if not exc.transient:
                raise
            last = exc
    assert last is not None
    raise last


@functools.cache
def tls_context() -> ssl.SSLContext:
    """This process's TLS context for outgoing requests, built once.

    Building one loads the CA bundle, about 16 ms of CPU: more than a whole small
    download, and httpx builds a fresh one for every client it is not given one.
    """
    return httpx.create_ssl_context()


def http_client(timeout: httpx.Timeout) -> httpx.Client:
    """A client for one request: redirects not followed, the shared TLS context."""
    return httpx.Client(timeout=timeout, follow_redirects=False, verify=tls_context())


class _Guard:
    """Watches one request from a thread: ends it at the fetch deadline, or when its body
    stalls (nothing for the window) or arrives slower than the minimum rate over it.

    It ends a request by shutting its socket down, which wakes a blocked read at once;
    the fetching thread then raises :attr:`error`. It learns the socket from httpx's
    ``trace`` extension (:meth:`trace`) and forgets it before the connection closes, so
    it never touches a socket that is gone.
    """

    def __init__(self, deadline: float, settings: Settings, what: str) -> None:
        self.deadline = deadline
        self.min_rate = max(0, settings.fetch_min_rate_bps)
        self.window = max(0.0, settings.fetch_rate_window_s)
        self.limit_s = settings.fetch_deadline_s
        self.what = what
        self.received = 0  # body bytes so far (as sent), set by the fetching thread ...
        self.moved_at = 0.0  # ... with the time they last grew
        self.declared: int | None = None
        self.error: ClipError | None = None
        self._lock = threading.Lock()
        self._stream: Any = None
        self._body_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fetch-guard", daemon=True)

    def __enter__(self) -> _Guard:
        if self.deadline < math.inf or self.min_rate:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._stream = None
        self._stop.set()

    def trace(self, event: str, info: dict[str, Any]) -> None:
        """httpx's ``trace`` extension: keep the connection's stream while it is open."""
        with self._lock:
            if event in ("connection.connect_tcp.complete", "connection.start_tls.complete"):
                self._stream = info.get("return_value")
                if self.error is not None:
                    self._shutdown()
            elif event.endswith(".failed") or event == "http11.response_closed.started":
                self._stream = None

    def body_started(self, declared: int | None) -> None:
        self.declared = declared
        self.moved_at = self._body_at = time.monotonic()

    def moved(self, received: int) -> None:
        self.received = received
        self.moved_at = time.monotonic()

    def progress(self) -> str:
        if self.declared is None:
            return f"{self.received} bytes received"
        return f"{self.received} of {self.declared} bytes received"

    def _run(self) -> None:
        samples: collections.deque[tuple[float, int]] = collections.deque()
        tick = min(0.25, self.window / 10) if self.min_rate and self.window else math.inf
        while True:
            now = time.monotonic()
            if now >= self.deadline:
                self._trip(
                    ErrorCode.SOURCE_TIMEOUT,
                    f"the {self.what} did not arrive within the fetch deadline of "
                    f"{self.limit_s:g} s ({self.progress()})",
                )
                return
            body_at = self._body_at
            if body_at is not None and tick < math.inf:
                received, moved_at = self.received, self.moved_at
                if not samples:
                    samples.append((body_at, 0))
                samples.append((now, received))
                while len(samples) > 1 and samples[1][0] <= now - self.window:
                    samples.popleft()  # keep the last sample at or before the window's start
                if now - body_at >= self.window:
                    since, base = samples[0]
                    rate = (received - base) / (now - since)
                    if now - moved_at >= self.window:
                        self._trip(
                            ErrorCode.SOURCE_TIMEOUT,
                            f"the {self.what} source stalled: nothing arrived for "
                            f"{self.window:g} s ({self.progress()})",
                        )
                        return
                    if rate < self.min_rate:
                        self._trip(
                            ErrorCode.SOURCE_TOO_SLOW,
                            f"the {self.what} source is too slow: {rate / 1024:.1f} KiB/s over "
                            f"the last {self.window:g} s, the minimum is "
                            f"{self.min_rate / 1024:g} KiB/s ({self.progress()})",
                        )
                        return
            if self._stop.wait(min(tick, max(0.0, self.deadline - now))):
                return

    def _trip(self, code: ErrorCode, message: str) -> None:
        with self._lock:
            if self._stop.is_set() or self.error is not None:
                return
            self.error = ClipError(code, message)
            self._shutdown()

    def _shutdown(self) -> None:
        stream = self._stream
        sock = stream.get_extra_info("socket") if stream is not None else None
        if isinstance(sock, socket.socket):
            # The base class's shutdown: a TLS socket's own drops its state under a reader.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def check(self) -> None:
        if self.error is not None:
            raise self.error


def _stream(
    target: str,
    headers: dict[str, str],
    extensions: dict[str, Any],
    dest: Path,
    settings: Settings,
    cap: int,
    what: str,
    deadline: float,
) -> None:
    """One try: GET ``target`` into ``dest`` by ``deadline`` (a ``time.monotonic()``)."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise ClipError(
            ErrorCode.SOURCE_TIMEOUT,
            f"the {what} did not arrive within the fetch deadline of "
            f"{settings.fetch_deadline_s:g} s",
        )
    read_s = min(settings.fetch_read_timeout_s, left)
    timeout = httpx.Timeout(read_s, connect=min(settings.fetch_connect_timeout_s, left))
    # Media is compressed already; identity keeps the rate the rate of what is sent.
    headers = {**headers, "Accept-Encoding": "identity"}
    in_body = False
    with _Guard(deadline, settings, what) as guard:
        extensions = {**extensions, "trace": guard.trace}
        try:
            with (
                http_client(timeout) as client,
                client.stream("GET", target, headers=headers, extensions=extensions) as resp,
            ):
                if resp.status_code in _TRANSIENT_STATUS:
                    raise ClipError(
                        ErrorCode.FETCH_FAILED, f"{what} URL answered HTTP {resp.status_code}"
                    )
                if resp.status_code in (301, 302, 303, 307, 308):
                    raise ClipError(
                        ErrorCode.FETCH_FAILED,
                        f"{what} URL redirects; give the final URL",
                        transient=False,
                    )
                if resp.status_code == 404:
                    raise ClipError(ErrorCode.NOT_FOUND, f"{what} URL answered HTTP 404")
                if resp.status_code >= 400:
                    raise ClipError(
                        ErrorCode.FETCH_FAILED,
                        f"{what} URL answered HTTP {resp.status_code}",
                        transient=False,
                    )
                header = resp.headers.get("content-length")
                declared = int(header) if header and header.isdigit() else None
                if declared is not None and declared > cap:
                    raise ClipError(
                        ErrorCode.TOO_LARGE, f"{what} is {declared} bytes; the limit is {cap}"
                    )
                guard.body_started(declared)
                in_body = True
                size = 0
                with open(dest, "wb") as fh:
                    for block in resp.iter_bytes():
                        guard.moved(resp.num_bytes_downloaded)
                        size += len(block)
                        if size > cap:
                            raise ClipError(
                                ErrorCode.TOO_LARGE, f"{what} exceeds the limit of {cap} bytes"
                            )
                        fh.write(block)
                guard.check()  # a body without a length ends "normally" when cut off
        except httpx.TimeoutException as exc:
            guard.check()
            if not isinstance(exc, httpx.ReadTimeout):
                raise ClipError(
                    ErrorCode.FETCH_FAILED, f"timed out fetching the {what}: {exc}"
                ) from exc
            error = ClipError(
                ErrorCode.SOURCE_TIMEOUT,
                f"timed out fetching the {what}: nothing arrived for {read_s:g} s"
                + (f" ({guard.progress()})" if in_body else ""),
            )
            if time.monotonic() >= deadline:
                raise error from exc
            raise _TryAgain(error) from exc
        except httpx.TransportError as exc:
            guard.check()
            if in_body:
                raise _TryAgain(
                    ClipError(
                        ErrorCode.SOURCE_TRUNCATED,
                        f"the {what} source closed the connection after "
                        f"{guard.received} of the {guard.declared} bytes it declared"
                        if guard.declared is not None
                        else f"the {what} source broke off after {guard.received} bytes: {exc}",
                    )
                ) from exc
            raise ClipError(
                ErrorCode.FETCH_FAILED, f"network error fetching the {what}: {exc}"
            ) from exc


def fetch_to(
    source: str,
    dest: Path,
    settings: Settings,
    *,
    cap: int,
    what: str,
    sniff: Callable[[bytes], str | None],
    bad_code: ErrorCode,
) -> tuple[Path, str]:
    """Fetch ``source`` to ``dest``; return the path and the sniffed format."""
    path = local_path(source)
    if path is not None:
        _copy_local(path, dest, settings, cap, what)
    else:
        _download(source, dest, settings, cap, what)
    size = dest.stat().st_size
    if size == 0:
        raise ClipError(ErrorCode.EMPTY_FILE, f"the {what} file is empty")
    with open(dest, "rb") as fh:
        head = fh.read(512)
    kind = sniff(head)
    if kind is None:
        noun = "a video" if bad_code == ErrorCode.NOT_A_VIDEO else "an image"
        raise ClipError(bad_code, f"the {what} is not {noun} (unrecognised content)")
    return dest, kind


def fetch_video(source: str, scratch: Path, settings: Settings) -> tuple[Path, str]:
    return fetch_to(
        source,
        scratch / "video",
        settings,
        cap=settings.max_video_bytes,
        what="video",
        sniff=sniff_video,
        bad_code=ErrorCode.NOT_A_VIDEO,
    )


#: Largest product image accepted, in pixels (a small file can decode to gigabytes).
MAX_IMAGE_PIXELS = 64_000_000


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from an image's header (JPEG, PNG, GIF, BMP, WebP), or None."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")
    if data[:2] == b"BM" and len(data) >= 26:
        w = int.from_bytes(data[18:22], "little", signed=True)
        h = int.from_bytes(data[22:26], "little", signed=True)
        return abs(w), abs(h)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 30:
        chunk = data[12:16]
        if chunk == b"VP8X":
            w = int.from_bytes(data[24:27], "little") + 1
            h = int.from_bytes(data[27:30], "little") + 1
            return w, h
        if chunk == b"VP8L":
            bits = int.from_bytes(data[21:25], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        if chunk == b"VP8 ":
            return (
                int.from_bytes(data[26:28], "little") & 0x3FFF,
                int.from_bytes(data[28:30], "little") & 0x3FFF,
            )
        return None
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 9 < len(data):
            if data[i] != 0xFF:
                i += 1
                continue
            marker = data[i + 1]
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
                i += 1 if marker == 0xFF else 2
                continue
            length = int.from_bytes(data[i + 2 : i + 4], "big")
            if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD):
                h = int.from_bytes(data[i + 5 : i + 7], "big")
                w = int.from_bytes(data[i + 7 : i + 9], "big")
                return w, h
            i += 2 + length
    return None


def check_image(path: Path, what: str) -> tuple[int, int]:
    """Refuse decompression bombs, then decode the image once: (width, height)."""
    import cv2
    import numpy as np

    with open(path, "rb") as fh:
        head = fh.read(1 << 18)
    size = image_size(head)
    if size is not None and size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise ClipError(
            ErrorCode.TOO_LARGE,
            f"{what} is {size[0]}x{size[1]} pixels; the limit is {MAX_IMAGE_PIXELS} pixels",
        )
    img = cv2.imdecode(np.fromfile(str(path), dtype=np.uint8), cv2.IMREAD_REDUCED_COLOR_4)
    if img is None or img.size == 0:
        raise ClipError(ErrorCode.NOT_AN_IMAGE, f"{what} could not be decoded as an image")
    return size or (img.shape[1] * 4, img.shape[0] * 4)


def fetch_image(source: str, scratch: Path, index: int, settings: Settings) -> Path:
    """Fetch a product image; it must be an image that decodes and is not a bomb."""
    what = f"product image {index + 1}"
    path, _ = fetch_to(
        source,
        scratch / f"image-{index}",
        settings,
        cap=settings.max_image_bytes,
        what=what,
        sniff=sniff_image,
        bad_code=ErrorCode.NOT_AN_IMAGE,
    )
    check_image(path, what)
    return path
