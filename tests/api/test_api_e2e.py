"""The job API end to end: the real API process, GPU daemon and Celery worker.

One :class:`clipline.stack.LocalStack` (``api=True``: the same processes ``clipline up``
starts, the API as ``clipline api`` under uvicorn) serves the module, on the real Redis
with its own deployment name. Videos and images are served over HTTP by a local file
server on 127.0.0.1 (loopback is allowed for these tests); callbacks go to a local
receiver that fails twice before it accepts, so the worker's retries with backoff are
exercised through Celery for real. A job is cancelled while its worker is fetching a
video that the file server sends slowly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import cv2
import httpx
import pytest
import redis
from api_helpers import CALLBACK_SECRET, FileServer, Keys, Receiver, make_keys, purge

from clipline import samples
from clipline.client import ApiError, Client, verify_callback
from clipline.stack import LocalStack
from clipline_core import constants
from clipline_core.job import ACTIVE, JobState
from clipline_core.settings import Settings

pytestmark = pytest.mark.slow


class Stack:
    def __init__(self, stack: LocalStack, keys: Keys, files: FileServer, media: Path) -> None:
        self.stack = stack
        self.keys = keys
        self.files = files
        self.media = media
        assert stack.api_url is not None
        self.url: str = stack.api_url

    @property
    def settings(self) -> Settings:
        return self.stack.settings

    def client(self) -> Client:
        return Client(self.url, self.keys.full)


@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("api-e2e")
    media = tmp / "media"
    samples.make_footage(media / "footage.avi", seconds=6.0, fps=20.0, seed=11)
    samples.make_product_image(media / "product.jpg", seed=4)
    keys = make_keys()
    settings = Settings(
        deployment=f"t-api-{uuid.uuid4().hex[:8]}",
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
        callback_max_attempts=5,
    )
    files = FileServer(media)
    stack = LocalStack(settings, workers=1, api=True)
    client = redis.Redis.from_url(redis_url)
    try:
        stack.start()
        yield Stack(stack, keys, files, media)
    finally:
        stack.stop()
        files.close()
        purge(client, settings.deployment)
        client.close()


def _poll_state(api: Client, job_id: str, states: set[JobState], timeout_s: float) -> JobState:
    deadline = time.monotonic() + timeout_s
    while True:
        state = api.get(job_id).state
        if state in states or time.monotonic() > deadline:
            return state
        time.sleep(0.02)


def test_submit_wait_download_with_a_callback_that_fails_twice(e2e: Stack, tmp_path: Path) -> None:
    receiver = Receiver(script=[500, 503])
    try:
        with e2e.client() as api:
            accepted = api.submit(
                f"{e2e.files.url}/footage.avi",
                [f"{e2e.files.url}/product.jpg"],
                title="Generated footage",
                duration_s=3.0,
                priority="high",
                callback_url=receiver.url + "/hooks/clip?tenant=shop-1",
            )
            job = api.wait(accepted.id, timeout_s=180)
            assert job.state == JobState.SUCCEEDED, job.error
            assert job.result is not None and job.result.download is not None
            assert 2.5 <= job.result.end_s - job.result.start_s <= 3.2
            assert job.timings.total_s is not None and job.attempts == 1
            clip = api.download(job.id, tmp_path)

        cap = cv2.VideoCapture(str(clip))
        frames = 0
        while cap.read()[0]:
            frames += 1
        cap.release()
        assert frames >= 50  # ~3 s at 20 fps

        size = clip.stat().st_size
        part = httpx.get(
            e2e.url + job.links.highlight,
            headers={"Authorization": f"Bearer {e2e.keys.full}", "Range": "bytes=0-99"},
        )
        assert part.status_code == 206 and part.content == clip.read_bytes()[:100]
        assert part.headers["content-range"] == f"bytes 0-99/{size}"

        got = receiver.wait_for(3, 60)
        assert [r.status for r in got[:3]] == [500, 503, 200]
        assert got[0].path == "/hooks/clip?tenant=shop-1"
        assert len({r.body for r in got}) == 1  # the same bytes on every attempt
        assert len({r.headers[constants.HEADER_EVENT_ID] for r in got}) == 1
        for r in got:
            event = verify_callback(CALLBACK_SECRET, r.body, r.headers[constants.HEADER_SIGNATURE])
        assert event.event == "job.succeeded" and event.id == got[0].headers["Clipline-Event-Id"]
        assert event.job.model_dump() == job.model_dump()  # the GET body, as documented
        # Exponential backoff between attempts (lower bounds: 0.3 s and 0.6 s less jitter).
        assert got[1].at - got[0].at >= 0.25 and got[2].at - got[1].at >= 0.5
        time.sleep(1.0)
        assert len(receiver.received) == 3  # delivered: no more attempts
    finally:
        receiver.close()


def test_failed_job_reports_its_error_and_calls_back(e2e: Stack, receiver: Receiver) -> None:
    with e2e.client() as api:
        job_id = api.submit(
            f"{e2e.files.url}/missing.mp4",
            [f"{e2e.files.url}/product.jpg"],
            callback_url=receiver.url + "/hook",
        ).id
        job = api.wait(job_id, timeout_s=120)
        assert job.state == JobState.FAILED
        assert job.error is not None and job.error.code == "not_found"
        with pytest.raises(ApiError) as err:
            api.download(job_id, e2e.settings.state_dir)
        assert err.value.status == 409
    got = receiver.wait_for(1, 30)
    event = verify_callback(CALLBACK_SECRET, got[0].body, got[0].headers["Clipline-Signature"])
    assert event.event == "job.failed" and event.job.error is not None
    assert event.job.error.code == "not_found"


def test_clip_uploaded_to_a_presigned_url_is_not_served_here(
    e2e: Stack, receiver: Receiver
) -> None:
    with e2e.client() as api:
        job = api.wait(
            api.submit(
                f"{e2e.files.url}/footage.avi",
                [f"{e2e.files.url}/product.jpg"],
                duration_s=2.0,
                upload_url=receiver.url + "/bucket/clip.mp4?X-Signature=s3cr3t",
            ).id,
            timeout_s=180,
        )
        assert job.state == JobState.SUCCEEDED, job.error
        assert job.result is not None and job.result.uploaded
        assert job.result.url == receiver.url + "/bucket/clip.mp4"  # no signature echoed
        assert job.result.download is None
        with pytest.raises(ApiError) as err:
            api.download(job.id, e2e.settings.state_dir)
    assert err.value.status == 404 and "upload_url" in err.value.message
    put = receiver.wait_for(1, 10)[0]
    assert put.path == "/bucket/clip.mp4?X-Signature=s3cr3t"
    assert put.body[4:8] == b"ftyp"  # an MP4 arrived


def test_cancel_a_running_job(e2e: Stack, receiver: Receiver) -> None:
    with e2e.client() as api:
        job_id = api.submit(
            f"{e2e.files.url}/slow/footage.avi",
            [f"{e2e.files.url}/product.jpg"],
            callback_url=receiver.url + "/hook",
        ).id
        state = _poll_state(api, job_id, set(ACTIVE), 60)
        assert state in ACTIVE, f"the job did not start ({state})"  # fetching, for ~4 s
        cancelled = api.cancel(job_id)
        assert cancelled.state == JobState.CANCELLED
        assert cancelled.error is not None and cancelled.error.code == "cancelled"
        with pytest.raises(ApiError) as err:
            api.cancel(job_id)
        assert err.value.status == 409
        # The worker stops at its next transition and never overwrites the state.
        got = receiver.wait_for(1, 30)
        event = verify_callback(CALLBACK_SECRET, got[0].body, got[0].headers["Clipline-Signature"])
        assert event.event == "job.cancelled" and event.job.id == job_id
        worker_log = e2e.stack.log_dir / "worker.log"
        deadline = time.monotonic() + 60
        while f"job {job_id} was cancelled" not in worker_log.read_text(errors="replace"):
            assert time.monotonic() < deadline, "the worker did not notice the cancellation"
            time.sleep(0.1)
        assert api.get(job_id).state == JobState.CANCELLED
    assert not (e2e.settings.artifacts_path / f"{job_id}.mp4").exists()
    assert len(receiver.received) == 1


def test_cli_submit_job_wait_use_the_api(e2e: Stack, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPLINE_")}
    env.update(CLIPLINE_API_URL=e2e.url, CLIPLINE_API_KEY=e2e.keys.full)
    cli = [sys.executable, "-m", "clipline.cli"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*cli, *args], env=env, capture_output=True, text=True, timeout=240, check=False
        )

    sub = run(
        "submit",
        f"{e2e.files.url}/footage.avi",
        "--image",
        f"{e2e.files.url}/product.jpg",
        "--duration",
        "2",
        "--idempotency-key",
        "cli-1",
        "--json",
    )
    assert sub.returncode == 0, sub.stderr
    submitted = json.loads(sub.stdout)
    assert submitted["created"] is True and submitted["state"] == "queued"
    job_id = submitted["job_id"]

    shown = run("job", job_id)
    assert shown.returncode == 0 and json.loads(shown.stdout)["id"] == job_id

    waited = run("wait", job_id, "--json", "--out", str(tmp_path))
    assert waited.returncode == 0, waited.stderr
    result = json.loads(waited.stdout)
    assert result["state"] == "succeeded" and Path(result["clip"]).stat().st_size > 0

    # submit --wait: the job's way through its stages, plain lines off a terminal.
    both = run(
        "submit",
        f"{e2e.files.url}/footage.avi",
        "--image",
        f"{e2e.files.url}/product.jpg",
        "--duration",
        "2",
        "--wait",
        "--out",
        str(tmp_path / "clips") + "/",
    )
    assert both.returncode == 0, both.stderr
    lines = both.stdout.splitlines()
    states = [line.split("] ")[1] for line in lines if line.startswith("  [")]
    assert states[-1] == "succeeded" and "decoding" in states and "rendering" in states, lines
    new_id = lines[0].split()[1]
    assert (tmp_path / "clips" / f"{new_id}.mp4").stat().st_size > 0

    bad = run("submit", "http://169.254.169.254/v.mp4", "--image", f"{e2e.files.url}/p.jpg")
    assert bad.returncode == 2 and "forbidden_source" in bad.stderr
    env["CLIPLINE_API_KEY"] = "clk_wrong"
    denied = run("job", job_id)
    assert denied.returncode == 2 and "unauthenticated" in denied.stderr
