"""GPU scheduling in the objects the operator builds: one daemon per GPU (or MIG slice)
with its own arena and device, its workers beside it, the pods' scheduling fields, the
weights volume, the probes and the workers' disruption budget. Every object is checked
with kubernetes-validate (strict) for the oldest supported and a current Kubernetes."""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate
import pytest

from clipline_core import constants
from clipline_core.settings import Settings
from clipline_operator import builders, crd
from clipline_operator.builders import Pipeline

K8S_VERSIONS = ("1.27", "1.35.0")
NODE = "gpu-node-1"


def _pipeline(**spec: Any) -> Pipeline:
    base: dict[str, Any] = {"image": "clipline:1", "redis": {"secretRef": {"name": "r"}}}
    base.update(spec)
    body = {"metadata": {"name": "clips", "namespace": "video", "uid": "u-1"}, "spec": base}
    return Pipeline.from_body(body)


def _pod(obj: dict[str, Any]) -> dict[str, Any]:
    return dict(obj["spec"]["template"]["spec"])


def _env(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in _pod(obj)["containers"][0]["env"]}


def _validate(obj: dict[str, Any], versions: tuple[str, ...] = K8S_VERSIONS) -> None:
    for version in versions:
        kubernetes_validate.validate(obj, version, strict=True)


def _settings(obj: dict[str, Any], node: str = NODE) -> Settings:
    """The Settings the container would read (the downward-API node name resolved)."""
    env = {
        name: item.get("value", node if "fieldRef" in item.get("valueFrom", {}) else "")
        for name, item in _env(obj).items()
        if name.startswith("CLIPLINE_") and "secretKeyRef" not in item.get("valueFrom", {})
    }
    return Settings.from_env(env)


def _arena(obj: dict[str, Any]) -> str:
    (arena,) = [v for v in _pod(obj)["volumes"] if v["name"] == "arena"]
    return str(arena["hostPath"]["path"])


def test_each_gpu_daemon_has_its_own_arena_device_and_workers() -> None:
    p = _pipeline()
    daemons = [builders.build_daemon_deployment(p, NODE, gpu) for gpu in range(4)]
    workers = [builders.build_worker_deployment(p, NODE, gpu, 2) for gpu in range(4)]
    for obj in daemons + workers:
        _validate(obj)
    assert len({_arena(d) for d in daemons}) == 4
    assert len({d["metadata"]["name"] for d in daemons + workers}) == 8
    for gpu, (daemon, worker) in enumerate(zip(daemons, workers, strict=True)):
        # Daemon i and its workers: the same node-local arena, the same index, the same
        # name in Redis (the workers watch their own daemon's heartbeat).
        assert _arena(daemon) == _arena(worker) == f"/dev/shm/clipline-clips-gpu{gpu}"
        d, w = _settings(daemon), _settings(worker)
        assert d.gpu_index == w.gpu_index == gpu
        assert d.daemon_name == w.daemon_name == (NODE if gpu == 0 else f"{NODE}/gpu{gpu}")
        assert d.arena_path == w.arena_path
        for obj in (daemon, worker):
            assert obj["spec"]["template"]["metadata"]["labels"][constants.LABEL_GPU] == str(gpu)
            assert obj["spec"]["selector"]["matchLabels"][constants.LABEL_GPU] == str(gpu)
        # One GPU each, given by the device plugin; the daemon sees it as its cuda device.
        resources = _pod(daemon)["containers"][0]["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"]
        assert resources["limits"]["nvidia.com/gpu"] == "1"
        assert "nvidia.com/gpu" not in str(_pod(worker)["containers"][0]["resources"])
        assert "NVIDIA_VISIBLE_DEVICES" not in _env(daemon)
        assert daemon["spec"]["replicas"] == 1
        assert daemon["spec"]["strategy"] == {"type": "Recreate"}
    # Selectors never overlap: no Deployment adopts another GPU's pods.
    for i, a in enumerate(daemons + workers):
        for b in (daemons + workers)[i + 1 :]:
            sel = a["spec"]["selector"]["matchLabels"]
            labels = b["spec"]["template"]["metadata"]["labels"]
            assert not all(labels.get(k) == v for k, v in sel.items())


