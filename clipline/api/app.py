"""The HTTP job API (FastAPI): submit, read, cancel jobs and download their clips.

Routes (all ``/v1`` routes need ``Authorization: Bearer <API key>``)::

    POST   /v1/jobs                  202 + Location; Idempotency-Key makes retries safe
    GET    /v1/jobs/{id}             state, timings, result or error
    GET    /v1/jobs/{id}/highlight   the clip (Range requests work)
    DELETE /v1/jobs/{id}             cancel a job that has not finished
    GET    /healthz  /readyz  /metrics  /openapi.json

The request body is :class:`clipline_core.job.JobSpec` (unknown fields rejected); on top of
its field limits the API requires http(s) sources (local paths only where
``api_allow_local_paths`` is set, as on the local stack), refuses literal addresses
that the fetch stage's SSRF rules forbid, caps the body (``api_max_body_bytes``,
413) and accepts only JSON (415). Every error answer is ``{"error": {"code",
"message", ...}}`` with a code from :class:`clipline_core.schema.ErrorCode`.

Keys: 401 when the key is missing or unknown, 403 when it lacks the scope the route
needs; a job belongs to the tenant of the key that created it and is invisible (404)
to other tenants' keys; idempotency keys are scoped per tenant. Per-key rate limit:
429 with ``Retry-After``.

The job store is the synchronous :class:`clipline_core.store.JobStore` and jobs are sent
with Celery's producer, both reused as they are (:func:`workers.submit.submit`).
Handlers are coroutines that hand each blocking step to a small dedicated thread pool
(``api_threads``, a few threads): the event loop stays free while Redis answers, and
a few threads contend for the GIL far less than a generic pool of dozens. The API's
own Celery app does not emit ``task-sent`` events (nothing consumes them; they would
double the Redis writes per submission).

(No ``from __future__ import annotations`` here: FastAPI reads the handlers'
annotations at runtime, and they name local dependencies.)
"""

import asyncio
import concurrent.futures
import ipaddress
import logging
import math
import mimetypes
import re
import time
import urllib.parse
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

import redis
from celery import Celery
from fastapi import Depends, FastAPI, Header, Request, Response
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from kombu.exceptions import KombuError
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from clipline.api.auth import ApiKey, KeyConfigError, KeyRing, RateLimiter, load_keys
from clipline_core import constants
from clipline_core.errors import ApiError, ClipError, ErrorCode
from clipline_core.job import Job, JobSpec, JobState
from clipline_core.schema import (
    ErrorBody,
    ErrorDetail,
    ErrorInfo,
    JobAccepted,
    JobView,
    job_path,
    job_view,
    links,
)
from clipline_core.settings import Settings
from clipline_core.store import OWNER_FIELD, IdempotencyConflict, _to_job
from workers import callbacks, fetch
from workers.app import make_app
from workers.submit import submit

log = logging.getLogger("clipline.api")
T = TypeVar("T")

API_VERSION = "1.0.0"
_JOB_ID_RE = re.compile(r"^[0-9a-f]{32}$")
_IDEMPOTENCY_RE = r"^[\x21-\x7e]{1,255}$"

REQUESTS = Counter(
    constants.Metric.API_REQUESTS_TOTAL,
    "API requests by method, route template and status",
    [constants.LABEL_METHOD, constants.LABEL_ROUTE, constants.LABEL_STATUS],
)
REQUEST_SECONDS = Histogram(
    constants.Metric.API_REQUEST_SECONDS,
    "API request latency by method and route template",
    [constants.LABEL_METHOD, constants.LABEL_ROUTE],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
)


def _error_response(
    status: int,
    code: ErrorCode | str,
    message: str,
    *,
    headers: dict[str, str] | None = None,
    details: list[ErrorDetail] | None = None,
    job_id: str | None = None,
) -> JSONResponse:
    body = ErrorBody(error=ErrorInfo(code=code, message=message, details=details, job_id=job_id))
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers)


def _doc(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: _doc("missing or unknown API key"),
    403: _doc("the API key lacks the scope this route needs"),
    429: _doc("rate limit exceeded (see Retry-After)"),
    503: _doc("Redis or the queue is unreachable"),
}
JOB_RESPONSES: dict[int | str, dict[str, Any]] = {
    **AUTH_RESPONSES,
    404: _doc("no such job (or it belongs to another API key)"),
    422: _doc("invalid path parameter"),
}


