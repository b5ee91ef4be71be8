"""What the job API does with bad or hostile input, over real HTTP against real Redis.

* a job stored without a tenant (``clipline highlight`` into a running stack) is the
  local stack's key's alone: every other key gets 404 on every job route;
* bad request bodies are 422 ``invalid_request`` (strict numbers, finite only, no
  control characters in sources, an aspect of the closed set), and the published
  schema says what is enforced; ``aspect`` round-trips (API, client and CLI);
* ``OPTIONS`` and 405 answers name every method of the path;
* slow clients (no bytes, dripped headers, a body that never ends, an idle keep-alive)
  are answered 408 or disconnected within the configured timeouts, by the server as
  ``clipline api`` configures it (threaded uvicorn here, and a ``clipline api``
  process);
* ``clipline submit`` refuses bad input with a message and exit status 2.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import redis
from api_helpers import Api, Keys, api_settings, purge, running_api
from pydantic import ValidationError

from clipline import cli
from clipline.api.auth import LOCAL_TENANT, entry, new_key, parse_entry
from clipline.api.server import MAX_HEAD_BYTES, BoundedHttpProtocol, server_config
from clipline_core.job import JobSpec, JobState
from clipline_core.settings import Settings
from clipline_core.store import JobStore
from workers.submit import submit

VIDEO = "https://cdn.example.com/videos/product.mp4"
IMAGE = "https://cdn.example.com/images/product.jpg"
DOCUMENT = Path(__file__).parents[2] / "docs" / "openapi.json"


def body(**changes: Any) -> dict[str, Any]:
    return {"video_url": VIDEO, "image_urls": [IMAGE], **changes}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def post_raw(api: Api, payload: bytes) -> httpx.Response:
    headers = {**auth(api.keys.full), "Content-Type": "application/json"}
    return httpx.post(api.url + "/v1/jobs", content=payload, headers=headers)


# ---------------------------------------------------------------------------
# Jobs without a tenant.
# ---------------------------------------------------------------------------
@pytest.fixture
def local_key() -> str:
    return new_key()


@pytest.fixture
def tenant_api(
    settings: Settings, keys: Keys, local_key: str, redis_client: redis.Redis
) -> Iterator[Api]:
    """The usual keys (tenants full and other) plus the local stack's kind of key."""
    s = api_settings(settings, keys)
    s = s.replace(api_keys=s.api_keys + "," + entry(LOCAL_TENANT, local_key))
    with running_api(s, keys, redis_client) as api:
        yield api


def _tenantless_succeeded_job(api: Api) -> str:
    """A finished job stored the way ``clipline highlight`` stores it: no owner."""
    client = redis.Redis.from_url(api.settings.redis_url)
    store = JobStore(client, api.settings.deployment)
    job_id, created = submit(
        store, api.app.state.services.celery, JobSpec(video_url=VIDEO, image_urls=[IMAGE])
    )
    assert created
    clip = api.settings.artifacts_path / f"{job_id}.mp4"
    clip.parent.mkdir(parents=True, exist_ok=True)
    clip.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"clip" * 100)
    assert store.claim(job_id, "lease-x", 30.0, 5)[0] == 1
    assert store.finish(
        job_id,
        JobState.SUCCEEDED,
        lease="lease-x",
        highlight={"start_s": 0.0, "end_s": 5.0, "score": 0.9, "path": str(clip)},
    )
    client.close()
    return job_id


