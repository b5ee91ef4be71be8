"""The whole stack with its clips in a real S3-compatible store (SeaweedFS).

One :class:`clipline.stack.LocalStack` (the API as ``clipline api``, the GPU daemon and
a Celery worker, the processes ``clipline up`` starts) runs with ``artifact_store=s3``
against the session's SeaweedFS server (``s3_server``), on the real Redis. A job is
submitted over HTTP; its clip is downloaded through ``GET /v1/jobs/{id}/highlight``
following the 307 to a presigned URL, and it is the same bytes as the object the worker
put in the bucket (sha256), read with a plain client. A second API process on the same
deployment with ``artifact_serve=stream`` relays the object (ranges too). Then the
store is killed while a job is rendering its clip, so its upload fails; once the store
is back the job is retried and ends exactly once: one terminal state, one callback, one
object.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import obstore
import pytest
import redis
from api_helpers import CALLBACK_SECRET, FileServer, Keys, LiveServer, Receiver, make_keys, purge
from objectstore import SeaweedS3

from clipline import samples
from clipline.api import create_app
from clipline.client import Client, verify_callback
from clipline.stack import LocalStack
from clipline_core import constants
from clipline_core.job import JobState
from clipline_core.settings import Settings

pytestmark = pytest.mark.slow

TTL_S = 6 * 3600


class Stack:
    def __init__(
        self,
        stack: LocalStack,
        keys: Keys,
        files: FileServer,
        s3: SeaweedS3,
        bucket: str,
        redis_client: redis.Redis,
    ) -> None:
        self.stack, self.keys, self.files, self.s3, self.bucket = stack, keys, files, s3, bucket
        self.redis = redis_client
        assert stack.api_url is not None
        self.url: str = stack.api_url

    @property
    def settings(self) -> Settings:
        return self.stack.settings

    def client(self) -> Client:
        return Client(self.url, self.keys.full)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys.full}"}

    def field(self, job_id: str, name: str) -> str:
        """One field of the job's hash in Redis ('' when absent)."""
        value: Any = self.redis.hget(constants.job_key(self.settings.deployment, job_id), name)
        return value.decode() if isinstance(value, bytes) else str(value or "")

    def object_path(self, job_id: str) -> str:
        return f"clips/{self.settings.deployment}/{job_id}.mp4"

    def object_bytes(self, job_id: str) -> bytes:
        """The clip as it is in the bucket (a plain client, not clipline's store)."""
        return bytes(obstore.get(self.s3.raw(self.bucket), self.object_path(job_id)).bytes())

    def submit(self, api: Client, **kwargs: object) -> str:
        return api.submit(
            f"{self.files.url}/footage.avi",
            [f"{self.files.url}/product.jpg"],
            duration_s=2.0,
            **kwargs,  # type: ignore[arg-type]
        ).id


@pytest.fixture(scope="module")
def e2e(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, s3_server: SeaweedS3
) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("api-s3")
    media = tmp / "media"
    samples.make_footage(media / "footage.avi", seconds=5.0, fps=20.0, seed=12)
    samples.make_product_image(media / "product.jpg", seed=4)
    keys = make_keys()
    bucket = s3_server.create_bucket()
    base = Settings(
        deployment=f"t-s3-{uuid.uuid4().hex[:8]}",
        redis_url=redis_url,
        state_dir=str(tmp / "state"),
        allow_loopback=True,
        shm_slots=8,
        shm_slot_bytes=4 << 20,
        inference_timeout_s=60.0,
        api_keys=keys.entries(),
        api_port=0,
        callback_secret=CALLBACK_SECRET,
        callback_backoff_s=0.3,
        artifact_ttl_s=TTL_S,
    )
    # A failing store is retried for 2 s within an attempt, then the job is retried, with
    # attempts to spare: a restarted SeaweedFS takes from 3 s to over 40 s (a loaded
    # machine) to serve again, and the job must not run out of attempts meanwhile.
    settings = s3_server.settings(base, bucket, s3_retry_timeout_s=2.0).replace(
        max_attempts=40, retry_backoff_max_s=2.0
    )
    files = FileServer(media)
    stack = LocalStack(settings, workers=1, api=True)
    client = redis.Redis.from_url(redis_url)
    try:
        stack.start()
        yield Stack(stack, keys, files, s3_server, bucket, client)
    finally:
        stack.stop()
        files.close()
        purge(client, settings.deployment)
        client.close()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_highlight_redirects_to_the_object_the_worker_stored(e2e: Stack, tmp_path: Path) -> None:
    with e2e.client() as api:
        job_id = e2e.submit(api)
        job = api.wait(job_id, timeout_s=180)
        assert job.state == JobState.SUCCEEDED, job.error
        assert job.result is not None and not job.result.uploaded
        assert job.result.download == f"/v1/jobs/{job_id}/highlight"
        downloaded = api.download(job_id, tmp_path)  # the client follows the redirect

    stored = e2e.object_bytes(job_id)
    assert stored[4:8] == b"ftyp" and len(stored) > 1000
    assert _sha(downloaded.read_bytes()) == _sha(stored)
    raw = json.loads(e2e.field(job_id, "highlight"))
    assert raw["artifact"] == f"{job_id}.mp4" and raw["path"] is None
    # Nothing of the clip stays on the worker's or the API's disk.
    assert not list(e2e.settings.artifacts_path.glob("*.mp4"))
    # The job expires with its clip.
    ttl = e2e.redis.ttl(constants.job_key(e2e.settings.deployment, job_id))
    assert TTL_S - 120 <= ttl <= TTL_S

    link = e2e.url + f"/v1/jobs/{job_id}/highlight"
    first = httpx.get(link, headers=e2e.headers())
    assert first.status_code == 307 and first.headers["cache-control"] == "no-store"
    location = first.headers["location"]
    assert location.startswith(f"{e2e.s3.endpoint}/{e2e.bucket}/{e2e.object_path(job_id)}?")
    assert "X-Amz-Signature=" in location and e2e.keys.full not in location
    followed = httpx.get(location)
    assert followed.status_code == 200 and _sha(followed.content) == _sha(stored)
    assert httpx.get(location.split("?", 1)[0]).status_code == 403  # the bucket is private
    other = httpx.get(link, headers={"Authorization": f"Bearer {e2e.keys.other}"})
    assert other.status_code == 404  # another tenant's job: no URL for it


