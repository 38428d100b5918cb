"""The per-job NetworkPolicy: which peer may reach which port of a job's pods (tests/fixtures/netpol.py).

The policy is rendered by the operator's pure builder and evaluated offline against the case table. These tests
do not prove that any node enforces the policy — ours does not (docs/security.md, "Ray network exposure").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from finetune_operator import builders, names
from finetune_operator.settings import Settings, SettingsError, load_settings
from finetune_trainer import spec as ftspec

from tests.fixtures import netpol
from tests.fixtures.netpol import ALL_PORTS, Peer, ReachCase

IDENT = names.JobIdentity(name=netpol.JOB, namespace=netpol.JOB_NAMESPACE, uid="0123abcd-0000-1111", attempt=3)
TARGETS = {
    "head": names.pod_labels(IDENT, role=names.ROLE_HEAD),
    "worker": names.pod_labels(IDENT, role=names.ROLE_WORKER, index=0),
}


def _reachable(policy: dict[str, Any], peer: Peer, target: dict[str, str]) -> frozenset[int]:
    return frozenset(
        port
        for port in ALL_PORTS
        if netpol.admits(policy, peer=peer, port=port, target_labels=target, policy_namespace=IDENT.namespace)
    )


def test_table_matches_the_pods_the_operator_builds() -> None:
    """The table's job pods carry the labels builders.py really puts on pods, so its cases are about them."""
    own = [c.peer for c in netpol.REACH_CASES if c.peer.name.startswith("own-")]
    assert own and all(netpol.JOB_POD_LABELS.items() <= p.labels.items() for p in own)
    assert netpol.JOB_POD_LABELS.items() <= TARGETS["worker"].items()
    job = ftspec.parse_spec({"model": {"uri": "hf://org/m"}, "dataset": {"train": "s3://b/t.csv"}})
    for pod in (
        builders.build_head_pod(job, settings=Settings(), ident=IDENT),
        builders.build_worker_pod(job, settings=Settings(), ident=IDENT, index=0),
    ):
        assert {p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]} <= set(ALL_PORTS)
    assert netpol.METRICS == builders.METRICS_PORT and netpol.DASHBOARD == builders.RAY_DASHBOARD_PORT


@pytest.mark.parametrize("target", TARGETS, ids=str)
@pytest.mark.parametrize("case", netpol.REACH_CASES, ids=lambda c: c.peer.name)
def test_who_reaches_which_port(case: ReachCase, target: str) -> None:
    policy = builders.build_network_policy(IDENT, settings=Settings(**netpol.SETTINGS_WITH_SCRAPERS))
    assert _reachable(policy, case.peer, TARGETS[target]) == case.allowed, case.why


@pytest.mark.parametrize("case", netpol.DEFAULT_SETTINGS_CASES, ids=lambda c: c.peer.name)
def test_default_settings_admit_only_the_jobs_own_pods(case: ReachCase) -> None:
    policy = builders.build_network_policy(IDENT, settings=Settings())
    assert _reachable(policy, case.peer, TARGETS["head"]) == case.allowed, case.why


def test_chart_settings_admit_the_operator_to_metrics_only() -> None:
    """What the chart configures (POD_NAMESPACE, the chart's pod labels) and nothing about scrapers."""
    settings = load_settings(
        [],
        {
            "POD_NAMESPACE": netpol.OPERATOR_NAMESPACE,
            "FINETUNE_OPERATOR_POD_LABELS": "app.kubernetes.io/name=finetune-operator",
        },
    )
    policy = builders.build_network_policy(IDENT, settings=settings)
    operator = Peer("operator", netpol.OPERATOR_NAMESPACE, {"app.kubernetes.io/name": "finetune-operator"})
    assert _reachable(policy, operator, TARGETS["head"]) == {netpol.METRICS}
    prometheus = Peer("prometheus", netpol.MONITORING_NAMESPACE, netpol.PROMETHEUS_LABELS)
    assert _reachable(policy, prometheus, TARGETS["head"]) == frozenset()


def test_scrapers_without_pod_labels_are_every_pod_of_those_namespaces() -> None:
    settings = Settings(metrics_scraper_namespace_labels={"monitoring": "true"})
    policy = builders.build_network_policy(IDENT, settings=settings)
    labelled = Peer("any", "obs", {"app": "x"}, namespace_labels={"monitoring": "true"})
    unlabelled = Peer("any", "obs", {"app": "x"})
    assert _reachable(policy, labelled, TARGETS["head"]) == {netpol.METRICS}
    assert _reachable(policy, unlabelled, TARGETS["head"]) == frozenset()


@dataclass(frozen=True)
class SettingsCase:
    name: str
    environ: dict[str, str]
    expected: dict[str, Any] | None = None
    error: str | None = None


