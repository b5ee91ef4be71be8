"""The job API over real HTTP (uvicorn) against real Redis: submission side.

No worker consumes the queue here; where a test needs a job in a later state it moves
the job with the job store's own transitions, the way a worker does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from api_helpers import CALLBACK_SECRET, Api, Keys, api_settings, running_api

from clipline.client import ApiError
from clipline_core import constants
from clipline_core.job import JobState
from clipline_core.settings import Settings
from clipline_core.store import OWNER_FIELD, JobStore

VIDEO = "https://cdn.example.com/videos/product.mp4"
IMAGE = "https://cdn.example.com/images/product.jpg"


def body(**changes: Any) -> dict[str, Any]:
    b: dict[str, Any] = {
        "video_url": VIDEO,
        "image_urls": [IMAGE],
        "title": "Blue kettle",
        "description": "A kettle",
        "duration_s": 5.0,
        "priority": "normal",
    }
    b.update(changes)
    return b


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def http(live_api: Api) -> Any:
    with httpx.Client(base_url=live_api.url, headers=auth(live_api.keys.full)) as c:
        yield c


def post(http: httpx.Client, data: Any, **headers: str) -> httpx.Response:
    return http.post("/v1/jobs", json=data, headers=headers)


def error_code(resp: httpx.Response) -> str:
    return str(resp.json()["error"]["code"])


# ---------------------------------------------------------------------------
# submit / get
# ---------------------------------------------------------------------------
def test_submit_answers_202_with_location_and_queues_the_task(
    live_api: Api, http: httpx.Client, redis_client: redis.Redis
) -> None:
    resp = post(http, body(priority="high"))
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]
    assert resp.headers["Location"] == f"/v1/jobs/{job_id}"
    assert resp.json()["state"] == "queued" and resp.json()["replayed"] is False

    got = http.get(resp.headers["Location"])
    assert got.status_code == 200
    view = got.json()
    assert view["id"] == job_id and view["state"] == "queued"
    assert view["priority"] == "high" and view["title"] == "Blue kettle"
    assert view["result"] is None and view["error"] is None
    assert set(view["timings"]) >= {"queued_s", "fetch_s", "total_s"}
    # The Celery message is on the deployment's queue at the high class's priority (0).
    queue = constants.queue_name(live_api.settings.deployment)
    messages = [json.loads(m) for m in redis_client.lrange(queue, 0, -1)]
    tasks = [(m["headers"]["task"], m["headers"]["argsrepr"]) for m in messages]
    assert (constants.CELERY_TASK_PROCESS_JOB, repr([job_id])) in tasks
    # The job records which key created it.
    assert redis_client.hget(constants.job_key(live_api.settings.deployment, job_id), OWNER_FIELD)


def test_client_submit_get_and_typed_views(live_api: Api) -> None:
    with live_api.client() as api:
        accepted = api.submit(VIDEO, [IMAGE], title="t", duration_s=3.0, priority="low")
        view = api.get(accepted.id)
    assert view.id == accepted.id and view.state == JobState.QUEUED
    assert view.duration_s == 3.0 and view.priority.value == "low"
    assert view.links.highlight == f"/v1/jobs/{accepted.id}/highlight"


# ---------------------------------------------------------------------------
# idempotency
# ---------------------------------------------------------------------------
def test_idempotency_same_body_same_job_other_body_conflict(
    live_api: Api, http: httpx.Client
) -> None:
    first = post(http, body(), **{"Idempotency-Key": "order-42"})
    again = post(http, body(), **{"Idempotency-Key": "order-42"})
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["replayed"] is True
    assert again.headers[constants.HEADER_IDEMPOTENT_REPLAYED] == "true"
    assert again.headers["Location"] == first.headers["Location"]

    other = post(http, body(title="another"), **{"Idempotency-Key": "order-42"})
    assert other.status_code == 409
    assert error_code(other) == "idempotency_conflict"
    assert other.json()["error"]["job_id"] == first.json()["id"]

    # Keys are scoped per tenant: another backend's identical key is its own job.
    theirs = httpx.post(
        live_api.url + "/v1/jobs",
        json=body(),
        headers={**auth(live_api.keys.other), "Idempotency-Key": "order-42"},
    )
    assert theirs.status_code == 202 and theirs.json()["id"] != first.json()["id"]
    # Without a key every request is a new job.
    assert post(http, body()).json()["id"] != post(http, body()).json()["id"]


def test_client_submit_retries_safely_with_its_idempotency_key(live_api: Api) -> None:
    with live_api.client() as api:
        a = api.submit(VIDEO, [IMAGE], idempotency_key="k-1")
        b = api.submit(VIDEO, [IMAGE], idempotency_key="k-1")
        assert a.id == b.id and b.replayed
        with pytest.raises(ApiError) as err:
            api.submit(VIDEO, [IMAGE], title="x", idempotency_key="k-1")
    assert err.value.status == 409 and err.value.code == "idempotency_conflict"


# ---------------------------------------------------------------------------
# authentication
# ---------------------------------------------------------------------------
def test_auth_failures_are_401_and_scope_failures_403(live_api: Api) -> None:
    url, keys = live_api.url, live_api.keys
    missing = httpx.post(url + "/v1/jobs", json=body())
    assert missing.status_code == 401 and error_code(missing) == "unauthenticated"
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    wrong = httpx.get(url + "/v1/jobs/" + "0" * 32, headers=auth("clk_not-a-key"))
    assert wrong.status_code == 401 and "invalid_token" in wrong.headers["WWW-Authenticate"]
    basic = httpx.get(url + "/v1/jobs/" + "0" * 32, headers={"Authorization": "Basic Zm9vOmJhcg=="})
    assert basic.status_code == 401
    # A hash of a configured key is not a key.
    from clipline.api.auth import hash_key

    hashed = httpx.get(url + "/v1/jobs/" + "0" * 32, headers=auth(hash_key(keys.full)))
    assert hashed.status_code == 401

    # The read-only key may read but not submit or cancel: 403, not 401.
    job_id = httpx.post(url + "/v1/jobs", json=body(), headers=auth(keys.full)).json()["id"]
    denied = httpx.post(url + "/v1/jobs", json=body(), headers=auth(keys.reader))
    assert denied.status_code == 403 and error_code(denied) == "forbidden"
    assert httpx.delete(f"{url}/v1/jobs/{job_id}", headers=auth(keys.reader)).status_code == 403
    assert httpx.get(f"{url}/v1/jobs/{job_id}", headers=auth(keys.reader)).status_code == 200
    # The reader shares the tenant of "full"; another tenant's key does not see the job.
    assert httpx.get(f"{url}/v1/jobs/{job_id}", headers=auth(keys.other)).status_code == 404
    assert httpx.delete(f"{url}/v1/jobs/{job_id}", headers=auth(keys.other)).status_code == 404
    # Probes need no key.
    assert httpx.get(url + "/healthz").status_code == 200


def test_keys_are_not_logged(
    live_api: Api, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level("DEBUG")
    httpx.get(live_api.url + "/v1/jobs/" + "1" * 32, headers=auth(live_api.keys.full))
    httpx.get(live_api.url + "/v1/jobs/" + "1" * 32, headers=auth("clk_wrong-secret-value"))
    out, err = capfd.readouterr()
    text = caplog.text + out + err
    assert live_api.keys.full not in text and "clk_wrong-secret-value" not in text


def test_rate_limit_answers_429_with_retry_after(
    settings: Settings, keys: Keys, redis_client: redis.Redis
) -> None:
    s = api_settings(settings, keys, api_rate_limit=0.5, api_rate_burst=2)
    with running_api(s, keys, redis_client) as api:
        h = auth(keys.full)
        codes = [
            httpx.get(f"{api.url}/v1/jobs/{'2' * 32}", headers=h).status_code for _ in range(3)
        ]
        assert codes == [404, 404, 429]
        limited = httpx.get(f"{api.url}/v1/jobs/{'2' * 32}", headers=h)
        assert limited.status_code == 429 and error_code(limited) == "rate_limited"
        assert 1 <= int(limited.headers["Retry-After"]) <= 2
        # Limits are per key.
        other = httpx.get(f"{api.url}/v1/jobs/{'2' * 32}", headers=auth(keys.other))
        assert other.status_code == 404


# ---------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("data", "field"),
    [
        (body(colour="blue"), "colour"),
        ({k: v for k, v in body().items() if k != "image_urls"}, "image_urls"),
        (body(image_urls=[]), "image_urls"),
        (body(image_urls=[IMAGE] * 9), "image_urls"),
        (body(title="t" * 301), "title"),
        (body(duration_s=0.1), "duration_s"),
        (body(duration_s="long"), "duration_s"),
        (body(priority="urgent"), "priority"),
        (body(video_url="x" * 5000), "video_url"),
        (body(video_url="file:///etc/passwd"), "video_url"),
        (body(video_url="/srv/videos/a.mp4"), "video_url"),
        (body(video_url="ftp://cdn.example.com/a.mp4"), "video_url"),
        (body(image_urls=[IMAGE, "gopher://x/y"]), "image_urls[1]"),
        (body(callback_url="not a url"), "callback_url"),
        (body(upload_url="s3://bucket/key"), "upload_url"),
    ],
)
def test_invalid_requests_are_422_with_the_field(
    http: httpx.Client, data: dict[str, Any], field: str
) -> None:
    resp = post(http, data)
    assert resp.status_code == 422, resp.text
    err = resp.json()["error"]
    assert err["code"] == "invalid_request"
    locs = [".".join(str(p) for p in d["loc"]) for d in err["details"]]
    assert any(field.split("[")[0] in loc for loc in locs), locs


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data",
        "http://10.0.0.7/hook",
        "http://[::ffff:192.168.1.1]/hook",
        "http://0.0.0.0/hook",
    ],
)
def test_callback_urls_follow_the_ssrf_rules(http: httpx.Client, url: str) -> None:
    resp = post(http, body(callback_url=url))
    assert resp.status_code == 422
    assert error_code(resp) == "forbidden_source"
    # Video sources too.
    assert error_code(post(http, body(video_url=url))) == "forbidden_source"


def test_loopback_is_refused_unless_allowed(
    settings: Settings, keys: Keys, redis_client: redis.Redis
) -> None:
    s = api_settings(settings, keys, allow_loopback=False)
    with running_api(s, keys, redis_client) as api:
        r = httpx.post(
            api.url + "/v1/jobs",
            json=body(callback_url="http://127.0.0.1:9/hook"),
            headers=auth(keys.full),
        )
        assert r.status_code == 422 and error_code(r) == "forbidden_source"
        r = httpx.post(
            api.url + "/v1/jobs",
            json=body(callback_url="http://localhost:9/hook"),
            headers=auth(keys.full),
        )
        assert r.status_code == 422 and error_code(r) == "forbidden_source"


def test_local_paths_only_where_allowed(
    settings: Settings, keys: Keys, redis_client: redis.Redis, tmp_path: Path
) -> None:
    s = api_settings(settings, keys, api_allow_local_paths=True)
    with running_api(s, keys, redis_client) as api:
        r = httpx.post(
            api.url + "/v1/jobs",
            json=body(video_url=str(tmp_path / "v.mp4"), image_urls=["file:///tmp/p.jpg"]),
            headers=auth(keys.full),
        )
        assert r.status_code == 202, r.text
        rel = httpx.post(
            api.url + "/v1/jobs", json=body(video_url="v.mp4"), headers=auth(keys.full)
        )
        assert rel.status_code == 422


def test_callbacks_need_a_server_secret(
    settings: Settings, keys: Keys, redis_client: redis.Redis
) -> None:
    s = api_settings(settings, keys).replace(callback_secret="")
    with running_api(s, keys, redis_client) as api:
        r = httpx.post(
            api.url + "/v1/jobs",
            json=body(callback_url="https://hooks.example.com/clip"),
            headers=auth(keys.full),
        )
        assert r.status_code == 422 and "callback" in r.json()["error"]["message"]


def test_malformed_oversized_and_non_json_bodies(live_api: Api, http: httpx.Client) -> None:
    bad = http.post(
        "/v1/jobs", content=b'{"video_url": ', headers={"Content-Type": "application/json"}
    )
    assert bad.status_code == 400 and error_code(bad) == "malformed_body"
    text = http.post("/v1/jobs", content=json.dumps(body()), headers={"Content-Type": "text/plain"})
    assert text.status_code == 415 and error_code(text) == "unsupported_media_type"
    limit = live_api.settings.api_max_body_bytes
    big = post(http, body(description="d" * (limit + 10)))
    assert big.status_code == 413 and error_code(big) == "body_too_large"

    def chunks() -> Any:  # no Content-Length: the limit holds while streaming
        for _ in range(limit // 1000 + 2):
            yield b" " * 1000

    streamed = http.post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413
    bad_key = post(http, body(), **{"Idempotency-Key": "has space"})
    assert bad_key.status_code == 422
    assert post(http, body(), **{"Idempotency-Key": "k" * 256}).status_code == 422


def test_unknown_routes_and_methods_use_the_error_body(http: httpx.Client) -> None:
    nf = http.get("/v1/nothing")
    assert nf.status_code == 404 and error_code(nf) == "not_found"
    na = http.put("/v1/jobs/" + "a" * 32, json={})
    assert na.status_code == 405 and error_code(na) == "method_not_allowed"
    bad_id = http.get("/v1/jobs/not-an-id")
    assert bad_id.status_code == 404


# ---------------------------------------------------------------------------
# cancellation
# ---------------------------------------------------------------------------
def test_cancel_a_queued_job(live_api: Api, http: httpx.Client) -> None:
    job_id = post(http, body()).json()["id"]
    resp = http.delete(f"/v1/jobs/{job_id}")
    assert resp.status_code == 200, resp.text
    view = resp.json()
    assert view["state"] == "cancelled" and view["error"]["code"] == "cancelled"
    assert view["finished_at"] is not None
    assert http.get(f"/v1/jobs/{job_id}").json()["state"] == "cancelled"
    again = http.delete(f"/v1/jobs/{job_id}")
    assert again.status_code == 409 and error_code(again) == "conflict"
    assert http.delete("/v1/jobs/" + "f" * 32).status_code == 404


def test_cancel_stops_a_running_job_at_its_next_transition(live_api: Api) -> None:
    """A worker holding the job under a lease finds its next advance refused."""
    s = live_api.settings
    store = JobStore(redis.Redis.from_url(s.redis_url), s.deployment)
    with live_api.client() as api:
        job_id = api.submit(VIDEO, [IMAGE]).id
        status, _, _ = store.claim(job_id, "lease-1", 30.0, 5)
        assert status == 1
        assert api.get(job_id).state == JobState.FETCHING
        assert api.cancel(job_id).state == JobState.CANCELLED
        assert store.advance(job_id, JobState.DECODING, "lease-1") is False
        assert api.get(job_id).state == JobState.CANCELLED


def test_cancel_enqueues_a_signed_cancelled_event(
    live_api: Api, redis_client: redis.Redis, receiver: Any
) -> None:
    from clipline.client import verify_callback
    from workers import callbacks

    with live_api.client() as api:
        job_id = api.submit(VIDEO, [IMAGE], callback_url=receiver.url + "/hooks/clip").id
        api.cancel(job_id)
    queue = constants.callbacks_queue_name(live_api.settings.deployment)
    messages = [json.loads(m) for m in redis_client.lrange(queue, 0, -1)]
    sent = [m for m in messages if m["headers"]["task"] == constants.CELERY_TASK_DELIVER_CALLBACK]
    assert len(sent) == 1
    import base64

    args = json.loads(base64.b64decode(sent[0]["body"]))[0]
    assert args[0] == job_id and args[1] == receiver.url + "/hooks/clip"
    # What a worker would do with that message.
    result = callbacks.deliver(args[1], args[2].encode(), args[3], live_api.settings)
    assert result.ok and result.status == 200
    got = receiver.wait_for(1, 5)[0]
    event = verify_callback(CALLBACK_SECRET, got.body, got.headers[constants.HEADER_SIGNATURE])
    assert event.event == "job.cancelled" and event.job.id == job_id
    assert event.job.state == JobState.CANCELLED
    assert got.headers[constants.HEADER_EVENT_ID] == event.id == args[3]


# ---------------------------------------------------------------------------
# highlight download
# ---------------------------------------------------------------------------
def _succeed(api: Api, job_id: str, highlight: dict[str, Any]) -> None:
    """Finish a job the way a worker does: claim it, then finish it as succeeded."""
    store = JobStore(redis.Redis.from_url(api.settings.redis_url), api.settings.deployment)
    assert store.claim(job_id, "lease-x", 30.0, 5)[0] == 1
    assert store.finish(
        job_id,
        JobState.SUCCEEDED,
        lease="lease-x",
        highlight=highlight,
        timings={"queued": 0.1, "fetch": 0.2, "total": 1.5},
    )


def test_highlight_download_supports_ranges(live_api: Api, http: httpx.Client) -> None:
    job_id = post(http, body()).json()["id"]
    pending = http.get(f"/v1/jobs/{job_id}/highlight")
    assert pending.status_code == 409 and error_code(pending) == "not_ready"

    clip = live_api.settings.artifacts_path / f"{job_id}.mp4"
    clip.parent.mkdir(parents=True, exist_ok=True)
    payload = bytes(range(256)) * 40
    clip.write_bytes(payload)
    _succeed(
        live_api,
        job_id,
        {"start_s": 1.0, "end_s": 6.0, "score": 0.8, "path": str(clip), "codec": "h264"},
    )
    view = http.get(f"/v1/jobs/{job_id}").json()
    assert view["state"] == "succeeded"
    assert view["result"]["download"] == f"/v1/jobs/{job_id}/highlight"
    assert view["result"]["codec"] == "h264" and "path" not in view["result"]
    assert view["timings"]["total_s"] == 1.5

    full = http.get(f"/v1/jobs/{job_id}/highlight")
    assert full.status_code == 200 and full.content == payload
    assert full.headers["content-type"] == "video/mp4"
    part = http.get(f"/v1/jobs/{job_id}/highlight", headers={"Range": "bytes=100-299"})
    assert part.status_code == 206 and part.content == payload[100:300]
    assert part.headers["content-range"] == f"bytes 100-299/{len(payload)}"
    beyond = http.get(f"/v1/jobs/{job_id}/highlight", headers={"Range": "bytes=999999-"})
    assert beyond.status_code == 416

    with live_api.client() as api:
        dest = api.download(job_id, live_api.settings.state_dir)
    assert Path(dest).read_bytes() == payload and Path(dest).name == f"{job_id}.mp4"


def test_highlight_uploaded_elsewhere_or_outside_artifacts_is_404(
    live_api: Api, http: httpx.Client, tmp_path: Path
) -> None:
    uploaded = post(http, body(upload_url="https://bucket.example.com/put?sig=abc")).json()["id"]
    _succeed(
        live_api,
        uploaded,
        {"start_s": 0.0, "end_s": 5.0, "score": 0.5, "url": "https://bucket.example.com/put"},
    )
    view = http.get(f"/v1/jobs/{uploaded}").json()
    assert view["result"]["uploaded"] is True and view["result"]["download"] is None
    resp = http.get(f"/v1/jobs/{uploaded}/highlight")
    assert resp.status_code == 404 and "upload_url" in resp.json()["error"]["message"]

    stray = tmp_path / "secret.mp4"
    stray.write_bytes(b"not yours")
    outside = post(http, body()).json()["id"]
    _succeed(live_api, outside, {"start_s": 0.0, "end_s": 5.0, "score": 0.5, "path": str(stray)})
    assert http.get(f"/v1/jobs/{outside}/highlight").status_code == 404


# ---------------------------------------------------------------------------
# probes, metrics, OpenAPI
# ---------------------------------------------------------------------------
def test_probes_and_metrics(live_api: Api, http: httpx.Client) -> None:
    assert httpx.get(live_api.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(live_api.url + "/readyz").status_code == 200
    post(http, body())
    text = httpx.get(live_api.url + "/metrics").text
    assert constants.Metric.API_REQUESTS_TOTAL in text
    line = next(
        ln
        for ln in text.splitlines()
        if ln.startswith(constants.Metric.API_REQUESTS_TOTAL)
        and 'route="/v1/jobs"' in ln
        and 'status="202"' in ln
    )
    assert float(line.rsplit(" ", 1)[1]) >= 1


def test_redis_down_is_503_not_500(
    settings: Settings, keys: Keys, redis_client: redis.Redis
) -> None:
    import socket

    with socket.socket() as sock:  # a port with nothing listening
        sock.bind(("127.0.0.1", 0))
        dead = f"redis://127.0.0.1:{sock.getsockname()[1]}/0"
    s = api_settings(settings, keys).replace(redis_url=dead)
    with running_api(s, keys, redis_client) as api:
        assert httpx.get(api.url + "/readyz").status_code == 503
        r = httpx.get(f"{api.url}/v1/jobs/{'3' * 32}", headers=auth(keys.full))
        assert r.status_code == 503 and error_code(r) == "unavailable"
        assert r.headers["Retry-After"] == "1"


def test_openapi_document_matches_the_committed_one(live_api: Api) -> None:
    """docs/openapi.json is the contract; regenerate with `python -m clipline.api openapi`."""
    from clipline.api.__main__ import openapi_diff

    committed = Path(__file__).parents[2] / "docs" / "openapi.json"
    served = httpx.get(live_api.url + "/openapi.json").json()
    assert openapi_diff(json.loads(committed.read_text()), served) == []
    assert served == json.loads(committed.read_text())
    ops = served["paths"]
    assert set(ops) >= {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/highlight"}
    assert ops["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]
    schema = served["components"]["schemas"]["JobSpec"]
    assert schema["additionalProperties"] is False


def test_the_client_reports_timeouts_while_waiting(live_api: Api) -> None:
    with live_api.client() as api:
        job_id = api.submit(VIDEO, [IMAGE]).id
        with pytest.raises(ApiError) as err:
            api.wait(job_id, timeout_s=0.3, poll_s=0.05)
    assert err.value.code == "timeout"
