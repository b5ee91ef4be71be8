"""Pure builders of the Kubernetes objects a ClipPipeline owns.

Nothing here does I/O: given a :class:`Pipeline` (name, namespace, uid and the spec with
defaults) the ``build_*`` functions return plain dicts ready to be sent to the API.

* ``build_daemon_deployment()``: one GPU daemon (``clipline gpu-daemon``): a Deployment
  of one pod (``Recreate``: the old pod gives its GPU back before the new one starts)
  pinned to its node with a ``metadata.name`` node-affinity term and requesting
  ``spec.gpu.resourceCount`` units of ``spec.gpu.resourceName`` (``nvidia.com/gpu``,
  a MIG profile such as ``nvidia.com/mig-1g.10gb``, ...). A node runs
  :func:`gpus_on_node` daemons, numbered 0, 1, ...: one per GPU or MIG slice it
  advertises (its allocatable ``resourceName`` over ``resourceCount``) unless
  ``spec.gpu.daemonsPerNode`` fixes the number. With an empty ``resourceName`` nothing
  is requested and daemon *i* gets ``NVIDIA_VISIBLE_DEVICES`` of its own GPUs.
* ``build_worker_deployment()``: per GPU daemon, its Celery CPU workers (``clipline
  worker``) pinned to the daemon's node; the autoscaler sizes each one.
* ``build_worker_pdb()``: one PodDisruptionBudget over all the pipeline's workers.

Daemon *i* and its workers carry the pod label ``clipline.dev/gpu: "<i>"`` (the
PodMonitor turns it into the ``gpu`` series label the autoscaler groups by) and the
setting ``CLIPLINE_GPU_INDEX=<i>`` (the daemon's name in Redis, see
``Settings.daemon_name``).

Shared memory: the daemon and the workers of GPU *i* mount the same node-local
directory, ``hostPath /dev/shm/clipline-<deployment>-gpu<i>`` (``DirectoryOrCreate``),
at :data:`ARENA_MOUNT`, which is ``CLIPLINE_SHM_DIR``: each daemon has its own arena,
and a worker feeds only its own daemon. We chose a hostPath under the host's
``/dev/shm`` over ``hostIPC: true`` because it shares only clipline's own directory
(not the host's whole IPC namespace) and keeps the arena in RAM-backed tmpfs. The kubelet
creates the directory root-owned; a tiny init container (root, only ``CHOWN`` and
``FOWNER`` capabilities, no privilege escalation) makes it owned by the image's user and
mode 0700, so only clipline's uid can open the arena. All long-running containers run as
uid/gid :data:`constants.CONTAINER_UID`, non-root, with a read-only root filesystem, an
``emptyDir`` at ``/tmp`` and every capability dropped.

Secrets reach the pods only through ``secretKeyRef`` (the operator itself never reads a
Secret): the Redis URL (``spec.redis.secretRef``) for both, the completion-callback
signing secret (``spec.callbacks.secretRef``) and the object store's access key pair
(``spec.artifacts.secretRef``) for the workers alone, which sign and send the callbacks
and store the clips; the GPU daemon needs neither and gets neither.

Scheduling (``spec.gpu`` for the daemons, ``spec.workers`` for the workers):
``runtimeClassName``, ``priorityClassName``, ``affinity`` (its required node terms are
ANDed with the pin to the node), ``podAnnotations``/``podLabels`` (the operator's own
win), ``env`` (non-``CLIPLINE_*`` variables), ``extraVolumes``/``extraVolumeMounts``;
``spec.gpu.nodeSelector`` and ``tolerations`` apply to both. ``spec.models.weights``
mounts a PersistentVolumeClaim, a hostPath or an image volume read-only into the
daemons and sets ``CLIPLINE_WEIGHTS_DIR`` to its mount path.

Probes use the processes' own endpoints on the ``metrics`` port: ``/readyz`` for
readiness and for the daemon's startup probe (ready only once its models are warm, so
``spec.gpu.startupSeconds`` covers compile and TensorRT builds), ``/healthz`` for
liveness. The workers' ``terminationGracePeriodSeconds`` is the job hard time limit
(``CLIPLINE_JOB_TIME_LIMIT_S``) plus :data:`WORKER_DRAIN_MARGIN_S`: a worker told to
stop finishes its job or hands it back before it is killed.

Every object carries an owner reference to the ClipPipeline (deleting it deletes
everything) and a ``clipline.dev/spec-hash`` annotation so the reconciler only patches
what changed.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
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
DAEMON_GRACE_SECONDS: Final = 60
#: Seconds a stopping worker gets beyond the job hard time limit (Celery's warm shutdown).
WORKER_DRAIN_MARGIN_S: Final = 30
#: Period of the startup probes (the daemon's failure threshold follows startupSeconds).
STARTUP_PERIOD_S: Final = 10
#: How long a worker may take to start serving /healthz (imports, first Redis contact).
WORKER_STARTUP_S: Final = 300

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


def daemon_deployment_name(pipeline: Pipeline, node: str, gpu: int) -> str:
    return dns_label(f"{pipeline.name}-gpu-{node}-{gpu}")


def workers_deployment_name(pipeline: Pipeline, node: str, gpu: int) -> str:
    return dns_label(f"{pipeline.name}-workers-{node}-{gpu}")


def workers_pdb_name(pipeline: Pipeline) -> str:
    return dns_label(f"{pipeline.name}-workers")


def selector_labels(pipeline: Pipeline, component: str) -> dict[str, str]:
    """The labels that select a component's pods (immutable selector fields)."""
    return {
        constants.LABEL_NAME: constants.PROJECT,
        constants.LABEL_INSTANCE: pipeline.name,
        constants.LABEL_COMPONENT: component,
    }


