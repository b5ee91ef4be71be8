"""The ``ClipPipeline`` custom resource: its CRD, spec defaults and validation.

``build_crd()`` returns the CustomResourceDefinition (``clipline.dev/v1alpha1``) whose
OpenAPI schema rejects bad specs at admission time; ``charts/clipline/crds/`` holds the
same object rendered to YAML (``clipline-operator crd`` writes it, a test keeps it in
sync). ``with_defaults()`` applies the schema's defaults in Python exactly as the API
server would, and ``validate_spec()`` checks a spec against the schema plus the
cross-field rules (the ``x-kubernetes-validations`` CEL rules) so the operator, the
simulation and the tests all read one source of truth.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import yaml

from clipline_core import constants

JSON = dict[str, Any]

CRD_NAME: Final = f"{constants.CRD_PLURAL}.{constants.CRD_GROUP}"
API_VERSION: Final = f"{constants.CRD_GROUP}/{constants.CRD_VERSION}"
#: Model-execution backends the GPU daemon understands (its fallback order).
BACKENDS: Final = constants.BACKENDS
#: Key of the callback signing secret in ``spec.callbacks.secretRef``'s Secret by default.
CALLBACK_SECRET_KEY: Final = "secret"
#: Keys of the object store's credentials in ``spec.artifacts.secretRef``'s Secret by default.
ACCESS_KEY_ID_KEY: Final = "AWS_ACCESS_KEY_ID"
SECRET_ACCESS_KEY_KEY: Final = "AWS_SECRET_ACCESS_KEY"
#: Placeholders a ``prometheus.selector`` or ``utilizationQuery`` may use.
QUERY_PLACEHOLDERS: Final = ("{namespace}", "{name}", "{selector}", "{window}")

DEFAULT_NODE_SELECTOR: Final = {"nvidia.com/gpu.present": "true"}
DEFAULT_TOLERATIONS: Final = [
    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
]
#: The extended resource each GPU daemon requests by default (one GPU each).
DEFAULT_GPU_RESOURCE: Final = "nvidia.com/gpu"
#: Where a weights volume is mounted (read-only) by default: CLIPLINE_WEIGHTS_DIR.
DEFAULT_WEIGHTS_MOUNT: Final = "/var/lib/clipline/weights"
#: Most GPU daemons one node runs (8 GPUs x 7 MIG slices fit).
MAX_DAEMONS_PER_NODE: Final = 64
#: Volume names the operator's pods use itself (extraVolumes must pick others).
RESERVED_VOLUMES: Final = ("arena", "tmp", "weights")
DEFAULT_PROMETHEUS_URL: Final = "http://prometheus-operated.monitoring.svc:9090"
DEFAULT_SELECTOR: Final = 'namespace="{namespace}"'
MAX_ARENA_BYTES: Final = 64 * 1024**3

_QUANTITY: Final = {
    "anyOf": [{"type": "integer"}, {"type": "string"}],
    "pattern": (
        r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
        r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
    ),
    "x-kubernetes-int-or-string": True,
}
_CPU_MEMORY: Final = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"cpu": _QUANTITY, "memory": _QUANTITY, "ephemeral-storage": _QUANTITY},
}


def _resources(requests: Mapping[str, str], limits: Mapping[str, str]) -> JSON:
    return {
        "type": "object",
        "description": "Container resources (cpu, memory, ephemeral-storage).",
        "default": {"requests": dict(requests), "limits": dict(limits)},
        "additionalProperties": False,
        "properties": {"requests": _CPU_MEMORY, "limits": _CPU_MEMORY},
    }


def _int(minimum: int, maximum: int, default: int, description: str) -> JSON:
    return {
        "type": "integer",
        "minimum": minimum,
        "maximum": maximum,
        "default": default,
        "description": description,
    }


_TOLERATION: Final = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "key": {"type": "string"},
        "operator": {"type": "string", "enum": ["Exists", "Equal"]},
        "value": {"type": "string"},
        "effect": {"type": "string", "enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"]},
        "tolerationSeconds": {"type": "integer"},
    },
}

_ENV_VAR: Final = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "value"],
    "properties": {
        "name": {"type": "string", "pattern": r"^CLIPLINE_[A-Z0-9_]+$"},
        "value": {"type": "string"},
    },
}


_FREE_OBJECT: Final = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
_STRING_MAP: Final = {"type": "object", "additionalProperties": {"type": "string"}}
_NAME_253: Final = {"type": "string", "minLength": 1, "maxLength": 253}

_POD_ENV_VAR: Final = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "x-kubernetes-validations": [
        {
            "rule": "!self.name.startsWith('CLIPLINE_')",
            "message": "CLIPLINE_* settings go in spec.extraEnv",
        },
        {
            "rule": "has(self.value) != has(self.valueFrom)",
            "message": "set exactly one of value and valueFrom",
        },
    ],
    "properties": {
        "name": {"type": "string", "minLength": 1, "pattern": r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"},
        "value": {"type": "string"},
        "valueFrom": dict(
            _FREE_OBJECT, description="A core/v1 EnvVarSource (secretKeyRef, fieldRef, ...)."
        ),
    },
}

_VOLUME: Final = {
    "type": "object",
    "required": ["name"],
    "x-kubernetes-preserve-unknown-fields": True,
    "description": "A core/v1 Volume (name plus one volume source).",
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}
    },
}

_VOLUME_MOUNT: Final = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "mountPath"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "mountPath": {"type": "string", "pattern": r"^/"},
        "subPath": {"type": "string"},
        "readOnly": {"type": "boolean"},
    },
}


def _pod_schema(who: str) -> dict[str, JSON]:
    """Scheduling and extras of the pods of ``who`` (the GPU daemons or the workers).

    Every field defaults to empty (nothing added), so the chart's values show them all.
    """
    optional_name = {"type": "string", "maxLength": 253, "default": ""}
    return {
        "runtimeClassName": dict(
            optional_name, description=f"RuntimeClass of {who} pods (e.g. nvidia); empty: none."
        ),
        "priorityClassName": dict(
            optional_name, description=f"PriorityClass of {who} pods; empty: none."
        ),
        "affinity": {
            "type": "object",
            "additionalProperties": False,
            "default": {},
            "description": (
                f"Affinity of {who} pods, added to the operator's pin to the node: "
                "required node terms are ANDed with it, the rest is kept as given."
            ),
            "properties": {
                "nodeAffinity": _FREE_OBJECT,
                "podAffinity": _FREE_OBJECT,
                "podAntiAffinity": _FREE_OBJECT,
            },
        },
        "podAnnotations": dict(
            _STRING_MAP, default={}, description=f"Extra annotations of {who} pods."
        ),
        "podLabels": dict(
            _STRING_MAP,
            default={},
            description=f"Extra labels of {who} pods (the operator's own labels win).",
        ),
        "env": {
            "type": "array",
            "maxItems": 64,
            "items": _POD_ENV_VAR,
            "default": [],
            "description": (
                f"Extra environment of the {who} container (not CLIPLINE_*: those are "
                "extraEnv), e.g. NCCL_* or TORCH_* variables."
            ),
        },
        "extraVolumes": {
            "type": "array",
            "maxItems": 32,
            "items": _VOLUME,
            "default": [],
            "x-kubernetes-validations": [
                {
                    "rule": "self.all(v, !(v.name in " + str(list(RESERVED_VOLUMES)) + "))",
                    "message": "volume names arena, tmp and weights are the operator's",
                },
                {
                    "rule": "self.all(v, self.exists_one(w, w.name == v.name))",
                    "message": "volume names must be unique",
                },
            ],
            "description": f"Extra volumes (core/v1 Volume objects) of {who} pods.",
        },
        "extraVolumeMounts": {
            "type": "array",
            "maxItems": 32,
            "items": _VOLUME_MOUNT,
            "default": [],
            "description": f"Extra volume mounts of the {who} container.",
        },
    }


#: Rules on a gpu/workers section: every extra mount names one of its extra volumes.
_POD_RULES: Final = [
    {
        "rule": "!has(self.extraVolumeMounts) || self.extraVolumeMounts.all(m, "
        "has(self.extraVolumes) && self.extraVolumes.exists(v, v.name == m.name))",
        "message": "every extraVolumeMounts entry must name one of extraVolumes",
    }
]

_WEIGHTS: Final = {
    "type": "object",
    "additionalProperties": False,
    "description": (
        "A volume with the model weights, mounted read-only into the GPU daemons at "
        "mountPath, which becomes CLIPLINE_WEIGHTS_DIR: exactly one of "
        "persistentVolumeClaim, hostPath and image."
    ),
    "x-kubernetes-validations": [
        {
            "rule": "[has(self.persistentVolumeClaim), has(self.hostPath), has(self.image)]"
            ".filter(x, x).size() == 1",
            "message": "set exactly one of persistentVolumeClaim, hostPath and image",
        }
    ],
    "properties": {
        "persistentVolumeClaim": {
            "type": "object",
            "required": ["claimName"],
            "additionalProperties": False,
            "description": "A PersistentVolumeClaim (same namespace; ReadOnlyMany for many nodes).",
            "properties": {"claimName": _NAME_253},
        },
        "hostPath": {
            "type": "object",
            "required": ["path"],
            "additionalProperties": False,
            "description": "A directory present on every GPU node.",
            "properties": {"path": {"type": "string", "pattern": r"^/"}},
        },
        "image": {
            "type": "object",
            "required": ["reference"],
            "additionalProperties": False,
            "description": "An OCI image (or artifact) volume (Kubernetes >= 1.33).",
            "properties": {
                "reference": {"type": "string", "minLength": 1, "pattern": r"^[^\s]+$"},
                "pullPolicy": {"type": "string", "enum": ["Always", "IfNotPresent", "Never"]},
            },
        },
        "subPath": {"type": "string", "description": "Mount only this path of the volume."},
        "mountPath": {
            "type": "string",
            "pattern": r"^/",
            "default": DEFAULT_WEIGHTS_MOUNT,
            "description": "Where the daemons see the weights (CLIPLINE_WEIGHTS_DIR).",
        },
    },
}


def spec_schema() -> JSON:
    """The OpenAPI v3 schema of ``.spec`` (structural, with defaults)."""
    prometheus = {
        "type": "object",
        "default": {},
        "additionalProperties": False,
        "description": "Where and how the operator reads GPU utilization and backlog.",
        "properties": {
            "url": {
                "type": "string",
                "pattern": r"^https?://[^\s]+$",
                "default": DEFAULT_PROMETHEUS_URL,
                "description": "Base URL of the Prometheus HTTP API.",
            },
            "selector": {
                "type": "string",
                "default": DEFAULT_SELECTOR,
                "maxLength": 512,
                "description": (
                    "PromQL label matchers (no braces) that pick this pipeline's series; "
                    "{namespace} and {name} are substituted."
                ),
            },
            "utilizationQuery": {
                "type": "string",
                "maxLength": 2048,
                "description": (
                    "Override of the GPU utilization query (0-1). It must return one "
                    "sample per GPU daemon labelled `node` and `gpu` (a sample without "
                    "`gpu` counts for every GPU of its node); {selector} becomes the "
                    "label matchers in braces and {window} the range, e.g. 60s."
                ),
            },
            "timeoutSeconds": {
                "type": "number",
                "minimum": 0.1,
                "maximum": 60,
                "default": 5,
                "description": "HTTP timeout of one query.",
            },
        },
    }
    autoscaling = {
        "type": "object",
        "default": {},
        "additionalProperties": False,
        "description": (
            "CPU-worker autoscaling per GPU daemon from that GPU's utilization and the "
            "backlog; a node's GPUs share its allocatable CPU."
        ),
        "x-kubernetes-validations": [
            {
                "rule": "self.minWorkersPerGpu <= self.maxWorkersPerGpu",
                "message": "minWorkersPerGpu must not exceed maxWorkersPerGpu",
            }
        ],
        "properties": {
            "enabled": {"type": "boolean", "default": True},
            "targetGpuUtilization": {
                "type": "number",
                "exclusiveMinimum": True,
                "minimum": 0,
                "maximum": 1,
                "default": 0.95,
                "description": "GPU utilization (0-1] the operator holds each GPU at.",
            },
            "tolerance": {
                "type": "number",
                "minimum": 0,
                "maximum": 0.5,
                "default": 0.03,
                "description": "No scale-up while utilization >= target - tolerance.",
            },
            "minWorkersPerGpu": _int(0, 1000, 1, "Fewest worker pods per GPU daemon."),
            "maxWorkersPerGpu": _int(1, 1000, 16, "Most worker pods per GPU daemon."),
            "periodSeconds": _int(1, 3600, 30, "How often each GPU is evaluated."),
            "windowSeconds": _int(1, 3600, 60, "Range over which utilization is averaged."),
            "scaleUpStabilizationSeconds": _int(
                0, 3600, 30, "Scale up only to the lowest recommendation of this window."
            ),
            "scaleDownStabilizationSeconds": _int(
                0, 3600, 300, "Scale down only to the highest recommendation of this window."
            ),
            "maxStepUp": _int(1, 1000, 4, "Most pods added to one GPU's workers per period."),
            "maxStepDown": _int(1, 1000, 1, "Most pods removed from one GPU's workers per period."),
            "prometheus": prometheus,
        },
    }
    return {
        "type": "object",
        "required": ["image", "redis"],
        "additionalProperties": False,
        "properties": {
            "image": {
                "type": "string",
                "minLength": 1,
                "maxLength": 512,
                "pattern": r"^[^\s]+$",
                "description": "The clipline image (runs both the GPU daemon and the workers).",
            },
            "imagePullPolicy": {
                "type": "string",
                "enum": ["Always", "IfNotPresent", "Never"],
                "default": "IfNotPresent",
            },
            "imagePullSecrets": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {"name": {"type": "string", "minLength": 1}},
                },
            },
            "serviceAccountName": {"type": "string", "minLength": 1, "maxLength": 253},
            "deployment": {
                "type": "string",
                "pattern": constants.DEPLOYMENT_RE.pattern,
                "description": (
                    "CLIPLINE_DEPLOYMENT: namespaces queues, Redis keys and the arena. "
                    "Defaults to the resource's name."
                ),
            },
            "redis": {
                "type": "object",
                "required": ["secretRef"],
                "additionalProperties": False,
                "properties": {
                    "secretRef": {
                        "type": "object",
                        "required": ["name"],
                        "additionalProperties": False,
                        "description": "Secret (same namespace) whose key holds the Redis URL.",
                        "properties": {
                            "name": {"type": "string", "minLength": 1, "maxLength": 253},
                            "key": {"type": "string", "minLength": 1, "default": "url"},
                        },
                    }
                },
            },
            "callbacks": {
                "type": "object",
                "required": ["secretRef"],
                "additionalProperties": False,
                "description": (
                    "Signed completion callbacks: the Secret whose key the workers sign "
                    "them with (CLIPLINE_CALLBACK_SECRET; comma-separated secrets each sign, "
                    "for rotation). The GPU daemon does not get it. Give the job API the "
                    "same secret. Without it the workers deliver no callbacks."
                ),
                "properties": {
                    "secretRef": {
                        "type": "object",
                        "required": ["name"],
                        "additionalProperties": False,
                        "description": "Secret (same namespace) whose key holds the secret.",
                        "properties": {
                            "name": {"type": "string", "minLength": 1, "maxLength": 253},
                            "key": {
                                "type": "string",
                                "minLength": 1,
                                "maxLength": 253,
                                "pattern": r"^[-._a-zA-Z0-9]+$",
                                "default": CALLBACK_SECRET_KEY,
                            },
                        },
                    }
                },
            },
            "artifacts": {
                "type": "object",
                "required": ["secretRef"],
                "additionalProperties": False,
                "description": (
                    "Credentials of the S3-compatible store the workers put the clips in "
                    "(CLIPLINE_S3_ACCESS_KEY_ID and CLIPLINE_S3_SECRET_ACCESS_KEY from the "
                    "Secret; the GPU daemon does not get them). The store itself is named "
                    "in extraEnv (CLIPLINE_ARTIFACT_STORE=s3, CLIPLINE_S3_BUCKET, ...). "
                    "Without it the workers use the AWS_* environment or the pod's identity."
                ),
                "properties": {
                    "secretRef": {
                        "type": "object",
                        "required": ["name"],
                        "additionalProperties": False,
                        "description": "Secret (same namespace) holding the access key pair.",
                        "properties": {
                            "name": {"type": "string", "minLength": 1, "maxLength": 253},
                            "accessKeyIdKey": {
                                "type": "string",
                                "minLength": 1,
                                "maxLength": 253,
                                "pattern": r"^[-._a-zA-Z0-9]+$",
                                "default": ACCESS_KEY_ID_KEY,
                            },
                            "secretAccessKeyKey": {
                                "type": "string",
                                "minLength": 1,
                                "maxLength": 253,
                                "pattern": r"^[-._a-zA-Z0-9]+$",
                                "default": SECRET_ACCESS_KEY_KEY,
                            },
                        },
                    }
                },
            },
            "models": {
                "type": "object",
                "default": {},
                "additionalProperties": False,
                "properties": {
                    "names": {
                        "type": "array",
                        "minItems": 1,
                        "maxItems": 16,
                        "default": ["features"],
                        "items": {"type": "string", "pattern": r"^[a-z0-9][a-z0-9_-]*$"},
                        "description": "Registry names of the models run per chunk.",
                    },
                    "backend": {
                        "type": "string",
                        "enum": list(BACKENDS),
                        "default": "eager",
                        "description": (
                            "Model-execution backend of the GPU daemon. One that cannot run "
                            "on the node falls back along "
                            f"{' -> '.join(reversed(BACKENDS))} (logged); tensorrt needs "
                            "the image's TensorRT target."
                        ),
                    },
                    "maxBatchSize": _int(1, 1024, 8, "Largest dynamic batch."),
                    "maxQueueDelayMs": {
                        "type": "number",
                        "minimum": 0,
                        "maximum": 10000,
                        "default": 5,
                    },
                    "weightsDir": {
                        "type": "string",
                        "description": (
                            "CLIPLINE_WEIGHTS_DIR for weights inside the image (else see weights)."
                        ),
                    },
                    "weights": _WEIGHTS,
                },
                "x-kubernetes-validations": [
                    {
                        "rule": "!(has(self.weights) && has(self.weightsDir))",
                        "message": "set weights or weightsDir, not both",
                    }
                ],
            },
            "sharedMemory": {
                "type": "object",
                "default": {},
                "additionalProperties": False,
                "description": "The node-local arena the workers fill and the daemon drains.",
                "x-kubernetes-validations": [
                    {
                        "rule": f"self.slots * self.slotBytes <= {MAX_ARENA_BYTES}",
                        "message": "the arena (slots x slotBytes) must not exceed 64 GiB",
                    }
                ],
                "properties": {
                    "slots": _int(2, 4096, 32, "Number of slots in the arena."),
                    "slotBytes": _int(65536, 1024**3, 4 * 1024 * 1024, "Bytes per slot."),
                },
            },
            "gpu": {
                "type": "object",
                "default": {},
                "additionalProperties": False,
                "description": (
                    "The GPU nodes and their GPU daemons: one daemon (a Deployment of one "
                    "pod) per GPU or MIG slice of each node, each with its own arena and "
                    "its own autoscaled workers."
                ),
                "x-kubernetes-validations": _POD_RULES,
                "properties": {
                    "nodeSelector": {
                        "type": "object",
                        "additionalProperties": {"type": "string"},
                        "default": dict(DEFAULT_NODE_SELECTOR),
                        "minProperties": 1,
                        "description": "Labels that select the GPU nodes.",
                    },
                    "tolerations": {
                        "type": "array",
                        "items": _TOLERATION,
                        "default": copy.deepcopy(DEFAULT_TOLERATIONS),
                        "description": "Tolerations of the GPU daemon and worker pods.",
                    },
                    "device": {
                        "type": "string",
                        "pattern": r"^(auto|cpu|cuda(:[0-9]+)?)$",
                        "default": "cuda",
                    },
                    "resources": _resources({"cpu": "1", "memory": "4Gi"}, {"memory": "16Gi"}),
                    "resourceName": {
                        "type": "string",
                        "maxLength": 253,
                        "pattern": r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/[-a-zA-Z0-9_.]+)?$",
                        "default": DEFAULT_GPU_RESOURCE,
                        "description": (
                            "Extended resource each GPU daemon requests (nvidia.com/gpu, "
                            "nvidia.com/mig-1g.10gb, ...). Empty: none; daemon i then gets "
                            "NVIDIA_VISIBLE_DEVICES of its own GPUs (set daemonsPerNode)."
                        ),
                    },
                    "resourceCount": _int(
                        1, 16, 1, "Units of resourceName per GPU daemon (request and limit)."
                    ),
                    "daemonsPerNode": _int(
                        0,
                        MAX_DAEMONS_PER_NODE,
                        0,
                        "GPU daemons per node. 0: the node's allocatable resourceName "
                        "divided by resourceCount (at least 1).",
                    ),
                    "startupSeconds": _int(
                        10,
                        7200,
                        1800,
                        "How long a GPU daemon may warm up (compile, TensorRT engines) "
                        "before its startup probe gives up.",
                    ),
                    **_pod_schema("GPU daemon"),
                },
            },
            "workers": {
                "type": "object",
                "default": {},
                "additionalProperties": False,
                "description": "The CPU workers of each GPU daemon (pinned to its node).",
                "x-kubernetes-validations": _POD_RULES,
                "properties": {
                    "concurrency": _int(1, 64, 2, "Celery prefork children per worker pod."),
                    "decodeBackend": {
                        "type": "string",
                        "enum": list(constants.DECODE_BACKEND_CHOICES),
                        "default": "opencv",
                        "description": (
                            "Video decoder of the workers: opencv (the reference), pyav, "
                            "nvdec (the node's GPU; the worker pods must see it) or auto "
                            "(nvdec where it can run, else opencv). A worker whose decoder "
                            "cannot run on its node does not start (decoder_unavailable)."
                        ),
                    },
                    "resources": _resources({"cpu": "1", "memory": "1Gi"}, {"memory": "2Gi"}),
                    "podDisruptionBudget": {
                        "type": "object",
                        "default": {},
                        "additionalProperties": False,
                        "description": (
                            "A PodDisruptionBudget over all of the pipeline's worker pods."
                        ),
                        "properties": {
                            "enabled": {"type": "boolean", "default": True},
                            "maxUnavailable": {
                                "anyOf": [{"type": "integer"}, {"type": "string"}],
                                "pattern": r"^[0-9]+%?$",
                                "x-kubernetes-int-or-string": True,
                                "default": "25%",
                                "description": "Most worker pods down at once (count or %).",
                            },
                        },
                    },
                    **_pod_schema("worker"),
                },
            },
            "extraEnv": {
                "type": "array",
                "maxItems": 64,
                "items": _ENV_VAR,
                "description": "Extra CLIPLINE_* settings for both the daemon and the workers.",
            },
            "autoscaling": autoscaling,
        },
    }


def status_schema() -> JSON:
    """The schema of ``.status`` (documented fields; unknown ones preserved for kopf)."""
    condition = {
        "type": "object",
        "required": ["type", "status"],
        "properties": {
            "type": {"type": "string"},
            "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
            "reason": {"type": "string"},
            "message": {"type": "string"},
            "lastTransitionTime": {"type": "string", "format": "date-time"},
            "observedGeneration": {"type": "integer"},
        },
    }
    decision = {
        "type": "object",
        "properties": {
            "time": {"type": "string"},
            "node": {"type": "string"},
            "gpu": {"type": "integer"},
            "direction": {"type": "string", "enum": ["up", "down", "hold"]},
            "from": {"type": "integer"},
            "to": {"type": "integer"},
            "reason": {"type": "string"},
            "message": {"type": "string"},
        },
    }
    daemon = {
        "type": "object",
        "required": ["gpu"],
        "properties": {
            "gpu": {"type": "integer"},
            "daemonDeployment": {"type": "string"},
            "deployment": {"type": "string"},
            "utilization": {"type": "number", "nullable": True},
            "slotWaitRatio": {"type": "number", "nullable": True},
            "currentWorkers": {"type": "integer"},
            "readyWorkers": {"type": "integer"},
            "desiredWorkers": {"type": "integer"},
            "maxWorkers": {"type": "integer"},
            "lastDecision": decision,
            "lastChange": decision,
            "recommendations": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"time": {"type": "number"}, "workers": {"type": "integer"}},
                },
            },
        },
    }
    node = {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string"},
            "gpus": {"type": "integer"},
            "currentWorkers": {"type": "integer"},
            "readyWorkers": {"type": "integer"},
            "desiredWorkers": {"type": "integer"},
            "maxWorkers": {"type": "integer"},
            "daemons": {"type": "array", "items": daemon},
        },
    }
    return {
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": True,
        "properties": {
            "observedGeneration": {"type": "integer"},
            "gpuNodes": {"type": "integer"},
            "gpus": {"type": "integer"},
            "totalWorkers": {"type": "integer"},
            "queueDepth": {"type": "number", "nullable": True},
            "lastEvaluationTime": {"type": "string"},
            "lastDecision": decision,
            "nodes": {"type": "array", "items": node},
            "conditions": {"type": "array", "items": condition},
        },
    }


def build_crd() -> JSON:
    """The ``clippipelines.clipline.dev`` CustomResourceDefinition."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {
                constants.LABEL_NAME: constants.PROJECT,
                constants.LABEL_COMPONENT: "operator",
            },
        },
        "spec": {
            "group": constants.CRD_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": constants.CRD_KIND,
                "listKind": f"{constants.CRD_KIND}List",
                "plural": constants.CRD_PLURAL,
                "singular": constants.CRD_SINGULAR,
                "shortNames": list(constants.CRD_SHORT_NAMES),
                "categories": [constants.PROJECT],
            },
            "versions": [
                {
                    "name": constants.CRD_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": "Nodes", "type": "integer", "jsonPath": ".status.gpuNodes"},
                        {"name": "GPUs", "type": "integer", "jsonPath": ".status.gpus"},
                        {"name": "Workers", "type": "integer", "jsonPath": ".status.totalWorkers"},
                        {
                            "name": "Target",
                            "type": "number",
                            "jsonPath": ".spec.autoscaling.targetGpuUtilization",
                        },
                        {
                            "name": "Ready",
                            "type": "string",
                            "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
                        },
                        {
                            "name": "Scaling",
                            "type": "string",
                            "jsonPath": '.status.conditions[?(@.type=="ScalingActive")].status',
                        },
                        {
                            "name": "Last",
                            "type": "string",
                            "priority": 1,
                            "jsonPath": ".status.lastDecision.reason",
                        },
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": (
                                "A clipline installation on GPU nodes: one GPU daemon per "
                                "GPU (or MIG slice) and autoscaled CPU workers per daemon."
                            ),
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema(),
                                "status": status_schema(),
                            },
                        }
                    },
                }
            ],
        },
    }