def test_a_tenantless_job_is_seen_only_by_the_local_key(tenant_api: Api, local_key: str) -> None:
    job_id = _tenantless_succeeded_job(tenant_api)
    paths = [f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/highlight"]
    with httpx.Client(base_url=tenant_api.url) as http:
        for key in (tenant_api.keys.full, tenant_api.keys.reader, tenant_api.keys.other):
            for path in paths:
                r = http.get(path, headers=auth(key))
                assert r.status_code == 404, (path, r.status_code)
                assert r.json()["error"]["code"] == "not_found"
                assert b"clip" not in r.content
            gone = http.delete(f"/v1/jobs/{job_id}", headers=auth(key))
            assert gone.status_code in (403, 404)  # reader may not cancel at all
        # The local stack's key sees it, clip included.
        view = http.get(paths[0], headers=auth(local_key))
        assert view.status_code == 200 and view.json()["state"] == "succeeded"
        clip = http.get(paths[1], headers=auth(local_key))
        assert clip.status_code == 200 and clip.content.endswith(b"clip" * 100)
        # A tenant's own job stays its own: the local key gets 404 for it.
        own = http.post("/v1/jobs", json=body(), headers=auth(tenant_api.keys.full))
        assert own.status_code == 202
        other = http.get(f"/v1/jobs/{own.json()['id']}", headers=auth(local_key))
        assert other.status_code == 404
        assert (
            http.delete(f"/v1/jobs/{own.json()['id']}", headers=auth(local_key)).status_code == 404
        )


def test_the_local_stack_key_is_the_local_tenant(settings: Settings) -> None:
    """The key ``clipline up`` makes belongs to the tenant that owns tenantless jobs."""
    from clipline.stack import LocalStack

    stack = LocalStack(settings.replace(api_keys="", api_key_file=""), api=True)
    stack._prepare_api()
    (key,) = [parse_entry(e) for e in stack.settings.api_keys.split(",")]
    assert key.tenant == LOCAL_TENANT
    assert key.sees(None) and key.sees("") and not key.sees("shop-1")
    assert not parse_entry(entry("shop-1", new_key())).sees(None)


# ---------------------------------------------------------------------------
# Request bodies.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"duration_s": "5"}, "duration_s"),
        ({"duration_s": True}, "duration_s"),
        ({"duration_s": False}, "duration_s"),
        ({"duration_s": None}, "duration_s"),
        ({"duration_s": [5]}, "duration_s"),
        ({"duration_s": 1e308 * 10}, "duration_s"),  # sent as Infinity
        ({"title": 5}, "title"),
        ({"description": True}, "description"),
        ({"priority": 1}, "priority"),
        ({"priority": True}, "priority"),
        ({"image_urls": IMAGE}, "image_urls"),
        ({"image_urls": [""]}, "image_urls"),
        ({"image_urls": [IMAGE] * 9}, "image_urls"),
        ({"image_urls": ["x" * 4097]}, "image_urls"),
        ({"video_url": ""}, "video_url"),
        ({"video_url": "https://cdn.example.com/a\r\nX-Injected: 1"}, "video_url"),
        ({"callback_url": "https://hooks.example.com/\x00"}, "callback_url"),
        ({"upload_url": "https://bucket.example.com/\t"}, "upload_url"),
        ({"aspect": "16:9"}, "aspect"),
        ({"aspect": "9x16"}, "aspect"),
        ({"aspect": None}, "aspect"),
        ({"aspect": 1}, "aspect"),
    ],
)
def test_bad_fields_are_422_invalid_request(
    live_api: Api, changes: dict[str, Any], field: str
) -> None:
    payload = json.dumps(body(**changes)).encode()  # allow_nan: Infinity goes out as is
    r = post_raw(live_api, payload)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_request"
    assert any(d["loc"][:2] == ["body", field] for d in err["details"]), err


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_durations_are_422(live_api: Api, literal: str) -> None:
    payload = json.dumps(body(duration_s=12345.0)).replace("12345.0", literal).encode()
    r = post_raw(live_api, payload)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_request"


def test_integral_durations_are_numbers(live_api: Api) -> None:
    r = post_raw(live_api, json.dumps(body(duration_s=7)).encode())
    assert r.status_code == 202, r.text
    got = httpx.get(live_api.url + r.headers["Location"], headers=auth(live_api.keys.full))
    assert got.json()["duration_s"] == 7.0