def daemon_selector(pipeline: Pipeline, component: str, node: str, gpu: int) -> dict[str, str]:
    """The labels that select the pods of one GPU daemon or of its workers."""
    labels = selector_labels(pipeline, component)
    labels[constants.LABEL_NODE] = node_label_value(node)
    labels[constants.LABEL_GPU] = str(gpu)
    return labels


def object_labels(
    pipeline: Pipeline, component: str, node: str | None = None, gpu: int | None = None
) -> dict[str, str]:
    labels = selector_labels(pipeline, component)
    labels[constants.LABEL_MANAGED_BY] = MANAGED_BY
    if node is not None:
        labels[constants.LABEL_NODE] = node_label_value(node)
    if gpu is not None:
        labels[constants.LABEL_GPU] = str(gpu)
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
WORKER_ONLY_ENV: Final = frozenset(
    {env_name("callback_secret"), env_name("s3_access_key_id"), env_name("s3_secret_access_key")}
)


def _secret_env(field: str, ref: Mapping[str, Any], default_key: str) -> JSON:
    key = ref.get("key") or default_key
    return {
        "name": env_name(field),
        "valueFrom": {"secretKeyRef": {"name": ref["name"], "key": key}},
    }


def _part(component: str) -> str:
    """The spec section with the pod settings of ``component``."""
    return "gpu" if component == COMPONENT_DAEMON else "workers"


def visible_devices(pipeline: Pipeline, gpu: int) -> str | None:
    """``NVIDIA_VISIBLE_DEVICES`` of GPU daemon ``gpu`` when no resource is requested.

    With a ``resourceName`` the device plugin picks the daemon's devices (None here).
    """
    spec = pipeline.spec["gpu"]
    if spec["resourceName"] or spec["device"] == "cpu":
        return None
    count = int(spec["resourceCount"])
    return ",".join(str(i) for i in range(gpu * count, (gpu + 1) * count))