def crd_yaml() -> str:
    """``build_crd()`` rendered as the YAML file shipped in the chart."""
    header = (
        "# Generated by `clipline-operator crd` from clipline_operator.crd.build_crd();\n"
        "# do not edit by hand.\n"
    )
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=100)


def chart_crd_path() -> Path:
    """Where the chart keeps the CRD (relative to the repository)."""
    return (
        Path(__file__).resolve().parents[2]
        / "charts"
        / constants.PROJECT
        / "crds"
        / f"{CRD_NAME}.yaml"
    )


# ---------------------------------------------------------------------------
# Defaults and validation in Python.
# ---------------------------------------------------------------------------
def _default_into(value: Any, schema: Mapping[str, Any]) -> Any:
    if value is None:
        if "default" not in schema:
            return None
        value = copy.deepcopy(schema["default"])
    if isinstance(value, dict) and schema.get("type") == "object":
        props = schema.get("properties", {})
        out = dict(value)
        for key, sub in props.items():
            filled = _default_into(out.get(key), sub)
            if filled is not None:
                out[key] = filled
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        return [_default_into(item, schema["items"]) for item in value]
    return value


def with_defaults(spec: Mapping[str, Any]) -> JSON:
    """``spec`` with every schema default filled in (as the API server stores it)."""
    out = _default_into(dict(spec), spec_schema())
    assert isinstance(out, dict)
    return out