def test_mig_slices_and_gpus_per_node() -> None:
    mig = _pipeline(gpu={"resourceName": "nvidia.com/mig-1g.10gb"})
    daemon = builders.build_daemon_deployment(mig, NODE, 6)
    _validate(daemon)
    limits = _pod(daemon)["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/mig-1g.10gb"] == "1" and "nvidia.com/gpu" not in limits
    assert builders.gpus_on_node(mig, {"nvidia.com/mig-1g.10gb": "7", "nvidia.com/gpu": "0"}) == 7
    plain = _pipeline()
    assert builders.gpus_on_node(plain, {"cpu": "96", "nvidia.com/gpu": "8"}) == 8
    assert builders.gpus_on_node(plain, {"cpu": "96"}) == 1  # plugin not reporting yet
    assert builders.gpus_on_node(plain, {"nvidia.com/gpu": "0"}) == 1
    pairs = _pipeline(gpu={"resourceCount": 2})
    assert builders.gpus_on_node(pairs, {"nvidia.com/gpu": "8"}) == 4
    assert (
        _pod(builders.build_daemon_deployment(pairs, NODE, 0))["containers"][0]["resources"][
            "limits"
        ]["nvidia.com/gpu"]
        == "2"
    )
    fixed = _pipeline(gpu={"daemonsPerNode": 3})
    assert builders.gpus_on_node(fixed, {"nvidia.com/gpu": "8"}) == 3


def test_without_a_resource_each_daemon_sees_only_its_own_gpus() -> None:
    p = _pipeline(gpu={"resourceName": "", "resourceCount": 2, "daemonsPerNode": 2})
    first, second = (builders.build_daemon_deployment(p, NODE, gpu) for gpu in (0, 1))
    for obj in (first, second):
        _validate(obj)
        assert "nvidia.com" not in str(_pod(obj)["containers"][0]["resources"])
    assert _env(first)["NVIDIA_VISIBLE_DEVICES"]["value"] == "0,1"
    assert _env(second)["NVIDIA_VISIBLE_DEVICES"]["value"] == "2,3"
    worker = builders.build_worker_deployment(p, NODE, 1, 1)
    assert "NVIDIA_VISIBLE_DEVICES" not in _env(worker)
    cpu = _pipeline(gpu={"resourceName": "", "device": "cpu"})
    assert "NVIDIA_VISIBLE_DEVICES" not in _env(builders.build_daemon_deployment(cpu, NODE, 0))


SCHEDULING: dict[str, Any] = {
    "runtimeClassName": "nvidia",
    "priorityClassName": "clipline-gpu",
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]},
                    {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["b"]}]},
                ]
            },
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 5,
                    "preference": {"matchExpressions": [{"key": "fast", "operator": "Exists"}]},
                }
            ],
        },
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 1,
                    "podAffinityTerm": {
                        "topologyKey": "kubernetes.io/hostname",
                        "labelSelector": {"matchLabels": {"team": "batch"}},
                    },
                }
            ]
        },
    },
    "podAnnotations": {"example.com/owner": "video", "prometheus.io/port": "1"},
    "podLabels": {"team": "video", constants.LABEL_COMPONENT: "hijack"},
    "env": [
        {"name": "CUDA_MODULE_LOADING", "value": "LAZY"},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ],
    "extraVolumes": [{"name": "engines", "emptyDir": {"sizeLimit": "1Gi"}}],
    "extraVolumeMounts": [{"name": "engines", "mountPath": "/var/cache/engines"}],
}


