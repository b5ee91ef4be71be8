"""Pure builders of the Kubernetes objects a ClipPipeline owns.

Nothing here does I/O: given a :class:`Pipeline` (name, namespace, uid and the spec with
defaults) the ``build_*`` functions return plain dicts ready to be sent to the API.

* ``build_daemonset()``: the GPU daemon (``clipline gpu-daemon``), one pod per selected
  GPU node, requesting ``nvidia.com/gpu: 1``.
* ``build_worker_deployment()``: per GPU node, the Celery CPU workers (``clipline
  worker``) pinned to that node with a ``metadata.name`` node-affinity term.

Shared memory: both pods of a node mount the same node-local directory,
``hostPath /dev/shm/clipline-<deployment>`` (``DirectoryOrCreate``), at
:data:`ARENA_MOUNT`, which is ``CLIPLINE_SHM_DIR``. We chose a hostPath under the host's
``/dev/shm`` over ``hostIPC: true`` because it shares only clipline's own directory
(not the host's whole IPC namespace) and keeps the arena in RAM-backed tmpfs. The kubelet
creates the directory root-owned; a tiny init container (root, only ``CHOWN`` and
``FOWNER`` capabilities, no privilege escalation) makes it owned by the image's user and
mode 0700, so only clipline's uid can open the arena. All long-running containers run as
uid/gid :data:`constants.CONTAINER_UID`, non-root, with a read-only root filesystem, an
``emptyDir`` at ``/tmp`` and every capability dropped.

Secrets reach the pods only through ``secretKeyRef`` (the operator itself never reads a
Secret): the Redis URL (``spec.redis.secretRef``) for both, the completion-callback
signing secret (``spec.callbacks.secretRef``) for the workers alone, which sign and send
the callbacks; the GPU daemon does not need it and does not get it.

Every object carries an owner reference to the ClipPipeline (deleting it deletes
everything) and a ``clipline.dev/spec-hash`` annotation so the reconciler only patches
what changed.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any, Final

from clipline_core import constants
from clipline_core.settings import ENV_PREFIX, Settings
from clipline_operator import crd

JSON = dict[str, Any]

MANAGED_BY: Final = "clipline-operator"
COMPONENT_DAEMON: Final = "gpu-daemon"
COMPONENT_WORKERS: Final = "workers"
ANNOTATION_SPEC_HASH: Final = f"{constants.CRD_GROUP}/spec-hash"
ANNOTATION_NODE: Final = f"{constants.CRD_GROUP}/node-name"
ANNOTATION_PIPELINE: Final = f"{constants.CRD_GROUP}/pipeline"
ARENA_MOUNT: Final = "/var/run/clipline/shm"
ARENA_HOST_ROOT: Final = "/dev/shm"
TMP_MOUNT: Final = "/tmp"
GPU_RESOURCE: Final = "nvidia.com/gpu"
DAEMON_GRACE_SECONDS: Final = 60
WORKER_GRACE_SECONDS: Final = 120

_LABEL_VALUE_RE: Final = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_DNS_LABEL_BAD: Final = re.compile(r"[^a-z0-9-]+")


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """The identity and (defaulted) spec of one ClipPipeline."""

    name: str
    namespace: str
    uid: str
    spec: Mapping[str, Any]
    generation: int = 0

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Pipeline:
        """Validate ``body['spec']`` (raising ``crd.SpecError``) and wrap it."""
        meta = body.get("metadata", {})
        name = str(meta.get("name", ""))
        spec = crd.validate_spec(body.get("spec") or {}, name=name)
        return cls(
            name=name,
            namespace=str(meta.get("namespace", "")),
            uid=str(meta.get("uid", "")),
            spec=spec,
            generation=int(meta.get("generation") or 0),
        )

    @property
    def deployment(self) -> str:
        """The CLIPLINE_DEPLOYMENT value (queues, keys and arena names)."""
        return crd.deployment_name(self.spec, self.name)

    @property
    def scaling(self) -> Mapping[str, Any]:
        return self.spec["autoscaling"]


# ---------------------------------------------------------------------------
# Names and labels.
# ---------------------------------------------------------------------------
def _short_hash(text: str, length: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def dns_label(text: str, max_len: int = 63) -> str:
    """A DNS-1123 label from ``text``; altered or truncated names get a hash suffix."""
    clean = _DNS_LABEL_BAD.sub("-", text.lower()).strip("-") or "x"
    if clean == text and len(clean) <= max_len:
        return clean
    suffix = _short_hash(text)
    return f"{clean[: max_len - len(suffix) - 1].rstrip('-')}-{suffix}"


def node_label_value(node: str) -> str:
    """A label value naming ``node`` (node names may exceed the 63-character limit)."""
    if len(node) <= 63 and _LABEL_VALUE_RE.match(node):
        return node
    return dns_label(node)


def daemonset_name(pipeline: Pipeline) -> str:
    return dns_label(f"{pipeline.name}-gpu")


def workers_deployment_name(pipeline: Pipeline, node: str) -> str:
    return dns_label(f"{pipeline.name}-workers-{node}")


def selector_labels(pipeline: Pipeline, component: str) -> dict[str, str]:
    """The labels that select a component's pods (immutable selector fields)."""
    return {
        constants.LABEL_NAME: constants.PROJECT,
        constants.LABEL_INSTANCE: pipeline.name,
        constants.LABEL_COMPONENT: component,
    }


