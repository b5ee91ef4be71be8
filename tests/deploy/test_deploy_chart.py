"""The Helm chart: lint, render, validate every object, reject bad values.

Rendering and linting use Helm's Go SDK (``helm_python``); built-in objects are validated
with ``kubernetes-validate`` (strict: unknown fields fail) for the oldest supported and a
current Kubernetes version; the default ClipPipeline is validated with ``jsonschema``
against the CRD file the chart installs, then turned into the GPU-daemon and worker
Deployments (one pair per GPU) and the workers' PodDisruptionBudget by the operator's
real builders, which must validate too. No Kubernetes
API server runs here, so nothing is applied to a cluster.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import subprocess
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from deploylib import (
    CHART,
    KUBE_VERSIONS,
    NAMESPACE,
    RELEASE,
    by_kind,
    ci_variants,
    crd_openapi,
    crds,
    labels_match,
    objects,
    one,
    pod_templates,
    promtool,
    render,
)

from clipline import dashboards
from clipline_core import constants
from clipline_core.settings import ENV_PREFIX, Settings

VARIANTS = ci_variants()
CUSTOM_GROUPS = ("clipline.dev/", "monitoring.coreos.com/")
STANDARD_LABELS = (
    "helm.sh/chart",
    constants.LABEL_NAME,
    constants.LABEL_INSTANCE,
    constants.LABEL_MANAGED_BY,
    "app.kubernetes.io/version",
    constants.LABEL_COMPONENT,
)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: objects(render(values)) for name, values in VARIANTS.items()}


def test_ci_variants_exist() -> None:
    assert len(VARIANTS) >= 4, sorted(VARIANTS)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_lint_is_clean(variant: str) -> None:
    report = helm.lint(CHART, VARIANTS[variant], strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_object_is_valid_kubernetes(
    variant: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    objs = rendered[variant]
    assert objs
    for obj in objs:
        if obj["apiVersion"].startswith(CUSTOM_GROUPS):
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} on {version}: {exc}")
    unknown = {o["apiVersion"] for o in objs if "/" in o["apiVersion"]} - {
        "apps/v1",
        "policy/v1",
        "networking.k8s.io/v1",
        "rbac.authorization.k8s.io/v1",
        "clipline.dev/v1alpha1",
        "monitoring.coreos.com/v1",
    }
    assert not unknown


def test_crds_are_valid_and_match_constants() -> None:
    found = crds()
    assert [c["metadata"]["name"] for c in found] == [
        f"{constants.CRD_PLURAL}.{constants.CRD_GROUP}"
    ]
    for crd in found:
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(crd, version, strict=True)
        assert crd["spec"]["group"] == constants.CRD_GROUP
        assert crd["spec"]["names"]["kind"] == constants.CRD_KIND
        assert [v["name"] for v in crd["spec"]["versions"]] == [constants.CRD_VERSION]


def _pipelines(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return by_kind(objs, constants.CRD_KIND)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_default_pipeline_validates_against_the_crd(
    variant: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    objs = rendered[variant]
    pipelines = _pipelines(objs)
    create = VARIANTS[variant].get("pipeline", {}).get("create", True)
    assert len(pipelines) == (1 if create else 0)
    schema = dashboards.openapi_to_json_schema(crd_openapi(constants.CRD_KIND))
    validator = jsonschema.Draft7Validator(schema)
    for pipeline in pipelines:
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(pipeline)]
        assert not errors
        # The secret and the service account the pipeline names come with the release
        # (or are named explicitly as existing ones in the values).
        secret = pipeline["spec"]["redis"]["secretRef"]["name"]
        redis = VARIANTS[variant].get("redis", {})
        existing = redis.get("external", {}).get("existingSecret") or redis.get("internal", {}).get(
            "auth", {}
        ).get("existingSecret")
        assert secret == existing or secret in {
            s["metadata"]["name"] for s in by_kind(objs, "Secret")
        }
        callbacks = VARIANTS[variant].get("callbacks", {})
        if "callbacks" in pipeline["spec"]:
            ref = pipeline["spec"]["callbacks"]["secretRef"]
            assert ref["name"] == callbacks.get("existingSecret") or ref["name"] in {
                s["metadata"]["name"] for s in by_kind(objs, "Secret")
            }
        else:
            assert callbacks.get("generateSecret") is False and not callbacks.get("existingSecret")


def test_schema_rejects_what_the_crd_rejects() -> None:
    """A CRD-invalid ClipPipeline fails at ``helm template`` time, not at apply time."""
    bad = {"pipeline": {"autoscaling": {"targetGpuUtilization": 0}}}
    with pytest.raises(helm.HelmValuesError):
        render(bad)
    spec = objects(render({}))
    pipeline = _pipelines(spec)[0]
    pipeline["spec"]["autoscaling"]["targetGpuUtilization"] = 0
    schema = dashboards.openapi_to_json_schema(crd_openapi(constants.CRD_KIND))
    assert list(jsonschema.Draft7Validator(schema).iter_errors(pipeline))


def _operator_objects(pipeline: dict[str, Any]) -> list[dict[str, Any]]:
    """What the real operator builds from a rendered ClipPipeline for one GPU node."""
    from clipline_operator import builders, crd

    body = copy.deepcopy(pipeline)
    body["metadata"]["uid"] = "00000000-0000-0000-0000-000000000001"
    crd.validate_spec(body["spec"], name=body["metadata"]["name"])
    model = builders.Pipeline.from_body(body)
    return [
        builders.build_daemon_deployment(model, "gpu-node-1.example.internal", 0),
        builders.build_worker_deployment(model, "gpu-node-1.example.internal", 0, 2),
    ]


@pytest.mark.parametrize("variant", ["default", "monitoring-values", "small-values"])
def test_operator_builds_valid_objects_from_the_default_pipeline(
    variant: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    objs = rendered[variant]
    built = _operator_objects(_pipelines(objs)[0])
    service_accounts = {s["metadata"]["name"] for s in by_kind(objs, "ServiceAccount")}
    for obj in built:
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)
        pod = obj["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] in service_accounts
        for container in pod["containers"]:
            assert any(p["name"] == "metrics" for p in container["ports"])


def test_pod_monitor_selects_the_pods_the_operator_creates(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    objs = rendered["monitoring-values"]
    monitor = one(objs, "PodMonitor")
    built = _operator_objects(_pipelines(objs)[0])
    assert {o["kind"] for o in built} == {"Deployment"}
    port = monitor["spec"]["podMetricsEndpoints"][0]["port"]
    for obj in built:
        labels = obj["spec"]["template"]["metadata"]["labels"]
        assert labels_match(monitor["spec"]["selector"], labels), labels
        ports = [
            p["name"] for c in obj["spec"]["template"]["spec"]["containers"] for p in c["ports"]
        ]
        assert port in ports
    # The API and the operator pods are scraped by the ServiceMonitors, not twice; the
    # callback worker (no Service) by the PodMonitor, on its metrics port.
    for _, template in pod_templates(objs):
        labels = template["metadata"]["labels"]
        if labels[constants.LABEL_COMPONENT] == "callbacks":
            assert labels_match(monitor["spec"]["selector"], labels)
            (container,) = template["spec"]["containers"]
            assert port in [p["name"] for p in container["ports"]]
        else:
            assert not labels_match(monitor["spec"]["selector"], labels)


def test_service_monitors_find_their_service_ports(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    objs = rendered["monitoring-values"]
    monitors = by_kind(objs, "ServiceMonitor")
    assert {m["metadata"]["labels"][constants.LABEL_COMPONENT] for m in monitors} == {
        "api",
        "operator",
    }
    for monitor in monitors:
        services = [
            s
            for s in by_kind(objs, "Service")
            if labels_match(monitor["spec"]["selector"], s["metadata"]["labels"])
        ]
        assert len(services) == 1, monitor["metadata"]["name"]
        names = {p["name"] for p in services[0]["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in names
            component = [r for r in endpoint["relabelings"] if r["targetLabel"] == "component"]
            assert (
                component[0]["replacement"]
                == monitor["metadata"]["labels"][constants.LABEL_COMPONENT]
            )
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_selectors_select_their_pods(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for variant, objs in rendered.items():
        templates = [t["metadata"]["labels"] for _, t in pod_templates(objs)]
        for owner, template in pod_templates(objs):
            if owner["kind"] != "Pod":
                assert labels_match(owner["spec"]["selector"], template["metadata"]["labels"])
        for obj in by_kind(objs, "Service"):
            selector = {"matchLabels": obj["spec"]["selector"]}
            assert sum(labels_match(selector, t) for t in templates) == 1, (variant, obj)
        for pdb in by_kind(objs, "PodDisruptionBudget"):
            assert sum(labels_match(pdb["spec"]["selector"], t) for t in templates) == 1


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_standard_labels_everywhere(
    variant: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    for obj in rendered[variant]:
        labels = obj["metadata"].get("labels", {})
        missing = [k for k in STANDARD_LABELS if k not in labels]
        assert not missing, (obj["kind"], obj["metadata"]["name"], missing)
        assert labels[constants.LABEL_INSTANCE] == RELEASE
        assert len(obj["metadata"]["name"]) <= 63
    for _, template in pod_templates(rendered[variant]):
        assert constants.LABEL_COMPONENT in template["metadata"]["labels"]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_pods_are_locked_down_and_sized(
    variant: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    templates = list(pod_templates(rendered[variant]))
    assert templates
    for owner, template in templates:
        where = f"{owner['kind']}/{owner['metadata']['name']}"
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["runAsUser"] == constants.CONTAINER_UID, where
        assert pod["securityContext"]["runAsGroup"] == constants.CONTAINER_GID, where
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
        for container in pod["containers"] + pod.get("initContainers", []):
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert not sc["capabilities"].get("add"), where
            assert not sc.get("privileged"), where
            requests = container["resources"]["requests"]
            assert {"cpu", "memory"} <= set(requests), where
            assert "memory" in container["resources"]["limits"], where
            probes = {"livenessProbe", "readinessProbe"} & set(container)
            assert probes, f"{where}: container {container['name']} has no probe"


def test_operator_pods_get_gpu_limits(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The chart has no GPU pod itself: the daemon the operator builds holds the GPU."""
    daemonset = _operator_objects(_pipelines(rendered["default"])[0])[0]
    container = daemonset["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for _, template in pod_templates(rendered["default"]):
        for c in template["spec"]["containers"]:
            assert "nvidia.com/gpu" not in c["resources"].get("limits", {})


def test_pdbs_follow_values(rendered: dict[str, list[dict[str, Any]]]) -> None:
    default = {
        p["metadata"]["labels"][constants.LABEL_COMPONENT]
        for p in by_kind(rendered["default"], "PodDisruptionBudget")
    }
    assert default == {"api", "operator"}
    assert not by_kind(rendered["small-values"], "PodDisruptionBudget")
    objs = objects(render({"api": {"podDisruptionBudget": {"minAvailable": 1}}}))
    api = one(objs, "PodDisruptionBudget", "-api")
    assert api["spec"] == {**api["spec"], "minAvailable": 1} and "maxUnavailable" not in api["spec"]


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e for e in container.get("env", [])}


