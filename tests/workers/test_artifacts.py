"""The artifact store (:mod:`clipline_core.artifacts`) on a local directory and on a real
S3-compatible server (SeaweedFS, the session's ``s3_server``), and the workers'
retention sweep.

Every store test runs against both stores: put, look up, read whole and by range, the
same bytes back (sha256), replace, delete. On S3 the object really is in the bucket
under ``<prefix>/<deployment>/`` (read with a plain client), a presigned URL downloads
it while an unsigned or tampered one is refused, one deployment's sweep never touches
another's clips, and a store that does not answer or refuses the credentials fails with
``upload_failed`` (transient, and final, respectively). The sweep of
:class:`workers.monitor.Monitor` deletes clips older than ``artifact_ttl_s`` and keeps the
rest.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import obstore
import pytest
from objectstore import SeaweedS3

from clipline_core import artifacts
from clipline_core.errors import ClipError, ErrorCode
from clipline_core.settings import Settings
from workers import monitor
from workers.app import make_app


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def bucket(s3_server: SeaweedS3) -> str:
    return s3_server.create_bucket()


@pytest.fixture(params=["local", "s3"])
def store_settings(request: pytest.FixtureRequest, settings: Settings) -> Settings:
    if request.param == "local":
        return settings
    server: SeaweedS3 = request.getfixturevalue("s3_server")
    return server.settings(settings, request.getfixturevalue("bucket"))


@pytest.fixture
def store(store_settings: Settings) -> Iterator[artifacts.ArtifactStore]:
    s = artifacts.open_store(store_settings)
    yield s
    s.expire(0, now=time.time() + 3600)  # leave nothing behind


@pytest.fixture
def clip(tmp_path: Path) -> Path:
    path = tmp_path / "clip.mp4"
    path.write_bytes(os.urandom(3 << 20) + b"end")  # above one read block
    return path


def test_put_stat_read_delete_roundtrip(
    store: artifacts.ArtifactStore, clip: Path, store_settings: Settings
) -> None:
    data = clip.read_bytes()
    key = artifacts.clip_key(uuid.uuid4().hex)
    assert store.stat(key) is None
    with pytest.raises(FileNotFoundError):
        b"".join(store.read(key))

    assert store.put(key, clip) == key
    info = store.stat(key)
    assert info is not None and info.key == key and info.size == len(data)
    assert abs(info.modified - time.time()) < 120
    assert _sha(b"".join(store.read(key))) == _sha(data)
    assert b"".join(store.read(key, 100, 300)) == data[100:300]
    assert b"".join(store.read(key, len(data) - 3)) == b"end"

    out = store.download(key, clip.with_name("copy.mp4"))
    assert _sha(out.read_bytes()) == _sha(data)

    clip.write_bytes(b"second version")
    store.put(key, clip)
    assert b"".join(store.read(key)) == b"second version"

    if store_settings.artifact_store == "local":
        path = store.local_path(key)
        assert path == store_settings.artifacts_path / key and path.is_file()
        assert store.url(key, 60) is None
        assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp
    store.delete(key)
    assert store.stat(key) is None
    store.delete(key)  # deleting what is not there is fine


def test_keys_are_flat_names(store: artifacts.ArtifactStore, clip: Path) -> None:
    for bad in ("../escape.mp4", "a/b.mp4", ".hidden", ""):
        with pytest.raises(ValueError):
            store.put(bad, clip)


def test_s3_objects_live_under_prefix_and_deployment_and_presign(
    s3_server: SeaweedS3, bucket: str, settings: Settings, clip: Path
) -> None:
    conf = s3_server.settings(settings, bucket)
    store = artifacts.open_store(conf)
    assert isinstance(store, artifacts.S3Artifacts) and store.local_path("x.mp4") is None
    key = artifacts.clip_key(uuid.uuid4().hex)
    store.put(key, clip)
    raw = s3_server.raw(bucket)
    stored = obstore.get(raw, f"clips/{settings.deployment}/{key}")
    assert _sha(bytes(stored.bytes())) == _sha(clip.read_bytes())
    assert stored.attributes.get("Content-Type") == "video/mp4"

    url = store.url(key, 60)
    assert url is not None and url.startswith(f"{s3_server.endpoint}/{bucket}/clips/")
    got = httpx.get(url)
    assert got.status_code == 200 and _sha(got.content) == _sha(clip.read_bytes())
    part = httpx.get(url, headers={"Range": "bytes=0-9"})
    assert part.status_code == 206 and part.content == clip.read_bytes()[:10]
    assert httpx.get(url.split("?", 1)[0]).status_code == 403  # unsigned
    tampered = url.replace("X-Amz-Expires=60", "X-Amz-Expires=6000")
    assert httpx.get(tampered).status_code == 403

    public = artifacts.open_store(conf.replace(s3_public_endpoint_url="https://clips.example.com"))
    signed = public.url(key, 60)
    assert signed is not None and signed.startswith(f"https://clips.example.com/{bucket}/")
    store.delete(key)


def test_expire_removes_only_old_clips_of_its_own_deployment(
    store_settings: Settings, clip: Path
) -> None:
    mine = artifacts.open_store(store_settings)
    other_settings = store_settings.replace(deployment=store_settings.deployment + "-b")
    other = artifacts.open_store(other_settings)
    keys = [artifacts.clip_key(uuid.uuid4().hex) for _ in range(3)]
    for key in keys:
        mine.put(key, clip)
    theirs = artifacts.clip_key(uuid.uuid4().hex)
    other.put(theirs, clip)

    assert mine.expire(3600) == []  # all fresh
    if store_settings.artifact_store == "local":
        old = time.time() - 7200
        path = mine.local_path(keys[0])
        assert path is not None
        os.utime(path, (old, old))
        assert mine.expire(3600) == [keys[0]]
        assert [k for k in keys if mine.stat(k)] == keys[1:]
    # "Now" a day later: everything of this deployment is old, the other's stays.
    assert sorted(mine.expire(3600, now=time.time() + 86400)) == sorted(
        k for k in keys if store_settings.artifact_store == "s3" or k != keys[0]
    )
    assert all(mine.stat(k) is None for k in keys)
    assert other.stat(theirs) is not None
    other.delete(theirs)


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def test_s3_failures_are_upload_failed(
    s3_server: SeaweedS3, bucket: str, settings: Settings, clip: Path
) -> None:
    down = s3_server.settings(
        settings,
        bucket,
        s3_endpoint_url=f"http://127.0.0.1:{_closed_port()}",
        s3_retry_timeout_s=1.0,
    )
    with pytest.raises(ClipError) as err:
        artifacts.open_store(down).put("a.mp4", clip)
    assert err.value.code == ErrorCode.UPLOAD_FAILED and err.value.transient
    assert "\n" not in err.value.message and "s3://" in err.value.message

    wrong = s3_server.settings(settings, bucket, s3_secret_access_key="not-the-secret")
    with pytest.raises(ClipError) as err:
        artifacts.open_store(wrong).put("a.mp4", clip)
    assert err.value.code == ErrorCode.UPLOAD_FAILED and not err.value.transient
    assert "not-the-secret" not in err.value.message


def test_settings_are_checked_at_open(settings: Settings) -> None:
    with pytest.raises(ValueError, match="ARTIFACT_STORE"):
        artifacts.open_store(settings.replace(artifact_store="nfs"))
    with pytest.raises(ValueError, match="ARTIFACT_SERVE"):
        artifacts.open_store(settings.replace(artifact_serve="proxy"))
    with pytest.raises(ValueError, match="BUCKET"):
        artifacts.open_store(settings.replace(artifact_store="s3"))
    assert artifacts.sweep_interval_s(settings) == 600.0  # a day's retention
    assert artifacts.sweep_interval_s(settings.replace(artifact_ttl_s=8)) == 5.0
    assert artifacts.sweep_interval_s(settings.replace(artifact_ttl_s=0)) == 0.0


def test_monitor_sweeps_expired_clips(settings: Settings, clip: Path) -> None:
    conf = settings.replace(artifact_ttl_s=60)
    store = artifacts.open_store(conf)
    old_key, new_key = "old.mp4", "new.mp4"
    store.put(old_key, clip)
    store.put(new_key, clip)
    old = time.time() - 120
    old_path = store.local_path(old_key)
    assert old_path is not None
    os.utime(old_path, (old, old))

    mon = monitor.Monitor(make_app(conf), conf, None)
    mon.tick()  # the sweep is one step of every housekeeping round
    assert store.stat(old_key) is None and store.stat(new_key) is not None
    os.utime(old_path.with_name(new_key), (old, old))
    assert mon.expire_clips() == []  # not again before the sweep interval
    mon._next_sweep = 0.0
    assert mon.expire_clips() == [new_key]
    off = monitor.Monitor(make_app(conf), conf.replace(artifact_ttl_s=0), None)
    store.put(old_key, clip)
    os.utime(old_path, (old, old))
    assert off.expire_clips() == [] and store.stat(old_key) is not None
