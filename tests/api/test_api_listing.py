"""Listing jobs, job metadata and ``Prefer: wait``, over real HTTP against real Redis.

* ``GET /v1/jobs``: the tenant's jobs only (the rule of ``GET /v1/jobs/{id}``), newest
  first, cursor pages that neither repeat nor skip a job while jobs are added, filters by
  state and creation time, expired jobs dropped from the index, the index capped;
* ``metadata``: stored with the job, returned in the document, the listing and the
  callback event; its limits refused with 422;
* ``Prefer: wait=N``: the answer comes when the job ends (woken by the store's pub/sub
  announcement, the API's threads free meanwhile) or after N seconds, N capped by the
  server, with ``Preference-Applied``; a submission that ends in time answers 201 with
  the document (200 for an idempotent replay).

No worker runs here: jobs are moved with the store's own transitions, as a worker does.
"""

from __future__ import annotations

import base64
import datetime
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
from api_helpers import Api, Keys, api_settings, running_api

from clipline.api.auth import LOCAL_TENANT, entry, new_key
from clipline.client import ApiError
from clipline_core import constants
from clipline_core.job import JobSpec, JobState
from clipline_core.settings import Settings
from clipline_core.store import JobStore

VIDEO = "https://cdn.example.com/videos/product.mp4"
IMAGE = "https://cdn.example.com/images/product.jpg"


def body(**changes: Any) -> dict[str, Any]:
    return {"video_url": VIDEO, "image_urls": [IMAGE], **changes}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def http(live_api: Api) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_api.url, headers=auth(live_api.keys.full), timeout=30) as c:
        yield c


def store_of(api: Api) -> JobStore:
    return JobStore(redis.Redis.from_url(api.settings.redis_url), api.settings.deployment)


def submit(http: httpx.Client, n: int, **changes: Any) -> list[str]:
    ids = []
    for _ in range(n):
        resp = http.post("/v1/jobs", json=body(**changes))
        assert resp.status_code == 202, resp.text
        ids.append(resp.json()["id"])
    return ids


def listed(http: httpx.Client, **params: Any) -> tuple[list[str], str | None]:
    resp = http.get("/v1/jobs", params=params)
    assert resp.status_code == 200, resp.text
    return [j["id"] for j in resp.json()["jobs"]], resp.json()["next_cursor"]


def finish(api: Api, job_id: str, to: JobState = JobState.SUCCEEDED) -> None:
    """End a job the way a worker does: claim it, then finish it."""
    store = store_of(api)
    assert store.claim(job_id, "lease-w", 30.0, 5)[0] == 1
    if to == JobState.SUCCEEDED:
        highlight = {"start_s": 0.0, "end_s": 5.0, "score": 0.6, "codec": "h264"}
        assert store.finish(job_id, to, lease="lease-w", highlight=highlight)
    else:
        error = {"code": "not_a_video", "message": "not a video"}
        assert store.finish(job_id, to, lease="lease-w", error=error)


# ---------------------------------------------------------------------------
# GET /v1/jobs
# ---------------------------------------------------------------------------
def test_listing_pages_newest_first_without_repeats_or_gaps(
    live_api: Api, http: httpx.Client
) -> None:
    ids = submit(http, 25)
    first, cursor = listed(http, limit=10)
    assert first == ids[::-1][:10] and cursor
    # Jobs created meanwhile go to the top; the pages that follow are not shifted.
    newer = submit(http, 3)
    second, cursor = listed(http, limit=10, cursor=cursor)
    third, last = listed(http, limit=10, cursor=cursor)
    assert second == ids[::-1][10:20] and third == ids[::-1][20:] and last is None
    everything, end = listed(http, limit=100)
    assert everything == (ids + newer)[::-1] and end is None
    # The default page size is 20.
    assert len(listed(http)[0]) == 20
    # The cursor is opaque, but it is a position: the last job's, not a page number.
    assert cursor is not None
    assert base64.urlsafe_b64decode(cursor + "==").decode().endswith(":" + second[-1])