class Services:
    """What the handlers share: settings, Redis, the job store, Celery, keys, limiter."""

    def __init__(self, settings: Settings) -> None:
        keys = load_keys(settings)
        if not keys:
            raise KeyConfigError(
                "no API keys are configured: set CLIPLINE_API_KEYS or CLIPLINE_API_KEY_FILE "
                "(python -m clipline.api new-key makes one)"
            )
        self.settings = settings
        self.keyring = KeyRing(keys)
        self.redis = redis.Redis.from_url(
            settings.redis_url or "redis://127.0.0.1:6379/0",
            socket_timeout=5.0,
            socket_connect_timeout=2.0,
            health_check_interval=30,
        )
        self.celery: Celery = make_app(settings)
        self.store = callbacks.job_store(settings, self.redis, self.celery)
        self.celery.conf.task_send_sent_event = False
        self.limiter = RateLimiter(
            self.redis, settings.deployment, settings.api_rate_limit, settings.api_rate_burst
        )
        self.artifacts = settings.artifacts_path.resolve()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, settings.api_threads), thread_name_prefix="clipline-api"
        )

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking (Redis, Celery) function on the API's own small thread pool."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=False)
        self.redis.close()


# ---------------------------------------------------------------------------
# ASGI middleware: body limit, content type, metrics.
# ---------------------------------------------------------------------------
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class _Guard:
    """Caps and buffers request bodies, checks JSON content type, records metrics."""

    def __init__(self, app: ASGIApp, max_body: int) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def send_tracked(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                early, receive = await self._read_body(scope, receive)
                if early is not None:
                    await early(scope, receive, send_tracked)
                    return
            await self.app(scope, receive, send_tracked)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope["method"]
            REQUESTS.labels(method, template, str(status[0])).inc()
            REQUEST_SECONDS.labels(method, template).observe(time.perf_counter() - start)

    async def _read_body(
        self, scope: Scope, receive: Receive
    ) -> tuple[JSONResponse | None, Receive]:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                return _error_response(
                    400, ErrorCode.MALFORMED_BODY, "invalid Content-Length"
                ), receive
            if int(declared) > self.max_body:
                return self._too_large(), receive
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                gone = _error_response(400, ErrorCode.MALFORMED_BODY, "client went away")
                return gone, receive
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return self._too_large(), receive
            chunks.append(chunk)
            more = bool(message.get("more_body", False))
        body = b"".join(chunks)
        if body:
            ctype = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if ctype != "application/json" and not ctype.endswith("+json"):
                return _error_response(
                    415,
                    ErrorCode.UNSUPPORTED_MEDIA_TYPE,
                    "the request body must be JSON (Content-Type: application/json)",
                ), receive
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return None, replay

    def _too_large(self) -> JSONResponse:
        return _error_response(
            413,
            ErrorCode.BODY_TOO_LARGE,
            f"the request body exceeds {self.max_body} bytes",
        )


# ---------------------------------------------------------------------------
# Request checks.
# ---------------------------------------------------------------------------
def _invalid(field: str, message: str, code: ErrorCode = ErrorCode.INVALID_REQUEST) -> None:
    detail = ErrorDetail(loc=["body", field], message=message)
    raise ApiError(422, code, f"{field}: {message}", details=[detail])


def _check_remote(field: str, url: str, settings: Settings) -> None:
    """An http(s) URL with a host; literal addresses must pass the SSRF rules now.

    Host names are resolved and checked when the URL is used (fetch, callback).
    """
    try:
        parsed = urllib.parse.urlsplit(url)
        port = parsed.port
    except ValueError as exc:
        _invalid(field, f"not a valid URL ({exc})")
        return
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        _invalid(field, "must be an http(s) URL")
        return
    host = parsed.hostname
    try:
        ipaddress.ip_address(host)
        literal = True
    except ValueError:
        literal = host.lower().rstrip(".") == "localhost"
    if not literal:
        return
    try:
        fetch.resolve_checked(host, port or (443 if parsed.scheme == "https" else 80), settings)
    except ClipError as err:
        _invalid(field, err.message, ErrorCode.FORBIDDEN_SOURCE)


def _check_source(field: str, source: str, settings: Settings) -> None:
    if source.startswith(("http://", "https://")):
        _check_remote(field, source, settings)
        return
    if not settings.api_allow_local_paths:
        _invalid(field, "must be an http(s) URL")
    path = source.removeprefix("file://")
    if "://" in path or not path.startswith("/"):
        _invalid(field, "must be an http(s) URL or an absolute local path")


def check_spec(spec: JobSpec, settings: Settings, callbacks_enabled: bool) -> None:
    """The API's rules on top of the model's: source schemes, SSRF, callbacks set up."""
    _check_source("video_url", spec.video_url, settings)
    for i, url in enumerate(spec.image_urls):
        _check_source(f"image_urls[{i}]", url, settings)
    if spec.callback_url is not None:
        if not callbacks_enabled:
            _invalid("callback_url", "callbacks are not enabled on this server (no secret)")
        _check_remote("callback_url", spec.callback_url, settings)
    if spec.upload_url is not None:
        _check_remote("upload_url", spec.upload_url, settings)


# ---------------------------------------------------------------------------
# The application.
# ---------------------------------------------------------------------------
def create_app(settings: Settings | None = None) -> FastAPI:
    """The ASGI application for ``settings`` (default: from the environment)."""
    settings = settings or Settings.from_env()
    svc = Services(settings)
    callbacks_enabled = bool(settings.callback_secret.strip(" ,"))
    bearer = HTTPBearer(auto_error=False, description="an API key: Authorization: Bearer <key>")

    app = FastAPI(
        title="clipline job API",
        version=API_VERSION,
        description=(
            "Submit product videos, learn the outcome by polling or by a signed callback, "
            "and download the highlight clip."
        ),
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.services = svc

    # -- errors --------------------------------------------------------------
    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return _error_response(
            exc.status,
            exc.code,
            exc.message,
            headers=exc.headers,
            details=exc.details,
            job_id=exc.job_id,
        )

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = list(exc.errors())
        details = [
            ErrorDetail(
                loc=[p if isinstance(p, int) else str(p) for p in e.get("loc", ())],
                message=str(e.get("msg", "invalid")),
            )
            for e in errors[:20]
        ]
        if any(e.get("type") == "json_invalid" for e in errors):
            return _error_response(
                400, ErrorCode.MALFORMED_BODY, "the body is not valid JSON", details=details
            )
        summary = "; ".join(
            f"{'.'.join(str(p) for p in d.loc[1:]) or d.loc[0] if d.loc else '?'}: {d.message}"
            for d in details[:3]
        )
        return _error_response(
            422, ErrorCode.INVALID_REQUEST, f"invalid request: {summary}", details=details
        )

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = {
            404: ErrorCode.NOT_FOUND,
            405: ErrorCode.METHOD_NOT_ALLOWED,
            400: ErrorCode.MALFORMED_BODY,
        }.get(exc.status_code, ErrorCode.INVALID_REQUEST)
        return _error_response(
            exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None)
        )

    async def on_unavailable(request: Request, exc: Exception) -> Response:
        log.warning("backend unavailable: %s: %s", type(exc).__name__, exc)
        return _error_response(
            503,
            ErrorCode.UNAVAILABLE,
            "the job store or queue is unavailable; retry later",
            headers={"Retry-After": "1"},
        )

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(redis.RedisError, on_unavailable)
    app.add_exception_handler(KombuError, on_unavailable)

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
    @app.post(
        f"{constants.API_PREFIX}/jobs",
        status_code=202,
        response_model=JobAccepted,
        summary="Submit a job",
        responses={
            **AUTH_RESPONSES,
            400: _doc("the body is not valid JSON"),
            409: _doc("the Idempotency-Key was used with a different body"),
            413: _doc("the body is too large"),
            415: _doc("the body is not JSON"),
            422: _doc("the request is invalid"),
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

    @app.get(
        f"{constants.API_PREFIX}/jobs/{{job_id}}",
        response_model=JobView,
        summary="Get a job",
        responses=JOB_RESPONSES,
    )
    async def get_job(job_id: JobId, key: Annotated[ApiKey, Depends(read_key)]) -> JobView:
        return job_view(await svc.call(load, job_id, key))

    @app.delete(
        f"{constants.API_PREFIX}/jobs/{{job_id}}",
        response_model=JobView,
        summary="Cancel a job that has not finished",
        responses={**JOB_RESPONSES, 409: _doc("the job already finished")},
    )
    async def cancel_job(job_id: JobId, key: Annotated[ApiKey, Depends(cancel_key)]) -> JobView:
        return job_view(await svc.call(cancel, job_id, key))

    @app.get(
        f"{constants.API_PREFIX}/jobs/{{job_id}}/highlight",
        response_class=FileResponse,
        summary="Download the highlight clip (Range requests work)",
        responses={
            **JOB_RESPONSES,
            200: {"content": {"video/mp4": {}}, "description": "the clip"},
            206: {"content": {"video/mp4": {}}, "description": "part of the clip (Range)"},
            404: _doc("no such job, or the clip is not kept here (uploaded or expired)"),
            409: _doc("the job has not succeeded"),
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

    @app.get("/healthz", summary="Liveness", responses={200: {"description": "alive"}})
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
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

    @app.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}, "description": "metrics"}},
    )
    async def metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(_Guard, max_body=settings.api_max_body_bytes)
    return app


def app_from_env() -> FastAPI:
    """Factory for uvicorn (``clipline.api.app:app_from_env``, factory mode)."""
    return create_app(Settings.from_env())