def test_env_names_are_settings_fields(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Every CLIPLINE_* variable the chart sets is read by a clipline process."""
    from clipline_operator import handlers

    fields = {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(Settings)}
    fields |= {v for k, v in vars(handlers).items() if k.startswith("ENV_")}
    fields |= {"CLIPLINE_API_URL", "CLIPLINE_API_KEY"}  # the CLI's (the helm test pod)
    seen = 0
    for objs in rendered.values():
        for _, template in pod_templates(objs):
            for container in template["spec"]["containers"]:
                for name in _env(container):
                    if name.startswith(ENV_PREFIX):
                        seen += 1
                        assert name in fields, name
    assert seen


def test_redis_internal_valkey_with_append_only_persistence(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    objs = rendered["default"]
    sts = one(objs, "StatefulSet", "-valkey")
    container = sts["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--requirepass") + 1] == "$(VALKEY_PASSWORD)"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert sts["spec"]["replicas"] == 1
    claim = sts["spec"]["volumeClaimTemplates"][0]
    assert claim["spec"]["resources"]["requests"]["storage"] == "8Gi"
    secret = one(objs, "Secret", "-redis")
    url = base64.b64decode(secret["data"]["url"]).decode()
    password = base64.b64decode(secret["data"]["password"]).decode()
    service = one(objs, "Service", "-valkey")["metadata"]["name"]
    assert url == f"redis://:{password}@{service}.{NAMESPACE}.svc:6379/0"
    assert len(password) == 32
    api = one(objs, "Deployment", "-api")["spec"]["template"]["spec"]["containers"][0]
    ref = _env(api)["CLIPLINE_REDIS_URL"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": secret["metadata"]["name"], "key": "url"}

    small = rendered["small-values"]
    sts = one(small, "StatefulSet", "-valkey")
    assert "volumeClaimTemplates" not in sts["spec"]
    assert "--requirepass" not in sts["spec"]["template"]["spec"]["containers"][0]["args"]
    url = base64.b64decode(one(small, "Secret", "-redis")["data"]["url"]).decode()
    assert url == f"redis://clips-valkey.{NAMESPACE}.svc:6379/0"


def test_redis_external_modes(rendered: dict[str, list[dict[str, Any]]]) -> None:
    existing = rendered["external-redis-values"]
    assert not by_kind(existing, "StatefulSet") and not by_kind(existing, "Secret")
    api = one(existing, "Deployment", "-api")["spec"]["template"]["spec"]["containers"][0]
    assert _env(api)["CLIPLINE_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "shared-redis",
        "key": "connection-url",
    }
    inline = rendered["external-url-values"]
    secret = one(inline, "Secret", "-redis")
    url = base64.b64decode(secret["data"]["url"]).decode()
    assert url == "rediss://:secret@redis.example.com:6380/2"
    assert not by_kind(inline, "StatefulSet")
    assert not by_kind(inline, "Role") and not by_kind(inline, "ClusterRole")
    operator = one(inline, "Deployment", "-operator")["spec"]["template"]["spec"]
    assert operator["serviceAccountName"] == "clipline-operator"


def test_prometheus_rule_is_the_generated_rule_file(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    rule = one(rendered["monitoring-values"], "PrometheusRule")
    rules = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    alerts = [r for r in rules if "alert" in r]
    assert [a["alert"] for a in alerts] == [a.name for a in dashboards.ALERTS]
    assert [r["record"] for r in rules if "record" in r] == [
        r.record for r in dashboards.RECORDINGS
    ]
    assert all(a["labels"]["team"] == "video" and a["labels"]["severity"] for a in alerts)
    # monitoring.prometheusRule.runbookUrl moves every runbook link, anchors kept.
    assert [a["annotations"]["runbook_url"] for a in alerts] == [
        "https://wiki.example.com/video/clipline-runbook#" + a.name.lower()
        for a in dashboards.ALERTS
    ]
    path = tmp_path / "rule.yaml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    proc = subprocess.run(
        [promtool(), "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(rules)} rules found" in proc.stdout
    assert not by_kind(rendered["default"], "PrometheusRule")


def test_dashboards_ship_as_sidecar_configmaps(rendered: dict[str, list[dict[str, Any]]]) -> None:
    maps = [
        c
        for c in by_kind(rendered["default"], "ConfigMap")
        if "grafana_dashboard" in c["metadata"]["labels"]
    ]
    assert len(maps) == len(dashboards.DASHBOARDS)
    shipped = {}
    for cm in maps:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        ((filename, text),) = cm["data"].items()
        shipped[filename] = json.loads(text)
    for dashboard in dashboards.DASHBOARDS:
        assert shipped[f"{dashboard.uid}.json"] == dashboards.dashboard_json(dashboard)
    monitoring = [
        c
        for c in by_kind(rendered["monitoring-values"], "ConfigMap")
        if c["metadata"].get("annotations")
    ]
    assert {c["metadata"]["namespace"] for c in monitoring} == {"monitoring"}
    assert not by_kind(rendered["external-redis-values"], "ConfigMap")


def test_release_name_that_is_no_deployment_name_fails_clearly() -> None:
    with pytest.raises(helm.HelmRenderError, match="deploymentName"):
        render({}, name="a-release-name-that-is-far-too-long-for-clipline")
    objs = objects(
        render({"deploymentName": "short"}, name="a-release-name-that-is-far-too-long-for-clipline")
    )
    assert _pipelines(objs)[0]["spec"]["deployment"] == "short"


BAD_VALUES: list[tuple[str, dict[str, Any], str]] = [
    ("unknown top-level key", {"replicas": 3}, "replicas"),
    ("typo in a nested key", {"api": {"ingres": {"enabled": True}}}, "ingres"),
    ("wrong type", {"api": {"replicaCount": "two"}}, "replicaCount"),
    ("unknown redis mode", {"redis": {"mode": "memcached"}}, "mode"),
    ("external redis without url", {"redis": {"mode": "external"}}, "external"),
    ("bad redis url", {"redis": {"mode": "external", "external": {"url": "http://x"}}}, "url"),
    ("two operators without peering", {"operator": {"replicaCount": 2}}, "peering"),
    ("too many operators", {"operator": {"replicaCount": 9, "peering": "p"}}, "replicaCount"),
    ("bad deployment name", {"deploymentName": "Bad_Name"}, "deploymentName"),
    ("bad digest", {"image": {"digest": "md5:abc"}}, "digest"),
    ("bad interval", {"monitoring": {"podMonitor": {"interval": 15}}}, "interval"),
    ("bad env name", {"api": {"extraEnv": [{"name": "PATH", "value": "/"}]}}, "name"),
    ("target above 1", {"pipeline": {"autoscaling": {"targetGpuUtilization": 1.5}}}, "target"),
    ("unknown backend", {"pipeline": {"models": {"backend": "tensorflow"}}}, "backend"),
    ("onnx is no backend", {"pipeline": {"models": {"backend": "onnx"}}}, "backend"),
    ("empty callback key", {"callbacks": {"existingSecretKey": ""}}, "existingSecretKey"),
    ("callbacks on the pipeline", {"pipeline": {"callbacks": {}}}, "callbacks"),
    ("unknown device", {"pipeline": {"gpu": {"device": "tpu"}}}, "device"),
    ("too few slots", {"pipeline": {"sharedMemory": {"slots": 1}}}, "slots"),
    ("unknown pipeline key", {"pipeline": {"replicas": 3}}, "replicas"),
    (
        "gpu limit in pipeline",
        {"pipeline": {"gpu": {"resources": {"limits": {"nvidia.com/gpu": 2}}}}},
        "nvidia.com/gpu",
    ),
    ("gpu resource without a domain", {"pipeline": {"gpu": {"resourceName": "gpu"}}}, "gpu"),
    ("no gpus per daemon", {"pipeline": {"gpu": {"resourceCount": 0}}}, "resourceCount"),
    ("negative daemons", {"pipeline": {"gpu": {"daemonsPerNode": -1}}}, "daemonsPerNode"),
    ("affinity typo", {"pipeline": {"gpu": {"affinity": {"nodeAfinity": {}}}}}, "nodeAfinity"),
    (
        "bad disruption budget",
        {"pipeline": {"workers": {"podDisruptionBudget": {"maxUnavailable": "half"}}}},
        "maxUnavailable",
    ),
    (
        "weights volume typo",
        {"pipeline": {"models": {"weights": {"pvc": {"claimName": "w"}}}}},
        "pvc",
    ),
    ("old autoscaling bound", {"pipeline": {"autoscaling": {"maxWorkersPerNode": 4}}}, "PerNode"),
    ("capability typo", {"securityContext": {"capabilites": {"drop": ["ALL"]}}}, "capabilites"),
]


@pytest.mark.parametrize(
    ("values", "needle"), [c[1:] for c in BAD_VALUES], ids=[c[0] for c in BAD_VALUES]
)
def test_schema_rejects_bad_values(values: dict[str, Any], needle: str) -> None:
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmValuesError) as caught:
            chart.validate_schema(chart.merge_values(values))
        with pytest.raises(helm.HelmValuesError):
            chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert needle in str(caught.value)


def _walk_schema(schema: dict[str, Any], path: str = "") -> list[str]:
    """Paths of object schemas without ``additionalProperties: false`` or a description."""
    problems = []
    if path and "description" not in schema:
        problems.append(f"{path}: no description")
    if "properties" in schema:
        if schema.get("additionalProperties") is not False:
            problems.append(f"{path}: additionalProperties is not false")
        for key, sub in schema["properties"].items():
            problems += _walk_schema(sub, f"{path}.{key}" if path else key)
    return problems


def test_values_schema_is_closed_and_described() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["additionalProperties"] is False
    assert _walk_schema(schema) == []


def test_every_value_is_documented() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    docs = dashboards.values_docs((CHART / "values.yaml").read_text())
    undocumented = []

    def walk(node: Any, path: str) -> None:
        if path in docs:
            assert docs[path], path
            return
        if isinstance(node, dict) and node:
            for key, sub in node.items():
                walk(sub, f"{path}.{key}" if path else key)
        else:
            undocumented.append(path)

    walk(values, "")
    assert undocumented == []
    assert docs["api.replicaCount"] == "Job API replicas."
    assert "pipeline.gpu.nodeSelector" in docs


def test_pipeline_defaults_equal_the_crd_defaults() -> None:
    from clipline_operator import crd

    values = yaml.safe_load((CHART / "values.yaml").read_text())["pipeline"]
    defaults = crd.with_defaults({"image": "x", "redis": {"secretRef": {"name": "x"}}})
    for field in dashboards.PIPELINE_SPEC_FIELDS:
        assert values[field] == defaults.get(field, []), field


def test_notes_tell_how_to_submit_a_job_and_open_the_dashboards() -> None:
    notes = render({})["clipline/templates/NOTES.txt"]
    assert f"port-forward service/{RELEASE}-clipline-api 8080:80" in notes
    assert f'"$CLIPLINE_API_URL{constants.API_PREFIX}/jobs"' in notes
    assert "/d/clipline-overview" in notes
    assert "/dev/shm" in notes and "128 MiB" in notes
    assert "kube_deployment_status_replicas" in notes
    assert f"get secret {RELEASE}-clipline-api-key -o jsonpath='{{.data.key}}'" in notes
    assert "Authorization: Bearer $CLIPLINE_API_KEY" in notes
    ingress = render(VARIANTS["monitoring-values"])["clipline/templates/NOTES.txt"]
    assert "CLIPLINE_API_URL=https://clips.example.com" in ingress
    assert "port-forward service" not in ingress.split("3. Dashboards")[0]


def _triples(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


CLUSTER_SCOPED = {"nodes", "namespaces", "customresourcedefinitions", "clusterkopfpeerings"}


@pytest.mark.parametrize("variant", ["default", "monitoring-values", "external-redis-values"])
def test_operator_rbac_equals_the_operators_own_rules(
    variant: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    from clipline_operator import rbac

    objs = rendered[variant]
    wanted = _triples(rbac.rbac_rules())
    cluster = _triples(one(objs, "ClusterRole")["rules"])
    roles = by_kind(objs, "Role")
    operator = one(objs, "Deployment", "-operator")["spec"]["template"]["spec"]
    args = operator["containers"][0]["args"]
    if VARIANTS[variant].get("operator", {}).get("clusterWide"):
        assert not roles and cluster == wanted
        assert not [a for a in args if a.startswith("--namespace")]
        return
    watched = sorted(a.split("=", 1)[1] for a in args if a.startswith("--namespace="))
    assert sorted(r["metadata"]["namespace"] for r in roles) == watched
    assert watched == sorted(
        VARIANTS[variant].get("operator", {}).get("watchNamespaces", [NAMESPACE])
    )
    for role in roles:
        namespaced = _triples(role["rules"])
        assert cluster | namespaced == wanted
        assert not cluster & namespaced
        assert {r for _, r, _ in cluster} <= CLUSTER_SCOPED
        assert not {r for _, r, _ in namespaced} & CLUSTER_SCOPED
    bindings = by_kind(objs, "RoleBinding") + by_kind(objs, "ClusterRoleBinding")
    assert len(bindings) == len(roles) + 1
    for binding in bindings:
        assert binding["subjects"] == [
            {
                "kind": "ServiceAccount",
                "name": operator["serviceAccountName"],
                "namespace": NAMESPACE,
            }
        ]


def test_operator_peering_and_replicas() -> None:
    objs = objects(render(VARIANTS["monitoring-values"]))
    deployment = one(objs, "Deployment", "-operator")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    assert _env(container)["CLIPLINE_OPERATOR_PEERING"]["value"] == "clipline"
    assert "--standalone" not in container["args"]
    default = one(objects(render({})), "Deployment", "-operator")
    assert default["spec"]["strategy"]["type"] == "Recreate"
    assert "--standalone" in default["spec"]["template"]["spec"]["containers"][0]["args"]
    with pytest.raises(helm.HelmValuesError, match="peering"):
        render({"operator": {"replicaCount": 2}})


def _b64(text: str) -> str:
    return base64.b64decode(text).decode()


def test_generated_api_key_is_what_the_api_accepts(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    from clipline.api.auth import KeyRing, parse_entry

    objs = rendered["default"]
    secret = one(objs, "Secret", "-api-key")
    key, entries = _b64(secret["data"]["key"]), _b64(secret["data"]["keys"])
    (entry,) = entries.splitlines()
    assert entry.startswith("default:") and key.startswith("clk_") and len(key) == 47
    ring = KeyRing([parse_entry(entry)])
    assert ring.authenticate(key) is not None
    assert ring.authenticate(key + "x") is None
    pod = one(objs, "Deployment", "-api")["spec"]["template"]["spec"]
    env = _env(pod["containers"][0])
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "api-keys")
    volume = next(v for v in pod["volumes"] if v["name"] == "api-keys")
    assert env["CLIPLINE_API_KEY_FILE"]["value"] == f"{mount['mountPath']}/keys"
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    assert "CLIPLINE_API_KEYS" not in env


def test_api_key_alternatives(rendered: dict[str, list[dict[str, Any]]]) -> None:
    from clipline.api.auth import parse_entry

    small = rendered["small-values"]
    assert not [s for s in by_kind(small, "Secret") if s["metadata"]["name"].endswith("api-key")]
    env = _env(one(small, "Deployment", "-api")["spec"]["template"]["spec"]["containers"][0])
    assert "CLIPLINE_API_KEY_FILE" not in env
    (entry,) = env["CLIPLINE_API_KEYS"]["value"].split(",")
    assert parse_entry(entry).scopes == {"submit", "read"}
    existing = rendered["external-redis-values"]
    pod = one(existing, "Deployment", "-api")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "api-keys")
    assert volume["secret"]["secretName"] == "clipline-api-keys"
    with pytest.raises(helm.HelmRenderError, match="API keys"):
        render({"api": {"auth": {"generateKey": False}}})


def test_chart_app_version_is_the_package_version() -> None:
    import tomllib

    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((CHART.parents[1] / "pyproject.toml").read_text())["project"]
    assert chart["appVersion"] == project["version"]
    assert chart["kubeVersion"].startswith(f">={KUBE_VERSIONS[0]}.")


# ---------------------------------------------------------------------------
# Completion callbacks: one signing secret for the API and the workers.
# ---------------------------------------------------------------------------
CALLBACK_ENV = ENV_PREFIX + "CALLBACK_SECRET"


def _resolve_env(
    container: dict[str, Any], objs: list[dict[str, Any]], existing: dict[str, dict[str, str]]
) -> dict[str, str]:
    """The container's environment as the kubelet would set it (secretKeyRef resolved
    against the rendered Secrets, then ``existing`` ones; fieldRefs left out)."""
    secrets = {s["metadata"]["name"]: s for s in by_kind(objs, "Secret")}
    out: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            out[item["name"]] = item["value"]
            continue
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        if ref is None:
            continue
        if ref["name"] in secrets:
            out[item["name"]] = _b64(secrets[ref["name"]]["data"][ref["key"]])
        else:
            out[item["name"]] = existing[ref["name"]][ref["key"]]
    return out


def _api_container(objs: list[dict[str, Any]]) -> dict[str, Any]:
    container: dict[str, Any] = one(objs, "Deployment", "-api")["spec"]["template"]["spec"][
        "containers"
    ][0]
    return container


def test_generated_callback_secret_signs_what_receivers_verify(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """The default install: the generated secret reaches the API and, through the
    ClipPipeline and the operator's real builders, the workers (not the daemon); a
    callback the workers sign verifies with the secret read as NOTES.txt says."""
    from clipline_core import signing

    objs = rendered["default"]
    secret = one(objs, "Secret", "-callback-secret")
    name = secret["metadata"]["name"]
    assert name == f"{RELEASE}-clipline-callback-secret"
    value = _b64(secret["data"]["secret"])
    assert len(value) >= 32 and value.isalnum()  # no comma: one secret, not a rotation list
    ref = {"name": name, "key": "secret"}
    assert _env(_api_container(objs))[CALLBACK_ENV]["valueFrom"]["secretKeyRef"] == ref
    assert _pipelines(objs)[0]["spec"]["callbacks"] == {"secretRef": ref}

    daemon, workers = _operator_objects(_pipelines(objs)[0])
    assert CALLBACK_ENV not in _env(daemon["spec"]["template"]["spec"]["containers"][0])
    worker_env = _resolve_env(workers["spec"]["template"]["spec"]["containers"][0], objs, {})
    api_env = _resolve_env(_api_container(objs), objs, {})
    worker = Settings.from_env(worker_env)
    api = Settings.from_env(api_env)
    assert worker.callback_secret == api.callback_secret == value
    body = b'{"id": "evt_1", "event": "job.succeeded"}'
    header = signing.sign(signing.split_secrets(worker.callback_secret), body)
    signing.verify(value, body, header)
    with pytest.raises(signing.SignatureError):
        signing.verify(value[:-1], body, header)

    notes = render({})["clipline/templates/NOTES.txt"]
    assert f"get secret {name} -o jsonpath='{{.data.secret}}' | base64 -d" in notes
    annotations = one(objs, "Deployment", "-api")["spec"]["template"]["metadata"]["annotations"]
    assert "checksum/callback-secret" in annotations


def test_callback_secret_alternatives(rendered: dict[str, list[dict[str, Any]]]) -> None:
    from clipline_operator import crd

    # An existing Secret (external-url-values): nothing generated, both read it.
    objs = rendered["external-url-values"]
    assert not [s for s in by_kind(objs, "Secret") if "callback" in s["metadata"]["name"]]
    ref = {"name": "clipline-callbacks", "key": "hmac.key"}
    assert _env(_api_container(objs))[CALLBACK_ENV]["valueFrom"]["secretKeyRef"] == ref
    pipeline = _pipelines(objs)[0]
    assert pipeline["spec"]["callbacks"]["secretRef"] == ref
    assert crd.validate_spec(pipeline["spec"])["callbacks"]["secretRef"] == ref
    _, workers = _operator_objects(pipeline)
    existing = {"clipline-callbacks": {"hmac.key": "new-secret,old-secret"}}
    env = _resolve_env(workers["spec"]["template"]["spec"]["containers"][0], objs, existing)
    assert Settings.from_env(env).callback_secret == "new-secret,old-secret"
    notes = render(VARIANTS["external-url-values"])["clipline/templates/NOTES.txt"]
    assert "get secret clipline-callbacks -o jsonpath='{.data.hmac\\.key}'" in notes
    only_api = rendered["external-redis-values"]  # no ClipPipeline, every Secret existing
    assert _env(_api_container(only_api))[CALLBACK_ENV]["valueFrom"]["secretKeyRef"] == {
        "name": "clipline-callbacks",
        "key": "secret",
    }

    # Callbacks off (small-values): no Secret, no env, no ClipPipeline field.
    objs = rendered["small-values"]
    assert not [s for s in by_kind(objs, "Secret") if "callback" in s["metadata"]["name"]]
    assert CALLBACK_ENV not in _env(_api_container(objs))
    assert "callbacks" not in _pipelines(objs)[0]["spec"]
    notes = render(VARIANTS["small-values"])["clipline/templates/NOTES.txt"]
    assert 'refuses jobs with a "callback_url"' in notes


# ---------------------------------------------------------------------------
# The `node` label the operator's queries and the per-node panels group by.
# ---------------------------------------------------------------------------
NODE_RELABEL = {
    "sourceLabels": ["__meta_kubernetes_pod_node_name"],
    "targetLabel": constants.LABEL_NODE_METRIC,
}


def test_monitors_give_series_the_pods_node(rendered: dict[str, list[dict[str, Any]]]) -> None:
    from clipline_operator import prom

    assert prom.NODE_LABEL == constants.LABEL_NODE_METRIC == "node"
    assert f"by ({prom.NODE_LABEL}, " in prom.DEFAULT_UTILIZATION_QUERY
    objs = rendered["monitoring-values"]
    (endpoint,) = one(objs, "PodMonitor")["spec"]["podMetricsEndpoints"]
    # The exporter's own `node` (the daemon's) wins; every other series gets the pod's.
    assert endpoint["honorLabels"] is True
    assert NODE_RELABEL in endpoint["relabelings"]
    monitors = {
        m["metadata"]["labels"][constants.LABEL_COMPONENT]: m["spec"]["endpoints"][0]
        for m in by_kind(objs, "ServiceMonitor")
    }
    assert monitors["api"]["honorLabels"] is True
    assert NODE_RELABEL in monitors["api"]["relabelings"]
    # The operator's `node` label names the GPU node a value is about: never overwritten.
    assert not [
        r
        for r in monitors["operator"]["relabelings"]
        if r.get("targetLabel") == constants.LABEL_NODE_METRIC
    ]


def test_object_store_values_reach_the_api_and_only_the_workers(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """``artifacts.store=s3``: the API and the workers share the bucket's settings; the
    access key pair comes from the existing Secret, to the API and the workers only."""
    objs = rendered["objectstore-values"]
    api = one(objs, "Deployment", "-api")["spec"]["template"]["spec"]["containers"][0]
    env = _env(api)
    assert env["CLIPLINE_ARTIFACT_STORE"]["value"] == "s3"
    assert env["CLIPLINE_S3_BUCKET"]["value"] == "clipline-clips"
    assert env["CLIPLINE_S3_PUBLIC_ENDPOINT_URL"]["value"] == "https://clips.example.com"
    assert env["CLIPLINE_ARTIFACT_TTL_S"]["value"] == "43200"
    assert env["CLIPLINE_S3_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {
        "name": "clipline-s3",
        "key": "access-key-id",
    }
    pipeline = _pipelines(objs)[0]
    assert pipeline["spec"]["artifacts"]["secretRef"]["name"] == "clipline-s3"
    daemonset, workers = _operator_objects(pipeline)
    worker_env = _env(workers["spec"]["template"]["spec"]["containers"][0])
    daemon_env = _env(daemonset["spec"]["template"]["spec"]["containers"][0])
    assert worker_env["CLIPLINE_S3_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "clipline-s3",
        "key": "secret-access-key",
    }
    for name in ("CLIPLINE_ARTIFACT_STORE", "CLIPLINE_S3_BUCKET", "CLIPLINE_S3_ENDPOINT_URL"):
        assert worker_env[name]["value"] == env[name]["value"], name
    assert "CLIPLINE_S3_SECRET_ACCESS_KEY" not in daemon_env
    assert "CLIPLINE_S3_ACCESS_KEY_ID" not in daemon_env
    for _, template in pod_templates(objs):
        for container in template["spec"]["containers"]:
            assert "secret-access-key" not in json.dumps(
                [e for e in container.get("env", []) if "value" in e]
            )
    assert (
        "s3://clipline-clips/highlights"
        in render(VARIANTS["objectstore-values"])["clipline/templates/NOTES.txt"]
    )

    default = _env(
        one(rendered["default"], "Deployment", "-api")["spec"]["template"]["spec"]["containers"][0]
    )
    assert default["CLIPLINE_ARTIFACT_STORE"]["value"] == "local"
    assert "CLIPLINE_S3_ACCESS_KEY_ID" not in default
    with pytest.raises(helm.HelmError):  # no bucket
        render({"artifacts": {"store": "s3"}})
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError):
        chart.validate_schema(chart.merge_values({"artifacts": {"store": "nfs"}}))


# ---------------------------------------------------------------------------
# GPU scheduling: one daemon per GPU, the pods' scheduling values, weights, MIG.
# ---------------------------------------------------------------------------
GPU_NODE = "gpu-node-1.example.internal"
PIPELINE_VARIANTS = sorted(
    v for v in VARIANTS if VARIANTS[v].get("pipeline", {}).get("create", True)
)


def _model(pipeline: dict[str, Any]) -> Any:
    from clipline_operator import builders

    body = copy.deepcopy(pipeline)
    body["metadata"]["uid"] = "00000000-0000-0000-0000-000000000001"
    return builders.Pipeline.from_body(body)


@pytest.mark.parametrize("variant", PIPELINE_VARIANTS)
def test_operator_objects_of_every_variant_are_valid(
    variant: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    """Every variant's ClipPipeline, through the real builders, on an 8-GPU node."""
    from clipline_operator import builders

    model = _model(_pipelines(rendered[variant])[0])
    allocatable = {"cpu": "96", model.spec["gpu"]["resourceName"] or "none": "8"}
    gpus = builders.gpus_on_node(model, allocatable)
    assert gpus == (8 if model.spec["gpu"]["resourceName"] else 1)
    built = [builders.build_worker_pdb(model)]
    for gpu in range(gpus):
        built.append(builders.build_daemon_deployment(model, GPU_NODE, gpu))
        built.append(builders.build_worker_deployment(model, GPU_NODE, gpu, 2))
    image_volume = "image" in (model.spec["models"].get("weights") or {})
    for obj in built:
        for version in KUBE_VERSIONS[1:] if image_volume else KUBE_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)
    arenas = {
        v["hostPath"]["path"]
        for obj in built[1::2]
        for v in obj["spec"]["template"]["spec"]["volumes"]
        if v["name"] == "arena"
    }
    assert len(arenas) == gpus  # every daemon on the node has its own arena


