"""Where rendered clips are kept: one small interface, a local directory or an S3 bucket.

Owns :class:`ArtifactStore` (``put(key, path) -> key``, ``stat``, ``read`` (a byte range,
streamed), ``url`` (a presigned GET, S3 only), ``local_path`` (local only), ``delete``,
``expire(older_than_s)``), its two implementations and :func:`open_store`, which picks
one from :class:`clipline_core.settings.Settings`:

* :class:`LocalArtifacts` (``artifact_store = local``, the default): files under
  ``Settings.artifacts_path`` (``<state_dir>/<deployment>/artifacts``). A put copies the
  clip into a hidden temporary file of that directory and renames it into place, so a
  reader never sees half a clip. Right for the local stack, where the API and the
  workers share the machine; on a cluster each pod has its own ``/tmp``, so use S3.
* :class:`S3Artifacts` (``artifact_store = s3``): objects in ``s3_bucket`` under
  ``<s3_prefix>/<deployment>/`` of any S3-compatible store (AWS, MinIO, SeaweedFS, …),
  through ``obstore`` (``pip install clipline[s3]``; chosen over boto3 for its speed and
  light import, see docs/deploy.md). Credentials: ``CLIPLINE_S3_ACCESS_KEY_ID`` /
  ``CLIPLINE_S3_SECRET_ACCESS_KEY`` when set, else the usual ``AWS_*`` variables (and
  web identity / instance credentials). Failing requests are retried with backoff for
  ``s3_retry_timeout_s``; what still fails raises :class:`clipline_core.errors.ClipError`
  ``upload_failed`` (transient unless the store refused: bad credentials, no bucket).

Retention: :meth:`ArtifactStore.expire` deletes clips older than ``artifact_ttl_s``; the
workers' housekeeping (:mod:`workers.monitor`) calls it periodically, and a succeeded job
whose clip is in the store expires with it. Keys are flat names (``<job id>.mp4``,
:func:`clip_key`); a deployment's clips never mix with another's.

Imports only the ground floor (errors, settings); ``obstore`` is imported when an S3
store is opened. Must not import anything else of clipline.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import datetime
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from clipline_core.errors import ClipError, ErrorCode
from clipline_core.settings import Settings

STORES = ("local", "s3")
SERVE_MODES = ("redirect", "stream")
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_PART = ".part-"
_BLOCK = 1 << 20


def clip_key(job_id: str) -> str:
    """The key of a job's clip."""
    return f"{job_id}.mp4"


def check_key(key: str) -> str:
    """``key`` if it is a flat artifact name (no path separators, no leading dot)."""
    if not _KEY_RE.match(key):
        raise ValueError(f"not an artifact key: {key!r}")
    return key


@dataclasses.dataclass(frozen=True)
class ArtifactInfo:
    key: str
    size: int
    modified: float  # unix time of the put
    content_type: str = "video/mp4"


