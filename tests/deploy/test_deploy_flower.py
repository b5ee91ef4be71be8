"""The chart's optional Flower: off by default; on, a locked-down Deployment and Service
that read the deployment's Redis URL and basic-auth credentials from Secrets.

Rendered with Helm's Go SDK like every chart test (``ci/flower-values.yaml`` is also one
of the variants every generic chart test renders and validates).
"""

from __future__ import annotations

import base64
from typing import Any

from deploylib import RELEASE, by_kind, ci_variants, objects, one, render


def _flower(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [
        o
        for o in by_kind(objs, kind)
        if o["metadata"]["labels"].get("app.kubernetes.io/component") == "flower"
    ]


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e for e in container["env"]}


def test_flower_is_off_by_default() -> None:
    objs = objects(render({}))
    assert not any(_flower(objs, k) for k in ("Deployment", "Service", "Secret"))


def test_flower_reads_redis_and_generated_credentials_from_secrets() -> None:
    objs = objects(render(ci_variants()["flower-values"]))
    deployment = one(_flower(objs, "Deployment"), "Deployment", "-flower")
    service = one(_flower(objs, "Service"), "Service", "-flower")
    secret = one(_flower(objs, "Secret"), "Secret", "-flower-auth")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["celery"] and container["args"][0] == "flower"
    assert not [a for a in container["args"] if "redis://" in a or "auth" in a]
    env = _env(container)
    redis_ref = env["CELERY_BROKER_URL"]["valueFrom"]["secretKeyRef"]
    assert redis_ref == {"name": f"{RELEASE}-clipline-redis", "key": "url"}
    redis_secret = one(objs, "Secret", "-clipline-redis")
    assert base64.b64decode(redis_secret["data"]["url"]).startswith(b"redis://:")
    auth_ref = env["FLOWER_BASIC_AUTH"]["valueFrom"]["secretKeyRef"]
    assert auth_ref == {"name": secret["metadata"]["name"], "key": "auth"}
    user, password = base64.b64decode(secret["data"]["auth"]).decode().split(":", 1)
    assert user == "admin" and len(password) == 32
    assert base64.b64decode(secret["data"]["password"]).decode() == password
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 5555, "targetPort": "http", "protocol": "TCP"}
    ]
    assert service["metadata"]["annotations"] == {"example.com/team": "video"}
    assert container["readinessProbe"]["tcpSocket"]["port"] == "http"
    assert pod["automountServiceAccountToken"] is False


def test_flower_with_an_existing_secret_makes_none() -> None:
    values = {
        "flower": {
            "enabled": True,
            "basicAuth": {"existingSecret": "ops-flower", "existingSecretKey": "users"},
        }
    }
    objs = objects(render(values))
    assert not _flower(objs, "Secret")
    container = one(objs, "Deployment", "-flower")["spec"]["template"]["spec"]["containers"][0]
    ref = _env(container)["FLOWER_BASIC_AUTH"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "ops-flower", "key": "users"}