def _env(pipeline: Pipeline, component: str, gpu: int) -> list[JSON]:
    """The container env of ``component`` (the daemon or the workers) of GPU ``gpu``.

    Only the workers get the callback signing secret (``spec.callbacks.secretRef``, or a
    ``CLIPLINE_CALLBACK_SECRET`` in ``extraEnv``) and the object store's key pair
    (``spec.artifacts.secretRef``): they deliver the callbacks and store the clips, the
    GPU daemon never needs either.
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
        "metrics_host": "0.0.0.0",  # the kubelet's probes and Prometheus come from outside
        "worker_concurrency": str(spec["workers"]["concurrency"]),
        "state_dir": f"{TMP_MOUNT}/clipline",
    }
    if component == COMPONENT_WORKERS:
        values["decode_backend"] = spec["workers"]["decodeBackend"]
    if models.get("weightsDir"):
        values["weights_dir"] = models["weightsDir"]
    if models.get("weights") and component == COMPONENT_DAEMON:
        values["weights_dir"] = models["weights"]["mountPath"]
    env: list[JSON] = [
        {
            "name": env_name("node_name"),
            "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "spec.nodeName"}},
        },
        {"name": env_name("gpu_index"), "value": str(gpu)},
        _secret_env("redis_url", redis_ref, "url"),
    ]
    callbacks = spec.get("callbacks")
    if component == COMPONENT_WORKERS and callbacks:
        env.append(_secret_env("callback_secret", callbacks["secretRef"], crd.CALLBACK_SECRET_KEY))
    stored = spec.get("artifacts")
    if component == COMPONENT_WORKERS and stored:
        ref = stored["secretRef"]
        for field, key_field, default in (
            ("s3_access_key_id", "accessKeyIdKey", crd.ACCESS_KEY_ID_KEY),
            ("s3_secret_access_key", "secretAccessKeyKey", crd.SECRET_ACCESS_KEY_KEY),
        ):
            env.append(
                _secret_env(field, {"name": ref["name"], "key": ref.get(key_field)}, default)
            )
    extra = {item["name"]: item["value"] for item in spec.get("extraEnv") or []}
    reserved = {item["name"] for item in env}
    if component != COMPONENT_WORKERS:
        reserved |= WORKER_ONLY_ENV
    for field, value in values.items():
        name = env_name(field)
        if name not in extra:
            env.append({"name": name, "value": value})
    env.extend({"name": k, "value": v} for k, v in extra.items() if k not in reserved)
    devices = visible_devices(pipeline, gpu) if component == COMPONENT_DAEMON else None
    if devices is not None:
        env.append({"name": "NVIDIA_VISIBLE_DEVICES", "value": devices})
    taken = {item["name"] for item in env}
    for item in spec[_part(component)].get("env") or []:
        if item["name"] not in taken:
            env.append(copy.deepcopy(dict(item)))
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


def arena_host_path(pipeline: Pipeline, gpu: int) -> str:
    """The node-local directory holding GPU ``gpu``'s arena and wake-up socket."""
    return f"{ARENA_HOST_ROOT}/{constants.PROJECT}-{pipeline.deployment}-gpu{gpu}"