def test_aspect_round_trips_and_a_bad_one_is_422_naming_the_choices(live_api: Api) -> None:
    with live_api.client() as client:
        for aspect in ("9:16", "1:1", "4:5", "source"):
            accepted = client.submit(VIDEO, [IMAGE], aspect=aspect)
            assert client.get(accepted.id).aspect.value == aspect
    r = post_raw(live_api, json.dumps(body()).encode())
    got = httpx.get(live_api.url + r.headers["Location"], headers=auth(live_api.keys.full))
    assert got.json()["aspect"] == "source"  # the default: the source's own picture
    bad = post_raw(live_api, json.dumps(body(aspect="16:9")).encode())
    assert bad.status_code == 422, bad.text
    err = bad.json()["error"]
    assert err["code"] == "invalid_request" and err["details"][0]["loc"] == ["body", "aspect"]
    assert all(f"'{a}'" in err["message"] for a in ("9:16", "1:1", "4:5", "source")), err
    # The default aspect keeps a spec's idempotency fingerprint; another changes it.
    plain = JobSpec(video_url=VIDEO, image_urls=[IMAGE])
    assert JobSpec(video_url=VIDEO, image_urls=[IMAGE], aspect="source").canonical_json() == (
        plain.canonical_json()
    )
    assert JobSpec(video_url=VIDEO, image_urls=[IMAGE], aspect="9:16").canonical_json() != (
        plain.canonical_json()
    )


@pytest.mark.parametrize("where", ["video_url", "image_urls"])
def test_a_local_path_with_a_nul_byte_is_refused_at_submit(
    settings: Settings, keys: Keys, redis_client: redis.Redis, tmp_path: Path, where: str
) -> None:
    s = api_settings(settings, keys, api_allow_local_paths=True)
    bad = str(tmp_path / "clip\x00.mp4")
    data = body(video_url=bad) if where == "video_url" else body(image_urls=[IMAGE, bad])
    with running_api(s, keys, redis_client) as api:
        r = httpx.post(api.url + "/v1/jobs", json=data, headers=auth(keys.full))
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert err["code"] == "invalid_request" and "control characters" in err["message"]
        assert err["details"][0]["loc"][:2] == ["body", where]
        # Nothing was stored or queued.
        assert not list(redis_client.scan_iter(match=f"*{s.deployment}*job:*"))
        fine = httpx.post(
            api.url + "/v1/jobs",
            json=body(video_url=str(tmp_path / "clip one.mp4")),
            headers=auth(keys.full),
        )
        assert fine.status_code == 202, fine.text


def _job_spec_validator() -> jsonschema.protocols.Validator:
    doc = json.loads(DOCUMENT.read_text())
    schema = {"$ref": "#/components/schemas/JobSpec", "components": doc["components"]}
    return jsonschema.Draft202012Validator(schema)


AGREEMENT = [
    body(),
    body(image_urls=[""]),
    body(image_urls=[]),
    body(image_urls=[IMAGE] * 8),
    body(image_urls=[IMAGE] * 9),
    body(image_urls=["i" * 4096]),
    body(image_urls=["i" * 4097]),
    body(video_url="v" * 4097),
    body(video_url="/srv/a\x00.mp4"),
    body(video_url="/srv/a b.mp4"),
    body(callback_url=""),
    body(callback_url=None),
    # (An embedded newline: Python's re, unlike ECMA-262 and the server, lets "$" match
    # before a trailing one.)
    body(upload_url="u\nv"),
    body(duration_s="5"),
    body(duration_s=True),
    body(duration_s=0.49),
    body(duration_s=0.5),
    body(duration_s=60),
    body(duration_s=60.01),
    body(title="t" * 300),
    body(title="t" * 301),
    body(description="d" * 5001),
    body(priority="urgent"),
    body(priority="low"),
    body(extra=1),
    {"video_url": VIDEO},
    body(metadata={"order": "A-1", "n": 3, "w": 1.5, "gift": False, "note": None}),
    body(metadata={}),
    body(metadata=None),
    body(metadata={"nested": {"a": 1}}),
    body(metadata={"list": [1]}),
    body(metadata={"": 1}),
    body(metadata={"k" * 64: 1}),
    body(metadata={"k" * 65: 1}),
    body(metadata={f"k{i}": i for i in range(16)}),
    body(metadata={f"k{i}": i for i in range(17)}),
    body(metadata={"v": "x" * 510}),
    body(metadata={"v": "x" * 511}),
    body(metadata=["a"]),
    body(aspect="9:16"),
    body(aspect="1:1"),
    body(aspect="4:5"),
    body(aspect="source"),
    body(aspect="16:9"),
    body(aspect="SOURCE"),
    body(aspect=None),
]