SETTINGS_CASES = [
    SettingsCase(
        "scrapers from the chart's variables",
        {
            "FINETUNE_METRICS_SCRAPER_NAMESPACE_LABELS": "kubernetes.io/metadata.name=monitoring",
            "FINETUNE_METRICS_SCRAPER_POD_LABELS": "app.kubernetes.io/name=prometheus,app=p",
        },
        expected={
            "metrics_scraper_namespace_labels": {"kubernetes.io/metadata.name": "monitoring"},
            "metrics_scraper_pod_labels": {"app.kubernetes.io/name": "prometheus", "app": "p"},
        },
    ),
    SettingsCase("operator namespace from the downward API", {"POD_NAMESPACE": "ops"}, {"operator_namespace": "ops"}),
    SettingsCase("no namespace outside a cluster", {}, {"operator_namespace": None}),
    SettingsCase(
        "explicit operator namespace wins",
        {"POD_NAMESPACE": "ops", "FINETUNE_OPERATOR_NAMESPACE": "other"},
        {"operator_namespace": "other", "lease_namespace": "ops"},
    ),
    SettingsCase(
        "scraper pods without their namespaces",
        {"FINETUNE_METRICS_SCRAPER_POD_LABELS": "app=prometheus"},
        error="metrics_scraper_pod_labels needs metrics_scraper_namespace_labels",
    ),
    SettingsCase(
        "malformed labels",
        {"FINETUNE_METRICS_SCRAPER_NAMESPACE_LABELS": "monitoring"},
        error="FINETUNE_METRICS_SCRAPER_NAMESPACE_LABELS",
    ),
    SettingsCase("bad namespace name", {"FINETUNE_OPERATOR_NAMESPACE": "Ops_1"}, error="FINETUNE_OPERATOR_NAMESPACE"),
]


@pytest.mark.parametrize("case", SETTINGS_CASES, ids=lambda c: c.name)
def test_network_policy_settings(case: SettingsCase) -> None:
    if case.error:
        with pytest.raises(SettingsError, match=case.error):
            load_settings([], case.environ)
        return
    settings = load_settings([], case.environ)
    assert {k: getattr(settings, k) for k in case.expected or {}} == case.expected


# ---- the evaluator itself, on the documented semantics of networking.k8s.io/v1 --------------------------


@dataclass(frozen=True)
class SemanticsCase:
    name: str
    rule: dict[str, Any]
    peer: Peer
    port: int
    admitted: bool


ANYWHERE = Peer("p", "elsewhere", {"role": "x"})
HERE = Peer("p", "here", {"role": "x"})
SEMANTICS = [
    SemanticsCase("podSelector alone: own namespace only", {"from": [{"podSelector": {}}]}, ANYWHERE, 1, False),
    SemanticsCase("podSelector alone admits own namespace", {"from": [{"podSelector": {}}]}, HERE, 1, True),
    SemanticsCase("empty namespaceSelector: every namespace", {"from": [{"namespaceSelector": {}}]}, ANYWHERE, 1, True),
    SemanticsCase(
        "namespaceSelector AND podSelector in one peer",
        {"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"role": "y"}}}]},
        ANYWHERE,
        1,
        False,
    ),
    SemanticsCase(
        "namespace name label is always present",
        {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "elsewhere"}}}]},
        ANYWHERE,
        1,
        True,
    ),
    SemanticsCase("no from: every source", {"ports": [{"port": 1}]}, ANYWHERE, 1, True),
    SemanticsCase("ports restrict", {"ports": [{"port": 1}]}, ANYWHERE, 2, False),
    SemanticsCase("UDP entry is not TCP", {"ports": [{"port": 1, "protocol": "UDP"}]}, ANYWHERE, 1, False),
]


@pytest.mark.parametrize("case", SEMANTICS, ids=lambda c: c.name)
def test_evaluator_semantics(case: SemanticsCase) -> None:
    policy = {"spec": {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [case.rule]}}
    assert netpol.admits(policy, peer=case.peer, port=case.port, target_labels={}, policy_namespace="here") is (
        case.admitted
    )


def test_evaluator_refuses_what_it_does_not_implement() -> None:
    policy = {"spec": {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}]}}
    with pytest.raises(netpol.UnsupportedPolicyError):
        netpol.admits(policy, peer=HERE, port=1, target_labels={}, policy_namespace="here")


def test_a_pod_the_policy_does_not_select_is_not_isolated() -> None:
    policy = builders.build_network_policy(IDENT, settings=Settings())
    assert netpol.admits(policy, peer=ANYWHERE, port=netpol.DASHBOARD, target_labels={"app": "x"}, policy_namespace="x")
