"""The job API's routes: submit, list, read, cancel, download, probes, metrics.

Owns :func:`build_router`: the bearer-key dependency per scope (401, 403, 429), tenant
isolation (another tenant's job, or one stored without a tenant, is 404 unless
:meth:`clipline.api.auth.ApiKey.sees` it; every job route loads through one function, and
the listing reads the tenant's own index and applies the same rule), idempotent
submission, ``Prefer: wait=N`` on submission and reads (:mod:`clipline.api.waiting`),
cursor pagination of ``GET /v1/jobs``, cancellation and the clip download
(:mod:`clipline.api.clips`: streamed with Range requests, or a redirect to the object
store); and :func:`build_webhooks`, the callback event as the document's ``webhooks``
describe it. What the document says beyond the models (operation ids, tags, examples,
headers) is set here, next to each route. Builds on :mod:`clipline.api.services` and
:mod:`clipline.api.errors`; must not import the factory.

(No ``from __future__ import annotations`` here: FastAPI reads the handlers'
annotations at runtime, and they name local dependencies.)
"""

import base64
import binascii
import datetime
import logging
import math
import re
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import redis
from fastapi import APIRouter, Body, Depends, Header, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import StringConstraints

from clipline.api import clips
from clipline.api.auth import ApiKey
from clipline.api.errors import AUTH_RESPONSES, JOB_RESPONSES, doc, header, retry_after
from clipline.api.services import _IDEMPOTENCY_RE, _JOB_ID_RE, Services, check_spec
from clipline.api.waiting import requested_wait
from clipline_core import constants
from clipline_core.constants import MetricRole
from clipline_core.errors import ApiError, ErrorCode
from clipline_core.job import Job, JobSpec, JobState
from clipline_core.job_metrics import JobStatsCollector
from clipline_core.metrics import exposition as metrics_registry
from clipline_core.schema import (
    EXAMPLE_ACCEPTED,
    EXAMPLE_EVENT,
    EXAMPLE_JOB,
    EXAMPLE_LIST,
    CallbackEvent,
    ErrorDetail,
    JobAccepted,
    JobList,
    JobView,
    job_path,
    job_view,
    links,
)
from clipline_core.store import OWNER_FIELD, IdempotencyConflict, _to_job
from workers.submit import submit

log = logging.getLogger("clipline.api")
T = TypeVar("T")

TAG_JOBS = "jobs"
TAG_PROBES = "probes"
TAG_CALLBACKS = "callbacks"
#: the tags of the document, in order, with what each groups
TAGS: list[dict[str, str]] = [
    {"name": TAG_JOBS, "description": "submit, list, read and cancel jobs; download clips"},
    {"name": TAG_PROBES, "description": "liveness, readiness and Prometheus metrics (no key)"},
    {"name": TAG_CALLBACKS, "description": "the signed event POSTed to a job's callback_url"},
]
MAX_LIMIT = 100
DEFAULT_LIMIT = 20
_STATES = "|".join(s.value for s in JobState)
#: one state, or a comma-separated list of them
STATE_PATTERN = rf"^({_STATES})(,({_STATES}))*$"
#: unix seconds, or an RFC 3339 date-time with its offset
TIME_PATTERN = (
    r"^([0-9]{1,12}(\.[0-9]{1,9})?"
    r"|[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2}))$"
)
CURSOR_PATTERN = r"^[A-Za-z0-9_-]{1,200}$"
_LIST_PARAMS = frozenset({"state", "created_after", "created_before", "limit", "cursor"})
_CURSOR_RE = re.compile(r"^(?P<score>[0-9.e+-]{1,32}):(?P<id>[0-9a-f]{32})$")

_PREFER = Header(
    alias=constants.HEADER_PREFER,
    description="RFC 7240 `wait=N`: hold the answer until the job is terminal or N seconds "
    "passed (N capped by the server's CLIPLINE_API_MAX_WAIT_S, 60 by default); other "
    "preferences are ignored",
    examples=["wait=30"],
)
_LOCATION = header("the job's URL", {"type": "string", "example": EXAMPLE_JOB["links"]["self"]})
_REPLAYED = header(
    "`true` when an earlier request with the same Idempotency-Key created the job",
    {"type": "string", "enum": ["true"]},
)
_APPLIED = header(
    "`wait=N`: the wait this answer honoured (N: the seconds granted); absent when none was "
    "asked for, or the server could not wait",
    {"type": "string", "pattern": "^wait=[0-9]+$", "example": "wait=30"},
)