def test_multigpu_values_reach_the_gpu_pods(rendered: dict[str, list[dict[str, Any]]]) -> None:
    from clipline_operator import builders

    values = VARIANTS["multigpu-values"]["pipeline"]
    model = _model(_pipelines(rendered["multigpu-values"])[0])
    daemon = builders.build_daemon_deployment(model, GPU_NODE, 5)
    workers = builders.build_worker_deployment(model, GPU_NODE, 5, 3)
    pod = daemon["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["priorityClassName"] == "clipline-gpu"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    preferred = pod["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert (
        preferred
        == values["gpu"]["affinity"]["nodeAffinity"][
            "preferredDuringSchedulingIgnoredDuringExecution"
        ]
    )
    meta = daemon["spec"]["template"]["metadata"]
    assert meta["labels"]["team"] == "video" and meta["labels"][constants.LABEL_GPU] == "5"
    assert meta["annotations"]["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"
    env = _env(container)
    assert env["CUDA_MODULE_LOADING"]["value"] == "LAZY"
    assert env["CLIPLINE_GPU_INDEX"]["value"] == "5"
    assert env["CLIPLINE_BACKEND"]["value"] == "tensorrt"
    # Weights: the PVC, read-only, at CLIPLINE_WEIGHTS_DIR; a cache volume for engines.
    weights = next(v for v in pod["volumes"] if v["name"] == "weights")
    assert weights["persistentVolumeClaim"] == {"claimName": "clipline-weights", "readOnly": True}
    mount = next(m for m in container["volumeMounts"] if m["name"] == "weights")
    assert mount["readOnly"] is True and mount["subPath"] == "v3"
    assert env["CLIPLINE_WEIGHTS_DIR"]["value"] == mount["mountPath"]
    cache = next(m for m in container["volumeMounts"] if m["name"] == "engines")
    assert env["CLIPLINE_ENGINE_CACHE_DIR"]["value"] == cache["mountPath"]
    # Warm-up: the startup probe waits an hour for TensorRT engines.
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/readyz"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 3600
    # Workers: their own priority class, grace from the longer job limit, no weights.
    wpod = workers["spec"]["template"]["spec"]
    assert wpod["priorityClassName"] == "clipline-cpu"
    assert "runtimeClassName" not in wpod
    assert wpod["terminationGracePeriodSeconds"] == 900 + builders.WORKER_DRAIN_MARGIN_S
    assert "weights" not in str(wpod["volumes"])
    assert wpod["affinity"]["podAntiAffinity"] == values["workers"]["affinity"]["podAntiAffinity"]
    assert builders.build_worker_pdb(model)["spec"]["maxUnavailable"] == 4


def test_mig_values_run_one_daemon_per_slice(rendered: dict[str, list[dict[str, Any]]]) -> None:
    from clipline_operator import builders

    model = _model(_pipelines(rendered["mig-values"])[0])
    # A node with one A100 in 7 slices, the full-GPU resource at 0 under MIG.
    allocatable = {"cpu": "32", "nvidia.com/gpu": "0", "nvidia.com/mig-1g.10gb": "7"}
    assert builders.gpus_on_node(model, allocatable) == 7
    daemon = builders.build_daemon_deployment(model, GPU_NODE, 6)
    pod = daemon["spec"]["template"]["spec"]
    limits = pod["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/mig-1g.10gb"] == "1" and "nvidia.com/gpu" not in limits
    # Helm merges maps: the default nvidia.com/gpu.present label stays selected too.
    assert pod["nodeSelector"] == {
        "nvidia.com/gpu.present": "true",
        "nvidia.com/mig.config": "all-1g.10gb",
    }
    weights = next(v for v in pod["volumes"] if v["name"] == "weights")
    assert weights["hostPath"] == {"path": "/opt/clipline/weights", "type": "Directory"}
    assert _env(pod["containers"][0])["CLIPLINE_WEIGHTS_DIR"]["value"] == "/weights"
    # 32 CPUs, 7 daemons at 500m: 57 half-CPU worker pods shared by the slices.
    assert builders.workers_cpu_cap(model, "32", daemons=7) == 57


def test_pod_monitor_labels_series_with_their_gpu(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    from clipline_operator import prom

    (endpoint,) = one(rendered["monitoring-values"], "PodMonitor")["spec"]["podMetricsEndpoints"]
    meta = "__meta_kubernetes_pod_label_" + constants.LABEL_GPU.replace(".", "_").replace("/", "_")
    assert {"sourceLabels": [meta], "targetLabel": constants.LABEL_GPU_METRIC} in endpoint[
        "relabelings"
    ]
    assert f"by ({prom.NODE_LABEL}, {prom.GPU_LABEL})" in prom.DEFAULT_UTILIZATION_QUERY