def _strip_k8s(schema: Any) -> Any:
    """A JSON-Schema view of an OpenAPI v3 schema (draft-4 style exclusive bounds)."""
    if isinstance(schema, dict):
        out = {k: _strip_k8s(v) for k, v in schema.items() if not k.startswith("x-kubernetes")}
        if out.pop("nullable", False) and "type" in out:
            out["type"] = [out["type"], "null"]
        if out.get("exclusiveMinimum") is True:
            out["exclusiveMinimum"] = out.pop("minimum")
        if "anyOf" in out and "pattern" in out:
            pattern = out.pop("pattern")
            out["anyOf"] = [
                dict(alt, pattern=pattern) if alt.get("type") == "string" else alt
                for alt in out["anyOf"]
            ]
        return out
    if isinstance(schema, list):
        return [_strip_k8s(v) for v in schema]
    return schema


def json_schema() -> JSON:
    """The CRD's ``openAPIV3Schema`` as a JSON Schema (Draft 2020-12) document."""
    root = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    out = _strip_k8s(root)
    assert isinstance(out, dict)
    return out


def _pod_problems(spec: Mapping[str, Any]) -> list[str]:
    """The CEL rules of the weights volume and of the pods' extras, in Python."""
    problems: list[str] = []
    models = spec["models"]
    weights = models.get("weights")
    if weights is not None:
        sources = [k for k in ("persistentVolumeClaim", "hostPath", "image") if k in weights]
        if len(sources) != 1:
            problems.append(
                "spec.models.weights: set exactly one of persistentVolumeClaim, hostPath and image"
            )
        if "weightsDir" in models:
            problems.append("spec.models: set weights or weightsDir, not both")
    for part in ("gpu", "workers"):
        section = spec[part]
        for item in section.get("env") or []:
            if item["name"].startswith("CLIPLINE_"):
                problems.append(
                    f"spec.{part}.env: {item['name']}: CLIPLINE_* settings go in spec.extraEnv"
                )
            if ("value" in item) == ("valueFrom" in item):
                problems.append(
                    f"spec.{part}.env: {item['name']}: set exactly one of value and valueFrom"
                )
        names = [v["name"] for v in section.get("extraVolumes") or []]
        for name in sorted(set(names) & set(RESERVED_VOLUMES)):
            problems.append(f"spec.{part}.extraVolumes: {name!r} is the operator's volume")
        for name in sorted({n for n in names if names.count(n) > 1}):
            problems.append(f"spec.{part}.extraVolumes: {name!r} appears twice")
        for mount in section.get("extraVolumeMounts") or []:
            if mount["name"] not in names:
                problems.append(
                    f"spec.{part}.extraVolumeMounts: no volume {mount['name']!r} in "
                    f"spec.{part}.extraVolumes"
                )
    return problems