def _weights_volume(weights: Mapping[str, Any]) -> JSON:
    if "persistentVolumeClaim" in weights:
        claim = weights["persistentVolumeClaim"]["claimName"]
        return {"name": "weights", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
    if "hostPath" in weights:
        return {
            "name": "weights",
            "hostPath": {"path": weights["hostPath"]["path"], "type": "Directory"},
        }
    image = {"reference": weights["image"]["reference"]}
    if weights["image"].get("pullPolicy"):
        image["pullPolicy"] = weights["image"]["pullPolicy"]
    return {"name": "weights", "image": image}


def _with_weights(pipeline: Pipeline, component: str) -> Mapping[str, Any] | None:
    weights = pipeline.spec["models"].get("weights")
    return weights if weights and component == COMPONENT_DAEMON else None


def _volumes(pipeline: Pipeline, component: str, gpu: int, tmp_limit: str) -> list[JSON]:
    volumes: list[JSON] = [
        {
            "name": "arena",
            "hostPath": {"path": arena_host_path(pipeline, gpu), "type": "DirectoryOrCreate"},
        },
        {"name": "tmp", "emptyDir": {"sizeLimit": tmp_limit}},
    ]
    weights = _with_weights(pipeline, component)
    if weights is not None:
        volumes.append(_weights_volume(weights))
    volumes.extend(
        copy.deepcopy(dict(v)) for v in pipeline.spec[_part(component)].get("extraVolumes") or []
    )
    return volumes


def _mounts(pipeline: Pipeline, component: str) -> list[JSON]:
    mounts: list[JSON] = [
        {"name": "arena", "mountPath": ARENA_MOUNT},
        {"name": "tmp", "mountPath": TMP_MOUNT},
    ]
    weights = _with_weights(pipeline, component)
    if weights is not None:
        mount: JSON = {"name": "weights", "mountPath": weights["mountPath"], "readOnly": True}
        if weights.get("subPath"):
            mount["subPath"] = weights["subPath"]
        mounts.append(mount)
    mounts.extend(
        copy.deepcopy(dict(m))
        for m in pipeline.spec[_part(component)].get("extraVolumeMounts") or []
    )
    return mounts


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


def pinned_affinity(node: str, extra: Mapping[str, Any] | None = None) -> JSON:
    """Node affinity that pins a pod to ``node``, ANDed into ``extra``'s required terms.

    Required node-selector terms are ORed by Kubernetes, so the pin joins every one of
    them; preferred terms, pod affinity and anti-affinity are kept as given.
    """
    out: JSON = copy.deepcopy(dict(extra or {}))
    node_affinity: JSON = dict(out.pop("nodeAffinity", None) or {})
    pin = {"key": "metadata.name", "operator": "In", "values": [node]}
    required = node_affinity.get("requiredDuringSchedulingIgnoredDuringExecution") or {}
    terms = []
    for term in required.get("nodeSelectorTerms") or [{}]:
        term = dict(term)
        term["matchFields"] = [*(term.get("matchFields") or []), pin]
        terms.append(term)
    node_affinity["requiredDuringSchedulingIgnoredDuringExecution"] = {"nodeSelectorTerms": terms}
    return {"nodeAffinity": node_affinity, **out}


def _pod_common(pipeline: Pipeline, component: str, node: str) -> JSON:
    spec = pipeline.spec
    part = spec[_part(component)]
    pod: JSON = {
        "securityContext": _pod_security(),
        "affinity": pinned_affinity(node, part.get("affinity")),
        "tolerations": copy.deepcopy(spec["gpu"]["tolerations"]),
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
    }
    for key in ("runtimeClassName", "priorityClassName"):
        if part.get(key):
            pod[key] = part[key]
    if spec.get("serviceAccountName"):
        pod["serviceAccountName"] = spec["serviceAccountName"]
    if spec.get("imagePullSecrets"):
        pod["imagePullSecrets"] = copy.deepcopy(spec["imagePullSecrets"])
    return pod


def _pod_metadata(pipeline: Pipeline, component: str, node: str, gpu: int, port: int) -> JSON:
    """Template metadata: the user's extra labels/annotations under the operator's own."""
    part = pipeline.spec[_part(component)]
    labels = {**(part.get("podLabels") or {}), **object_labels(pipeline, component, node, gpu)}
    annotations = {**(part.get("podAnnotations") or {}), **_metrics_annotations(port)}
    return {"labels": labels, "annotations": annotations}


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


def _http_probe(path: str, period: int, failures: int) -> JSON:
    return {
        "httpGet": {"path": path, "port": "metrics"},
        "periodSeconds": period,
        "timeoutSeconds": 5,
        "failureThreshold": failures,
    }


def startup_failures(seconds: int) -> int:
    """Failure threshold of a startup probe every :data:`STARTUP_PERIOD_S` for ``seconds``."""
    return max(1, math.ceil(seconds / STARTUP_PERIOD_S))


def worker_grace_seconds(pipeline: Pipeline) -> int:
    """The workers' termination grace: the job hard time limit plus a drain margin.

    The limit is ``CLIPLINE_JOB_TIME_LIMIT_S`` from ``spec.extraEnv``, else the setting's
    default: within it a running job ends (or is handed back to the queue) on SIGTERM.
    """
    limit = Settings.job_time_limit_s
    for item in pipeline.spec.get("extraEnv") or []:
        if item["name"] == env_name("job_time_limit_s"):
            with contextlib.suppress(ValueError):
                limit = float(item["value"])
    return math.ceil(max(limit, 0.0)) + WORKER_DRAIN_MARGIN_S


def _meta(pipeline: Pipeline, name: str, component: str, node: str | None, gpu: int | None) -> JSON:
    annotations = {ANNOTATION_PIPELINE: pipeline.name}
    if node is not None:
        annotations[ANNOTATION_NODE] = node
    return {
        "name": name,
        "namespace": pipeline.namespace,
        "labels": object_labels(pipeline, component, node, gpu),
        "annotations": annotations,
        "ownerReferences": [owner_reference(pipeline)],
    }


# ---------------------------------------------------------------------------
# Objects.
# ---------------------------------------------------------------------------
def build_daemon_deployment(pipeline: Pipeline, node: str, gpu: int) -> JSON:
    """GPU daemon ``gpu`` of ``node``: a one-pod Deployment pinned to the node."""
    spec = pipeline.spec
    gpu_spec = spec["gpu"]
    resources = _resources(gpu_spec["resources"])
    if gpu_spec["resourceName"]:
        count = str(gpu_spec["resourceCount"])
        resources.setdefault("limits", {})[gpu_spec["resourceName"]] = count
        resources.setdefault("requests", {})[gpu_spec["resourceName"]] = count
    port = constants.DEFAULT_DAEMON_METRICS_PORT
    container = {
        "name": "gpu-daemon",
        "image": spec["image"],
        "imagePullPolicy": spec["imagePullPolicy"],
        "args": ["gpu-daemon"],
        "env": _env(pipeline, COMPONENT_DAEMON, gpu),
        "ports": [{"name": "metrics", "containerPort": port, "protocol": "TCP"}],
        "resources": resources,
        "securityContext": _container_security(),
        "volumeMounts": _mounts(pipeline, COMPONENT_DAEMON),
        "startupProbe": _http_probe(
            "/readyz", STARTUP_PERIOD_S, startup_failures(int(gpu_spec["startupSeconds"]))
        ),
        "readinessProbe": _http_probe("/readyz", 10, 3),
        "livenessProbe": _http_probe("/healthz", 20, 6),
    }
    pod = _pod_common(pipeline, COMPONENT_DAEMON, node)
    pod.update(
        {
            "nodeSelector": dict(gpu_spec["nodeSelector"]),
            "initContainers": [_arena_init(pipeline)],
            "containers": [container],
            "volumes": _volumes(pipeline, COMPONENT_DAEMON, gpu, "4Gi"),
            "terminationGracePeriodSeconds": DAEMON_GRACE_SECONDS,
        }
    )
    name = daemon_deployment_name(pipeline, node, gpu)
    obj: JSON = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(pipeline, name, COMPONENT_DAEMON, node, gpu),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": daemon_selector(pipeline, COMPONENT_DAEMON, node, gpu)},
            # The old pod gives the GPU and the arena back before the new one starts.
            "strategy": {"type": "Recreate"},
            "revisionHistoryLimit": 3,
            "template": {
                "metadata": _pod_metadata(pipeline, COMPONENT_DAEMON, node, gpu, port),
                "spec": pod,
            },
        },
    }
    return _with_hash(obj)


