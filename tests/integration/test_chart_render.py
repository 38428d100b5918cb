"""The Helm chart rendered offline: `helm lint`, the values schema, and the promises the chart makes.

Why these tests exist apart from the cluster tests: they run in seconds without a control plane and pin the
properties reviewers care about (non-root, read-only root filesystem, probes on the health port, least-privilege
RBAC with a justification per rule, CRD kept on uninstall, settings the operator really reads). They run the
pinned helm built by `make binaries`; the cluster tests in test_chart_cluster.py apply the same output for real.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import pytest
import yaml
from finetune_operator import builders, names, rbac
from finetune_operator.settings import ENV_PREFIX, Settings, load_settings
from finetune_trainer import contract, spec

from tests.fixtures.helm import CHART_DIR, by_kind, helm, render, template

# Value sets every structural test runs against: defaults, HA, namespaced mode, and everything optional on.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "ha": {"replicaCount": 2},
    "namespaced": {"watch.namespaces": ["team-a", "team-b"]},
    "everything": {
        "replicaCount": 2,
        "metrics.serviceMonitor.enabled": True,
        "metrics.podMonitor.enabled": True,
        "dashboards.enabled": True,
        "defaults.storage.endpoint": "http://minio.minio.svc:9000",
        "defaults.storage.credentialsSecret": "s3-creds",
        "defaults.outputBaseUri": "s3://models/",
        "logging.level": "DEBUG",
        "kueue.enabled": True,
    },
}


def _deployment(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = by_kind(objects, "Deployment")
    return deployment


def _container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = _deployment(objects)["spec"]["template"]["spec"]["containers"]
    return dict(container)


def _plain_env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_helm_lint_is_clean(values: dict[str, Any]) -> None:
    args = [f"{k}={v if not isinstance(v, list) else '{' + ','.join(v) + '}'}" for k, v in values.items()]
    set_args = [a for arg in args for a in ("--set", arg)]
    proc = helm("lint", "--strict", str(CHART_DIR), *set_args)
    assert "0 chart(s) failed" in proc.stdout, proc.stdout
    # Only the cosmetic icon hint is allowed; any WARNING or ERROR fails the test.
    problems = [line for line in proc.stdout.splitlines() if re.match(r"\[(WARNING|ERROR)\]", line)]
    assert not problems, proc.stdout


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_operator_pod_is_non_root_read_only_and_probed(values: dict[str, Any]) -> None:
    objects = render(values)
    pod = _deployment(objects)["spec"]["template"]["spec"]
    container = _container(objects)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    env = _plain_env(container)
    assert ports["health"] == int(env["FINETUNE_HEALTH_PORT"])
    assert ports["metrics"] == int(env["FINETUNE_METRICS_PORT"])


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_every_env_var_is_a_setting_the_operator_loads(values: dict[str, Any]) -> None:
    """The chart and finetune_operator.settings agree on names and formats: a typo would be silently ignored."""
    container = _container(render(values))
    env = _plain_env(container)
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    unknown = sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in known)
    assert not unknown, f"chart sets variables the operator does not read: {unknown}"
    fieldrefs = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"] if "valueFrom" in e}
    assert fieldrefs == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}
    settings = load_settings([], {**env, "POD_NAME": "fto-0", "POD_NAMESPACE": "finetune-system"})
    assert settings.identity == "fto-0"
    assert settings.lease_namespace == "finetune-system"
    assert list(settings.namespaces) == values.get("watch.namespaces", [])
    assert settings.leader_election is True


def test_operator_pod_labels_setting_matches_the_pods() -> None:
    """Job NetworkPolicies admit the operator by FINETUNE_OPERATOR_POD_LABELS: they must select the chart's pods."""
    objects = render()
    settings = load_settings([], _plain_env(_container(objects)))
    pod_labels = _deployment(objects)["spec"]["template"]["metadata"]["labels"]
    assert settings.operator_pod_labels
    assert settings.operator_pod_labels.items() <= pod_labels.items()


@dataclass
class RbacCase:
    name: str
    values: dict[str, Any]
    cluster_roles: int
    roles_in: set[str] = field(default_factory=set)


RBAC_CASES = [
    RbacCase("cluster-mode", {}, cluster_roles=1, roles_in={"finetune-system"}),
    RbacCase(
        "namespaced-mode",
        {"watch.namespaces": ["team-a", "team-b"]},
        cluster_roles=0,
        roles_in={"team-a", "team-b", "finetune-system"},
    ),
]


