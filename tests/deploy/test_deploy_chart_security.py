"""The chart's security surface: Ingress routes, Pod Security Standards, the ``helm test`` hook.

* The Ingress routes only the job API (``/v1``) and ``/healthz``; ``/metrics``,
  ``/readyz`` and the docs stay inside the cluster unless ``api.ingress.exposeDocs``. The
  paths are matched (Kubernetes ``Prefix``/``Exact`` rules) against the routes the real
  FastAPI app serves, so a new route is classified, not silently exposed.
* Every pod the chart creates meets the Pod Security Standards' ``restricted`` level; the
  pods the operator builds break ``baseline`` only by the arena's ``hostPath`` and
  ``restricted`` only by it and the arena init container (root, ``CHOWN`` + ``FOWNER``),
  which is what docs/deploy.md ("Security") tells cluster admins. The checks follow the
  published PSS rules (Kubernetes 1.27+); no admission controller runs here.
* The ``helm test`` pod: its hook annotations, its Service, the variables the CLI reads
  (``CLIPLINE_API_URL``, ``CLIPLINE_API_KEY``), NOTES.txt naming the same variables, and
  the rendered script run for real against a local stack (API, GPU daemon, workers on the
  real Redis) with the media it generates and serves itself.
"""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import redis
import yaml
from deploylib import CHART, KUBE_VERSIONS, NAMESPACE, RELEASE, by_kind, objects, one, render

from clipline_core import constants
from clipline_core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
INGRESS = {"api": {"ingress": {"enabled": True, "hosts": [{"host": "a.example"}, {"host": "b"}]}}}
NOTES = "clipline/templates/NOTES.txt"


def _validate(obj: dict[str, Any]) -> None:
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


# ---------------------------------------------------------------------------
# Ingress.
# ---------------------------------------------------------------------------
def _ingress(values: dict[str, Any]) -> dict[str, Any]:
    ingress = one(objects(render(values)), "Ingress")
    _validate(ingress)
    return ingress


def _paths(ingress: dict[str, Any]) -> list[tuple[str, str]]:
    rules = ingress["spec"]["rules"]
    per_host = [[(p["path"], p["pathType"]) for p in r["http"]["paths"]] for r in rules]
    assert all(paths == per_host[0] for paths in per_host), per_host
    for rule in rules:
        for path in rule["http"]["paths"]:
            assert path["backend"]["service"]["port"] == {"name": "http"}
    return per_host[0]


def _routed(paths: list[tuple[str, str]], url_path: str) -> bool:
    """Whether a request path matches an Ingress path (Kubernetes Prefix/Exact rules)."""
    for path, kind in paths:
        if kind == "Exact" and url_path == path:
            return True
        if kind == "Prefix":
            want = [p for p in path.split("/") if p]
            if [p for p in url_path.split("/") if p][: len(want)] == want:
                return True
    return False


def _app_paths(redis_url: str) -> set[str]:
    from clipline.api.app import create_app
    from clipline.api.auth import entry, new_key

    settings = Settings(
        redis_url=redis_url,
        deployment=f"t-sec-{uuid.uuid4().hex[:8]}",
        api_keys=entry("k", new_key()),
    )
    app = create_app(settings)
    # The documented routes, plus the docs pages FastAPI adds outside the schema.
    docs = {app.docs_url, app.openapi_url, app.swagger_ui_oauth2_redirect_url}
    return set(app.openapi()["paths"]) | {p for p in docs if p}


