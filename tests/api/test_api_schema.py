"""Property-based run over the OpenAPI document (schemathesis) against the live API.

Schemathesis reads the committed ``docs/openapi.json`` (which must equal what the
server serves) and sends generated valid and invalid requests to every operation of
the running server (uvicorn, real Redis), with a valid API key;
each answer must not be a 5xx, must have a status code and content type the document
declares, must match the declared schema, and invalid data must be refused. Examples
per operation are bounded so the run stays within seconds.

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

from clipline_core.settings import Settings


@pytest.fixture(scope="module")
def fuzz_api(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    base = Settings(
        deployment=f"t-fuzz-{uuid.uuid4().hex[:8]}",
        redis_url=redis_url,
        state_dir=str(tmp / "state"),
        allow_loopback=True,
    )
    keys = make_keys()
    client = redis.Redis.from_url(redis_url)
    try:
        with running_api(api_settings(base, keys), keys, client) as api:
            yield api
    finally:
        client.close()


DOCUMENT = Path(__file__).parents[2] / "docs" / "openapi.json"
SCHEMA = schemathesis.openapi.from_path(str(DOCUMENT))
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]  # type: ignore[union-attr]
# Invalid data needs an input to put it in: probes without parameters get valid runs only.
CASES = [
    pytest.param(op, mode, id=f"{op.label} {mode.value}")
    for op in OPERATIONS
    for mode in GenerationMode
    if mode == GenerationMode.POSITIVE or len(op.path_parameters) + len(op.query) + len(op.body)
]


@pytest.mark.parametrize(("operation", "mode"), CASES)
def test_no_5xx_and_answers_match_the_document(
    fuzz_api: Api, operation: Any, mode: GenerationMode
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
