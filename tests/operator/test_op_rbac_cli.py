"""The least-privilege RBAC rules cover exactly what the operator touches, and the CLI's
manifest commands print what the package builds."""

from __future__ import annotations

import io
from contextlib import redirect_stdout

import kubernetes_validate
import yaml

from clipline_core import constants
from clipline_operator import cli, crd, rbac


def _verbs(group: str, resource: str) -> set[str]:
    out: set[str] = set()
    for rule in rbac.rbac_rules():
        if group in rule["apiGroups"] and resource in rule["resources"]:
            out |= set(rule["verbs"])
    return out


def test_cluster_role_is_valid() -> None:
    kubernetes_validate.validate(rbac.cluster_role(), "1.35.0", strict=True)


def test_rules_cover_the_operator_and_no_more() -> None:
    assert _verbs(constants.CRD_GROUP, constants.CRD_PLURAL) >= {"get", "list", "watch", "patch"}
    assert "patch" in _verbs(constants.CRD_GROUP, f"{constants.CRD_PLURAL}/status")
    assert _verbs("apps", "deployments") >= {"get", "list", "create", "update", "patch", "delete"}
    assert not _verbs("apps", "daemonsets")  # the GPU daemons are Deployments, one per GPU
    pdb = _verbs("policy", "poddisruptionbudgets")
    assert pdb >= {"get", "create", "update", "patch", "delete"}
    assert _verbs("", "nodes") == {"get", "list", "watch"}
    assert "create" in _verbs("", "events")
    assert "patch" in _verbs("kopf.dev", "clusterkopfpeerings")
    everything = {r for rule in rbac.rbac_rules() for r in rule["resources"]}
    assert not everything & {"secrets", "pods", "*", "configmaps"}
    assert all("*" not in rule["verbs"] for rule in rbac.rbac_rules())


def _run(*args: str) -> str:
    out = io.StringIO()
    with redirect_stdout(out):
        assert cli.main(list(args)) == 0
    return out.getvalue()


def test_cli_crd_and_rbac() -> None:
    assert yaml.safe_load(_run("crd")) == crd.build_crd()
    peering = list(yaml.safe_load_all(_run("crd", "--peering")))
    assert {d["spec"]["names"]["kind"] for d in peering} == {"ClusterKopfPeering", "KopfPeering"}
    assert yaml.safe_load(_run("rbac"))["rules"] == rbac.rbac_rules()