class SpecError(ValueError):
    """A ClipPipeline spec the operator cannot act on (a permanent error)."""


def validate_spec(spec: Mapping[str, Any], *, name: str = "clipline") -> JSON:
    """Validate ``spec`` (schema + cross-field rules) and return it with defaults.

    Raises :class:`SpecError` with every problem found.
    """
    import jsonschema  # local: only the operator process and the tests need it

    validator = jsonschema.Draft202012Validator(_strip_k8s(spec_schema()))
    problems = [
        f"spec.{'.'.join(str(p) for p in err.absolute_path) or '<root>'}: {err.message}"
        for err in sorted(validator.iter_errors(dict(spec)), key=lambda e: list(e.path))
    ]
    full = with_defaults(spec)
    if not problems:
        scaling = full["autoscaling"]
        if scaling["minWorkersPerGpu"] > scaling["maxWorkersPerGpu"]:
            problems.append("spec.autoscaling: minWorkersPerGpu must not exceed maxWorkersPerGpu")
        problems.extend(_pod_problems(full))
        shm = full["sharedMemory"]
        if shm["slots"] * shm["slotBytes"] > MAX_ARENA_BYTES:
            problems.append("spec.sharedMemory: the arena (slots x slotBytes) exceeds 64 GiB")
        deployment = full.get("deployment") or name
        if not constants.DEPLOYMENT_RE.match(deployment):
            problems.append(
                f"spec.deployment: {deployment!r} is not a valid deployment name "
                "(1-40 lowercase letters, digits and '-'); set spec.deployment"
            )
    if problems:
        raise SpecError("; ".join(problems))
    return full


