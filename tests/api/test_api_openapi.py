"""What the published OpenAPI document says, and that it cannot drift from the server.

* every operation has a stable operationId and a tag; the response headers the server
  sends (Location, Retry-After, Idempotent-Replayed, Preference-Applied, Content-Range)
  are declared; the highlight is a binary video and its redirect a 307 with Location;
* the error body's ``code`` is the enum of ``REQUEST_CODES | JOB_CODES``;
* the ``webhooks`` section describes the callback event (the very
  :class:`clipline_core.schema.CallbackEvent` schema) with its signature headers;
* every example in the document is valid against the schema it illustrates;
* the comparison with ``docs/openapi.json`` (:func:`clipline.api.__main__.openapi_diff`,
  ``python -m clipline.api openapi --check``) fails on an undocumented change: a new
  route, a changed status, a new field.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import referencing
import referencing.jsonschema
from pydantic import BaseModel

from clipline.api.__main__ import main, openapi_diff, openapi_document
from clipline_core.errors import JOB_CODES, REQUEST_CODES
from clipline_core.schema import CallbackEvent

DOCUMENT = Path(__file__).parents[2] / "docs" / "openapi.json"


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return json.loads(DOCUMENT.read_text())


def operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method, op in item.items():
            yield path, method, op


def test_operations_have_ids_and_tags(doc: dict[str, Any]) -> None:
    ids = {(path, method): op["operationId"] for path, method, op in operations(doc)}
    assert ids == {
        ("/v1/jobs", "post"): "createJob",
        ("/v1/jobs", "get"): "listJobs",
        ("/v1/jobs/{job_id}", "get"): "getJob",
        ("/v1/jobs/{job_id}", "delete"): "cancelJob",
        ("/v1/jobs/{job_id}/highlight", "get"): "getHighlight",
        ("/healthz", "get"): "getHealth",
        ("/readyz", "get"): "getReadiness",
        ("/metrics", "get"): "getMetrics",
    }
    declared = {t["name"] for t in doc["tags"]}
    for _, _, op in operations(doc):
        assert op["tags"] and set(op["tags"]) <= declared
    assert all(t.get("description") for t in doc["tags"])


def test_response_headers_are_declared(doc: dict[str, Any]) -> None:
    create = doc["paths"]["/v1/jobs"]["post"]["responses"]
    assert create["202"]["headers"]["Location"]["required"] is True
    assert set(create["202"]["headers"]) == {
        "Location",
        "Idempotent-Replayed",
        "Preference-Applied",
    }
    # Prefer: wait: 201 (created, ended in time) and 200 (replayed, ended) with the job.
    for status in ("200", "201"):
        ref = create[status]["content"]["application/json"]["schema"]["$ref"]
        assert ref == "#/components/schemas/JobView"
        assert create[status]["headers"]["Preference-Applied"]["required"] is True
    assert create["429"]["headers"]["Retry-After"]["required"] is True
    assert "Retry-After" in create["503"]["headers"]
    get = doc["paths"]["/v1/jobs/{job_id}"]["get"]
    assert "Preference-Applied" in get["responses"]["200"]["headers"]
    prefer = [p for p in get["parameters"] if p["in"] == "header"]
    assert [p["name"] for p in prefer] == ["Prefer"]
    listing = doc["paths"]["/v1/jobs"]["get"]
    names = {p["name"] for p in listing["parameters"]}
    assert names == {"state", "created_after", "created_before", "limit", "cursor"}
    limit = next(p for p in listing["parameters"] if p["name"] == "limit")["schema"]
    assert (limit["minimum"], limit["maximum"], limit["default"]) == (1, 100, 20)


def test_the_highlight_is_binary_video_or_a_redirect(doc: dict[str, Any]) -> None:
    responses = doc["paths"]["/v1/jobs/{job_id}/highlight"]["get"]["responses"]
    for status in ("200", "206"):
        content = responses[status]["content"]
        assert set(content) == {"video/mp4", "video/webm"}
        assert content["video/mp4"]["schema"] == {"type": "string", "format": "binary"}
    assert responses["206"]["headers"]["Content-Range"]["required"] is True
    assert responses["307"]["headers"]["Location"]["required"] is True
    assert "content" not in responses["307"]
    assert "Content-Range" in responses["416"]["headers"]


def test_the_error_code_is_an_enum_of_every_code(doc: dict[str, Any]) -> None:
    info = doc["components"]["schemas"]["ErrorInfo"]["properties"]["code"]
    enum = doc["components"]["schemas"][info["$ref"].rsplit("/", 1)[1]]["enum"]
    assert sorted(enum) == sorted(c.value for c in REQUEST_CODES | JOB_CODES)
    # Every documented error response names a code of that enum in its example.
    for _, _, op in operations(doc):
        for status, response in op["responses"].items():
            example = response.get("content", {}).get("application/json", {}).get("example")
            if status.startswith(("4", "5")) and example and "error" in example:
                assert example["error"]["code"] in enum, (op["operationId"], status)


def test_the_webhook_describes_the_signed_callback_event(doc: dict[str, Any]) -> None:
    (hook,) = doc["webhooks"].values()
    post = hook["post"]
    ref = post["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/CallbackEvent"
    headers = {p["name"]: p for p in post["parameters"] if p["in"] == "header"}
    assert set(headers) == {"Clipline-Signature", "Clipline-Event-Id"}
    assert all(h["required"] for h in headers.values())
    event = doc["components"]["schemas"]["CallbackEvent"]
    assert event["properties"]["event"]["enum"] == ["job.succeeded", "job.failed", "job.cancelled"]
    assert event["properties"]["job"]["$ref"] == "#/components/schemas/JobView"
    assert "metadata" in doc["components"]["schemas"]["JobView"]["properties"]
    assert CallbackEvent.model_json_schema()["title"] == "CallbackEvent"


def _examples(node: Any) -> Iterator[tuple[Any, Any]]:
    """(example, the schema it illustrates) for every example in the document."""
    if isinstance(node, dict):
        schema = node.get("schema")
        if isinstance(schema, dict):  # a media type (or parameter) object
            if "example" in node:
                yield node["example"], schema
            named = node.get("examples")
            if isinstance(named, dict):
                for item in named.values():
                    yield item["value"], schema
        if isinstance(node.get("examples"), list):  # a schema with examples
            for item in node["examples"]:
                yield item, node
        for key, value in node.items():
            if key not in ("example", "examples"):
                yield from _examples(value)
    elif isinstance(node, list):
        for value in node:
            yield from _examples(value)


def test_every_example_is_valid_against_its_schema(doc: dict[str, Any]) -> None:
    registry = referencing.Registry().with_resource(
        "urn:doc", referencing.Resource.from_contents(doc, referencing.jsonschema.DRAFT202012)
    )
    found = list(_examples(doc))
    assert len(found) >= 20
    for example, schema in found:
        rebased = json.loads(json.dumps(schema).replace('"#/components', '"urn:doc#/components'))
        jsonschema.Draft202012Validator(rebased, registry=registry).validate(example)
    # The request examples are bodies the server's model accepts.
    from clipline_core.job import JobSpec

    body = doc["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]
    for item in body["examples"].values():
        JobSpec.model_validate(item["value"])


def test_the_comparison_fails_on_an_undocumented_change(
    doc: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    served: dict[str, Any] = json.loads(json.dumps(openapi_document()))
    assert openapi_diff(doc, served) == []
    assert main(["openapi", "--check", str(DOCUMENT)]) == 0

    # A route the document does not know.
    from fastapi import FastAPI

    from clipline.api.app import create_app
    from clipline_core.settings import Settings

    app: FastAPI = create_app(Settings(api_keys="doc:" + "0" * 64, deployment="openapi"))

    @app.get("/v1/undocumented", operation_id="sneaky")
    def sneaky() -> dict[str, str]:
        return {}

    assert openapi_diff(doc, app.openapi()) == ["paths./v1/undocumented: added"]

    # A field added to a model, a status code changed, a header dropped.
    class Extra(BaseModel):
        x: int

    changed = copy.deepcopy(served)
    changed["components"]["schemas"]["JobView"]["properties"]["extra"] = Extra.model_json_schema()
    responses = changed["paths"]["/v1/jobs"]["post"]["responses"]
    responses["203"] = responses.pop("202")
    del changed["paths"]["/v1/jobs/{job_id}"]["get"]["responses"]["200"]["headers"]
    diff = openapi_diff(doc, changed)
    assert "components.schemas.JobView.properties.extra: added" in diff
    assert "paths./v1/jobs.post.responses.202: removed" in diff
    assert "paths./v1/jobs.post.responses.203: added" in diff
    assert "paths./v1/jobs/{job_id}.get.responses.200.headers: removed" in diff

    stale = tmp_path / "openapi.json"
    stale.write_text(json.dumps(changed))
    assert main(["openapi", "--check", str(stale)]) == 1
    out = capsys.readouterr()
    assert "responses.203: removed" in out.out and "regenerate" in out.err