@pytest.mark.parametrize("part", ["gpu", "workers"])
def test_scheduling_values_reach_their_pods(part: str) -> None:
    p = _pipeline(**{part: copy.deepcopy(SCHEDULING)})
    daemon = builders.build_daemon_deployment(p, NODE, 1)
    workers = builders.build_worker_deployment(p, NODE, 1, 2)
    target, other = (daemon, workers) if part == "gpu" else (workers, daemon)
    for obj in (daemon, workers):
        _validate(obj)
    pod = _pod(target)
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["priorityClassName"] == "clipline-gpu"
    # The pin to the node joins each required term (ORed terms: zone a or b, on NODE).
    affinity = pod["affinity"]
    terms = affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    pin = {"key": "metadata.name", "operator": "In", "values": [NODE]}
    assert [t["matchFields"] for t in terms] == [[pin], [pin]]
    assert [t["matchExpressions"][0]["values"] for t in terms] == [["a"], ["b"]]
    assert (
        affinity["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["weight"]
        == 5
    )
    assert affinity["podAntiAffinity"] == SCHEDULING["affinity"]["podAntiAffinity"]
    meta = target["spec"]["template"]["metadata"]
    assert meta["annotations"]["example.com/owner"] == "video"
    assert meta["annotations"]["prometheus.io/port"] != "1"  # the operator's own win
    assert meta["labels"]["team"] == "video"
    assert meta["labels"][constants.LABEL_COMPONENT] != "hijack"
    env = _env(target)
    assert env["CUDA_MODULE_LOADING"]["value"] == "LAZY"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert {"name": "engines", "emptyDir": {"sizeLimit": "1Gi"}} in pod["volumes"]
    mounts = pod["containers"][0]["volumeMounts"]
    assert {"name": "engines", "mountPath": "/var/cache/engines"} in mounts
    # The other component gets none of it, only the pin to its node.
    other_pod = _pod(other)
    assert "runtimeClassName" not in other_pod and "priorityClassName" not in other_pod
    assert other_pod["affinity"] == builders.pinned_affinity(NODE)
    assert "CUDA_MODULE_LOADING" not in _env(other)
    assert "engines" not in str(other_pod["volumes"])
    # Both keep the GPU tolerations; only the daemon has the GPU node selector.
    assert _pod(daemon)["nodeSelector"] == crd.DEFAULT_NODE_SELECTOR
    assert _pod(workers)["tolerations"] == crd.DEFAULT_TOLERATIONS


@pytest.mark.parametrize(
    ("source", "volume", "versions"),
    [
        (
            {"persistentVolumeClaim": {"claimName": "weights"}},
            {"persistentVolumeClaim": {"claimName": "weights", "readOnly": True}},
            K8S_VERSIONS,
        ),
        (
            {"hostPath": {"path": "/opt/weights"}},
            {"hostPath": {"path": "/opt/weights", "type": "Directory"}},
            K8S_VERSIONS,
        ),
        (  # image volumes exist from Kubernetes 1.31 on (beta in 1.33)
            {
                "image": {
                    "reference": "registry.example.com/weights:v3",
                    "pullPolicy": "IfNotPresent",
                }
            },
            {
                "image": {
                    "reference": "registry.example.com/weights:v3",
                    "pullPolicy": "IfNotPresent",
                }
            },
            ("1.35.0",),
        ),
    ],
)
def test_weights_volume_is_mounted_read_only_into_the_daemons(
    source: dict[str, Any], volume: dict[str, Any], versions: tuple[str, ...]
) -> None:
    p = _pipeline(models={"weights": {**source, "subPath": "v3"}})
    daemon = builders.build_daemon_deployment(p, NODE, 0)
    _validate(daemon, versions)
    pod = _pod(daemon)
    assert {"name": "weights", **volume} in pod["volumes"]
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "weights"]
    assert mount == {
        "name": "weights",
        "mountPath": crd.DEFAULT_WEIGHTS_MOUNT,
        "readOnly": True,
        "subPath": "v3",
    }
    assert _settings(daemon).weights_dir == crd.DEFAULT_WEIGHTS_MOUNT
    workers = builders.build_worker_deployment(p, NODE, 0, 1)
    assert "weights" not in str(_pod(workers)["volumes"])
    assert "CLIPLINE_WEIGHTS_DIR" not in _env(workers)
    moved = _pipeline(models={"weights": {**source, "mountPath": "/w"}})
    assert _settings(builders.build_daemon_deployment(moved, NODE, 0)).weights_dir == "/w"


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ({"models": {"weights": {}}}, "exactly one"),
        (
            {"models": {"weights": {"hostPath": {"path": "/a"}, "image": {"reference": "w:1"}}}},
            "exactly one",
        ),
        (
            {"models": {"weightsDir": "/w", "weights": {"hostPath": {"path": "/a"}}}},
            "not both",
        ),
        ({"gpu": {"env": [{"name": "CLIPLINE_DEVICE", "value": "cpu"}]}}, "extraEnv"),
        ({"workers": {"env": [{"name": "A"}]}}, "exactly one of value"),
        ({"gpu": {"extraVolumes": [{"name": "arena", "emptyDir": {}}]}}, "operator's"),
        (
            {"workers": {"extraVolumes": [{"name": "x", "emptyDir": {}}] * 2}},
            "appears twice",
        ),
        ({"gpu": {"extraVolumeMounts": [{"name": "x", "mountPath": "/x"}]}}, "no volume"),
        ({"gpu": {"resourceName": "gpu"}}, "resourceName"),
        ({"gpu": {"resourceCount": 0}}, "resourceCount"),
        ({"gpu": {"affinity": {"nodeAfinity": {}}}}, "nodeAfinity"),
        ({"workers": {"podDisruptionBudget": {"maxUnavailable": "half"}}}, "maxUnavailable"),
    ],
)
def test_bad_gpu_scheduling_specs_are_rejected(spec: dict[str, Any], needle: str) -> None:
    with pytest.raises(crd.SpecError, match=needle):
        _pipeline(**spec)