def _json(example: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"example": example}}}


def encode_cursor(position: tuple[float, str]) -> str:
    """The opaque cursor of a listing position (``created_at``, job id)."""
    raw = f"{position[0]!r}:{position[1]}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    """The position a cursor of :func:`encode_cursor` names; ``ApiError`` 422 otherwise."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
        match = _CURSOR_RE.match(raw)
        score = float(match["score"]) if match else math.nan
    except (binascii.Error, UnicodeDecodeError, ValueError):
        match, score = None, math.nan
    if match is None or not math.isfinite(score):
        raise ApiError(
            422,
            ErrorCode.INVALID_REQUEST,
            "cursor: not a cursor of this listing (pass next_cursor as it came)",
            details=[ErrorDetail(loc=["query", "cursor"], message="invalid cursor")],
        )
    return score, match["id"]


def parse_time(name: str, value: str | None) -> float | None:
    """Unix seconds from unix seconds or an RFC 3339 date-time; ``ApiError`` 422 otherwise."""
    if value is None:
        return None
    try:
        if "-" not in value:
            seconds = float(value)
        else:
            when = datetime.datetime.fromisoformat(value.replace("z", "Z").replace("t", "T"))
            if when.tzinfo is None:
                raise ValueError("no offset")
            seconds = when.timestamp()
        if math.isfinite(seconds):
            return seconds
    except (ValueError, OverflowError):
        pass
    raise ApiError(
        422,
        ErrorCode.INVALID_REQUEST,
        f"{name}: not unix seconds or an RFC 3339 date-time with an offset",
        details=[ErrorDetail(loc=["query", name], message="invalid time")],
    )


