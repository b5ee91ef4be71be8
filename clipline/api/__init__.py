"""The HTTP job API: ``create_app`` (ASGI app for tests and servers) and ``serve``.

Importing this package is cheap (no web framework): workers and clients import
:mod:`clipline_core.schema` and :mod:`clipline_core.signing` from it; the FastAPI
application lives in :mod:`clipline.api.app` and is imported on first use.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING

from clipline_core.settings import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI


def create_app(settings: Settings | None = None) -> FastAPI:
    """The ASGI application (default settings: from the environment)."""
    from clipline.api.app import create_app as build

    return build(settings)


def serve(host: str, port: int) -> int:
    """Run the API with uvicorn until SIGTERM/SIGINT; the exit status.

    The server's limits (header, body and keep-alive timeouts, connections) come from
    :func:`clipline.api.server.server_config`.
    """
    from clipline.api.auth import KeyConfigError, load_keys

    settings = Settings.from_env()
    try:
        if not load_keys(settings):
            raise KeyConfigError(
                "no API keys are configured: set CLIPLINE_API_KEYS or CLIPLINE_API_KEY_FILE "
                "(python -m clipline.api new-key makes one)"
            )
    except KeyConfigError as exc:
        print(f"clipline api: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from clipline.api.server import run, server_config

    started = run(
        server_config(
            settings,
            "clipline.api.app:app_from_env",
            host,
            port,
            factory=True,
            workers=max(1, settings.api_workers),
            loop="auto",
            log_level="info",
        )
    )
    return 0 if started else 1