class ArtifactStore(abc.ABC):
    """Rendered clips by key; every method may block (call it off an event loop)."""

    kind: str = ""

    @abc.abstractmethod
    def put(self, key: str, path: Path, content_type: str = "video/mp4") -> str:
        """Store the file at ``path`` under ``key`` (replacing any); return the key."""

    @abc.abstractmethod
    def stat(self, key: str) -> ArtifactInfo | None:
        """What is stored under ``key``, or None."""

    @abc.abstractmethod
    def read(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Bytes ``start`` to ``end`` (exclusive; None: the end) of ``key``, in blocks.

        ``FileNotFoundError`` when nothing is stored under ``key``.
        """

    def url(self, key: str, expires_s: float) -> str | None:
        """A presigned GET URL of ``key`` valid ``expires_s`` seconds; None if the store
        cannot give one (a local directory)."""
        return None

    def local_path(self, key: str) -> Path | None:
        """The file holding ``key`` when the store is a local directory, else None."""
        return None

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key`` (nothing happens when it is not there)."""

    @abc.abstractmethod
    def expire(self, older_than_s: float, now: float | None = None) -> list[str]:
        """Delete everything stored more than ``older_than_s`` seconds ago; the keys."""

    @abc.abstractmethod
    def describe(self) -> str:
        """Where the store is, for logs (never a credential)."""

    def download(self, key: str, dest: Path) -> Path:
        """Copy ``key`` to the file ``dest`` (written whole or not at all)."""
        tmp = dest.with_name(f".{dest.name}{_PART}{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as fh:
                for block in self.read(key):
                    fh.write(block)
            tmp.replace(dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest


# ---------------------------------------------------------------------------
# A local directory.
# ---------------------------------------------------------------------------
class LocalArtifacts(ArtifactStore):
    """Clips as files in one directory (created on first put)."""

    kind = "local"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key: str, path: Path, content_type: str = "video/mp4") -> str:
        dest = self._path(key)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{key}{_PART}{uuid.uuid4().hex[:8]}"
        try:
            shutil.copyfile(path, tmp)
            os.replace(tmp, dest)
        except OSError as exc:
            raise ClipError(
                ErrorCode.UPLOAD_FAILED, f"cannot store the clip in {self.root}: {exc}"
            ) from exc
        finally:
            tmp.unlink(missing_ok=True)
        return key

    def stat(self, key: str) -> ArtifactInfo | None:
        try:
            st = self._path(key).stat()
        except (OSError, ValueError):
            return None
        return ArtifactInfo(key, st.st_size, st.st_mtime)

    def read(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        fh = open(self._path(key), "rb")  # noqa: SIM115 (closed by the generator)

        def blocks() -> Iterator[bytes]:
            with fh:
                fh.seek(start)
                left = None if end is None else max(0, end - start)
                while left is None or left > 0:
                    block = fh.read(_BLOCK if left is None else min(_BLOCK, left))
                    if not block:
                        return
                    if left is not None:
                        left -= len(block)
                    yield block

        return blocks()

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def expire(self, older_than_s: float, now: float | None = None) -> list[str]:
        cutoff = (time.time() if now is None else now) - older_than_s
        removed = []
        try:
            entries = list(os.scandir(self.root))
        except OSError:
            return []
        for entry in entries:
            try:
                if not entry.is_file(follow_symlinks=False) or entry.stat().st_mtime >= cutoff:
                    continue
                os.unlink(entry.path)
            except OSError:
                continue
            if not entry.name.startswith("."):  # a temporary file of an interrupted put
                removed.append(entry.name)
        return removed

    def describe(self) -> str:
        return f"local directory {self.root}"


# ---------------------------------------------------------------------------
# S3-compatible object storage.
# ---------------------------------------------------------------------------
def _short(exc: BaseException) -> str:
    """The first line of an object-store error (they carry a long debug dump)."""
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


class S3Artifacts(ArtifactStore):
    """Clips as objects under ``<prefix>/<deployment>/`` of one bucket."""

    kind = "s3"

    def __init__(self, settings: Settings) -> None:
        try:
            from obstore.store import S3Store
        except ImportError as exc:  # pragma: no cover - the [s3] extra is missing
            raise RuntimeError(
                "artifact_store=s3 needs obstore: pip install 'clipline[s3]'"
            ) from exc
        if not settings.s3_bucket:
            raise ValueError("artifact_store=s3 needs a bucket: set CLIPLINE_S3_BUCKET")
        self.bucket = settings.s3_bucket
        self.prefix = "/".join(p for p in (settings.s3_prefix.strip("/"), settings.deployment) if p)
        self.endpoint = settings.s3_endpoint_url.rstrip("/")
        config: dict[str, Any] = {}
        if settings.s3_region:
            config["region"] = settings.s3_region
        elif not (os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")):
            config["region"] = "us-east-1"
        if settings.s3_access_key_id:
            config["access_key_id"] = settings.s3_access_key_id
            config["secret_access_key"] = settings.s3_secret_access_key
        timeout_s = max(1.0, settings.s3_timeout_s)
        client: dict[str, Any] = {
            "timeout": datetime.timedelta(seconds=timeout_s),
            "connect_timeout": datetime.timedelta(seconds=min(10.0, timeout_s)),
        }
        retry: Any = {
            "max_retries": 10,
            "retry_timeout": datetime.timedelta(seconds=max(0.0, settings.s3_retry_timeout_s)),
            "backoff": {
                "init_backoff": datetime.timedelta(milliseconds=100),
                "max_backoff": datetime.timedelta(seconds=5),
                "base": 2,
            },
        }

        def store(endpoint: str) -> Any:
            extra: dict[str, Any] = {}
            if endpoint:
                # Custom endpoints (MinIO, SeaweedFS, …) address buckets by path.
                extra = {"endpoint": endpoint, "virtual_hosted_style_request": False}
            opts: Any = dict(client, allow_http=endpoint.startswith("http://"))
            return S3Store(
                self.bucket,
                prefix=self.prefix or None,
                client_options=opts,
                retry_config=retry,
                **config,
                **extra,
            )

        self._store = store(self.endpoint)
        public = settings.s3_public_endpoint_url.rstrip("/")
        self._signer = store(public) if public and public != self.endpoint else self._store

    def _error(self, what: str, key: str, exc: Exception) -> ClipError:
        from obstore import exceptions as ox

        refused = isinstance(
            exc, ox.PermissionDeniedError | ox.UnauthenticatedError | ox.NotFoundError
        )
        return ClipError(
            ErrorCode.UPLOAD_FAILED,
            f"cannot {what} {key} in the object store ({self.describe()}): {_short(exc)}",
            transient=not refused,
        )

    def put(self, key: str, path: Path, content_type: str = "video/mp4") -> str:
        import obstore

        check_key(key)
        try:
            obstore.put(self._store, key, Path(path), attributes={"Content-Type": content_type})
        except Exception as exc:
            raise self._error("store", key, exc) from exc
        return key

    def stat(self, key: str) -> ArtifactInfo | None:
        import obstore

        check_key(key)
        try:
            meta = obstore.head(self._store, key)
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise self._error("look up", key, exc) from exc
        return ArtifactInfo(key, int(meta["size"]), meta["last_modified"].timestamp())

    def read(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        import obstore

        check_key(key)
        options: Any = {}
        if start or end is not None:
            options["range"] = {"offset": start} if end is None else (start, end)
        try:
            result = obstore.get(self._store, key, options=options or None)
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise self._error("read", key, exc) from exc

        def blocks() -> Iterator[bytes]:
            for chunk in result.stream(min_chunk_size=_BLOCK):
                yield bytes(chunk)

        return blocks()

    def url(self, key: str, expires_s: float) -> str | None:
        import obstore

        check_key(key)
        expires = datetime.timedelta(seconds=max(1.0, expires_s))
        return str(obstore.sign(self._signer, "GET", key, expires))

    def delete(self, key: str) -> None:
        import obstore

        check_key(key)
        try:
            obstore.delete(self._store, key)
        except FileNotFoundError:
            return
        except Exception as exc:
            raise self._error("delete", key, exc) from exc

    def expire(self, older_than_s: float, now: float | None = None) -> list[str]:
        import obstore

        cutoff = (time.time() if now is None else now) - older_than_s
        old: list[str] = []
        for chunk in obstore.list(self._store):
            old += [m["path"] for m in chunk if m["last_modified"].timestamp() < cutoff]
        for i in range(0, len(old), 1000):
            obstore.delete(self._store, old[i : i + 1000])
        return old

    def describe(self) -> str:
        where = self.endpoint or "AWS"
        return f"s3://{self.bucket}/{self.prefix} at {where}"


def check_settings(settings: Settings) -> None:
    """Refuse an unknown store or serving mode (a clear error at start, not per job)."""
    if settings.artifact_store not in STORES:
        raise ValueError(
            f"CLIPLINE_ARTIFACT_STORE={settings.artifact_store!r}: use one of {', '.join(STORES)}"
        )
    if settings.artifact_serve not in SERVE_MODES:
        raise ValueError(
            f"CLIPLINE_ARTIFACT_SERVE={settings.artifact_serve!r}: "
            f"use one of {', '.join(SERVE_MODES)}"
        )


def open_store(settings: Settings) -> ArtifactStore:
    """The artifact store ``settings`` name."""
    check_settings(settings)
    if settings.artifact_store == "s3":
        return S3Artifacts(settings)
    return LocalArtifacts(settings.artifacts_path)


def sweep_interval_s(settings: Settings) -> float:
    """How often the housekeeping looks for expired clips: a quarter of the retention,
    between 5 s and 10 min (0: never, retention off)."""
    if settings.artifact_ttl_s <= 0:
        return 0.0
    return min(600.0, max(5.0, settings.artifact_ttl_s / 4))
