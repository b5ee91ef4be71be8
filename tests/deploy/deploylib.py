"""Shared helpers of the deployment tests: chart paths, rendering, object walking.

The chart is rendered with Helm's own Go SDK (``helm_python``) exactly as ``helm
template`` would, offline (no Kubernetes API server runs here: ``lookup`` returns nothing).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "clipline"
CI_DIR = CHART / "ci"
RELEASE = "demo"
NAMESPACE = "video"
#: Kubernetes versions every rendered object must be valid for: the chart's oldest
#: supported minor (Chart.yaml kubeVersion) and the newest kubernetes-validate knows.
KUBE_VERSIONS = ("1.27", ".".join(kubernetes_validate.utils.latest_version().split(".")[:2]))


def ci_variants() -> dict[str, dict[str, Any]]:
    """``{"default": {}, "<ci file stem>": values, ...}``."""
    out: dict[str, dict[str, Any]] = {"default": {}}
    for path in sorted(CI_DIR.glob("*-values.yaml")):
        out[path.stem] = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return out


def render(
    values: dict[str, Any] | None = None,
    *,
    name: str = RELEASE,
    namespace: str = NAMESPACE,
) -> dict[str, str]:
    """Rendered templates by path (``clipline/templates/x.yaml``), NOTES.txt included."""
    with helm.Chart.load(CHART) as chart:
        return chart.render(values or {}, name=name, namespace=namespace, is_install=True)


def objects(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """Every Kubernetes object of a render (NOTES.txt excluded)."""
    out: list[dict[str, Any]] = []
    for path, text in sorted(rendered.items()):
        if not path.endswith((".yaml", ".yml")):
            continue
        out.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return out


def by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    found = [o for o in by_kind(objs, kind) if o["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"expected one {kind} *{name_suffix}, got {len(found)}"
    return found[0]


def pod_templates(objs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """``(owner object, pod template)`` of every workload; a bare Pod (the ``helm test``
    hook) is its own template."""
    for obj in objs:
        if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield obj, obj["spec"]["template"]
        elif obj["kind"] == "Pod":
            yield obj, obj


def crds() -> list[dict[str, Any]]:
    """The CRDs Helm installs from the chart's ``crds/`` (``render`` leaves them out)."""
    with helm.Chart.load(CHART) as chart:
        return [doc for item in chart.crds for doc in yaml.safe_load_all(item["data"]) if doc]


def crd_openapi(kind: str) -> dict[str, Any]:
    for crd in crds():
        if crd["spec"]["names"]["kind"] == kind:
            schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
            return schema
    raise AssertionError(f"no CRD for {kind}")


def labels_match(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a LabelSelector (matchLabels + matchExpressions) selects ``labels``."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is not installed (Debian package prometheus)"
    return path