def test_the_published_schema_and_the_model_agree() -> None:
    """A body is schema-valid exactly when the model accepts it (the URL policy aside)."""
    validator = _job_spec_validator()
    for data in AGREEMENT:
        try:
            JobSpec.model_validate(data)
            accepted = True
        except ValidationError:
            accepted = False
        assert validator.is_valid(data) == accepted, data
    items = json.loads(DOCUMENT.read_text())["components"]["schemas"]["JobSpec"]["properties"]
    urls = items["image_urls"]
    assert urls["maxItems"] == 8 and urls["minItems"] == 1
    assert urls["items"]["minLength"] == 1 and urls["items"]["maxLength"] == 4096


def test_schema_invalid_bodies_are_refused_by_the_server(live_api: Api) -> None:
    validator = _job_spec_validator()
    refused = [d for d in AGREEMENT if not validator.is_valid(d)]
    assert len(refused) > 10
    for data in refused:
        r = post_raw(live_api, json.dumps(data).encode())
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", data


# ---------------------------------------------------------------------------
# Methods.
# ---------------------------------------------------------------------------
def test_options_and_405_name_every_method_of_the_path(live_api: Api) -> None:
    job = live_api.url + "/v1/jobs/" + "a" * 32
    with httpx.Client(headers=auth(live_api.keys.full)) as http:
        opts = http.options(job)
        assert opts.status_code == 204 and opts.content == b""
        assert {m.strip() for m in opts.headers["Allow"].split(",")} == {"DELETE", "GET", "OPTIONS"}
        put = http.put(job, json={})
        assert put.status_code == 405 and put.json()["error"]["code"] == "method_not_allowed"
        assert {m.strip() for m in put.headers["Allow"].split(",")} == {"DELETE", "GET", "OPTIONS"}
        jobs = http.options(live_api.url + "/v1/jobs")
        assert {m.strip() for m in jobs.headers["Allow"].split(",")} == {"GET", "POST", "OPTIONS"}
        assert http.options(live_api.url + "/v1/nothing").status_code == 404


# ---------------------------------------------------------------------------
# Slow clients.
# ---------------------------------------------------------------------------
HEADER_S = 0.5
BODY_S = 0.5
KEEP_ALIVE_S = 1
# Every bound below is the configured timeout plus this margin (a loaded test machine).
MARGIN_S = 8.0


@pytest.fixture
def strict_api(settings: Settings, keys: Keys, redis_client: redis.Redis) -> Iterator[Api]:
    s = api_settings(
        settings,
        keys,
        api_header_timeout_s=HEADER_S,
        api_body_timeout_s=BODY_S,
        api_keep_alive_s=KEEP_ALIVE_S,
    )
    with running_api(s, keys, redis_client) as api:
        yield api


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=MARGIN_S + 5)
    return sock