def object_labels(pipeline: Pipeline, component: str, node: str | None = None) -> dict[str, str]:
    labels = selector_labels(pipeline, component)
    labels[constants.LABEL_MANAGED_BY] = MANAGED_BY
    if node is not None:
        labels[constants.LABEL_NODE] = node_label_value(node)
    return labels


def owner_reference(pipeline: Pipeline) -> JSON:
    return {
        "apiVersion": crd.API_VERSION,
        "kind": constants.CRD_KIND,
        "name": pipeline.name,
        "uid": pipeline.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def spec_hash(obj: Mapping[str, Any]) -> str:
    """Hash of an object's desired content (replicas excluded: the autoscaler owns it)."""
    content = copy.deepcopy(dict(obj))
    content.get("spec", {}).pop("replicas", None)
    content.get("metadata", {}).get("annotations", {}).pop(ANNOTATION_SPEC_HASH, None)
    return _short_hash(json.dumps(content, sort_keys=True), 16)


def _with_hash(obj: JSON) -> JSON:
    obj["metadata"].setdefault("annotations", {})[ANNOTATION_SPEC_HASH] = spec_hash(obj)
    return obj


# ---------------------------------------------------------------------------
# Pod pieces.
# ---------------------------------------------------------------------------
_SETTINGS_FIELDS: Final = frozenset(f.name for f in dataclasses.fields(Settings))


def env_name(field: str) -> str:
    """``CLIPLINE_<FIELD>`` for a :class:`clipline_core.settings.Settings` field."""
    if field not in _SETTINGS_FIELDS:
        raise KeyError(f"{field!r} is not a clipline Settings field")
    return ENV_PREFIX + field.upper()


#: Settings only the workers get, whatever ``extraEnv`` says.
WORKER_ONLY_ENV: Final = frozenset({env_name("callback_secret")})


def _secret_env(field: str, ref: Mapping[str, Any], default_key: str) -> JSON:
    key = ref.get("key") or default_key
    return {
        "name": env_name(field),
        "valueFrom": {"secretKeyRef": {"name": ref["name"], "key": key}},
    }


def _env(pipeline: Pipeline, component: str) -> list[JSON]:
    """The container env of ``component`` (the daemon or the workers).

    Only the workers get the callback signing secret (``spec.callbacks.secretRef``, or a
    ``CLIPLINE_CALLBACK_SECRET`` in ``extraEnv``): they deliver the callbacks, the GPU
    daemon never needs it.
    """
    spec = pipeline.spec
    models = spec["models"]
    shm = spec["sharedMemory"]
    redis_ref = spec["redis"]["secretRef"]
    values: dict[str, str] = {
        "deployment": pipeline.deployment,
        "shm_dir": ARENA_MOUNT,
        "shm_slots": str(shm["slots"]),
        "shm_slot_bytes": str(shm["slotBytes"]),
        "device": spec["gpu"]["device"],
        "models": ",".join(models["names"]),
        "backend": models["backend"],
        "max_batch_size": str(models["maxBatchSize"]),
        "max_queue_delay_ms": str(models["maxQueueDelayMs"]),
        "daemon_metrics_port": str(constants.DEFAULT_DAEMON_METRICS_PORT),
        "worker_metrics_port": str(constants.DEFAULT_WORKER_METRICS_PORT),
        "worker_concurrency": str(spec["workers"]["concurrency"]),
        "state_dir": f"{TMP_MOUNT}/clipline",
    }
    if models.get("weightsDir"):
        values["weights_dir"] = models["weightsDir"]
    env: list[JSON] = [
        {
            "name": env_name("node_name"),
            "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "spec.nodeName"}},
        },
        _secret_env("redis_url", redis_ref, "url"),
    ]
    callbacks = spec.get("callbacks")
    if component == COMPONENT_WORKERS and callbacks:
        env.append(_secret_env("callback_secret", callbacks["secretRef"], crd.CALLBACK_SECRET_KEY))
    extra = {item["name"]: item["value"] for item in spec.get("extraEnv") or []}
    reserved = {item["name"] for item in env}
    if component != COMPONENT_WORKERS:
        reserved |= WORKER_ONLY_ENV
    for field, value in values.items():
        name = env_name(field)
        if name not in extra:
            env.append({"name": name, "value": value})
    env.extend({"name": k, "value": v} for k, v in extra.items() if k not in reserved)
    return env


def _container_security() -> JSON:
    return {
        "runAsNonRoot": True,
        "runAsUser": constants.CONTAINER_UID,
        "runAsGroup": constants.CONTAINER_GID,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _pod_security() -> JSON:
    return {
        "runAsNonRoot": True,
        "runAsUser": constants.CONTAINER_UID,
        "runAsGroup": constants.CONTAINER_GID,
        "fsGroup": constants.CONTAINER_GID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def arena_host_path(pipeline: Pipeline) -> str:
    """The node-local directory holding the pipeline's arena and wake-up socket."""
    return f"{ARENA_HOST_ROOT}/{constants.PROJECT}-{pipeline.deployment}"


def _volumes(pipeline: Pipeline, tmp_limit: str) -> list[JSON]:
    return [
        {
            "name": "arena",
            "hostPath": {"path": arena_host_path(pipeline), "type": "DirectoryOrCreate"},
        },
        {"name": "tmp", "emptyDir": {"sizeLimit": tmp_limit}},
    ]


def _mounts() -> list[JSON]:
    return [
        {"name": "arena", "mountPath": ARENA_MOUNT},
        {"name": "tmp", "mountPath": TMP_MOUNT},
    ]


_ARENA_DIR_SCRIPT: Final = (
    "import os, sys; d = sys.argv[1]; "
    "os.chown(d, int(sys.argv[2]), int(sys.argv[3])); os.chmod(d, 0o700)"
)


def _arena_init(pipeline: Pipeline) -> JSON:
    """Init container that gives the arena directory to the image's user, mode 0700."""
    return {
        "name": "arena-dir",
        "image": pipeline.spec["image"],
        "imagePullPolicy": pipeline.spec["imagePullPolicy"],
        "command": [
            "python",
            "-c",
            _ARENA_DIR_SCRIPT,
            ARENA_MOUNT,
            str(constants.CONTAINER_UID),
            str(constants.CONTAINER_GID),
        ],
        "securityContext": {
            "runAsNonRoot": False,
            "runAsUser": 0,
            "runAsGroup": 0,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"], "add": ["CHOWN", "FOWNER"]},
        },
        "resources": {
            "requests": {"cpu": "10m", "memory": "32Mi"},
            "limits": {"cpu": "100m", "memory": "64Mi"},
        },
        "volumeMounts": [{"name": "arena", "mountPath": ARENA_MOUNT}],
    }


def _pod_common(pipeline: Pipeline) -> JSON:
    spec = pipeline.spec
    pod: JSON = {
        "securityContext": _pod_security(),
        "tolerations": copy.deepcopy(spec["gpu"]["tolerations"]),
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
    }
    if spec.get("serviceAccountName"):
        pod["serviceAccountName"] = spec["serviceAccountName"]
    if spec.get("imagePullSecrets"):
        pod["imagePullSecrets"] = copy.deepcopy(spec["imagePullSecrets"])
    return pod


def _metrics_annotations(port: int) -> dict[str, str]:
    return {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(port),
        "prometheus.io/path": "/metrics",
    }


def _resources(raw: Mapping[str, Any]) -> JSON:
    out: JSON = {}
    for part in ("requests", "limits"):
        if raw.get(part):
            out[part] = {k: str(v) for k, v in raw[part].items()}
    return out


# ---------------------------------------------------------------------------
# Objects.
# ---------------------------------------------------------------------------
def build_daemonset(pipeline: Pipeline) -> JSON:
    """The GPU-daemon DaemonSet on the nodes matching ``spec.gpu.nodeSelector``."""
    spec = pipeline.spec
    resources = _resources(spec["gpu"]["resources"])
    resources.setdefault("limits", {})[GPU_RESOURCE] = "1"
    resources.setdefault("requests", {})[GPU_RESOURCE] = "1"
    port = constants.DEFAULT_DAEMON_METRICS_PORT
    container = {
        "name": "gpu-daemon",
        "image": spec["image"],
        "imagePullPolicy": spec["imagePullPolicy"],
        "args": ["gpu-daemon"],
        "env": _env(pipeline, COMPONENT_DAEMON),
        "ports": [{"name": "metrics", "containerPort": port, "protocol": "TCP"}],
        "resources": resources,
        "securityContext": _container_security(),
        "volumeMounts": _mounts(),
        "readinessProbe": {
            "tcpSocket": {"port": "metrics"},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            "tcpSocket": {"port": "metrics"},
            "initialDelaySeconds": 60,
            "periodSeconds": 20,
            "failureThreshold": 6,
        },
    }
    pod = _pod_common(pipeline)
    pod.update(
        {
            "nodeSelector": dict(spec["gpu"]["nodeSelector"]),
            "initContainers": [_arena_init(pipeline)],
            "containers": [container],
            "volumes": _volumes(pipeline, "4Gi"),
            "terminationGracePeriodSeconds": DAEMON_GRACE_SECONDS,
        }
    )
    obj: JSON = {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {
            "name": daemonset_name(pipeline),
            "namespace": pipeline.namespace,
            "labels": object_labels(pipeline, COMPONENT_DAEMON),
            "annotations": {ANNOTATION_PIPELINE: pipeline.name},
            "ownerReferences": [owner_reference(pipeline)],
        },
        "spec": {
            "selector": {"matchLabels": selector_labels(pipeline, COMPONENT_DAEMON)},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "revisionHistoryLimit": 3,
            "template": {
                "metadata": {
                    "labels": object_labels(pipeline, COMPONENT_DAEMON),
                    "annotations": _metrics_annotations(port),
                },
                "spec": pod,
            },
        },
    }
    return _with_hash(obj)


def build_worker_deployment(pipeline: Pipeline, node: str, replicas: int) -> JSON:
    """The CPU-worker Deployment pinned to GPU node ``node`` with ``replicas`` pods."""
    spec = pipeline.spec
    port = constants.DEFAULT_WORKER_METRICS_PORT
    container = {
        "name": "worker",
        "image": spec["image"],
        "imagePullPolicy": spec["imagePullPolicy"],
        "args": ["worker"],
        "env": _env(pipeline, COMPONENT_WORKERS),
        "ports": [{"name": "metrics", "containerPort": port, "protocol": "TCP"}],
        "resources": _resources(spec["workers"]["resources"]),
        "securityContext": _container_security(),
        "volumeMounts": _mounts(),
        "readinessProbe": {
            "tcpSocket": {"port": "metrics"},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
    }
    pod_labels = object_labels(pipeline, COMPONENT_WORKERS, node)
    pod = _pod_common(pipeline)
    pod.update(
        {
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {
                                "matchFields": [
                                    {"key": "metadata.name", "operator": "In", "values": [node]}
                                ]
                            }
                        ]
                    }
                }
            },
            "initContainers": [_arena_init(pipeline)],
            "containers": [container],
            "volumes": _volumes(pipeline, "16Gi"),
            "terminationGracePeriodSeconds": WORKER_GRACE_SECONDS,
        }
    )
    match = selector_labels(pipeline, COMPONENT_WORKERS)
    match[constants.LABEL_NODE] = node_label_value(node)
    obj: JSON = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": workers_deployment_name(pipeline, node),
            "namespace": pipeline.namespace,
            "labels": object_labels(pipeline, COMPONENT_WORKERS, node),
            "annotations": {ANNOTATION_NODE: node, ANNOTATION_PIPELINE: pipeline.name},
            "ownerReferences": [owner_reference(pipeline)],
        },
        "spec": {
            "replicas": int(replicas),
            "selector": {"matchLabels": match},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1},
            },
            "revisionHistoryLimit": 3,
            "template": {
                "metadata": {"labels": pod_labels, "annotations": _metrics_annotations(port)},
                "spec": pod,
            },
        },
    }
    return _with_hash(obj)