def test_stream_mode_relays_the_object_with_ranges(e2e: Stack) -> None:
    with e2e.client() as api:
        job_id = e2e.submit(api)
        assert api.wait(job_id, timeout_s=180).state == JobState.SUCCEEDED
    stored = e2e.object_bytes(job_id)
    streaming = e2e.settings.replace(artifact_serve="stream")
    app = create_app(streaming)
    server = LiveServer(app, streaming)
    url = server.start()
    try:
        link = f"{url}/v1/jobs/{job_id}/highlight"
        with httpx.Client(headers=e2e.headers()) as http:
            full = http.get(link)
            assert full.status_code == 200 and _sha(full.content) == _sha(stored)
            assert full.headers["content-type"] == "video/mp4"
            assert full.headers["content-length"] == str(len(stored))
            part = http.get(link, headers={"Range": "bytes=100-299"})
            assert part.status_code == 206 and part.content == stored[100:300]
            assert part.headers["content-range"] == f"bytes 100-299/{len(stored)}"
            tail = http.get(link, headers={"Range": "bytes=-10"})
            assert tail.status_code == 206 and tail.content == stored[-10:]
            beyond = http.get(link, headers={"Range": f"bytes={len(stored)}-"})
            assert beyond.status_code == 416
            assert beyond.headers["content-range"] == f"bytes */{len(stored)}"

            obstore.delete(e2e.s3.raw(e2e.bucket), e2e.object_path(job_id))
            gone = http.get(link)
            assert gone.status_code == 404 and "no longer available" in gone.text
        redirected = httpx.get(e2e.url + f"/v1/jobs/{job_id}/highlight", headers=e2e.headers())
        assert redirected.status_code == 404  # no URL to an object that is not there
    finally:
        server.stop()
        app.state.services.close()


def _wait_state(e2e: Stack, job_id: str, state: JobState, timeout_s: float) -> None:
    """Until the job reaches ``state``, on its events channel (no polling gap)."""
    pubsub = e2e.redis.pubsub()
    pubsub.subscribe(constants.job_events_channel(e2e.settings.deployment, job_id))
    try:
        deadline = time.monotonic() + timeout_s
        if e2e.field(job_id, "state") == state.value:
            return
        while time.monotonic() < deadline:
            msg = pubsub.get_message(timeout=0.5)
            if msg and msg["type"] == "message" and msg["data"].decode() == state.value:
                return
        raise AssertionError(f"job {job_id} did not reach {state.value}")
    finally:
        pubsub.close()


def test_store_killed_during_the_upload_job_retries_and_ends_once(e2e: Stack) -> None:
    receiver = Receiver()
    try:
        with e2e.client() as api:
            job_id = e2e.submit(api, callback_url=receiver.url + "/hook")
            _wait_state(e2e, job_id, JobState.RENDERING, 120)
            e2e.s3.kill()  # the clip is being cut: its upload meets a dead store
            try:
                deadline = time.monotonic() + 90
                while "upload_failed" not in e2e.field(job_id, "last_error"):
                    state = e2e.field(job_id, "state")
                    assert state != JobState.SUCCEEDED.value, "the upload did not meet the outage"
                    assert time.monotonic() < deadline, "the failed upload was not retried"
                    time.sleep(0.1)
            finally:
                e2e.s3.restart()
            job = api.wait(job_id, timeout_s=240)
        assert job.state == JobState.SUCCEEDED, job.error
        assert job.attempts >= 2
        got = receiver.wait_for(1, 60)
        time.sleep(2.0)
        assert len(receiver.received) == 1  # ended once: one callback
        event = verify_callback(CALLBACK_SECRET, got[0].body, got[0].headers["Clipline-Signature"])
        assert event.event == "job.succeeded" and event.job.id == job_id
        objects = [m["path"] for c in obstore.list(e2e.s3.raw(e2e.bucket)) for m in c]
        assert objects.count(e2e.object_path(job_id)) == 1
        location = httpx.get(
            e2e.url + f"/v1/jobs/{job_id}/highlight", headers=e2e.headers()
        ).headers["location"]
        assert _sha(httpx.get(location).content) == _sha(e2e.object_bytes(job_id))
    finally:
        receiver.close()