def _read_to_close(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and when it closed (monotonic)."""
    got = b""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            return got, time.monotonic()
        if not chunk:
            return got, time.monotonic()
        got += chunk
    raise AssertionError(f"the server kept the connection open past {limit_s} s: {got!r}")


def _head(path: str, key: str, length: int, method: str = "POST") -> bytes:
    return (
        f"{method} {path} HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def test_slow_clients_are_answered_408_or_disconnected(strict_api: Api) -> None:
    key = strict_api.keys.full
    job = "/v1/jobs/" + "a" * 32
    n = 40
    silent = [_connect(strict_api.url) for _ in range(n)]
    partial_head = [_connect(strict_api.url) for _ in range(n)]
    partial_body = [_connect(strict_api.url) for _ in range(n)]
    get_with_body = [_connect(strict_api.url) for _ in range(n)]
    for s in partial_head:
        s.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: api\r\nAuthori")
    for s in partial_body:
        s.sendall(_head("/v1/jobs", key, 1000) + b'{"video_url": ')
    for s in get_with_body:  # a route that never reads the body it declares
        s.sendall(_head(job, key, 1000, method="GET") + b"{")
    started = time.monotonic()

    # The server keeps serving others meanwhile.
    ok = httpx.post(strict_api.url + "/v1/jobs", json=body(), headers=auth(key))
    assert ok.status_code == 202

    for s in silent:
        got, _ = _read_to_close(s, HEADER_S + MARGIN_S)
        assert got == b""  # nothing was asked: closed without an answer
    for s in partial_head:
        got, _ = _read_to_close(s, HEADER_S + MARGIN_S)
        assert got.startswith(b"HTTP/1.1 408 "), got
        assert json.loads(got.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
    for s in [*partial_body, *get_with_body]:
        got, _ = _read_to_close(s, BODY_S + MARGIN_S)
        assert got.startswith(b"HTTP/1.1 408 "), got
        assert b"request_timeout" in got and b"connection: close" in got.lower()
    assert time.monotonic() - started < max(HEADER_S, BODY_S) + MARGIN_S
    for s in [*silent, *partial_head, *partial_body, *get_with_body]:
        s.close()
    # The server holds none of those connections any more.
    assert strict_api.server is not None
    state = strict_api.server.server.server_state
    deadline = time.monotonic() + MARGIN_S
    while state.connections and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not state.connections


def test_dripping_clients_are_cut_off_at_the_deadline(strict_api: Api) -> None:
    """One byte every 50 ms keeps no connection alive past its header or body deadline."""
    key = strict_api.keys.full
    closed_after: dict[str, float] = {}

    def drip(name: str, first: bytes, drops: bytes) -> None:
        sock = _connect(strict_api.url)
        t0 = time.monotonic()
        try:
            sock.sendall(first)
            for b in drops:
                time.sleep(0.05)
                sock.sendall(bytes([b]))
        except (BrokenPipeError, ConnectionResetError):
            pass
        _read_to_close(sock, MARGIN_S)
        closed_after[name] = time.monotonic() - t0
        sock.close()

    head = b"POST /v1/jobs HTTP/1.1\r\nHost: api\r\nX-Slow: " + b"a" * 400
    threads = [
        threading.Thread(target=drip, args=("head", b"P", head[1:])),
        threading.Thread(target=drip, args=("body", _head("/v1/jobs", key, 400), b" " * 400)),
        # Answered 413 at once from its Content-Length: the rest must not keep it open.
        threading.Thread(
            target=drip, args=("too_large", _head("/v1/jobs", key, 10**7), b" " * 400)
        ),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    # 400 drops take 20 s; the server cut each off near its 0.5 s deadline.
    assert closed_after["head"] < HEADER_S + MARGIN_S, closed_after
    assert closed_after["body"] < BODY_S + MARGIN_S, closed_after
    assert closed_after["too_large"] < MARGIN_S, closed_after


def test_idle_keep_alive_connections_are_closed(strict_api: Api) -> None:
    sock = _connect(strict_api.url)
    sock.sendall(
        f"GET /v1/jobs/{'b' * 32} HTTP/1.1\r\nHost: api\r\n"
        f"Authorization: Bearer {strict_api.keys.full}\r\n\r\n".encode()
    )
    got, _ = _read_to_close(sock, KEEP_ALIVE_S + MARGIN_S)
    assert got.startswith(b"HTTP/1.1 404 ")
    sock.close()


def test_oversized_request_heads_are_431(strict_api: Api) -> None:
    sock = _connect(strict_api.url)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(
            b"GET /healthz HTTP/1.1\r\nHost: api\r\nX-Pad: " + b"p" * (MAX_HEAD_BYTES + 10)
        )
    got, _ = _read_to_close(sock, HEADER_S + MARGIN_S)
    assert got.startswith(b"HTTP/1.1 431 "), got[:100]
    sock.close()


def test_the_api_command_configures_the_bounded_server() -> None:
    s = Settings(
        api_header_timeout_s=3.0, api_body_timeout_s=4.0, api_keep_alive_s=7, api_max_connections=9
    )
    config = server_config(s, "clipline.api.app:app_from_env", "127.0.0.1", 0, factory=True)
    assert config.http is BoundedHttpProtocol and config.header_timeout_s == 3.0
    assert config.timeout_keep_alive == 7 and config.limit_concurrency == 9


def test_clipline_api_process_cuts_off_slow_clients(
    redis_url: str, tmp_path: Path, redis_client: redis.Redis
) -> None:
    """``clipline api`` itself (two uvicorn worker processes) applies the same limits."""
    key = new_key()
    deployment = f"t-apiproc-{os.getpid()}"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPLINE_")}
    env.update(
        CLIPLINE_DEPLOYMENT=deployment,
        CLIPLINE_REDIS_URL=redis_url,
        CLIPLINE_STATE_DIR=str(tmp_path / "state"),
        CLIPLINE_API_KEYS=entry("full", key),
        CLIPLINE_API_WORKERS="2",
        CLIPLINE_API_HEADER_TIMEOUT_S=str(HEADER_S),
        CLIPLINE_API_BODY_TIMEOUT_S=str(BODY_S),
    )
    log = tmp_path / "api.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "clipline.cli",
                "api",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, "clipline api did not come up"
            time.sleep(0.2)
        head = _connect(url)
        head.sendall(b"GET /healthz HTTP/1.1\r\nHo")
        slow_body = _connect(url)
        slow_body.sendall(_head("/v1/jobs", key, 500) + b"{")
        got, _ = _read_to_close(head, HEADER_S + MARGIN_S)
        assert got.startswith(b"HTTP/1.1 408 "), got
        got, _ = _read_to_close(slow_body, BODY_S + MARGIN_S)
        assert got.startswith(b"HTTP/1.1 408 ") and b"request_timeout" in got, got
        head.close()
        slow_body.close()
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        purge(redis_client, deployment)


# ---------------------------------------------------------------------------
# The command line.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "five"])
def test_cli_refuses_non_finite_durations_as_usage_errors(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for command in ("submit", "highlight"):
        with pytest.raises(SystemExit) as exit_:
            cli.main([command, VIDEO, "--image", IMAGE, "--duration", value])
        assert exit_.value.code == cli.EXIT_USAGE
        err = capsys.readouterr().err
        assert "--duration" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--duration", "100"], "duration_s"),
        (["--duration", "0.1"], "duration_s"),
        (["--title", "t" * 301], "title"),
        (["--callback-url", ""], "callback_url"),
    ],
)
def test_cli_submit_refuses_invalid_specs_before_calling_the_api(
    args: list[str], says: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # No API is configured: a spec the API would refuse never gets that far.
    monkeypatch.setenv("CLIPLINE_API_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("CLIPLINE_API_KEY", "unused")
    code = cli.main(["submit", VIDEO, "--image", IMAGE, *args])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE, err
    assert err.startswith("error: invalid_request: ") and says in err and err[-1] == "\n"
    assert err.count("\n") == 1


@pytest.mark.parametrize("command", ["submit", "highlight"])
def test_cli_refuses_a_bad_aspect_with_exit_2_and_the_choices(
    command: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLIPLINE_API_URL", "http://127.0.0.1:9")  # never reached
    monkeypatch.setenv("CLIPLINE_API_KEY", "unused")
    code = cli.main([command, VIDEO, "--image", IMAGE, "--aspect", "16:9"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE, err
    assert "invalid_request" in err and "aspect" in err and "'9:16'" in err, err
    assert "Traceback" not in err
    code = cli.main(["highlight", VIDEO, "--image", IMAGE, "--aspect", "2:3", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == cli.EXIT_USAGE and out["error"]["code"] == "invalid_request", out
    assert "aspect" in out["error"]["message"]


def test_cli_submit_sends_the_aspect(live_api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIPLINE_API_URL", live_api.url)
    monkeypatch.setenv("CLIPLINE_API_KEY", live_api.keys.full)
    assert cli.main(["submit", VIDEO, "--image", IMAGE, "--aspect", "1:1", "--json"]) == 0
    with live_api.client() as client:
        jobs, _ = client.list_jobs(limit=5)
    assert [j.aspect.value for j in jobs] == ["1:1"]


def test_cli_submit_inf_in_a_real_process_prints_no_traceback() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPLINE_")}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "clipline.cli",
            "submit",
            VIDEO,
            "--image",
            IMAGE,
            "--duration",
            "inf",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "finite" in r.stderr