# ---------------------------------------------------------------------------
# Quantities (for the allocatable-CPU bound).
# ---------------------------------------------------------------------------
_CPU_RE: Final = re.compile(r"^([0-9]*\.?[0-9]+)(m?)$")


def cpu_millis(quantity: str | int | float | None) -> int | None:
    """Millicores of a CPU quantity (``"2"``, ``"500m"``, ``1.5``), ``None`` if unset."""
    if quantity is None or quantity == "":
        return None
    if isinstance(quantity, int | float):
        return round(float(quantity) * 1000)
    match = _CPU_RE.match(str(quantity).strip())
    if not match:
        raise ValueError(f"unsupported CPU quantity {quantity!r}")
    value = float(match.group(1))
    return round(value if match.group(2) else value * 1000)


def workers_cpu_cap(pipeline: Pipeline, allocatable_cpu: str | None) -> int | None:
    """How many worker pods fit a node's allocatable CPU beside the GPU daemon.

    ``None`` when either the node's allocatable CPU or the worker CPU request is unknown.
    Other pods on the node are not subtracted: the scheduler leaves extra pods Pending
    and the autoscaler does not scale further up while pods are not ready.
    """
    node_m = cpu_millis(allocatable_cpu)
    worker_m = cpu_millis(pipeline.spec["workers"]["resources"].get("requests", {}).get("cpu"))
    if node_m is None or not worker_m:
        return None
    daemon_m = cpu_millis(pipeline.spec["gpu"]["resources"].get("requests", {}).get("cpu")) or 0
    return max(0, (node_m - daemon_m) // worker_m)
