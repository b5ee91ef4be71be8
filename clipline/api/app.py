"""The HTTP job API (FastAPI): the factory that assembles it.

The parts: :mod:`clipline.api.routes` (the routes), :mod:`clipline.api.services` (what
the handlers share, spec checks), :mod:`clipline.api.errors` (error bodies and
handlers), :mod:`clipline.api.middleware` (body limit, content type, metrics). Must not
be imported by any of them.

Routes (all ``/v1`` routes need ``Authorization: Bearer <API key>``)::

    POST   /v1/jobs                  202 + Location; Idempotency-Key makes retries safe
    GET    /v1/jobs                  the tenant's jobs, newest first (cursor, state, time)
    GET    /v1/jobs/{id}             state, timings, result or error
    GET    /v1/jobs/{id}/highlight   the clip (Range requests work)
    DELETE /v1/jobs/{id}             cancel a job that has not finished
    GET    /healthz  /readyz  /metrics  /openapi.json

``Prefer: wait=N`` on ``POST /v1/jobs`` and ``GET /v1/jobs/{id}`` holds the answer until
the job is terminal or N seconds passed (:mod:`clipline.api.waiting`). The document's
``webhooks`` describe the completion callback.

The request body is :class:`clipline_core.job.JobSpec` (unknown fields rejected); on top of
its field limits the API requires http(s) sources (local paths only where
``api_allow_local_paths`` is set, as on the local stack), refuses literal addresses
that the fetch stage's SSRF rules forbid, caps the body (``api_max_body_bytes``,
413) and the time it takes to arrive (``api_body_timeout_s``, 408) and accepts only
JSON (415). Every error answer is ``{"error": {"code",
"message", ...}}`` with a code from :class:`clipline_core.errors.ErrorCode`.

Keys: 401 when the key is missing or unknown, 403 when it lacks the scope the route
needs; a job belongs to the tenant of the key that created it and is invisible (404)
to other tenants' keys (a job stored without a tenant, by the local tools, belongs to
the local stack's key); idempotency keys are scoped per tenant. Per-key rate limit:
429 with ``Retry-After``.

The job store is the synchronous :class:`clipline_core.store.JobStore` and jobs are sent
with Celery's producer, both reused as they are (:func:`workers.submit.submit`).
Handlers are coroutines that hand each blocking step to a small dedicated thread pool
(``api_threads``, a few threads): the event loop stays free while Redis answers, and
a few threads contend for the GIL far less than a generic pool of dozens. The API's
own Celery app does not emit ``task-sent`` events (nothing consumes them; they would
double the Redis writes per submission).
"""

import logging

from fastapi import FastAPI

from clipline.api.errors import install_handlers
from clipline.api.middleware import BodyGuard
from clipline.api.routes import TAGS, build_router, build_webhooks
from clipline.api.services import API_VERSION, Services, check_spec
from clipline_core.settings import Settings

__all__ = ["API_VERSION", "Services", "app_from_env", "check_spec", "create_app"]

log = logging.getLogger("clipline.api")


def create_app(settings: Settings | None = None) -> FastAPI:
    """The ASGI application for ``settings`` (default: from the environment)."""
    settings = settings or Settings.from_env()
    svc = Services(settings)

    app = FastAPI(
        title="clipline job API",
        version=API_VERSION,
        description=(
            "Submit product videos, learn the outcome by polling or by a signed callback, "
            "and download the highlight clip."
        ),
        docs_url="/docs",
        redoc_url=None,
        openapi_tags=TAGS,
    )
    app.state.services = svc
    install_handlers(app)
    app.include_router(build_router(svc))
    app.webhooks.include_router(build_webhooks())
    app.add_middleware(
        BodyGuard,
        max_body=settings.api_max_body_bytes,
        body_timeout_s=settings.api_body_timeout_s,
    )
    return app


def app_from_env() -> FastAPI:
    """Factory for uvicorn (``clipline.api.app:app_from_env``, factory mode)."""
    return create_app(Settings.from_env())