def test_listing_shows_the_tenants_jobs_only(
    settings: Settings, keys: Keys, redis_client: redis.Redis
) -> None:
    local_key = new_key()
    s = api_settings(settings, keys)
    s = s.replace(api_keys=s.api_keys + "," + entry(LOCAL_TENANT, local_key))
    with running_api(s, keys, redis_client) as api:
        mine = [
            httpx.post(api.url + "/v1/jobs", json=body(), headers=auth(keys.full)).json()["id"]
            for _ in range(3)
        ]
        theirs = httpx.post(api.url + "/v1/jobs", json=body(), headers=auth(keys.other))
        # A job of the local tools (no tenant) is the local stack's key's.
        store = store_of(api)
        unowned, _ = store.create(JobSpec(video_url=VIDEO, image_urls=[IMAGE]))

        def ids(key: str) -> list[str]:
            resp = httpx.get(api.url + "/v1/jobs", headers=auth(key))
            assert resp.status_code == 200
            return [j["id"] for j in resp.json()["jobs"]]

        assert ids(keys.full) == mine[::-1]
        assert ids(keys.reader) == mine[::-1]  # another key of the same tenant
        assert ids(keys.other) == [theirs.json()["id"]]
        assert ids(local_key) == [unowned]
        # The same rule as a read by id: whatever a key lists it can read, and only that.
        for job_id in mine:
            assert (
                httpx.get(f"{api.url}/v1/jobs/{job_id}", headers=auth(keys.other)).status_code
                == 404
            )
        assert httpx.get(api.url + "/v1/jobs").status_code == 401


def test_listing_filters_by_state_and_creation_time(live_api: Api, http: httpx.Client) -> None:
    ids = submit(http, 6)
    finish(live_api, ids[0])
    finish(live_api, ids[1], JobState.FAILED)
    assert http.delete(f"/v1/jobs/{ids[2]}").status_code == 200
    assert listed(http, state="succeeded")[0] == [ids[0]]
    assert listed(http, state="failed,cancelled")[0] == [ids[2], ids[1]]
    # Repeated parameters are the same as a comma list.
    repeated = http.get("/v1/jobs", params=[("state", "failed"), ("state", "cancelled")])
    assert [j["id"] for j in repeated.json()["jobs"]] == [ids[2], ids[1]]
    assert listed(http, state="queued")[0] == ids[:2:-1]

    views = {j["id"]: j for j in http.get("/v1/jobs").json()["jobs"]}
    t1, t4 = views[ids[1]]["created_at"], views[ids[4]]["created_at"]
    # Exclusive bounds, in unix seconds ...
    assert listed(http, created_after=t1, created_before=t4)[0] == [ids[3], ids[2]]
    # ... or RFC 3339 with an offset (microseconds kept).
    utc = datetime.UTC
    after = datetime.datetime.fromtimestamp(t1, utc).isoformat()
    before = datetime.datetime.fromtimestamp(t4, datetime.timezone(datetime.timedelta(hours=2)))
    got = listed(http, created_after=after, created_before=before.isoformat())[0]
    assert got == [ids[3], ids[2]]
    zulu = datetime.datetime.fromtimestamp(t4, utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert listed(http, created_before=zulu)[0] == ids[:4][::-1]
    # Filters and pages together.
    page, cursor = listed(http, state="queued,succeeded", limit=2)
    rest, end = listed(http, state="queued,succeeded", limit=2, cursor=cursor)
    assert page + rest == [ids[5], ids[4], ids[3], ids[0]] and end is None


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 101}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"state": "done"}, "state"),
        ({"state": "queued,"}, "state"),
        ({"cursor": "not a cursor"}, "cursor"),
        ({"cursor": base64.urlsafe_b64encode(b"1.5:xyz").decode().rstrip("=")}, "cursor"),
        ({"cursor": "bm90aGluZw"}, "cursor"),
        ({"created_after": "yesterday"}, "created_after"),
        ({"created_after": "2024-05-01T00:00:00"}, "created_after"),  # no offset
        ({"created_before": "2024-13-01T00:00:00Z"}, "created_before"),
        ({"states": "queued"}, "states"),  # a typo is refused, not ignored
    ],
)
def test_invalid_listing_parameters_are_422(
    http: httpx.Client, params: dict[str, Any], field: str
) -> None:
    resp = http.get("/v1/jobs", params=params)
    assert resp.status_code == 422, resp.text
    err = resp.json()["error"]
    assert err["code"] == "invalid_request"
    assert any(d["loc"][:2] == ["query", field] for d in err["details"]), err


def test_expired_jobs_leave_the_index_when_listed(
    live_api: Api, http: httpx.Client, redis_client: redis.Redis
) -> None:
    ids = submit(http, 4)
    store = store_of(live_api)
    index = store.index_key("full")
    redis_client.delete(store.key(ids[1]), store.key(ids[2]))  # as if their TTL ran out
    assert redis_client.zcard(index) == 4
    assert listed(http)[0] == [ids[3], ids[0]]
    left: Any = redis_client.zrange(index, 0, -1)
    assert sorted(m.decode() for m in left) == sorted([ids[0], ids[3]])
    # The index itself expires a day after the jobs it could hold.
    ttl = redis_client.ttl(index)
    assert live_api.settings.terminal_ttl_s < ttl <= live_api.settings.terminal_ttl_s + 86_400


