"""The objects the builders make: valid Kubernetes objects (kubernetes-validate, strict)
with the security, shared-memory, GPU and ownership properties the design requires."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
import yaml
from op_helpers import REPO

from clipline_core import constants
from clipline_core.settings import Settings
from clipline_operator import builders
from clipline_operator.builders import Pipeline

K8S_VERSION = "1.35.0"


def _pipeline(name: str = "clipline", **spec: Any) -> Pipeline:
    base = {"image": "ghcr.io/clipline/clipline:0.1.0", "redis": {"secretRef": {"name": "r"}}}
    base.update(spec)
    body = {
        "metadata": {"name": name, "namespace": "ml", "uid": "1234-uid", "generation": 3},
        "spec": base,
    }
    return Pipeline.from_body(body)


def _pod(obj: dict[str, Any]) -> dict[str, Any]:
    return dict(obj["spec"]["template"]["spec"])


@pytest.fixture(scope="module")
def full() -> Pipeline:
    doc = yaml.safe_load((REPO / "operator" / "examples" / "clippipeline-full.yaml").read_text())
    doc["metadata"]["uid"] = "uid-full"
    return Pipeline.from_body(doc)


def test_objects_validate_against_kubernetes_schemas(full: Pipeline) -> None:
    for pipeline in (_pipeline(), full):
        kubernetes_validate.validate(
            builders.build_daemon_deployment(pipeline, "gpu-1", 0), K8S_VERSION, strict=True
        )
        for node in ("gpu-node-1", "ip-10-0-1-23.eu-west-1.compute.internal", "n" * 200):
            dep = builders.build_worker_deployment(pipeline, node, 0, 3)
            kubernetes_validate.validate(dep, K8S_VERSION, strict=True)


def test_daemon_and_workers_share_the_node_local_arena(full: Pipeline) -> None:
    ds = builders.build_daemon_deployment(full, "gpu-1", 0)
    dep = builders.build_worker_deployment(full, "gpu-1", 0, 2)
    host_paths = []
    for obj in (ds, dep):
        pod = _pod(obj)
        (arena,) = [v for v in pod["volumes"] if v["name"] == "arena"]
        host_paths.append(arena["hostPath"])
        container = pod["containers"][0]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        env = {e["name"]: e for e in container["env"]}
        assert env["CLIPLINE_SHM_DIR"]["value"] == mounts["arena"] == builders.ARENA_MOUNT
        assert env["CLIPLINE_SHM_SLOTS"]["value"] == "64"
        assert env["CLIPLINE_DEPLOYMENT"]["value"] == "highlights"
        assert env["CLIPLINE_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
        assert env["CLIPLINE_GPU_INDEX"]["value"] == "0"
        assert env["CLIPLINE_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {
            "name": "clipline-redis",
            "key": "url",
        }
        assert env["CLIPLINE_MAX_VIDEO_BYTES"]["value"] == "268435456"  # extraEnv
        # The init container gives the directory to the image's user, mode 0700.
        (init,) = pod["initContainers"]
        assert init["securityContext"]["capabilities"] == {
            "drop": ["ALL"],
            "add": ["CHOWN", "FOWNER"],
        }
        assert init["securityContext"]["allowPrivilegeEscalation"] is False
        assert str(constants.CONTAINER_UID) in init["command"]
    assert host_paths[0] == host_paths[1]
    assert host_paths[0] == {
        "path": "/dev/shm/clipline-highlights-gpu0",
        "type": "DirectoryOrCreate",
    }


def test_long_running_containers_are_locked_down(full: Pipeline) -> None:
    for obj in (
        builders.build_daemon_deployment(full, "gpu-1", 0),
        builders.build_worker_deployment(full, "g", 0, 1),
    ):
        pod = _pod(obj)
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == constants.CONTAINER_UID == 10001
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        assert "hostIPC" not in pod and "hostNetwork" not in pod
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/tmp"}
        tmp = next(v for v in pod["volumes"] if v["name"] == "tmp")
        assert "emptyDir" in tmp


def test_daemon_owns_the_gpu_and_exposes_metrics(full: Pipeline) -> None:
    ds = builders.build_daemon_deployment(full, "gpu-1", 0)
    pod = _pod(ds)
    c = pod["containers"][0]
    assert c["args"] == ["gpu-daemon"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert c["ports"][0]["containerPort"] == constants.DEFAULT_DAEMON_METRICS_PORT
    assert pod["nodeSelector"]["nvidia.com/gpu.present"] == "true"
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["CLIPLINE_BACKEND"] == "eager" and env["CLIPLINE_MODELS"] == "features"
    assert env["CLIPLINE_DAEMON_METRICS_PORT"] == str(constants.DEFAULT_DAEMON_METRICS_PORT)


def test_workers_are_pinned_to_their_node_without_gpu(full: Pipeline) -> None:
    node = "ip-10-0-1-23.eu-west-1.compute.internal"
    dep = builders.build_worker_deployment(full, node, 0, 4)
    pod = _pod(dep)
    assert dep["spec"]["replicas"] == 4
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms["nodeSelectorTerms"][0]["matchFields"][0] == {
        "key": "metadata.name",
        "operator": "In",
        "values": [node],
    }
    c = pod["containers"][0]
    assert c["args"] == ["worker"]
    assert "nvidia.com/gpu" not in str(c["resources"])
    assert c["ports"][0]["containerPort"] == constants.DEFAULT_WORKER_METRICS_PORT
    assert dep["metadata"]["annotations"][builders.ANNOTATION_NODE] == node
    assert dep["spec"]["selector"]["matchLabels"][constants.LABEL_NODE] == node
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["CLIPLINE_WORKER_CONCURRENCY"] == "2"
    assert env["CLIPLINE_DECODE_BACKEND"] == "opencv"  # the CRD's default


def test_decode_backend_reaches_the_workers_only() -> None:
    p = _pipeline(workers={"decodeBackend": "nvdec"})
    workers = _pod(builders.build_worker_deployment(p, "gpu-1", 0, 1))["containers"][0]
    daemon = _pod(builders.build_daemon_deployment(p, "gpu-1", 0))["containers"][0]
    assert {"name": "CLIPLINE_DECODE_BACKEND", "value": "nvdec"} in workers["env"]
    assert "CLIPLINE_DECODE_BACKEND" not in {e["name"] for e in daemon["env"]}
    # An extraEnv entry of the same name wins, as for every setting.
    extra = [{"name": "CLIPLINE_DECODE_BACKEND", "value": "pyav"}]
    p = _pipeline(workers={"decodeBackend": "nvdec"}, extraEnv=extra)
    env = _pod(builders.build_worker_deployment(p, "gpu-1", 0, 1))["containers"][0]["env"]
    assert [e["value"] for e in env if e["name"] == "CLIPLINE_DECODE_BACKEND"] == ["pyav"]


def test_owner_references_and_names() -> None:
    p = _pipeline("video")
    ds = builders.build_daemon_deployment(p, "gpu-1", 0)
    (ref,) = ds["metadata"]["ownerReferences"]
    assert ref == {
        "apiVersion": "clipline.dev/v1alpha1",
        "kind": "ClipPipeline",
        "name": "video",
        "uid": "1234-uid",
        "controller": True,
        "blockOwnerDeletion": True,
    }
    long_node = "n" * 200
    dep = builders.build_worker_deployment(p, long_node, 0, 1)
    assert dep["metadata"]["ownerReferences"] == [ref]
    assert len(dep["metadata"]["name"]) <= 63
    assert len(dep["metadata"]["labels"][constants.LABEL_NODE]) <= 63
    other = builders.build_worker_deployment(p, "n" * 199, 0, 1)
    assert other["metadata"]["name"] != dep["metadata"]["name"]
    assert builders.build_worker_deployment(p, "gpu-1", 0, 1)["metadata"]["name"] == (
        "video-workers-gpu-1-0"
    )
    assert (
        builders.build_daemon_deployment(p, "gpu-1", 3)["metadata"]["name"] == "video-gpu-gpu-1-3"
    )


def test_every_env_var_is_a_clipline_setting() -> None:
    fields = {f"CLIPLINE_{name.upper()}" for name in Settings.__dataclass_fields__}
    for obj in (
        builders.build_daemon_deployment(_pipeline(), "n", 0),
        builders.build_worker_deployment(_pipeline(), "n", 0, 1),
    ):
        names = {e["name"] for e in _pod(obj)["containers"][0]["env"]}
        assert names <= fields, names - fields
    with pytest.raises(KeyError):
        builders.env_name("no_such_field")


def test_spec_hash_ignores_replicas_but_not_the_image() -> None:
    p = _pipeline()
    a = builders.build_worker_deployment(p, "n", 0, 1)
    b = builders.build_worker_deployment(p, "n", 0, 9)
    c = builders.build_worker_deployment(_pipeline(image="other:2"), "n", 0, 1)
    key = builders.ANNOTATION_SPEC_HASH
    assert a["metadata"]["annotations"][key] == b["metadata"]["annotations"][key]
    assert a["metadata"]["annotations"][key] != c["metadata"]["annotations"][key]


@pytest.mark.parametrize(
    ("allocatable", "expected"),
    [("16", 15), ("15500m", 14), ("2", 1), ("1", 0), (None, None)],
)
def test_cpu_cap_from_allocatable(allocatable: str | None, expected: int | None) -> None:
    # gpu.resources.requests.cpu = 1, workers request 1 CPU each (defaults)
    assert builders.workers_cpu_cap(_pipeline(), allocatable) == expected


def test_cpu_cap_leaves_room_for_every_gpu_daemon() -> None:
    # 4 daemons of 1 CPU each on a 16-CPU node leave 12 one-CPU workers to share.
    assert builders.workers_cpu_cap(_pipeline(), "16", daemons=4) == 12
    assert builders.workers_cpu_cap(_pipeline(), "3", daemons=4) == 0


def test_cpu_quantities() -> None:
    assert builders.cpu_millis("250m") == 250
    assert builders.cpu_millis("1.5") == 1500
    assert builders.cpu_millis(2) == 2000
    with pytest.raises(ValueError):
        builders.cpu_millis("1Gi")


def _env_of(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in _pod(obj)["containers"][0]["env"]}


def test_workers_alone_get_the_callback_secret_from_its_secret(full: Pipeline) -> None:
    secret = builders.env_name("callback_secret")
    assert secret == "CLIPLINE_CALLBACK_SECRET"
    workers = _env_of(builders.build_worker_deployment(full, "gpu-1", 0, 2))
    assert workers[secret] == {
        "name": secret,
        "valueFrom": {"secretKeyRef": {"name": "clipline-callbacks", "key": "secret"}},
    }
    # The GPU daemon never needs it (least privilege), not even through extraEnv.
    assert secret not in _env_of(builders.build_daemon_deployment(full, "gpu-1", 0))
    leaky = _pipeline(
        callbacks={"secretRef": {"name": "cb", "key": "hmac"}},
        extraEnv=[{"name": secret, "value": "plain-text"}],
    )
    assert secret not in _env_of(builders.build_daemon_deployment(leaky, "gpu-1", 0))
    # The Secret wins over a plain value in extraEnv, and appears once.
    env = _pod(builders.build_worker_deployment(leaky, "n", 0, 1))["containers"][0]["env"]
    assert [e for e in env if e["name"] == secret] == [
        {"name": secret, "valueFrom": {"secretKeyRef": {"name": "cb", "key": "hmac"}}}
    ]


def test_callback_secret_key_defaults_and_absence() -> None:
    with_ref = _pipeline(callbacks={"secretRef": {"name": "cb"}})
    assert with_ref.spec["callbacks"]["secretRef"] == {"name": "cb", "key": "secret"}
    env = _env_of(builders.build_worker_deployment(with_ref, "n", 0, 1))
    assert env["CLIPLINE_CALLBACK_SECRET"]["valueFrom"]["secretKeyRef"] == {
        "name": "cb",
        "key": "secret",
    }
    kubernetes_validate.validate(
        builders.build_worker_deployment(with_ref, "n", 0, 1), K8S_VERSION, strict=True
    )
    plain = _pipeline()
    assert "callbacks" not in plain.spec
    plain_workers = builders.build_worker_deployment(plain, "n", 0, 1)
    assert "CLIPLINE_CALLBACK_SECRET" not in _env_of(plain_workers)
    # Turning callbacks on restarts the workers, never the GPU daemon.
    key = builders.ANNOTATION_SPEC_HASH
    daemons = [
        builders.build_daemon_deployment(p, "gpu-1", 0)["metadata"]["annotations"][key]
        for p in (plain, with_ref)
    ]
    workers = [
        builders.build_worker_deployment(p, "n", 0, 1)["metadata"]["annotations"][key]
        for p in (plain, with_ref)
    ]
    assert daemons[0] == daemons[1]
    assert workers[0] != workers[1]


def test_callbacks_spec_is_validated() -> None:
    from clipline_operator import crd

    bads: list[dict[str, Any]] = [
        {},
        {"secretRef": {}},
        {"secretRef": {"name": "cb", "key": ""}},
        {"x": 1},
    ]
    for bad in bads:
        with pytest.raises(crd.SpecError, match="callbacks"):
            _pipeline(callbacks=bad)