def test_ingress_routes_only_the_job_api_by_default(redis_url: str) -> None:
    ingress = _ingress(INGRESS)
    assert [r["host"] for r in ingress["spec"]["rules"]] == ["a.example", "b"]
    paths = _paths(ingress)
    assert paths == [(constants.API_PREFIX, "Prefix"), ("/healthz", "Exact")]
    served = _app_paths(redis_url)
    job_routes = {p for p in served if p.startswith(constants.API_PREFIX + "/")}
    assert f"{constants.API_PREFIX}/jobs/{{job_id}}/highlight" in job_routes
    internal = {"/metrics", "/readyz", "/docs", "/openapi.json", "/docs/oauth2-redirect"}
    assert internal <= served
    # Every route the app serves is either a job route or healthz (routed) or internal.
    assert served - job_routes - internal == {"/healthz"}
    for path in job_routes | {"/healthz"}:
        assert _routed(paths, path.replace("{job_id}", "0123abcd")), path
    for path in internal | {"/v1x", "/metrics/", "/healthz/x"}:
        assert not _routed(paths, path), path


def test_ingress_exposes_the_docs_only_when_asked(redis_url: str) -> None:
    values = copy.deepcopy(INGRESS)
    values["api"]["ingress"]["exposeDocs"] = True
    paths = _paths(_ingress(values))
    served = _app_paths(redis_url)
    for path in ("/docs", "/docs/oauth2-redirect", "/openapi.json"):
        assert path in served and _routed(paths, path), path
    for path in ("/metrics", "/readyz"):
        assert not _routed(paths, path), path
    assert _routed(paths, f"{constants.API_PREFIX}/jobs")


def test_ingress_hosts_take_no_paths_of_their_own() -> None:
    """The old `paths` list (`/` routed everything) is refused, not silently ignored."""
    values = {"api": {"ingress": {"enabled": True, "hosts": [{"host": "a", "paths": []}]}}}
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError, match="paths"):
        chart.validate_schema(chart.merge_values(values))
    tls = copy.deepcopy(INGRESS)
    tls["api"]["ingress"]["tls"] = [{"hosts": ["a.example"]}]  # the controller's certificate
    assert _ingress(tls)["spec"]["tls"] == [{"hosts": ["a.example"]}]
    assert not by_kind(objects(render({})), "Ingress")


# ---------------------------------------------------------------------------
# Pod Security Standards (https://kubernetes.io/docs/concepts/security/pod-security-standards/).
# ---------------------------------------------------------------------------
BASELINE_CAPS = {
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
}
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        *pod.get("initContainers", []),
        *pod["containers"],
        *pod.get("ephemeralContainers", []),
    ]


def baseline_violations(pod: dict[str, Any]) -> set[str]:
    """The baseline rules a pod spec breaks."""
    out: set[str] = set()
    psc = pod.get("securityContext") or {}
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            out.add(field)
    if (psc.get("windowsOptions") or {}).get("hostProcess"):
        out.add("hostProcess")
    if (psc.get("seccompProfile") or {}).get("type") == "Unconfined":
        out.add("seccomp Unconfined")
    if {s["name"] for s in psc.get("sysctls") or []} - SAFE_SYSCTLS:
        out.add("unsafe sysctls")
    for volume in pod.get("volumes") or []:
        if "hostPath" in volume:
            out.add(f"hostPath volume {volume['name']}")
    for c in _containers(pod):
        sc = c.get("securityContext") or {}
        name = c["name"]
        if sc.get("privileged"):
            out.add(f"{name}: privileged")
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            out.add(f"{name}: hostProcess")
        added = set((sc.get("capabilities") or {}).get("add") or [])
        if added - BASELINE_CAPS:
            out.add(f"{name}: capabilities {sorted(added - BASELINE_CAPS)}")
        if any(p.get("hostPort") for p in c.get("ports") or []):
            out.add(f"{name}: hostPort")
        if sc.get("procMount", "Default") != "Default":
            out.add(f"{name}: procMount")
        if (sc.get("seccompProfile") or {}).get("type") == "Unconfined":
            out.add(f"{name}: seccomp Unconfined")
        if (sc.get("appArmorProfile") or {}).get("type") == "Unconfined":
            out.add(f"{name}: AppArmor Unconfined")
    return out