@pytest.mark.parametrize("case", RBAC_CASES, ids=lambda c: c.name)
def test_rbac_shape(case: RbacCase) -> None:
    objects = render(case.values)
    assert len(by_kind(objects, "ClusterRole")) == case.cluster_roles
    assert len(by_kind(objects, "ClusterRoleBinding")) == case.cluster_roles
    assert {r["metadata"]["namespace"] for r in by_kind(objects, "Role")} == case.roles_in
    assert {b["metadata"]["namespace"] for b in by_kind(objects, "RoleBinding")} == case.roles_in
    (sa,) = by_kind(objects, "ServiceAccount")
    for binding in by_kind(objects, "RoleBinding") + by_kind(objects, "ClusterRoleBinding"):
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "finetune-system"}
        ]


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_rbac_has_no_wildcards_and_no_secrets(values: dict[str, Any]) -> None:
    objects = render(values)
    for role in by_kind(objects, "ClusterRole") + by_kind(objects, "Role"):
        for rule in role["rules"]:
            for key in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert "*" not in rule.get(key, []), f"{role['metadata']['name']}: wildcard in {key}: {rule}"
            assert "secrets" not in rule["resources"], f"{role['metadata']['name']} grants Secrets: {rule}"
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), rule


def _triples(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


@pytest.mark.parametrize("values", [{}, {"watch.namespaces": ["team-a"]}], ids=["cluster", "namespaced"])
def test_rbac_is_exactly_what_the_operator_documents(values: dict[str, Any]) -> None:
    """finetune_operator.rbac is the tested source of truth (the operator's e2e runs under it); the chart matches."""
    objects = render(values)
    job_roles = by_kind(objects, "ClusterRole") + [
        r for r in by_kind(objects, "Role") if not r["metadata"]["name"].endswith("-leader-election")
    ]
    assert job_roles
    documented = _triples([r.manifest() for r in rbac.JOB_RULES])
    for role in job_roles:
        assert _triples(role["rules"]) == documented, role["metadata"]
    (lease,) = [r for r in by_kind(objects, "Role") if r["metadata"]["name"].endswith("-leader-election")]
    # Same verbs as documented; the chart additionally pins get/update to the operator's own Lease name.
    assert _triples(lease["rules"]) == _triples([r.manifest() for r in rbac.LEASE_RULES])


@pytest.mark.parametrize("values", [{}, {"watch.namespaces": ["team-a"]}], ids=["cluster", "namespaced"])
def test_kueue_value_turns_the_integration_on_and_grants_exactly_its_rbac(values: dict[str, Any]) -> None:
    off = render(values)
    assert _plain_env(_container(off))["FINETUNE_KUEUE_ENABLED"] == "false"
    for role in by_kind(off, "ClusterRole") + by_kind(off, "Role"):
        assert all("kueue.x-k8s.io" not in rule["apiGroups"] for rule in role["rules"]), role["metadata"]["name"]

    on = render({**values, "kueue.enabled": True})
    assert _plain_env(_container(on))["FINETUNE_KUEUE_ENABLED"] == "true"
    kueue_roles = [r for r in by_kind(on, "ClusterRole") if r["metadata"]["name"].endswith("-kueue")]
    (kueue_role,) = kueue_roles
    assert _triples(kueue_role["rules"]) == _triples([r.manifest() for r in rbac.KUEUE_CLUSTER_RULES])
    (kueue_binding,) = [b for b in by_kind(on, "ClusterRoleBinding") if b["metadata"]["name"].endswith("-kueue")]
    assert kueue_binding["roleRef"]["name"] == kueue_role["metadata"]["name"]
    job_roles = [r for r in by_kind(on, "ClusterRole") if r not in kueue_roles] + [
        r for r in by_kind(on, "Role") if not r["metadata"]["name"].endswith("-leader-election")
    ]
    documented = _triples([r.manifest() for r in (*rbac.JOB_RULES, *rbac.KUEUE_RULES)])
    for role in job_roles:
        assert _triples(role["rules"]) == documented, role["metadata"]


def test_every_rbac_rule_is_justified_by_a_comment() -> None:
    """A reviewer reads why each verb is needed next to the rule (templates/rbac.yaml)."""
    lines = (CHART_DIR / "templates" / "rbac.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        if line.lstrip().startswith("- apiGroups:"):
            assert lines[i - 1].lstrip().startswith("#"), f"rbac.yaml:{i + 1} has no comment justifying it"


def test_lease_rbac_is_limited_to_the_lease_the_operator_uses() -> None:
    objects = render({"leaderElection.leaseName": "my-lease"})
    env = _plain_env(_container(objects))
    (role,) = [r for r in by_kind(objects, "Role") if r["metadata"]["name"].endswith("-leader-election")]
    named = [r for r in role["rules"] if r.get("resourceNames")]
    assert named == [
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": [env["FINETUNE_LEASE_NAME"]],
            "verbs": ["get", "update"],
        }
    ]
    assert env["FINETUNE_LEASE_NAME"] == "my-lease"


def test_crd_is_a_template_kept_on_uninstall() -> None:
    (crd,) = by_kind(render(), "CustomResourceDefinition")
    assert crd["metadata"]["name"] == f"{names.PLURAL}.{names.GROUP}"
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert crd["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    assert not (CHART_DIR / "crds").exists(), "crds/ is never upgraded by helm; the CRD must stay a template"


def test_crd_toggles() -> None:
    assert not by_kind(render({"crds.install": False}), "CustomResourceDefinition")
    (crd,) = by_kind(render({"crds.keep": False}), "CustomResourceDefinition")
    assert "helm.sh/resource-policy" not in crd["metadata"].get("annotations", {})


def test_ha_adds_a_disruption_budget_and_surge_rollout() -> None:
    objects = render({"replicaCount": 2})
    (pdb,) = by_kind(objects, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert _deployment(objects)["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert not by_kind(render(), "PodDisruptionBudget")


def test_monitors_select_what_the_operator_labels() -> None:
    objects = render({"metrics.serviceMonitor.enabled": True, "metrics.podMonitor.enabled": True})
    (service,) = by_kind(objects, "Service")
    (service_monitor,) = by_kind(objects, "ServiceMonitor")
    assert service_monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert service_monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    (pod_monitor,) = by_kind(objects, "PodMonitor")
    selector = pod_monitor["spec"]["selector"]["matchLabels"]
    assert selector == {names.LABEL_MANAGED_BY: names.MANAGER, names.LABEL_ROLE: names.ROLE_HEAD}
    assert pod_monitor["spec"]["namespaceSelector"] == {"any": True}
    namespaced = render({"metrics.podMonitor.enabled": True, "watch.namespaces": ["team-a"]})
    (pod_monitor,) = by_kind(namespaced, "PodMonitor")
    assert pod_monitor["spec"]["namespaceSelector"] == {"matchNames": ["team-a"]}


def test_pod_monitor_port_is_the_head_pods_metrics_port() -> None:
    job = spec.parse_spec({"model": {"uri": "hf://org/model"}, "dataset": {"train": "s3://b/train.jsonl"}})
    head = builders.build_head_pod(
        job, settings=Settings(), ident=names.JobIdentity(name="j", namespace="ns", uid="0000-1111")
    )
    ports = {p["name"]: p["containerPort"] for p in head["spec"]["containers"][0]["ports"]}
    (pod_monitor,) = by_kind(render({"metrics.podMonitor.enabled": True}), "PodMonitor")
    assert ports[pod_monitor["spec"]["podMetricsEndpoints"][0]["port"]] == contract.DEFAULT_METRICS_PORT
    assert head["metadata"]["labels"][names.LABEL_JOB] == "j"  # relabelled to job_name for the dashboard


def test_dashboards_configmap_ships_every_dashboard() -> None:
    (cm,) = by_kind(render({"dashboards.enabled": True}), "ConfigMap")
    shipped = sorted(p.name for p in (CHART_DIR / "dashboards").glob("*.json"))
    assert shipped and sorted(cm["data"]) == shipped
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"


@dataclass
class BadValues:
    name: str
    values: dict[str, Any]
    message: str


BAD_VALUES = [
    BadValues("unknown key (typo)", {"watch.namespace": ["a"]}, "additional properties 'namespace' not allowed"),
    BadValues("HA without leader election", {"replicaCount": 2, "leaderElection.enabled": False}, "must be true"),
    BadValues("writable root filesystem", {"securityContext.readOnlyRootFilesystem": False}, "allOf"),
    BadValues("root user", {"podSecurityContext.runAsNonRoot": False}, "allOf"),
    BadValues("bad log level", {"logging.level": "LOUD"}, "logging/level"),
    BadValues("bad namespace name", {"watch.namespaces": ["Team_A"]}, "watch/namespaces/0"),
    BadValues("bad endpoint", {"defaults.storage.endpoint": "minio:9000"}, "defaults/storage/endpoint"),
    BadValues(
        "service monitor without service",
        {"metrics.serviceMonitor.enabled": True, "metrics.service.enabled": False},
        "needs metrics.service",
    ),
]


@pytest.mark.parametrize("case", BAD_VALUES, ids=lambda c: c.name)
def test_bad_values_are_rejected_with_the_field(case: BadValues) -> None:
    proc = template(case.values, check=False)
    assert proc.returncode != 0, f"accepted bad values {case.values}"
    assert case.message in proc.stderr, proc.stderr


def test_chart_app_version_matches_the_package() -> None:
    chart = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    pyproject = (CHART_DIR.parents[1] / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', pyproject, re.M)
    assert version and chart["appVersion"] == version.group(1)
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    assert values["defaults"]["trainerImage"].endswith(":" + chart["appVersion"])
