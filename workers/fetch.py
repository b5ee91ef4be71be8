"""Fetch stage: bring a job's video and product images into node-local scratch files.

Sources are http(s) URLs or local paths (plain or ``file://``). Local paths are
accepted only under the configured roots (``CLIPLINE_LOCAL_ROOTS``). URLs are streamed
with a size cap and connect/read timeouts, retried with exponential backoff on
transient errors (5xx, 429, connection resets), and checked against SSRF: a host that
resolves to a loopback, private, link-local, reserved or cloud-metadata address is
refused unless configuration allows it (``CLIPLINE_ALLOW_LOOPBACK``,
``CLIPLINE_ALLOW_PRIVATE_NETWORKS``). The resolved address is the one connected to,
so a DNS answer cannot change between the check and the request.

Content is sniffed from its first bytes: a video must be a known container (a renamed
text file is ``not_a_video``), an image a known image format. A product image must
also decode, and its header may not announce more than :data:`MAX_IMAGE_PIXELS`
pixels (a small compressed file can expand to gigabytes): ``too_large``.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import shutil
import socket
import ssl
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


def check_address(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address, settings: Settings
) -> str | None:
    """Why connecting to ``ip`` is refused, or None if it is allowed."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    if ip in _METADATA_IPS:
        return "a cloud metadata address"
    if ip.is_loopback:
        return None if settings.allow_loopback else "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast or ip.is_unspecified or ip.is_reserved:
        return "a reserved address"
    if ip.is_private or not ip.is_global:
        return None if settings.allow_private_networks else "a private-network address"
    return None


def resolve_checked(host: str, port: int, settings: Settings) -> str:
    """Resolve ``host`` and return an address that passes the SSRF rules."""
    if host.lower().rstrip(".") in _METADATA_HOSTS:
        raise ClipError(
            ErrorCode.FORBIDDEN_SOURCE, f"refusing to fetch from metadata host {host!r}"
        )
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ClipError(
            ErrorCode.FETCH_FAILED, f"cannot resolve host {host!r}: {exc}", transient=False
        ) from exc
    addrs = []
    for info in infos:
        ip = ipaddress.ip_address(info[4][0])
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
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
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
    try:
        resolved = path.resolve(strict=True)
    except (FileNotFoundError, NotADirectoryError):
        raise ClipError(ErrorCode.NOT_FOUND, f"{what} file {str(path)!r} does not exist") from None
    except OSError as exc:
        raise ClipError(
            ErrorCode.NOT_FOUND, f"cannot open {what} file {str(path)!r}: {exc}"
        ) from None
    roots = settings.local_root_paths
    if not any(resolved == r or r in resolved.parents for r in roots):
        raise ClipError(
            ErrorCode.FORBIDDEN_SOURCE,
            f"{what} path {str(path)!r} is outside the allowed local directories "
            "(set CLIPLINE_LOCAL_ROOTS)",
        )
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


def _download(url: str, dest: Path, settings: Settings, cap: int, what: str) -> Path:
    attempts = max(1, settings.fetch_retries + 1)
    last: ClipError | None = None
    for attempt in range(attempts):
        target, headers, extensions = pinned(url, settings)
        try:
            _stream(target, headers, extensions, dest, settings, cap, what)
            return dest
        except ClipError as exc:
            if not exc.transient:
                raise
            last = exc
        if attempt + 1 < attempts:
            time.sleep(min(8.0, 0.25 * 2**attempt))
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


def _stream(
    target: str,
    headers: dict[str, str],
    extensions: dict[str, Any],
    dest: Path,
    settings: Settings,
    cap: int,
    what: str,
) -> None:
    timeout = httpx.Timeout(settings.fetch_read_timeout_s, connect=settings.fetch_connect_timeout_s)
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
            declared = resp.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > cap:
                raise ClipError(
                    ErrorCode.TOO_LARGE, f"{what} is {declared} bytes; the limit is {cap}"
                )
            size = 0
            with open(dest, "wb") as fh:
                for block in resp.iter_bytes(1 << 20):
                    size += len(block)
                    if size > cap:
                        raise ClipError(
                            ErrorCode.TOO_LARGE, f"{what} exceeds the limit of {cap} bytes"
                        )
                    fh.write(block)
    except httpx.TimeoutException as exc:
        raise ClipError(ErrorCode.FETCH_FAILED, f"timed out fetching the {what}: {exc}") from exc
    except httpx.TransportError as exc:
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
