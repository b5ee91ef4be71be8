"""Completion callbacks: the signature scheme, one delivery attempt against a real HTTP
receiver, the SSRF rules on callback URLs, the backoff schedule, and ``notify``.

Retries through a real Celery worker (a receiver that fails twice, then accepts) are
covered end to end in ``test_api_e2e.py``. The verification samples of ``docs/api.md``
(Python and Node.js) are run against signatures made here.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import socket
import statistics
import subprocess
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread
from typing import Any

import pytest
import redis
from api_helpers import CALLBACK_SECRET, Receiver

from clipline.client import verify_callback
from clipline_core import constants, signing
from clipline_core.job import JobSpec, JobState
from clipline_core.settings import Settings
from clipline_core.store import JobStore
from workers import callbacks
from workers.app import make_app


# ---------------------------------------------------------------------------
# signatures
# ---------------------------------------------------------------------------
def test_sign_and_verify_round_trip() -> None:
    body = b'{"id":"evt_1","event":"job.succeeded"}'
    header = signing.sign(["s3cret"], body, timestamp=1_700_000_000)
    t, v1 = header.split(",")
    assert t == "t=1700000000" and v1.startswith("v1=") and len(v1) == 3 + 64
    assert signing.verify("s3cret", body, header, now=1_700_000_100) == 1_700_000_000


@pytest.mark.parametrize(
    ("secret", "body", "header", "now", "why"),
    [
        ("s3cret", b"{}x", None, 1_700_000_000, "tampered"),
        ("other", b"{}", None, 1_700_000_000, "wrong secret"),
        ("s3cret", b"{}", None, 1_700_000_301, "stale"),
        ("s3cret", b"{}", None, 1_699_999_600, "from the future"),
        ("s3cret", b"{}", "", 1_700_000_000, "missing"),
        ("s3cret", b"{}", "t=1700000000", 1_700_000_000, "no v1"),
        ("s3cret", b"{}", "v1=abc", 1_700_000_000, "no t"),
        ("s3cret", b"{}", "t=soon,v1=abc", 1_700_000_000, "bad t"),
        ("s3cret", b"{}", "garbage", 1_700_000_000, "garbage"),
        ("s3cret", b"{}", "t=1700000000,v1=\u00e9\u00e9", 1_700_000_000, "non-ascii"),
    ],
)
def test_verify_rejects(secret: str, body: bytes, header: str | None, now: int, why: str) -> None:
    signed = signing.sign(["s3cret"], b"{}", timestamp=1_700_000_000)
    with pytest.raises(signing.SignatureError):
        signing.verify(secret, body, signed if header is None else header, now=now)


def test_rotation_signs_with_every_secret() -> None:
    body = b"{}"
    header = signing.sign(signing.split_secrets("new-secret, old-secret"), body, 1_700_000_000)
    assert header.count("v1=") == 2
    for secret in ("new-secret", "old-secret"):
        signing.verify(secret, body, header, now=1_700_000_000)
    with pytest.raises(signing.SignatureError):
        signing.verify("retired", body, header, now=1_700_000_000)
    with pytest.raises(ValueError):
        signing.sign([], body)


# ---------------------------------------------------------------------------
# one delivery attempt
# ---------------------------------------------------------------------------
def test_deliver_posts_the_exact_body_signed(settings: Settings, receiver: Receiver) -> None:
    s = settings.replace(callback_secret=CALLBACK_SECRET)
    body = json.dumps({"id": "evt_x", "event": "job.failed"}).encode()
    result = callbacks.deliver(receiver.url + "/hook?token=abc", body, "evt_x", s)
    assert result.ok and result.status == 200 and not result.retry
    got = receiver.wait_for(1, 5)[0]
    assert got.body == body and got.path == "/hook?token=abc"
    assert got.headers["Content-Type"] == "application/json"
    assert got.headers[constants.HEADER_EVENT_ID] == "evt_x"
    signing.verify(CALLBACK_SECRET, got.body, got.headers[constants.HEADER_SIGNATURE])


@pytest.mark.parametrize("status", [500, 503, 404, 410, 302])
def test_non_2xx_answers_are_retryable_and_redirects_not_followed(
    settings: Settings, status: int
) -> None:
    receiver = Receiver(default=status)
    try:
        s = settings.replace(callback_secret=CALLBACK_SECRET)
        result = callbacks.deliver(receiver.url + "/hook", b"{}", "evt", s)
        assert not result.ok and result.retry and result.status == status
        assert len(receiver.wait_for(1, 5)) == 1  # one request, no redirect followed
    finally:
        receiver.close()


def test_timeouts_and_refused_connections_are_retryable(settings: Settings) -> None:
    s = settings.replace(callback_secret=CALLBACK_SECRET, callback_timeout_s=0.3)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{sock.getsockname()[1]}/hook"
    r = callbacks.deliver(refused, b"{}", "evt", s)
    assert not r.ok and r.retry and r.status is None

    class Slow(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            self.server.stop_event.wait(5)  # type: ignore[attr-defined]

        def log_message(self, format: str, *args: object) -> None:
            return

    import threading

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    httpd.daemon_threads = True
    httpd.stop_event = threading.Event()  # type: ignore[attr-defined]
    Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        r = callbacks.deliver(f"http://127.0.0.1:{httpd.server_address[1]}/", b"{}", "evt", s)
        assert not r.ok and r.retry and "Timeout" in r.reason
    finally:
        httpd.stop_event.set()  # type: ignore[attr-defined]
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize(
    ("url", "changes"),
    [
        ("http://169.254.169.254/latest/meta-data/", {}),
        ("http://10.1.2.3/hook", {}),
        ("http://192.168.0.10/hook", {}),
        ("http://[fe80::1]/hook", {}),
        ("ftp://hooks.example.com/x", {}),
        ("loopback", {"allow_loopback": False}),
    ],
)
def test_ssrf_rules_refuse_before_connecting(
    settings: Settings, receiver: Receiver, url: str, changes: dict[str, bool]
) -> None:
    """Refused URLs are never connected to, and not retried."""
    s = settings.replace(callback_secret=CALLBACK_SECRET, **changes)
    target = receiver.url + "/hook" if url == "loopback" else url
    result = callbacks.deliver(target, b"{}", "evt", s)
    assert not result.ok and not result.retry and result.status is None
    assert receiver.received == []


def test_no_secret_means_no_delivery(settings: Settings, receiver: Receiver) -> None:
    result = callbacks.deliver(receiver.url, b"{}", "evt", settings.replace(callback_secret=""))
    assert not result.ok and not result.retry and receiver.received == []


def test_backoff_doubles_with_jitter_and_is_capped(settings: Settings) -> None:
    s = settings.replace(callback_backoff_s=2.0, callback_backoff_max_s=60.0)
    for attempt, nominal in [(1, 2.0), (2, 4.0), (3, 8.0), (5, 32.0), (9, 60.0)]:
        samples = [callbacks.backoff_s(attempt, s) for _ in range(200)]
        assert nominal * 0.9 <= min(samples) and max(samples) <= nominal * 1.1
        assert abs(statistics.mean(samples) - nominal) < nominal * 0.05


def test_redacted_drops_query_strings() -> None:
    assert callbacks.redacted("https://h.example.com/a/b?sig=SECRET") == "https://h.example.com/a/b"


# ---------------------------------------------------------------------------
# notify: what the worker calls on a terminal transition
# ---------------------------------------------------------------------------
def _queued_callback_messages(client: redis.Redis, deployment: str) -> list[dict[str, Any]]:
    out = []
    assert not client.llen(constants.queue_name(deployment))  # never on the jobs queue
    for raw in client.lrange(constants.callbacks_queue_name(deployment), 0, -1):
        msg = json.loads(raw)
        if msg["headers"]["task"] == constants.CELERY_TASK_DELIVER_CALLBACK:
            out.append({"args": json.loads(base64.b64decode(msg["body"]))[0], "msg": msg})
    return out


def test_notify_enqueues_only_terminal_jobs_with_a_callback(
    settings: Settings, redis_client: redis.Redis
) -> None:
    from api_helpers import purge

    from workers.app import make_app

    store = JobStore(redis_client, settings.deployment)
    app = make_app(settings)
    try:
        plain, _ = store.create(JobSpec(video_url="https://v.example.com/a.mp4", image_urls=["x"]))
        hooked, _ = store.create(
            JobSpec(
                video_url="https://v.example.com/a.mp4",
                image_urls=["x"],
                callback_url="https://hooks.example.com/done?k=1",
            )
        )
        assert callbacks.notify(settings, store, hooked, app) is False  # not terminal yet
        assert callbacks.notify(settings, store, "0" * 32, app) is False  # no such job
        for job_id in (plain, hooked):
            assert store.transition(
                job_id,
                {JobState.QUEUED},
                JobState.FAILED,
                error=json.dumps({"code": "not_a_video", "message": "the video is not a video"}),
            )
        assert callbacks.notify(settings, store, plain, app) is False  # no callback URL
        assert callbacks.notify(settings, store, hooked, app) is True
        sent = _queued_callback_messages(redis_client, settings.deployment)
        assert len(sent) == 1
        job_id, url, body, event_id = sent[0]["args"]
        assert job_id == hooked and url == "https://hooks.example.com/done?k=1"
        assert sent[0]["msg"]["properties"]["priority"] == 0
        event = json.loads(body)
        expected_id = callbacks.event_id(settings.deployment, hooked, "job.failed")
        assert event["id"] == event_id == expected_id
        assert event["event"] == "job.failed" and isinstance(event["created"], int)
        assert event["job"]["state"] == "failed"
        assert event["job"]["error"]["code"] == "not_a_video"
        assert "callback_url" not in event["job"] and event["job"]["callback"] is True
        # verify_callback parses what deliver() would send.
        signed = signing.sign([CALLBACK_SECRET], body.encode())
        parsed = verify_callback(CALLBACK_SECRET, body.encode(), signed)
        assert parsed.job.id == hooked
    finally:
        purge(redis_client, settings.deployment)


def test_notify_never_raises(settings: Settings) -> None:
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    dead = redis.Redis(
        host="127.0.0.1", port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0)
    )
    store = JobStore(dead, settings.deployment)
    assert callbacks.notify(settings, store, "a" * 32, make_app(settings)) is False


# ---------------------------------------------------------------------------
# the verification samples in docs/api.md
# ---------------------------------------------------------------------------
DOC = Path(__file__).parents[2] / "docs" / "api.md"


def _doc_block(language: str, marker: str) -> str:
    blocks = re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.S)
    return next(b for b in blocks if marker in b)


def _signed_event() -> tuple[bytes, str]:
    body = json.dumps({"id": "evt_doc", "event": "job.failed", "created": 1}).encode()
    return body, signing.sign(["doc-secret-1", "doc-secret-0"], body)


def test_the_documented_python_verifier_accepts_and_rejects() -> None:
    namespace: dict[str, object] = {}
    exec(_doc_block("python", "def verify("), namespace)
    verify = namespace["verify"]
    body, header = _signed_event()
    assert verify("doc-secret-1", body, header) is True  # type: ignore[operator]
    assert verify("doc-secret-0", body, header) is True  # type: ignore[operator]
    assert verify("other", body, header) is False  # type: ignore[operator]
    assert verify("doc-secret-1", body + b" ", header) is False  # type: ignore[operator]
    stale = signing.sign(["doc-secret-1"], body, timestamp=int(time.time()) - 600)
    assert verify("doc-secret-1", body, stale) is False  # type: ignore[operator]


def test_the_documented_node_verifier_accepts_and_rejects(tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed; the Node.js sample in docs/api.md is not run")
    body, header = _signed_event()
    stale = signing.sign(["doc-secret-1"], body, timestamp=int(time.time()) - 600)
    script = _doc_block("js", "function verify(") + (
        "\nconst [body, header, stale] = JSON.parse(process.argv[2]);\n"
        "const b = Buffer.from(body, 'base64');\n"
        "console.log(JSON.stringify([verify('doc-secret-1', b, header),"
        " verify('doc-secret-0', b, header), verify('other', b, header),"
        " verify('doc-secret-1', Buffer.concat([b, Buffer.from(' ')]), header),"
        " verify('doc-secret-1', b, stale)]));\n"
    )
    path = tmp_path / "verify.js"
    path.write_text(script)
    arg = json.dumps([base64.b64encode(body).decode(), header, stale])
    out = subprocess.run(
        [node, str(path), arg], capture_output=True, text=True, timeout=30, check=True
    )
    assert json.loads(out.stdout) == [True, True, False, False, False]