def build_router(svc: Services) -> APIRouter:
    """The job API's routes over ``svc``: ``/v1/jobs`` and the probes and metrics."""
    settings = svc.settings
    callbacks_enabled = bool(settings.callback_secret.strip(" ,"))
    bearer = HTTPBearer(auto_error=False, description="an API key: Authorization: Bearer <key>")
    router = APIRouter()
    # The API's own metrics, and the deployment's job outcomes and states (from Redis).
    exported = metrics_registry(MetricRole.API, [JobStatsCollector(svc.redis, settings.deployment)])

    # -- auth ----------------------------------------------------------------
    def require(scope: str) -> Callable[..., Awaitable[ApiKey]]:
        async def dependency(
            credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
        ) -> ApiKey:
            if credentials is None:
                raise ApiError(
                    401,
                    ErrorCode.UNAUTHENTICATED,
                    "missing API key: send Authorization: Bearer <key>",
                    headers={"WWW-Authenticate": 'Bearer realm="clipline"'},
                )
            key = svc.keyring.authenticate(credentials.credentials)
            if key is None:
                raise ApiError(
                    401,
                    ErrorCode.UNAUTHENTICATED,
                    "unknown API key",
                    headers={"WWW-Authenticate": 'Bearer realm="clipline", error="invalid_token"'},
                )
            if scope not in key.scopes:
                raise ApiError(
                    403,
                    ErrorCode.FORBIDDEN,
                    f"API key {key.id!r} may not {scope} (its scopes: "
                    f"{', '.join(sorted(key.scopes))})",
                )
            if svc.limiter.enabled:
                wait = await svc.call(svc.limiter.check, key.id)
                if wait > 0:
                    raise ApiError(
                        429,
                        ErrorCode.RATE_LIMITED,
                        f"rate limit of {svc.limiter.rate:g} requests/s exceeded",
                        headers={"Retry-After": str(max(1, math.ceil(wait)))},
                    )
            return key

        return dependency

    submit_key = require("submit")
    read_key = require("read")
    cancel_key = require("cancel")

    def enqueue(
        spec: JobSpec, scoped: str | None, tenant: str
    ) -> tuple[str, bool, JobState | None]:
        job_id, created = submit(
            svc.store, svc.celery, spec, scoped, owner=tenant, hold_ttl_s=svc.settings.job_lease_s
        )
        if created:
            return job_id, True, JobState.QUEUED
        return job_id, False, svc.store.state(job_id)

    def load(job_id: str, key: ApiKey) -> Job:
        if not _JOB_ID_RE.match(job_id):
            raise ApiError(404, ErrorCode.NOT_FOUND, f"no job {job_id!r}")
        raw = svc.store.raw(job_id)
        if not raw or "state" not in raw or not key.sees(raw.get(OWNER_FIELD)):
            raise ApiError(
                404, ErrorCode.NOT_FOUND, f"no job {job_id!r} (expired or never existed)"
            )
        return _to_job(raw)

    def cancel(job_id: str, key: ApiKey) -> Job:
        job = load(job_id, key)
        if not job.terminal and svc.store.cancel(job_id):
            return load(job_id, key)
        job = load(job_id, key)
        raise ApiError(
            409,
            ErrorCode.CONFLICT,
            f"job {job_id} already {job.state.value}; it cannot be cancelled",
            job_id=job_id,
        )

    def page(
        key: ApiKey,
        limit: int,
        after: tuple[float, str] | None,
        created_after: float | None,
        created_before: float | None,
        states: frozenset[JobState] | None,
    ) -> tuple[list[Job], tuple[float, str] | None]:
        raws, position = svc.store.list_jobs(
            key.tenant,
            limit=limit,
            after=after,
            created_after=created_after,
            created_before=created_before,
            states=states,
        )
        return [_to_job(r) for r in raws if key.sees(r.get(OWNER_FIELD))], position

    async def waited(request: Request, job: Job, key: ApiKey) -> tuple[Job, dict[str, str]]:
        """``job`` after the request's ``Prefer: wait`` (if any), and the headers to add."""
        async with svc.waiters.slot(requested_wait(request.headers.getlist("prefer"))) as secs:
            if secs is None:
                return job, {}
            applied = {constants.HEADER_PREFERENCE_APPLIED: f"wait={secs}"}
            if job.terminal:
                return job, applied

            async def read() -> Job:
                return await svc.call(load, job.id, key)

            return await svc.waiters.until_terminal(svc.store.channel(job.id), secs, read), applied

    JobId = Annotated[str, PathParam(min_length=1, max_length=64, description="job id")]
    # Declared for the document; ``waited`` reads every Prefer header of the request.
    Prefer = Annotated[str | None, _PREFER]

    # -- routes ----------------------------------------------------------------
    @router.post(
        f"{constants.API_PREFIX}/jobs",
        status_code=202,
        response_model=JobAccepted,
        operation_id="createJob",
        tags=[TAG_JOBS],
        summary="Submit a job",
        description="Queues a highlight job and answers 202 at once. With `Prefer: wait=N` "
        "the answer waits until the job is terminal or N seconds passed: a job that ended "
        "in time is answered with its document, 201 when this request created it, 200 when "
        "it replays an earlier request's job (Idempotency-Key); otherwise 202 as usual.",
        responses={
            202: {
                "description": "the job is queued (or running)",
                "headers": {
                    "Location": {**_LOCATION, "required": True},
                    constants.HEADER_IDEMPOTENT_REPLAYED: _REPLAYED,
                    constants.HEADER_PREFERENCE_APPLIED: _APPLIED,
                },
                **_json(EXAMPLE_ACCEPTED),
            },
            201: {
                "model": JobView,
                "description": "`Prefer: wait`: the job this request created ended in time",
                "headers": {
                    "Location": {**_LOCATION, "required": True},
                    constants.HEADER_PREFERENCE_APPLIED: {**_APPLIED, "required": True},
                },
                **_json(EXAMPLE_JOB),
            },
            200: {
                "model": JobView,
                "description": "`Prefer: wait`: the job of an earlier request with this "
                "Idempotency-Key, ended",
                "headers": {
                    "Location": {**_LOCATION, "required": True},
                    constants.HEADER_IDEMPOTENT_REPLAYED: {**_REPLAYED, "required": True},
                    constants.HEADER_PREFERENCE_APPLIED: {**_APPLIED, "required": True},
                },
                **_json(EXAMPLE_JOB),
            },
            **AUTH_RESPONSES,
            400: doc("the body is not valid JSON", ErrorCode.MALFORMED_BODY),
            408: doc(
                "the body did not arrive in time (the connection is closed)",
                ErrorCode.REQUEST_TIMEOUT,
            ),
            409: doc(
                "the Idempotency-Key was used with a different body",
                ErrorCode.IDEMPOTENCY_CONFLICT,
            ),
            413: doc("the body is too large", ErrorCode.BODY_TOO_LARGE),
            415: doc("the body is not JSON", ErrorCode.UNSUPPORTED_MEDIA_TYPE),
            422: doc("the request is invalid", ErrorCode.INVALID_REQUEST),
        },
    )
    async def create_job(
        spec: Annotated[
            JobSpec,
            Body(
                openapi_examples={
                    "minimal": {
                        "summary": "a video and a product image",
                        "value": {
                            "video_url": "https://cdn.example.com/v/123.mp4",
                            "image_urls": ["https://cdn.example.com/p/123.jpg"],
                        },
                    },
                    "full": {
                        "summary": "every field",
                        "value": {
                            "video_url": "https://cdn.example.com/v/123.mp4",
                            "image_urls": ["https://cdn.example.com/p/123.jpg"],
                            "title": "Blue kettle",
                            "description": "1.7 l, steel",
                            "duration_s": 5.0,
                            "aspect": "9:16",
                            "priority": "high",
                            "callback_url": "https://shop.example.com/hooks/clipline",
                            "upload_url": "https://bucket.example.com/clips/123.mp4?X-Amz-Signature=abc",
                            "metadata": {"order_id": "A-1042", "sku": 31337},
                        },
                    },
                }
            ),
        ],
        request: Request,
        response: Response,
        key: Annotated[ApiKey, Depends(submit_key)],
        idempotency_key: Annotated[
            str | None,
            Header(
                alias=constants.HEADER_IDEMPOTENCY_KEY,
                pattern=_IDEMPOTENCY_RE,
                description="makes retries safe: same key and body, same job",
                examples=["order-1042"],
            ),
        ] = None,
        prefer: Prefer = None,
    ) -> Any:
        check_spec(spec, settings, callbacks_enabled)
        scoped = f"{key.tenant}:{idempotency_key}" if idempotency_key else None
        try:
            job_id, created, current = await svc.call(enqueue, spec, scoped, key.tenant)
        except IdempotencyConflict as exc:
            raise ApiError(
                409,
                ErrorCode.IDEMPOTENCY_CONFLICT,
                f"{constants.HEADER_IDEMPOTENCY_KEY} was already used with another body",
                job_id=exc.job_id,
            ) from None
        headers = {"Location": job_path(job_id)}
        if not created:
            headers[constants.HEADER_IDEMPOTENT_REPLAYED] = "true"
        state = current or JobState.QUEUED
        if requested_wait(request.headers.getlist("prefer")) is not None:
            job, applied = await waited(request, await svc.call(load, job_id, key), key)
            headers.update(applied)
            state = job.state
            if job.terminal:
                return JSONResponse(
                    job_view(job).model_dump(mode="json"),
                    status_code=201 if created else 200,
                    headers=headers,
                )
        response.headers.update(headers)
        return JobAccepted(id=job_id, state=state, replayed=not created, links=links(job_id))

    @router.get(
        f"{constants.API_PREFIX}/jobs",
        response_model=JobList,
        operation_id="listJobs",
        tags=[TAG_JOBS],
        summary="List the tenant's jobs, newest first",
        description="The jobs of the API key's tenant (the same ones `GET /v1/jobs/{id}` "
        "shows), newest first, a page at a time: pass `next_cursor` as `cursor` until it is "
        "null. A page may hold fewer jobs than `limit` (even none) before the last one when "
        "a filter skips many jobs. Jobs that expired are not listed; a tenant's listing "
        "holds its 10,000 newest jobs.",
        responses={
            200: {"description": "a page of jobs", **_json(EXAMPLE_LIST)},
            **AUTH_RESPONSES,
            422: doc("a query parameter is invalid", ErrorCode.INVALID_REQUEST),
        },
    )
    async def list_jobs(
        request: Request,
        key: Annotated[ApiKey, Depends(read_key)],
        state: Annotated[
            list[Annotated[str, StringConstraints(pattern=STATE_PATTERN)]] | None,
            Query(
                description="only jobs in these states: repeat the parameter or give a "
                "comma-separated list",
                examples=[["queued,fetching"]],
            ),
        ] = None,
        created_after: Annotated[
            str | None,
            Query(
                pattern=TIME_PATTERN,
                description="only jobs created after this instant (unix seconds or RFC 3339)",
                examples=["2024-05-01T00:00:00Z"],
            ),
        ] = None,
        created_before: Annotated[
            str | None,
            Query(
                pattern=TIME_PATTERN,
                description="only jobs created before this instant (unix seconds or RFC 3339)",
                examples=["1714521600"],
            ),
        ] = None,
        limit: Annotated[
            int, Query(ge=1, le=MAX_LIMIT, description="jobs per page at most")
        ] = DEFAULT_LIMIT,
        cursor: Annotated[
            str | None,
            Query(pattern=CURSOR_PATTERN, description="next_cursor of the previous page"),
        ] = None,
    ) -> JobList:
        unknown = sorted(set(request.query_params) - _LIST_PARAMS)
        if unknown:  # a typo (``states=``) must not silently list everything
            raise ApiError(
                422,
                ErrorCode.INVALID_REQUEST,
                f"unknown query parameter {unknown[0]!r} "
                f"(known: {', '.join(sorted(_LIST_PARAMS))})",
                details=[
                    ErrorDetail(loc=["query", n], message="unknown parameter") for n in unknown
                ],
            )
        states = (
            frozenset(JobState(s) for value in state for s in value.split(",")) if state else None
        )
        after = decode_cursor(cursor) if cursor is not None else None
        since = parse_time("created_after", created_after)
        until = parse_time("created_before", created_before)
        jobs, position = await svc.call(page, key, limit, after, since, until, states)
        return JobList(
            jobs=[job_view(j) for j in jobs],
            next_cursor=encode_cursor(position) if position is not None else None,
        )

    @router.get(
        f"{constants.API_PREFIX}/jobs/{{job_id}}",
        response_model=JobView,
        operation_id="getJob",
        tags=[TAG_JOBS],
        summary="Get a job",
        description="The job's document. With `Prefer: wait=N` the answer waits until the "
        "job is terminal or N seconds passed (long polling without polling).",
        responses={
            200: {
                "description": "the job",
                "headers": {constants.HEADER_PREFERENCE_APPLIED: _APPLIED},
                **_json(EXAMPLE_JOB),
            },
            **JOB_RESPONSES,
        },
    )
    async def get_job(
        job_id: JobId,
        request: Request,
        key: Annotated[ApiKey, Depends(read_key)],
        prefer: Prefer = None,
    ) -> Any:
        job = await svc.call(load, job_id, key)
        if requested_wait(request.headers.getlist("prefer")) is None:
            return job_view(job)
        job, applied = await waited(request, job, key)
        return JSONResponse(job_view(job).model_dump(mode="json"), headers=applied)

    @router.delete(
        f"{constants.API_PREFIX}/jobs/{{job_id}}",
        response_model=JobView,
        operation_id="cancelJob",
        tags=[TAG_JOBS],
        summary="Cancel a job that has not finished",
        responses={
            200: {"description": "the cancelled job", **_json(EXAMPLE_JOB)},
            **JOB_RESPONSES,
            409: doc("the job already finished", ErrorCode.CONFLICT),
        },
    )
    async def cancel_job(job_id: JobId, key: Annotated[ApiKey, Depends(cancel_key)]) -> JobView:
        return job_view(await svc.call(cancel, job_id, key))

    clip = {"schema": {"type": "string", "format": "binary"}}
    clip_types = {"video/mp4": clip, "video/webm": clip}
    disposition = header('inline; filename="<id>.mp4"')

    @router.get(
        f"{constants.API_PREFIX}/jobs/{{job_id}}/highlight",
        response_class=Response,
        operation_id="getHighlight",
        tags=[TAG_JOBS],
        summary="Download the highlight clip (Range requests work)",
        description="The clip of a succeeded job: H.264/AAC MP4 (VP9 WebM where the "
        "workers have no ffmpeg). From an object store the answer is a 307 to a presigned "
        "URL (follow it without the API key).",
        responses={
            200: {
                "content": clip_types,
                "description": "the clip",
                "headers": {
                    "Content-Length": header("bytes", {"type": "integer"}),
                    "Content-Disposition": disposition,
                    "Accept-Ranges": header("bytes"),
                },
            },
            206: {
                "content": clip_types,
                "description": "part of the clip (Range)",
                "headers": {
                    "Content-Range": header(
                        "bytes START-END/SIZE", {"type": "string"}, required=True
                    ),
                    "Content-Length": header("bytes", {"type": "integer"}),
                },
            },
            307: {
                "description": "the clip is in an object store: a presigned URL to fetch it "
                "from (artifact_serve=redirect)",
                "headers": {
                    "Location": header("the presigned URL (a credential)", required=True),
                    "Cache-Control": header("no-store", {"type": "string", "enum": ["no-store"]}),
                },
            },
            **JOB_RESPONSES,
            404: doc(
                "no such job, or the clip is not kept here (uploaded or expired)",
                ErrorCode.NOT_FOUND,
            ),
            409: doc("the job has not succeeded", ErrorCode.NOT_READY),
            416: doc(
                "the Range cannot be satisfied",
                ErrorCode.INVALID_REQUEST,
                headers={"Content-Range": header("bytes */SIZE", required=True)},
            ),
            503: doc(
                "Redis, the queue or the artifact store is unreachable",
                ErrorCode.UNAVAILABLE,
                headers={"Retry-After": retry_after(False)},
            ),
        },
    )
    async def get_highlight(
        job_id: JobId,
        key: Annotated[ApiKey, Depends(read_key)],
        range_header: Annotated[
            str | None,
            Header(
                alias="Range", description="bytes=START-END (one range)", examples=["bytes=0-1023"]
            ),
        ] = None,
    ) -> Response:
        job = await svc.call(load, job_id, key)
        if job.state != JobState.SUCCEEDED:
            msg = (
                f"job {job_id} is {job.state.value}; it has no highlight"
                if job.terminal
                else f"job {job_id} is still {job.state.value}; wait for it to succeed"
            )
            raise ApiError(409, ErrorCode.NOT_READY, msg, job_id=job_id)
        return await clips.highlight_response(svc, job, range_header)

    @router.get(
        "/healthz",
        operation_id="getHealth",
        tags=[TAG_PROBES],
        summary="Liveness",
        responses={200: {"description": "alive", **_json({"status": "ok"})}},
    )
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get(
        "/readyz",
        operation_id="getReadiness",
        tags=[TAG_PROBES],
        summary="Readiness (Redis reachable)",
        response_model=dict[str, str],
        responses={
            200: {"description": "ready", **_json({"status": "ready"})},
            503: {
                "description": "Redis is unreachable",
                **_json({"status": "unavailable", "reason": "ConnectionError"}),
            },
        },
    )
    async def readyz() -> JSONResponse:
        try:
            await svc.call(svc.redis.ping)
        except redis.RedisError as exc:
            return JSONResponse(
                {"status": "unavailable", "reason": type(exc).__name__}, status_code=503
            )
        return JSONResponse({"status": "ready"})

    @router.get(
        "/metrics",
        operation_id="getMetrics",
        tags=[TAG_PROBES],
        summary="Prometheus metrics",
        response_class=Response,
        responses={
            200: {
                "content": {"text/plain": {"schema": {"type": "string"}}},
                "description": "metrics",
            }
        },
    )
    async def metrics() -> Response:
        body = await svc.call(generate_latest, exported)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return router


