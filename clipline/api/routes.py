"""The job API's routes: submit, read, cancel, download, probes, metrics.

Owns :func:`build_router`: the bearer-key dependency per scope (401, 403, 429), tenant
isolation (another tenant's job is 404), idempotent submission, cancellation and the
clip download (Range requests). Builds on :mod:`clipline.api.services` and
:mod:`clipline.api.errors`; must not import the factory.

(No ``from __future__ import annotations`` here: FastAPI reads the handlers'
annotations at runtime, and they name local dependencies.)
"""

import logging
import math
import mimetypes
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, TypeVar

import redis
from fastapi import APIRouter, Depends, Header, Response
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from clipline.api.auth import ApiKey
from clipline.api.errors import AUTH_RESPONSES, JOB_RESPONSES, doc
from clipline.api.services import _IDEMPOTENCY_RE, _JOB_ID_RE, Services, check_spec
from clipline_core import constants
from clipline_core.errors import ApiError, ErrorCode
from clipline_core.job import Job, JobSpec, JobState
from clipline_core.schema import (
    JobAccepted,
    JobView,
    job_path,
    job_view,
    links,
)
from clipline_core.store import OWNER_FIELD, IdempotencyConflict, _to_job
from workers.submit import submit

log = logging.getLogger("clipline.api")
T = TypeVar("T")


def build_router(svc: Services) -> APIRouter:
    """The job API's routes over ``svc``: ``/v1/jobs`` and the probes and metrics."""
    settings = svc.settings
    callbacks_enabled = bool(settings.callback_secret.strip(" ,"))
    bearer = HTTPBearer(auto_error=False, description="an API key: Authorization: Bearer <key>")
    router = APIRouter()

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
        job_id, created = submit(svc.store, svc.celery, spec, scoped, owner=tenant)
        if created:
            return job_id, True, JobState.QUEUED
        return job_id, False, svc.store.state(job_id)

    def load(job_id: str, key: ApiKey) -> Job:
        if not _JOB_ID_RE.match(job_id):
            raise ApiError(404, ErrorCode.NOT_FOUND, f"no job {job_id!r}")
        raw = svc.store.raw(job_id)
        if not raw or "state" not in raw or raw.get(OWNER_FIELD, key.tenant) != key.tenant:
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

    JobId = Annotated[str, PathParam(min_length=1, max_length=64, description="job id")]

    # -- routes ----------------------------------------------------------------
    @router.post(
        f"{constants.API_PREFIX}/jobs",
        status_code=202,
        response_model=JobAccepted,
        summary="Submit a job",
        responses={
            **AUTH_RESPONSES,
            400: doc("the body is not valid JSON"),
            409: doc("the Idempotency-Key was used with a different body"),
            413: doc("the body is too large"),
            415: doc("the body is not JSON"),
            422: doc("the request is invalid"),
        },
    )
    async def create_job(
        spec: JobSpec,
        response: Response,
        key: Annotated[ApiKey, Depends(submit_key)],
        idempotency_key: Annotated[
            str | None,
            Header(
                alias=constants.HEADER_IDEMPOTENCY_KEY,
                pattern=_IDEMPOTENCY_RE,
                description="makes retries safe: same key and body, same job",
            ),
        ] = None,
    ) -> JobAccepted:
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
        state = current or JobState.QUEUED
        if not created:
            response.headers[constants.HEADER_IDEMPOTENT_REPLAYED] = "true"
        response.headers["Location"] = job_path(job_id)
        return JobAccepted(id=job_id, state=state, replayed=not created, links=links(job_id))

    @router.get(
        f"{constants.API_PREFIX}/jobs/{{job_id}}",
        response_model=JobView,
        summary="Get a job",
        responses=JOB_RESPONSES,
    )
    async def get_job(job_id: JobId, key: Annotated[ApiKey, Depends(read_key)]) -> JobView:
        return job_view(await svc.call(load, job_id, key))

    @router.delete(
        f"{constants.API_PREFIX}/jobs/{{job_id}}",
        response_model=JobView,
        summary="Cancel a job that has not finished",
        responses={**JOB_RESPONSES, 409: doc("the job already finished")},
    )
    async def cancel_job(job_id: JobId, key: Annotated[ApiKey, Depends(cancel_key)]) -> JobView:
        return job_view(await svc.call(cancel, job_id, key))

    @router.get(
        f"{constants.API_PREFIX}/jobs/{{job_id}}/highlight",
        response_class=FileResponse,
        summary="Download the highlight clip (Range requests work)",
        responses={
            **JOB_RESPONSES,
            200: {"content": {"video/mp4": {}}, "description": "the clip"},
            206: {"content": {"video/mp4": {}}, "description": "part of the clip (Range)"},
            404: doc("no such job, or the clip is not kept here (uploaded or expired)"),
            409: doc("the job has not succeeded"),
            416: {"description": "the Range cannot be satisfied"},
        },
    )
    async def get_highlight(job_id: JobId, key: Annotated[ApiKey, Depends(read_key)]) -> Response:
        job = await svc.call(load, job_id, key)
        if job.state != JobState.SUCCEEDED:
            msg = (
                f"job {job_id} is {job.state.value}; it has no highlight"
                if job.terminal
                else f"job {job_id} is still {job.state.value}; wait for it to succeed"
            )
            raise ApiError(409, ErrorCode.NOT_READY, msg, job_id=job_id)
        h = job.highlight
        path = Path(h.path).resolve() if h is not None and h.path else None
        if path is None or svc.artifacts not in path.parents or not path.is_file():
            if h is not None and h.url:
                msg = (
                    "the clip was uploaded to the upload_url given with the job; "
                    "this API does not keep a copy"
                )
            else:
                msg = "the clip is no longer available here (expired or removed)"
            raise ApiError(404, ErrorCode.NOT_FOUND, msg, job_id=job_id)
        media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(
            path,
            media_type=media_type,
            filename=f"{job_id}{path.suffix}",
            content_disposition_type="inline",
        )

    @router.get("/healthz", summary="Liveness", responses={200: {"description": "alive"}})
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get(
        "/readyz",
        summary="Readiness (Redis reachable)",
        responses={503: {"description": "Redis is unreachable"}},
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
        summary="Prometheus metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}, "description": "metrics"}},
    )
    async def metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return router