def test_the_index_is_capped_to_the_newest_jobs(
    live_api: Api, http: httpx.Client, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from clipline_core import store as store_module

    monkeypatch.setattr(store_module, "INDEX_CAP", 5)
    ids = submit(http, 8)
    assert redis_client.zcard(store_of(live_api).index_key("full")) == 5
    assert listed(http)[0] == ids[:2:-1]
    # Older jobs stay readable by id.
    assert http.get(f"/v1/jobs/{ids[0]}").status_code == 200


def test_a_filtered_page_may_be_short_but_the_cursor_goes_on(
    live_api: Api, redis_client: redis.Redis
) -> None:
    store = store_of(live_api)
    spec = JobSpec(video_url=VIDEO, image_urls=[IMAGE])
    ids = [store.create(spec, owner="full")[0] for _ in range(7)]
    finish(live_api, ids[0], JobState.FAILED)
    raws, position = store.list_jobs(
        "full", limit=5, states=frozenset({JobState.FAILED}), scan_max=3
    )
    assert raws == [] and position is not None  # three queued jobs read, none matched
    raws, position = store.list_jobs(
        "full", limit=5, after=position, states=frozenset({JobState.FAILED})
    )
    assert [r["id"] for r in raws] == [ids[0]] and position is None


# ---------------------------------------------------------------------------
# metadata
# ---------------------------------------------------------------------------
META = {"order_id": "A-1042", "sku": 31337, "weight": 1.5, "gift": False, "note": None}


def test_metadata_round_trips_through_the_job_listing_and_callback(
    live_api: Api, http: httpx.Client, redis_client: redis.Redis, receiver: Any
) -> None:
    resp = http.post("/v1/jobs", json=body(metadata=META, callback_url=receiver.url + "/hook"))
    job_id = resp.json()["id"]
    view = http.get(f"/v1/jobs/{job_id}").json()
    assert view["metadata"] == META
    assert {k: type(v) for k, v in view["metadata"].items()} == {
        k: type(v) for k, v in META.items()
    }
    assert http.get("/v1/jobs").json()["jobs"][0]["metadata"] == META
    plain = http.post("/v1/jobs", json=body()).json()["id"]
    assert http.get(f"/v1/jobs/{plain}").json()["metadata"] == {}

    # The callback event carries it (the message the API enqueued when the job ended).
    assert http.delete(f"/v1/jobs/{job_id}").status_code == 200
    queue = constants.callbacks_queue_name(live_api.settings.deployment)
    messages = [json.loads(m) for m in redis_client.lrange(queue, 0, -1)]
    (sent,) = [
        m for m in messages if m["headers"]["task"] == constants.CELERY_TASK_DELIVER_CALLBACK
    ]
    event = json.loads(json.loads(base64.b64decode(sent["body"]))[0][2])
    assert event["job"]["id"] == job_id and event["job"]["metadata"] == META


def test_metadata_is_part_of_the_idempotency_fingerprint(http: httpx.Client) -> None:
    key = {"Idempotency-Key": "meta-1"}
    first = http.post("/v1/jobs", json=body(metadata={"a": 1, "b": "x"}), headers=key)
    # The same object in another key order is the same request.
    again = http.post("/v1/jobs", json=body(metadata={"b": "x", "a": 1}), headers=key)
    assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
    other = http.post("/v1/jobs", json=body(metadata={"a": 2, "b": "x"}), headers=key)
    assert other.status_code == 409
    # No metadata and an empty object are the same request.
    k2 = {"Idempotency-Key": "meta-2"}
    a = http.post("/v1/jobs", json=body(), headers=k2)
    b = http.post("/v1/jobs", json=body(metadata={}), headers=k2)
    assert b.status_code == 202 and a.json()["id"] == b.json()["id"]


@pytest.mark.parametrize(
    "metadata",
    [
        {"nested": {"a": 1}},
        {"list": [1, 2]},
        {"": "empty key"},
        {"k" * 65: 1},
        {f"k{i}": i for i in range(17)},
        {"long": "x" * 511},  # 513 characters as JSON
        {"quotes": '"' * 300},  # short, but 602 characters as JSON
        {f"k{i}": "é" * 300 for i in range(8)},  # each fits; together over 4 KiB
        ["not", "an", "object"],
        "text",
    ],
)
def test_metadata_limits_are_422(http: httpx.Client, metadata: Any) -> None:
    resp = http.post("/v1/jobs", json=body(metadata=metadata))
    assert resp.status_code == 422, resp.text
    err = resp.json()["error"]
    assert err["code"] == "invalid_request"
    assert any(d["loc"][:2] == ["body", "metadata"] for d in err["details"]), err


def test_metadata_at_its_limits_is_accepted(http: httpx.Client) -> None:
    full = {f"k{i:02d}" + "x" * 61: "y" * 180 for i in range(16)}  # 16 keys of 64 chars
    assert len(json.dumps(full, separators=(",", ":")).encode()) <= 4096
    resp = http.post("/v1/jobs", json=body(metadata=full))
    assert resp.status_code == 202, resp.text
    edge = {"v": "x" * 510}  # exactly 512 characters as JSON
    resp = http.post("/v1/jobs", json=body(metadata=edge))
    assert resp.status_code == 202, resp.text
    assert http.get(f"/v1/jobs/{resp.json()['id']}").json()["metadata"] == edge


# ---------------------------------------------------------------------------
# Prefer: wait=N
# ---------------------------------------------------------------------------
def later(seconds: float, fn: Any, *args: Any) -> threading.Thread:
    def run() -> None:
        time.sleep(seconds)
        fn(*args)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_get_waits_until_the_job_ends(live_api: Api, http: httpx.Client) -> None:
    (job_id,) = submit(http, 1)
    worker = later(0.5, finish, live_api, job_id)
    start = time.monotonic()
    resp = http.get(f"/v1/jobs/{job_id}", headers={"Prefer": "wait=20"})
    elapsed = time.monotonic() - start
    worker.join()
    assert resp.status_code == 200 and resp.json()["state"] == "succeeded"
    assert resp.headers["Preference-Applied"] == "wait=20"
    # Woken by the job's end, not by the time running out (20 s; 10 s of margin).
    assert 0.4 <= elapsed < 10


def test_get_waits_at_most_n_seconds_and_answers_the_job_as_it_is(
    live_api: Api, http: httpx.Client
) -> None:
    (job_id,) = submit(http, 1)
    store = store_of(live_api)
    later(0.2, store.claim, job_id, "lease-w", 30.0, 5)  # a transition that ends nothing
    start = time.monotonic()
    resp = http.get(f"/v1/jobs/{job_id}", headers={"Prefer": "respond-async, wait=1"})
    assert time.monotonic() - start >= 1.0
    assert resp.json()["state"] == "fetching"  # read again when the time was up
    assert resp.headers["Preference-Applied"] == "wait=1"
    # A job that already ended is answered at once; the preference still applies.
    finish_id = submit(http, 1)[0]
    finish(live_api, finish_id)
    done = http.get(f"/v1/jobs/{finish_id}", headers={"Prefer": "wait=30"})
    assert done.json()["state"] == "succeeded" and done.headers["Preference-Applied"] == "wait=30"
    # No preference, or one that is not delta-seconds: no wait and no header.
    for prefer in (None, "wait=soon", "wait=-1", "return=minimal"):
        plain = http.get(f"/v1/jobs/{job_id}", headers={"Prefer": prefer} if prefer else {})
        assert plain.status_code == 200 and "Preference-Applied" not in plain.headers


def test_waits_are_capped_and_bounded_in_number(
    settings: Settings, keys: Keys, redis_client: redis.Redis
) -> None:
    s = api_settings(settings, keys, api_max_wait_s=1, api_max_waiters=1, api_threads=1)
    with (
        running_api(s, keys, redis_client) as api,
        httpx.Client(base_url=api.url, headers=auth(keys.full), timeout=30) as http,
    ):
        (job_id,) = submit(http, 1)
        results: dict[str, httpx.Response] = {}

        def long_read() -> None:
            results["long"] = http.get(f"/v1/jobs/{job_id}", headers={"Prefer": "wait=600"})

        waiter = threading.Thread(target=long_read)
        waiter.start()
        time.sleep(0.3)
        # The only waiter slot is taken: this one is answered at once, unwaited; and the
        # API's one thread is free while the other request waits.
        busy = http.get(f"/v1/jobs/{job_id}", headers={"Prefer": "wait=5"})
        assert "long" not in results
        assert busy.status_code == 200 and "Preference-Applied" not in busy.headers
        waiter.join(10)
        assert results["long"].headers["Preference-Applied"] == "wait=1"  # capped


def _finish_when_listed(api: Api, out: dict[str, str], to: JobState = JobState.SUCCEEDED) -> None:
    """A worker that ends the first job that appears in the tenant's index."""
    r = redis.Redis.from_url(api.settings.redis_url)
    index = store_of(api).index_key("full")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        members: Any = r.zrange(index, 0, -1)
        if members:
            out["id"] = members[0].decode()
            time.sleep(0.2)
            finish(api, out["id"], to)
            return
        time.sleep(0.02)


def test_submit_with_wait_answers_201_with_the_document_when_the_job_ends(
    live_api: Api, http: httpx.Client
) -> None:
    seen: dict[str, str] = {}
    worker = threading.Thread(target=_finish_when_listed, args=(live_api, seen))
    worker.start()
    headers = {"Prefer": "wait=20", "Idempotency-Key": "wait-1"}
    resp = http.post("/v1/jobs", json=body(metadata={"m": 1}), headers=headers)
    worker.join()
    assert resp.status_code == 201, resp.text
    doc = resp.json()
    assert doc["id"] == seen["id"] and doc["state"] == "succeeded" and doc["metadata"] == {"m": 1}
    assert resp.headers["Location"] == f"/v1/jobs/{doc['id']}"
    assert resp.headers["Preference-Applied"] == "wait=20"
    assert "Idempotent-Replayed" not in resp.headers
    # Replaying the request: its job, ended: 200 with the document.
    replay = http.post("/v1/jobs", json=body(metadata={"m": 1}), headers=headers)
    assert replay.status_code == 200 and replay.json() == http.get(f"/v1/jobs/{doc['id']}").json()
    assert replay.headers["Idempotent-Replayed"] == "true"
    # Without the preference, a replay stays 202.
    plain = http.post(
        "/v1/jobs", json=body(metadata={"m": 1}), headers={"Idempotency-Key": "wait-1"}
    )
    assert plain.status_code == 202 and plain.json()["replayed"] is True


def test_submit_with_wait_answers_202_when_the_job_runs_on(http: httpx.Client) -> None:
    start = time.monotonic()
    resp = http.post("/v1/jobs", json=body(), headers={"Prefer": "wait=1"})
    assert time.monotonic() - start >= 1.0
    assert resp.status_code == 202 and resp.json()["state"] == "queued"
    assert resp.headers["Preference-Applied"] == "wait=1"
    assert resp.headers["Location"] == f"/v1/jobs/{resp.json()['id']}"


# ---------------------------------------------------------------------------
# the Python client
# ---------------------------------------------------------------------------
def test_client_lists_iterates_and_waits(live_api: Api) -> None:
    with live_api.client() as api:
        ids = [api.submit(VIDEO, [IMAGE], metadata={"i": i}).id for i in range(5)]
        finish(live_api, ids[1], JobState.FAILED)
        jobs, cursor = api.list_jobs(limit=2)
        assert [j.id for j in jobs] == ids[:2:-1] and cursor
        more, cursor = api.list_jobs(limit=2, cursor=cursor)
        assert [j.id for j in more] == [ids[2], ids[1]] and cursor
        assert [j.id for j in api.iter_jobs(page_size=2)] == ids[::-1]
        assert [j.id for j in api.iter_jobs(state=["queued"], page_size=1)] == [
            ids[4],
            ids[3],
            ids[2],
            ids[0],
        ]
        failed, end = api.list_jobs(state=JobState.FAILED)
        assert [j.id for j in failed] == [ids[1]] and end is None
        assert failed[0].metadata == {"i": 1}
        t2 = api.get(ids[2]).created_at
        newer = [j.id for j in api.iter_jobs(created_after=t2)]
        assert newer == [ids[4], ids[3]]
        when = datetime.datetime.fromtimestamp(t2, datetime.UTC)
        assert [j.id for j in api.iter_jobs(created_before=when)] == [ids[1], ids[0]]
        with pytest.raises(ValueError):
            api.list_jobs(created_after=datetime.datetime(2024, 1, 1))  # no timezone
        with pytest.raises(ApiError) as err:
            api.list_jobs(cursor="bogus")
        assert err.value.status == 422

        # get(wait_s=...) and wait() are woken by the job's end.
        worker = later(0.3, finish, live_api, ids[3])
        assert api.get(ids[3], wait_s=20).state == JobState.SUCCEEDED
        worker.join()
        worker = later(0.3, finish, live_api, ids[4], JobState.FAILED)
        start = time.monotonic()
        assert api.wait(ids[4], timeout_s=30, poll_s=5, max_poll_s=5).state == JobState.FAILED
        worker.join()
        assert time.monotonic() - start < 5  # a poll every 5 s would have waited 5 s
        with pytest.raises(ApiError) as err:
            api.wait(ids[0], timeout_s=1.5)
        assert err.value.code == "timeout"