def deployment_name(spec: Mapping[str, Any], name: str) -> str:
    """The CLIPLINE_DEPLOYMENT value of a pipeline."""
    value = spec.get("deployment") or name
    return str(value)


# ---------------------------------------------------------------------------
# kopf's peering resources (two operator replicas never both act).
# ---------------------------------------------------------------------------
PEERING_GROUP: Final = "kopf.dev"


def build_peering_crds() -> list[JSON]:
    """kopf's ``ClusterKopfPeering`` and ``KopfPeering`` CRDs (``kopf.dev/v1``)."""
    out: list[JSON] = []
    for kind, scope in (("ClusterKopfPeering", "Cluster"), ("KopfPeering", "Namespaced")):
        plural = kind.lower() + "s"
        out.append(
            {
                "apiVersion": "apiextensions.k8s.io/v1",
                "kind": "CustomResourceDefinition",
                "metadata": {"name": f"{plural}.{PEERING_GROUP}"},
                "spec": {
                    "group": PEERING_GROUP,
                    "scope": scope,
                    "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
                    "versions": [
                        {
                            "name": "v1",
                            "served": True,
                            "storage": True,
                            "schema": {
                                "openAPIV3Schema": {
                                    "type": "object",
                                    "properties": {
                                        "status": {
                                            "type": "object",
                                            "x-kubernetes-preserve-unknown-fields": True,
                                        }
                                    },
                                }
                            },
                        }
                    ],
                },
            }
        )
    return out


def peering_object(name: str) -> JSON:
    """The ``ClusterKopfPeering`` the operator replicas coordinate through."""
    return {
        "apiVersion": f"{PEERING_GROUP}/v1",
        "kind": "ClusterKopfPeering",
        "metadata": {"name": name},
    }
