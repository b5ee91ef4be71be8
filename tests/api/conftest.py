"""Fixtures of the API tests (helpers in ``api_helpers.py``).

``live_api`` runs the real application under uvicorn on a free loopback port (in a
thread of the test process) against the real Redis, with its own deployment name, so
its jobs and queue never mix with other tests'. No worker consumes that queue there;
the end-to-end tests run the real daemon and worker through ``LocalStack``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from api_helpers import Api, Keys, Receiver, api_settings, make_keys, running_api

from clipline_core.settings import Settings


@pytest.fixture
def keys() -> Keys:
    return make_keys()


@pytest.fixture
def live_api(settings: Settings, keys: Keys, redis_client: redis.Redis) -> Iterator[Api]:
    with running_api(api_settings(settings, keys), keys, redis_client) as api:
        yield api


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()