def build_worker_deployment(pipeline: Pipeline, node: str, gpu: int, replicas: int) -> JSON:
    """The CPU workers of GPU daemon ``gpu`` on ``node``, ``replicas`` pods."""
    spec = pipeline.spec
    port = constants.DEFAULT_WORKER_METRICS_PORT
    container = {
        "name": "worker",
        "image": spec["image"],
        "imagePullPolicy": spec["imagePullPolicy"],
        "args": ["worker"],
        "env": _env(pipeline, COMPONENT_WORKERS, gpu),
        "ports": [{"name": "metrics", "containerPort": port, "protocol": "TCP"}],
        "resources": _resources(spec["workers"]["resources"]),
        "securityContext": _container_security(),
        "volumeMounts": _mounts(pipeline, COMPONENT_WORKERS),
        "startupProbe": _http_probe(
            "/healthz", STARTUP_PERIOD_S, startup_failures(WORKER_STARTUP_S)
        ),
        "readinessProbe": _http_probe("/readyz", 10, 3),
        "livenessProbe": _http_probe("/healthz", 20, 6),
    }
    pod = _pod_common(pipeline, COMPONENT_WORKERS, node)
    pod.update(
        {
            "initContainers": [_arena_init(pipeline)],
            "containers": [container],
            "volumes": _volumes(pipeline, COMPONENT_WORKERS, gpu, "16Gi"),
            "terminationGracePeriodSeconds": worker_grace_seconds(pipeline),
        }
    )
    name = workers_deployment_name(pipeline, node, gpu)
    obj: JSON = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(pipeline, name, COMPONENT_WORKERS, node, gpu),
        "spec": {
            "replicas": int(replicas),
            "selector": {"matchLabels": daemon_selector(pipeline, COMPONENT_WORKERS, node, gpu)},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1},
            },
            "revisionHistoryLimit": 3,
            "template": {
                "metadata": _pod_metadata(pipeline, COMPONENT_WORKERS, node, gpu, port),
                "spec": pod,
            },
        },
    }
    return _with_hash(obj)