def test_probes_use_the_health_endpoints_and_grace_follows_the_job_limit() -> None:
    p = _pipeline(gpu={"startupSeconds": 1200})
    daemon = _pod(builders.build_daemon_deployment(p, NODE, 0))["containers"][0]
    worker_pod = _pod(builders.build_worker_deployment(p, NODE, 0, 1))
    worker = worker_pod["containers"][0]
    for c in (daemon, worker):
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert c["ports"] == [
            {
                "name": "metrics",
                "containerPort": int(_env_value(c, "CLIPLINE_DAEMON_METRICS_PORT"))
                if c is daemon
                else int(_env_value(c, "CLIPLINE_WORKER_METRICS_PORT")),
                "protocol": "TCP",
            }
        ]
    # The daemon is ready (and its startup over) once its models are warm: 1200 s here.
    startup = daemon["startupProbe"]
    assert startup["httpGet"]["path"] == "/readyz"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1200
    assert startup["periodSeconds"] * (startup["failureThreshold"] - 1) < 1200
    # Workers get the job hard time limit plus a margin to finish or hand back their job.
    default_limit = Settings().job_time_limit_s
    assert worker_pod["terminationGracePeriodSeconds"] == default_limit + 30
    longer = _pipeline(extraEnv=[{"name": "CLIPLINE_JOB_TIME_LIMIT_S", "value": "1800"}])
    pod = _pod(builders.build_worker_deployment(longer, NODE, 0, 1))
    assert pod["terminationGracePeriodSeconds"] == 1830 > default_limit


def _env_value(container: dict[str, Any], name: str) -> str:
    return str(next(e["value"] for e in container["env"] if e["name"] == name))


def test_workers_disruption_budget() -> None:
    p = _pipeline()
    pdb = builders.build_worker_pdb(p)
    _validate(pdb)
    assert pdb["spec"]["maxUnavailable"] == "25%"
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    selector = pdb["spec"]["selector"]["matchLabels"]
    for gpu in range(3):
        labels = builders.build_worker_deployment(p, NODE, gpu, 1)["spec"]["template"]["metadata"][
            "labels"
        ]
        assert all(labels[k] == v for k, v in selector.items())
    daemon = builders.build_daemon_deployment(p, NODE, 0)["spec"]["template"]["metadata"]
    assert not all(daemon["labels"].get(k) == v for k, v in selector.items())
    assert pdb["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    counted = builders.build_worker_pdb(
        _pipeline(workers={"podDisruptionBudget": {"maxUnavailable": 3}})
    )
    assert counted["spec"]["maxUnavailable"] == 3