def build_webhooks() -> APIRouter:
    """The completion callback, for the document's ``webhooks`` (no route is served)."""
    webhooks = APIRouter()

    @webhooks.post(
        "job.finished",
        operation_id="jobFinished",
        tags=[TAG_CALLBACKS],
        summary="A job reached a terminal state",
        description="POSTed to the job's `callback_url` once it succeeded, failed or was "
        "cancelled; `job` is the body of `GET /v1/jobs/{id}`. Verify `Clipline-Signature` "
        "over the raw body before parsing it; any 2xx acknowledges, anything else is "
        "retried with backoff (at least once: deduplicate on `id`).",
        status_code=200,
        responses={
            200: {"description": "any 2xx answer acknowledges the event"},
            "default": {"description": "anything else (or no answer in time) is retried"},
        },
    )
    def job_finished(
        event: Annotated[
            CallbackEvent, Body(openapi_examples={"succeeded": {"value": EXAMPLE_EVENT}})
        ],
        signature: Annotated[
            str,
            Header(
                alias=constants.HEADER_SIGNATURE,
                description='t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<raw body>" keyed '
                "with the callback secret> (one v1 per configured secret)",
                examples=[
                    "t=1700000004,v1=5257a869e7ecebeda32affa62cdca3fa51cad7e77a0e56ff536d0ce8e108d8bd"
                ],
            ),
        ],
        event_id: Annotated[
            str,
            Header(
                alias=constants.HEADER_EVENT_ID,
                description="the event's id (as in the body), the same on every attempt",
                examples=[EXAMPLE_EVENT["id"]],
            ),
        ],
    ) -> None:
        return None

    return webhooks