def build_worker_pdb(pipeline: Pipeline) -> JSON:
    """The PodDisruptionBudget over every worker pod of the pipeline.

    ``unhealthyPodEvictionPolicy: AlwaysAllow``: a worker that is not ready (still
    starting) never blocks a drain. The operator removes the daemons and workers of a
    cordoned node itself (deleting, not evicting), since pods pinned to a cordoned
    node could never become ready elsewhere.
    """
    budget = pipeline.spec["workers"]["podDisruptionBudget"]
    obj: JSON = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(pipeline, workers_pdb_name(pipeline), COMPONENT_WORKERS, None, None),
        "spec": {
            "maxUnavailable": budget["maxUnavailable"],
            "selector": {"matchLabels": selector_labels(pipeline, COMPONENT_WORKERS)},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }
    return _with_hash(obj)


def gpus_on_node(pipeline: Pipeline, allocatable: Mapping[str, Any]) -> int:
    """How many GPU daemons ``spec`` runs on a node with ``allocatable`` resources.

    ``spec.gpu.daemonsPerNode`` when set; else the node's allocatable ``resourceName``
    divided by ``resourceCount``. At least 1: a selected node whose device plugin has
    not reported yet (or reports none) still gets a daemon, Pending until it has a GPU.
    """
    gpu = pipeline.spec["gpu"]
    if gpu["daemonsPerNode"]:
        return int(gpu["daemonsPerNode"])
    if not gpu["resourceName"]:
        return 1
    try:
        units = int(str(allocatable.get(gpu["resourceName"], "0")))
    except ValueError:
        units = 0
    return max(1, min(units // int(gpu["resourceCount"]), crd.MAX_DAEMONS_PER_NODE))


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


def workers_cpu_cap(
    pipeline: Pipeline, allocatable_cpu: str | None, daemons: int = 1
) -> int | None:
    """How many worker pods fit a node's allocatable CPU beside its ``daemons`` GPU daemons.

    The node's GPU daemons share this budget (see ``decide.decide_node``). ``None`` when
    either the node's allocatable CPU or the worker CPU request is unknown.
    Other pods on the node are not subtracted: the scheduler leaves extra pods Pending
    and the autoscaler does not scale further up while pods are not ready.
    """
    node_m = cpu_millis(allocatable_cpu)
    worker_m = cpu_millis(pipeline.spec["workers"]["resources"].get("requests", {}).get("cpu"))
    if node_m is None or not worker_m:
        return None
    daemon_m = cpu_millis(pipeline.spec["gpu"]["resources"].get("requests", {}).get("cpu")) or 0
    return max(0, (node_m - daemon_m * max(daemons, 0)) // worker_m)
