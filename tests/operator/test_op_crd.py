"""The ClipPipeline CRD: the chart's file is current, the CRD is a valid Kubernetes object,
and example ClipPipelines validate against the CRD's own schema (good ones pass, bad ones
fail, each for its stated reason)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from op_helpers import REPO

from clipline_core import constants
from clipline_operator import crd

K8S_VERSION = "1.35.0"
EXAMPLES = REPO / "operator" / "examples"
GOOD = sorted(EXAMPLES.glob("*.yaml"))
BAD = sorted((EXAMPLES / "bad").glob("*.yaml"))

#: The word each bad example's validation error must mention.
BAD_REASONS = {
    "missing-image.yaml": "image",
    "target-above-one.yaml": "targetGpuUtilization",
    "min-above-max.yaml": "minWorkersPerGpu",
    "unknown-backend.yaml": "backend",
    "typo-field.yaml": "maxWorkerPerNode",
    "tiny-arena.yaml": "slot",
    "redis-without-secret.yaml": "secretRef",
    "callbacks-without-secret-name.yaml": "callbacks.secretRef",
}


def _load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    return data


def test_chart_crd_file_is_up_to_date() -> None:
    path = crd.chart_crd_path()
    assert path == REPO / "charts" / "clipline" / "crds" / "clippipelines.clipline.dev.yaml"
    assert path.read_text() == crd.crd_yaml(), "run: clipline-operator crd --write"


def test_crd_is_a_valid_kubernetes_object() -> None:
    obj = yaml.safe_load(crd.crd_yaml())
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    version = obj["spec"]["versions"][0]
    assert obj["spec"]["group"] == constants.CRD_GROUP
    assert version["name"] == constants.CRD_VERSION
    assert version["subresources"] == {"status": {}}
    columns = {c["name"] for c in version["additionalPrinterColumns"]}
    assert {"Nodes", "Workers", "Ready", "Target", "Age"} <= columns
    for peering in crd.build_peering_crds():
        kubernetes_validate.validate(peering, K8S_VERSION, strict=True)


def _structural(schema: Any, path: str = "") -> list[str]:
    """Nodes violating Kubernetes' structural-schema rule (every node has a type)."""
    problems: list[str] = []
    if isinstance(schema, dict):
        has_type = "type" in schema or schema.get("x-kubernetes-int-or-string")
        if ("properties" in schema or "items" in schema) and not has_type:
            problems.append(path)
        for key in ("properties",):
            for name, sub in (schema.get(key) or {}).items():
                problems += _structural(sub, f"{path}.{name}")
        if isinstance(schema.get("items"), dict):
            problems += _structural(schema["items"], f"{path}[]")
        if isinstance(schema.get("additionalProperties"), dict):
            problems += _structural(schema["additionalProperties"], f"{path}{{}}")
    return problems


def test_schema_is_structural_with_defaults_inside_typed_nodes() -> None:
    root = crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert _structural(root) == []
    # Defaults must themselves validate (the API server rejects the CRD otherwise).
    full = crd.with_defaults({"image": "x", "redis": {"secretRef": {"name": "r"}}})
    jsonschema.Draft202012Validator(crd.json_schema()).validate({"spec": full})


@pytest.mark.parametrize("path", GOOD, ids=[p.name for p in GOOD])
def test_good_examples_validate(path: Path) -> None:
    doc = _load(path)
    assert doc["apiVersion"] == f"{constants.CRD_GROUP}/{constants.CRD_VERSION}"
    jsonschema.Draft202012Validator(crd.json_schema()).validate(doc)
    spec = crd.validate_spec(doc["spec"], name=doc["metadata"]["name"])
    assert spec["autoscaling"]["targetGpuUtilization"] == pytest.approx(0.95)


@pytest.mark.parametrize("path", BAD, ids=[p.name for p in BAD])
def test_bad_examples_are_rejected(path: Path) -> None:
    doc = _load(path)
    with pytest.raises(crd.SpecError) as err:
        crd.validate_spec(doc["spec"], name=doc["metadata"]["name"])
    assert BAD_REASONS[path.name] in str(err.value)
    if path.name != "min-above-max.yaml":  # a CEL rule: the API server checks it, not JSON Schema
        assert list(jsonschema.Draft202012Validator(crd.json_schema()).iter_errors(doc))


def test_every_bad_example_is_covered() -> None:
    assert {p.name for p in BAD} == set(BAD_REASONS)


def test_defaults_match_the_issue() -> None:
    spec = crd.with_defaults({"image": "x", "redis": {"secretRef": {"name": "r"}}})
    scaling = spec["autoscaling"]
    assert scaling["targetGpuUtilization"] == 0.95
    assert scaling["minWorkersPerGpu"] >= 1  # never zero by default
    assert scaling["prometheus"]["url"].startswith("http")
    assert spec["redis"]["secretRef"]["key"] == "url"
    assert spec["gpu"]["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_backends_are_the_daemons() -> None:
    """The CRD accepts exactly the GPU daemon's backends (one tuple, in constants)."""
    from gpu_service import backends

    enum = crd.spec_schema()["properties"]["models"]["properties"]["backend"]["enum"]
    assert tuple(enum) == constants.BACKENDS == backends.BACKENDS
    assert "onnx" not in enum
    for name in constants.BACKENDS:
        spec = {"image": "x", "redis": {"secretRef": {"name": "r"}}, "models": {"backend": name}}
        assert crd.validate_spec(spec)["models"]["backend"] == name


def test_decode_backends_are_the_workers() -> None:
    """spec.workers.decodeBackend: the workers' choices (one tuple, in constants)."""
    from workers import decoders

    prop = crd.spec_schema()["properties"]["workers"]["properties"]["decodeBackend"]
    assert tuple(prop["enum"]) == constants.DECODE_BACKEND_CHOICES == decoders.CHOICES
    assert prop["default"] == "opencv"
    base = {"image": "x", "redis": {"secretRef": {"name": "r"}}}
    assert crd.validate_spec(base)["workers"]["decodeBackend"] == "opencv"
    spec = {**base, "workers": {"decodeBackend": "nvdec"}}
    assert crd.validate_spec(spec)["workers"]["decodeBackend"] == "nvdec"
    with pytest.raises(crd.SpecError, match="decodeBackend"):
        crd.validate_spec({**base, "workers": {"decodeBackend": "ffmpeg"}})


def test_the_crd_does_not_import_torch() -> None:
    """The operator image path: the backend names come from constants, not the daemon."""
    code = (
        "import sys, clipline_core.constants, clipline_operator.crd, clipline_operator.builders; "
        "print(clipline_core.constants.BACKENDS); sys.exit('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr or "torch was imported"
    assert "tensorrt" in out.stdout


def test_deployment_name_must_fit_the_wire_format() -> None:
    spec = {"image": "x", "redis": {"secretRef": {"name": "r"}}}
    with pytest.raises(crd.SpecError, match=r"spec\.deployment"):
        crd.validate_spec(spec, name="Has.Dots.And.Caps")
    assert crd.validate_spec(dict(spec, deployment="ok-name"), name="Has.Dots")["deployment"] == (
        "ok-name"
    )
