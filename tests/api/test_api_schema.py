"""Property-based run over the OpenAPI document (schemathesis) against the live API.

Schemathesis reads the committed ``docs/openapi.json`` (which must equal what the
server serves) and sends generated valid and invalid requests to every operation of
the running server (uvicorn, real Redis), with a valid API key; each answer must not be
a 5xx, must have a status code, content type and headers the document declares, must
match the declared schema, and invalid data must be refused. The run is bounded: 25
examples per operation and mode, derandomized, ``Prefer: wait`` capped at 1 s by the
server's settings, and a time limit per operation.

The tenant of the key has real jobs (queued with metadata, succeeded with a clip, failed,
cancelled), so listings answer real documents; explicit cases then read each one, its
clip (whole, a range, an unsatisfiable range), wait on one and submit with a wait, and
each answer is validated against the document the same way.

One default check is left out: "schema-valid data is accepted". The document cannot
express the server's URL policy (http(s) only, literal private/metadata addresses
refused by the SSRF rules), so a schema-valid body such as ``{"video_url": "0", ...}``
is rightly answered 422.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import schemathesis
from api_helpers import Api, api_settings, make_keys, running_api
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance

from clipline_core.job import JobSpec, JobState
from clipline_core.settings import Settings
from clipline_core.store import JobStore

VIDEO = "https://cdn.example.com/videos/product.mp4"
IMAGE = "https://cdn.example.com/images/product.jpg"


def _seed(api: Api, client: redis.Redis) -> dict[str, str]:
    """Jobs of the full key's tenant in every kind of end state (ids by name)."""
    store = JobStore(client, api.settings.deployment)
    spec = JobSpec(video_url=VIDEO, image_urls=[IMAGE], metadata={"order": "A-1", "n": 3})
    ids = {name: store.create(spec, owner="full")[0] for name in ("queued", "ok", "bad", "off")}
    clip = api.settings.artifacts_path / f"{ids['ok']}.mp4"
    clip.parent.mkdir(parents=True, exist_ok=True)
    clip.write_bytes(bytes(range(256)) * 8)
    for name in ("ok", "bad"):
        assert store.claim(ids[name], "lease", 30.0, 5)[0] == 1
    highlight = {"start_s": 1.0, "end_s": 6.0, "score": 0.7, "path": str(clip), "codec": "h264"}
    assert store.finish(ids["ok"], JobState.SUCCEEDED, lease="lease", highlight=highlight)
    error = {"code": "not_a_video", "message": "the source is not a video"}
    assert store.finish(ids["bad"], JobState.FAILED, lease="lease", error=error)
    assert store.cancel(ids["off"])
    return ids


@pytest.fixture(scope="module")
def fuzz_api(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    base = Settings(
        deployment=f"t-fuzz-{uuid.uuid4().hex[:8]}",
        redis_url=redis_url,
        state_dir=str(tmp / "state"),
        allow_loopback=True,
        api_max_wait_s=1,  # a generated ``Prefer: wait=N`` holds an answer 1 s at most
    )
    keys = make_keys()
    client = redis.Redis.from_url(redis_url)
    try:
        with running_api(api_settings(base, keys), keys, client) as api:
            yield api
    finally:
        client.close()


@pytest.fixture(scope="module")
def seeded(fuzz_api: Api, redis_url: str) -> dict[str, str]:
    client = redis.Redis.from_url(redis_url)
    try:
        return _seed(fuzz_api, client)
    finally:
        client.close()


DOCUMENT = Path(__file__).parents[2] / "docs" / "openapi.json"
SCHEMA = schemathesis.openapi.from_path(str(DOCUMENT))
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]  # type: ignore[union-attr]
BY_ID = {op.definition.raw["operationId"]: op for op in OPERATIONS}
# Invalid data needs an input to put it in: probes without parameters get valid runs only.
CASES = [
    pytest.param(op, mode, id=f"{op.label} {mode.value}")
    for op in OPERATIONS
    for mode in GenerationMode
    if mode == GenerationMode.POSITIVE or len(op.path_parameters) + len(op.query) + len(op.body)
]


def test_every_route_is_fuzzed() -> None:
    """The run covers the whole API, the listing and the waits included."""
    assert set(BY_ID) == {
        "createJob",
        "listJobs",
        "getJob",
        "cancelJob",
        "getHighlight",
        "getHealth",
        "getReadiness",
        "getMetrics",
    }


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("operation", "mode"), CASES)
def test_no_5xx_and_answers_match_the_document(
    fuzz_api: Api, seeded: dict[str, str], operation: Any, mode: GenerationMode
) -> None:
    """The committed document equals the served one (see test_api_jobs.py)."""
    headers = {"Authorization": f"Bearer {fuzz_api.keys.full}"}

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=25,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        case.call_and_validate(
            base_url=fuzz_api.url, headers=headers, excluded_checks=[positive_data_acceptance]
        )

    run()


def _check(api: Api, operation_id: str, **parts: Any) -> Any:
    """One explicit request, validated against the document like the generated ones."""
    case = BY_ID[operation_id].Case(**parts)
    headers = {"Authorization": f"Bearer {api.keys.full}", **parts.get("headers", {})}
    return case.call_and_validate(
        base_url=api.url, headers=headers, excluded_checks=[positive_data_acceptance]
    )


@pytest.mark.timeout(120)
def test_real_documents_match_the_document(fuzz_api: Api, seeded: dict[str, str]) -> None:
    ids = seeded
    listed = _check(fuzz_api, "listJobs", query={"limit": 2})
    assert listed.status_code == 200 and len(listed.json()["jobs"]) == 2
    cursor = listed.json()["next_cursor"]
    assert cursor
    rest = _check(fuzz_api, "listJobs", query={"cursor": cursor, "state": "failed,cancelled"})
    assert rest.status_code == 200
    filtered = _check(fuzz_api, "listJobs", query={"state": ["succeeded"]})
    assert [j["id"] for j in filtered.json()["jobs"]] == [ids["ok"]]

    for job_id in ids.values():
        assert _check(fuzz_api, "getJob", path_parameters={"job_id": job_id}).status_code == 200
    job = {"job_id": ids["ok"]}
    assert _check(fuzz_api, "getHighlight", path_parameters=job).status_code == 200
    ranged = _check(fuzz_api, "getHighlight", path_parameters=job, headers={"Range": "bytes=0-9"})
    assert ranged.status_code == 206
    beyond = _check(fuzz_api, "getHighlight", path_parameters=job, headers={"Range": "bytes=9999-"})
    assert beyond.status_code == 416
    pending = {"job_id": ids["queued"]}
    assert _check(fuzz_api, "getHighlight", path_parameters=pending).status_code == 409

    waited = _check(fuzz_api, "getJob", path_parameters=pending, headers={"Prefer": "wait=1"})
    assert waited.headers["preference-applied"] == ["wait=1"]
    body = {"video_url": VIDEO, "image_urls": [IMAGE], "metadata": {"k": "v"}}
    created = _check(fuzz_api, "createJob", body=body, headers={"Prefer": "wait=1"})
    assert created.status_code == 202 and created.headers["preference-applied"] == ["wait=1"]
    cancelled = _check(fuzz_api, "cancelJob", path_parameters={"job_id": created.json()["id"]})
    assert cancelled.status_code == 200 and cancelled.json()["metadata"] == {"k": "v"}
    again = _check(fuzz_api, "cancelJob", path_parameters={"job_id": created.json()["id"]})
    assert again.status_code == 409