def restricted_violations(pod: dict[str, Any]) -> set[str]:
    """The restricted rules a pod spec breaks (baseline's included)."""
    out = baseline_violations(pod)
    psc = pod.get("securityContext") or {}
    for volume in pod.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if kinds - RESTRICTED_VOLUMES:
            out.add(f"volume {volume['name']}: {sorted(kinds)}")
    if psc.get("runAsUser") == 0:
        out.add("runAsUser 0")
    for c in _containers(pod):
        sc = c.get("securityContext") or {}
        name = c["name"]
        if sc.get("allowPrivilegeEscalation") is not False:
            out.add(f"{name}: allowPrivilegeEscalation")
        non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        if non_root is not True:
            out.add(f"{name}: runAsNonRoot")
        if sc.get("runAsUser") == 0:
            out.add(f"{name}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.add(f"{name}: seccompProfile")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.add(f"{name}: capabilities not dropped")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            out.add(f"{name}: adds {sorted(caps['add'])}")
    return out


def _chart_pods(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    pods: dict[str, dict[str, Any]] = {}
    for obj in objects(render(values)):
        if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            pods[f"{obj['kind']}/{obj['metadata']['name']}"] = obj["spec"]["template"]["spec"]
        elif obj["kind"] == "Pod":
            pods[f"Pod/{obj['metadata']['name']}"] = obj["spec"]
    return pods


def _operator_pods(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    from clipline_operator import builders, crd

    (pipeline,) = by_kind(objects(render(values)), constants.CRD_KIND)
    body = copy.deepcopy(pipeline)
    body["metadata"]["uid"] = "00000000-0000-0000-0000-000000000001"
    crd.validate_spec(body["spec"], name=body["metadata"]["name"])
    model = builders.Pipeline.from_body(body)
    node = "gpu-node-1.example.internal"
    built = [
        builders.build_daemon_deployment(model, node, 0),
        builders.build_worker_deployment(model, node, 0, 2),
    ]
    return {
        o["metadata"]["labels"][constants.LABEL_COMPONENT]: o["spec"]["template"]["spec"]
        for o in built
    }


def test_every_chart_pod_meets_the_restricted_level() -> None:
    """API, operator, Valkey, callback worker and the helm test pod: `restricted` as shipped."""
    pods = _chart_pods({})
    kinds = {name.split("/")[0] + "/" + name.rsplit("-", 1)[-1] for name in pods}
    assert kinds == {
        "Deployment/api",
        "Deployment/operator",
        "Deployment/callbacks",
        "StatefulSet/valkey",
        "Pod/submit",
    }
    for name, pod in pods.items():
        assert restricted_violations(pod) == set(), name
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] == constants.CONTAINER_UID
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod["enableServiceLinks"] is False, name
        # Only the operator talks to the Kubernetes API, so only it mounts a token.
        assert pod.get("automountServiceAccountToken", True) is name.endswith("-operator")
        for c in _containers(pod):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"] == {"drop": ["ALL"]}, name
            assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False
            writable = {m["mountPath"] for m in c.get("volumeMounts", []) if not m.get("readOnly")}
            assert "/tmp" in writable or name.startswith("StatefulSet/"), name


def test_a_weakened_security_context_is_caught() -> None:
    """The checker is not vacuous: values that loosen the defaults break `restricted`."""
    pods = _chart_pods({"securityContext": {"allowPrivilegeEscalation": True}})
    assert all(
        "allowPrivilegeEscalation" in " ".join(restricted_violations(p)) for p in pods.values()
    )
    pods = _chart_pods({"podSecurityContext": {"runAsUser": 0, "runAsNonRoot": False}})
    api = next(p for n, p in pods.items() if n.endswith("-api"))
    assert {"runAsUser 0"} <= restricted_violations(api)
    assert not baseline_violations(api)


def test_operator_pods_need_the_privileged_level_for_the_arena_hostpath() -> None:
    """What docs/deploy.md says: the GPU namespace needs `privileged`, for one reason each."""
    from clipline_operator import builders

    pods = _operator_pods({})
    assert set(pods) == {builders.COMPONENT_DAEMON, builders.COMPONENT_WORKERS}
    paths = set()
    for kind, pod in pods.items():
        (volume,) = [v for v in pod["volumes"] if "hostPath" in v]
        paths.add(volume["hostPath"]["path"])
        assert volume["hostPath"]["path"].startswith(builders.ARENA_HOST_ROOT + "/clipline-")
        assert volume["hostPath"]["type"] == "DirectoryOrCreate"
        assert baseline_violations(pod) == {"hostPath volume arena"}, kind
        (init,) = pod["initContainers"]
        assert restricted_violations(pod) == {
            "hostPath volume arena",
            "volume arena: ['hostPath']",
            f"{init['name']}: runAsNonRoot",
            f"{init['name']}: runAsUser 0",
            f"{init['name']}: adds ['CHOWN', 'FOWNER']",
        }, kind
        # Not privileged, no escalation, read-only, only the arena mounted.
        sc = init["securityContext"]
        assert not sc.get("privileged") and sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert [m["name"] for m in init["volumeMounts"]] == ["arena"]
        assert not pod.get("hostIPC") and pod["automountServiceAccountToken"] is False
    assert len(paths) == 1  # a daemon and its workers share one arena directory


def test_security_docs_state_the_levels() -> None:
    text = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")
    section = text.split("\n## Security", 1)[1].split("\n## ", 1)[0]
    for needle in (
        "pod-security.kubernetes.io/enforce: restricted",
        "pod-security.kubernetes.io/enforce: privileged",
        "/dev/shm/clipline-<deployment>",
        "CHOWN",
        "FOWNER",
        "api.ingress.exposeDocs",
        "CLIPLINE_PRIVATE_HOSTS",
        "helm test",
    ):
        assert needle in section, needle
    # The split layout's ClipPipeline and Namespaces are valid as written.
    from clipline_operator import crd

    docs = [
        d
        for block in section.split("```yaml")[1:]
        for d in yaml.safe_load_all(block.split("```")[0])
    ]
    (pipeline,) = [d for d in docs if d["kind"] == constants.CRD_KIND]
    spec = crd.validate_spec(pipeline["spec"], name=pipeline["metadata"]["name"])
    # ... and shares its queues with the API of `helm install clips`.
    api = one(objects(render({"pipeline": {"create": False}}, name="clips")), "Deployment", "-api")
    env = _env(api["spec"]["template"]["spec"]["containers"][0])
    assert spec["deployment"] == env["CLIPLINE_DEPLOYMENT"]
    for namespace in [d for d in docs if d["kind"] == "Namespace"]:
        _validate(namespace)


# ---------------------------------------------------------------------------
# The helm test hook.
# ---------------------------------------------------------------------------
def _hook(values: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    objs = objects(render(values))
    hooks = [o for o in objs if (o["metadata"].get("annotations") or {}).get("helm.sh/hook")]
    pods = [o for o in hooks if o["kind"] == "Pod"]
    services = [o for o in hooks if o["kind"] == "Service"]
    assert len(pods) <= 1 and len(services) <= 1 and len(hooks) == len(pods) + len(services)
    for obj in hooks:
        _validate(obj)
        assert obj["metadata"]["annotations"]["helm.sh/hook"] == "test"
    return (pods[0] if pods else None), (services[0] if services else None)


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_the_test_hook_submits_through_the_api_service() -> None:
    pod, service = _hook({})
    assert pod is not None and service is not None
    annotations = pod["metadata"]["annotations"]
    assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation"  # logs stay
    assert int(service["metadata"]["annotations"]["helm.sh/hook-weight"]) < 0
    spec = pod["spec"]
    assert spec["restartPolicy"] == "Never"
    (container,) = spec["containers"]
    assert container["command"] == ["bash", "-c"]
    script = container["args"][0]
    assert 'clipline submit "$TEST_VIDEO_URL" --image "$TEST_IMAGE_URL"' in script
    assert 'clipline wait "$job" --timeout "$TEST_TIMEOUT_S"' in script
    assert "samples.make_planted_video" in script and "http.server" in script
    env = _env(container)
    objs = objects(render({}))
    api = one(objs, "Service", "-api")
    port = api["spec"]["ports"][0]["port"]
    assert env["CLIPLINE_API_URL"] == f"http://{api['metadata']['name']}.{NAMESPACE}.svc:{port}"
    key = one(objs, "Secret", "-api-key")
    assert env["CLIPLINE_API_KEY"] == {
        "secretKeyRef": {"name": key["metadata"]["name"], "key": "key"}
    }
    # The media the workers fetch: this pod, through the hook's Service.
    media = f"http://{service['metadata']['name']}.{NAMESPACE}.svc:8000"
    assert env["TEST_MEDIA_URL"] == media
    assert env["TEST_VIDEO_URL"] == f"{media}/video.avi"
    assert env["TEST_IMAGE_URL"] == f"{media}/product.jpg"
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] == container["ports"][0]["name"]
    assert container["readinessProbe"]["httpGet"]["port"] == "media"
    assert spec["activeDeadlineSeconds"] > int(env["TEST_TIMEOUT_S"])
    assert pod["metadata"]["labels"][constants.LABEL_INSTANCE] == RELEASE


def test_the_test_hook_alternatives() -> None:
    pod, service = _hook(
        {
            "tests": {
                "videoUrl": "https://cdn.example/v.mp4",
                "imageUrl": "https://cdn.example/p.jpg",
            }
        }
    )
    assert pod is not None and service is None
    env = _env(pod["spec"]["containers"][0])
    assert env["TEST_VIDEO_URL"] == "https://cdn.example/v.mp4"
    assert "TEST_MEDIA_URL" not in env
    # No generated key: the test needs a Secret with a bearer key, or it is not rendered.
    keys = {"generateKey": False, "keys": ["backend:" + "0" * 64 + ":submit+read"]}
    assert _hook({"api": {"auth": keys}}) == (None, None)
    assert "No test hook" in render({"api": {"auth": keys}})[NOTES]
    pod, _ = _hook(
        {
            "api": {"auth": keys},
            "tests": {"apiKey": {"existingSecret": "k", "existingSecretKey": "t"}},
        }
    )
    assert pod is not None
    env = _env(pod["spec"]["containers"][0])
    assert env["CLIPLINE_API_KEY"] == {"secretKeyRef": {"name": "k", "key": "t"}}
    assert _hook({"tests": {"enabled": False}}) == (None, None)
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError):
        chart.validate_schema(chart.merge_values({"tests": {"videoUrl": "/local/file.mp4"}}))


def test_the_pipeline_allows_only_the_test_media_host() -> None:
    """The chart's pipeline may fetch from the test's own media Service, no other private
    address; without the self-served media (or without tests) nothing is allowed."""

    def env(values: dict[str, Any]) -> dict[str, str]:
        objs = objects(render(values))
        (pipeline,) = [o for o in objs if o["kind"] == constants.CRD_KIND]
        return {e["name"]: e.get("value", "") for e in pipeline["spec"].get("extraEnv", [])}

    assert env({})["CLIPLINE_PRIVATE_HOSTS"] == f"{RELEASE}-clipline-test-media.{NAMESPACE}.svc"
    assert "CLIPLINE_ALLOW_PRIVATE_NETWORKS" not in env({})
    assert "CLIPLINE_PRIVATE_HOSTS" not in env({"tests": {"enabled": False}})
    hosted = {
        "tests": {"videoUrl": "https://cdn.example/v.mp4", "imageUrl": "https://cdn.example/p.jpg"}
    }
    assert "CLIPLINE_PRIVATE_HOSTS" not in env(hosted)


def test_notes_use_the_variables_the_cli_reads() -> None:
    import inspect

    from clipline import cli

    source = inspect.getsource(cli)
    for name in ("CLIPLINE_API_URL", "CLIPLINE_API_KEY"):
        assert f'os.environ.get("{name}"' in source, name
    notes = render({})[NOTES]
    assert "export CLIPLINE_API_URL=http://127.0.0.1:8080" in notes
    assert "CLIPLINE_URL" not in notes.replace("CLIPLINE_API_URL", "")
    assert f"helm test {RELEASE} -n {NAMESPACE} --logs" in notes
    media_host = f"{RELEASE}-clipline-test-media.{NAMESPACE}.svc"
    assert f"CLIPLINE_PRIVATE_HOSTS={media_host}" in notes
    external = render({"pipeline": {"create": False}})[NOTES]
    assert "refuse private addresses" in external and media_host in external
    ingress = render(INGRESS)[NOTES]
    assert "export CLIPLINE_API_URL=http://a.example" in ingress
    assert "api.ingress.exposeDocs=true" in ingress


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_the_test_hook_script_passes_against_a_real_stack(tmp_path: Path, redis_url: str) -> None:
    """The rendered script, run as the pod runs it, against the API, daemon and workers.

    Only the addresses differ from the cluster: the API is the local stack's and the media
    are served on localhost (the stack allows loopback here, as the chart's pipeline allows
    the media Service's one private host with CLIPLINE_PRIVATE_HOSTS).
    """
    from clipline.stack import LocalStack

    pod, _ = _hook({"tests": {"timeoutSeconds": 240}})
    assert pod is not None
    (container,) = pod["spec"]["containers"]
    settings = Settings(
        deployment=f"t-helmtest-{uuid.uuid4().hex[:8]}",
        redis_url=redis_url,
        state_dir=str(tmp_path / "state"),
        allow_loopback=True,
        shm_slots=8,
        shm_slot_bytes=4 << 20,
        inference_timeout_s=60.0,
        api_port=0,
    )
    stack = LocalStack(settings, workers=1, api=True)
    client = redis.Redis.from_url(redis_url)
    try:
        stack.start()
        assert stack.api_url and stack.api_key
        port = _free_port()
        media = f"http://localhost:{port}"
        env = {k: v for k, v in _env(container).items() if isinstance(v, str)}
        env.update(
            CLIPLINE_API_URL=stack.api_url,
            CLIPLINE_API_KEY=stack.api_key,
            TEST_MEDIA_DIR=str(tmp_path / "media"),
            TEST_MEDIA_PORT=str(port),
            TEST_MEDIA_URL=media,
            TEST_VIDEO_URL=f"{media}/video.avi",
            TEST_IMAGE_URL=f"{media}/product.jpg",
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            HOME=str(tmp_path),
        )

        def run_script(**changes: str) -> tuple[int, str]:
            done = subprocess.run(
                [*container["command"], container["args"][0]],
                env={**env, **changes},
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=300,
            )
            return done.returncode, done.stdout + done.stderr

        code, out = run_script()
        assert code == 0, out
        assert "PASS: job" in out and "highlight:" in out, out
        assert (tmp_path / "media" / "video.avi").stat().st_size > 0
        # A job that fails fails the test, with the job shown.
        code, out = run_script(TEST_VIDEO_URL=f"{media}/missing.avi")
        assert code == 1, out
        assert '"state": "failed"' in out and "FAIL: job" in out and "PASS" not in out, out
    finally:
        stack.stop()
        for pattern in (
            constants.redis_prefix(settings.deployment) + ":*",
            constants.queue_name(settings.deployment) + "*",
            f"_kombu.binding.*{settings.deployment}*",
        ):
            for key in client.scan_iter(match=pattern, count=1000):
                client.delete(key)
        client.close()
