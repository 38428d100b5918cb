"""The chart's security values rendered offline: the admission policy's shape per value, the scrapers' settings.

test_admission_policy.py applies the same rendered policy to the real API server; here every value's effect on
the rendered objects is pinned in seconds, without a control plane, and bad values fail at `helm template`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from finetune_operator import builders, names
from finetune_operator.settings import load_settings

from tests.fixtures.helm import by_kind, render, template

POLICY, BINDING = "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"


def _policy(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    objects = render(values)
    policies, bindings = by_kind(objects, POLICY), by_kind(objects, BINDING)
    assert len(policies) == len(bindings) <= 1
    return (policies[0], bindings[0]) if policies else None


def _messages(values: dict[str, Any]) -> list[str]:
    rendered = _policy(values)
    assert rendered is not None
    return [v["message"] for v in rendered[0]["spec"]["validations"]]


def test_default_policy_restricts_images_only() -> None:
    """Defaults: any image but the default trainer repository is refused; everything else is as before."""
    rendered = _policy({})
    assert rendered is not None
    policy, binding = rendered
    (rule,) = policy["spec"]["validations"]
    assert '["ghcr.io/finetune-operator/trainer:","ghcr.io/finetune-operator/trainer@"]' in rule["expression"]
    assert rule["message"].startswith("spec.image is not allowed")
    assert policy["spec"]["failurePolicy"] == "Fail"
    assert policy["spec"]["matchConstraints"]["resourceRules"] == [
        {
            "apiGroups": [names.GROUP],
            "apiVersions": ["*"],
            "operations": ["CREATE", "UPDATE"],
            "resources": [names.PLURAL],
        }
    ]
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    assert binding["spec"]["matchResources"] == {"namespaceSelector": {}}


@dataclass(frozen=True)
class RuleCase:
    name: str
    values: dict[str, Any]
    fields: list[str]  # the fields the policy's messages name, in order


RULE_CASES = [
    RuleCase("defaults", {}, ["spec.image"]),
    RuleCase("pvc off", {"jobAdmissionPolicy.allowPVCModels": False}, ["spec.image", "spec.model.uri"]),
    RuleCase(
        "tolerations off", {"jobAdmissionPolicy.allowTolerations": False}, ["spec.image", "spec.resources.tolerations"]
    ),
    RuleCase(
        "node selection off",
        {"jobAdmissionPolicy.allowNodeSelection": False},
        ["spec.image", "spec.resources.nodeSelector", "spec.resources.affinity.nodeAffinity"],
    ),
    RuleCase(
        "named lists",
        {
            "jobAdmissionPolicy.allowedPriorityClasses": [],
            "jobAdmissionPolicy.allowedCredentialsSecrets": ["a"],
            "jobAdmissionPolicy.allowedStorageEndpoints": ["https://s3.x"],
        },
        ["spec.image", "spec.resources.priorityClassName", "spec.storage.credentialsSecret", "spec.storage.endpoint"],
    ),
    RuleCase(
        "any image",
        {"jobAdmissionPolicy.allowedImagePrefixes": ["*"], "jobAdmissionPolicy.allowPVCModels": False},
        ["spec.model.uri"],
    ),
]


@pytest.mark.parametrize("case", RULE_CASES, ids=lambda c: c.name)
def test_each_restricting_value_adds_a_rule_naming_its_field(case: RuleCase) -> None:
    assert [m.split(" ", 1)[0] for m in _messages(case.values)] == case.fields
    for message in _messages(case.values):
        assert "is not allowed" in message and "(chart value jobAdmissionPolicy." in message


@dataclass(frozen=True)
class MessageCase:
    name: str
    values: dict[str, Any]
    message: str


MESSAGE_CASES = [
    MessageCase(
        "image prefixes include the default repository, by tag and digest",
        {
            "defaults.trainerImage": "reg:5000/ml/trainer:1@sha256:abc",
            "jobAdmissionPolicy.allowedImagePrefixes": ["x/"],
        },
        "spec.image is not allowed: leave it unset (the operator's default trainer image) or use an image starting "
        "with one of: reg:5000/ml/trainer:, reg:5000/ml/trainer@, x/ (chart value "
        "jobAdmissionPolicy.allowedImagePrefixes)",
    ),
    MessageCase(
        "nothing allowed",
        {"jobAdmissionPolicy.allowedPriorityClasses": []},
        "spec.resources.priorityClassName is not allowed: leave it unset (chart value "
        "jobAdmissionPolicy.allowedPriorityClasses)",
    ),
    MessageCase(
        "the operator's default Secret is always allowed",
        {"jobAdmissionPolicy.allowedCredentialsSecrets": [], "defaults.storage.credentialsSecret": "s3-creds"},
        "spec.storage.credentialsSecret is not allowed: leave it unset or use one of: s3-creds (chart value "
        "jobAdmissionPolicy.allowedCredentialsSecrets)",
    ),
]


@pytest.mark.parametrize("case", MESSAGE_CASES, ids=lambda c: c.name)
def test_messages_say_what_is_allowed(case: MessageCase) -> None:
    assert case.message in _messages(case.values)


@dataclass(frozen=True)
class BindingCase:
    name: str
    values: dict[str, Any]
    match: dict[str, Any]
    actions: list[str] = field(default_factory=lambda: ["Deny"])


BINDING_CASES = [
    BindingCase("cluster mode: every namespace", {}, {"namespaceSelector": {}}),
    BindingCase(
        "namespaced mode: the watched namespaces",
        {"watch.namespaces": ["team-a", "team-b"]},
        {
            "namespaceSelector": {
                "matchExpressions": [
                    {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["team-a", "team-b"]}
                ]
            }
        },
    ),
    BindingCase(
        "explicit namespace labels win",
        {"watch.namespaces": ["team-a"], "jobAdmissionPolicy.namespaceLabels": {"finetune.dev/guarded": "true"}},
        {"namespaceSelector": {"matchLabels": {"finetune.dev/guarded": "true"}}},
    ),
    BindingCase(
        "warn and audit",
        {"jobAdmissionPolicy.validationActions": ["Warn", "Audit"]},
        {"namespaceSelector": {}},
        ["Warn", "Audit"],
    ),
]


@pytest.mark.parametrize("case", BINDING_CASES, ids=lambda c: c.name)
def test_binding_scope_and_actions(case: BindingCase) -> None:
    rendered = _policy(case.values)
    assert rendered is not None
    assert rendered[1]["spec"]["matchResources"] == case.match
    assert rendered[1]["spec"]["validationActions"] == case.actions


@pytest.mark.parametrize(
    "values",
    [
        {"jobAdmissionPolicy.enabled": False},
        {"jobAdmissionPolicy.allowedImagePrefixes": ["*"]},  # nothing left to restrict: no empty policy
    ],
    ids=["disabled", "nothing restricted"],
)
def test_no_policy_when_disabled_or_unrestricted(values: dict[str, Any]) -> None:
    assert _policy(values) is None


@dataclass(frozen=True)
class BadValues:
    name: str
    values: dict[str, Any]
    message: str


BAD_VALUES = [
    BadValues(
        "prefix without a separator",
        {"jobAdmissionPolicy.allowedImagePrefixes": ["ghcr.io/team"]},
        "jobAdmissionPolicy/allowedImagePrefixes/0",
    ),
    BadValues(
        "deny and warn",
        {"jobAdmissionPolicy.validationActions": ["Deny", "Warn"]},
        "jobAdmissionPolicy/validationActions",
    ),
    BadValues(
        "unknown action", {"jobAdmissionPolicy.validationActions": ["Block"]}, "jobAdmissionPolicy/validationActions/0"
    ),
    BadValues(
        "bad Secret name",
        {"jobAdmissionPolicy.allowedCredentialsSecrets": ["Team_Creds"]},
        "jobAdmissionPolicy/allowedCredentialsSecrets/0",
    ),
    BadValues(
        "endpoint without scheme",
        {"jobAdmissionPolicy.allowedStorageEndpoints": ["s3.example"]},
        "jobAdmissionPolicy/allowedStorageEndpoints/0",
    ),
    BadValues(
        "unknown key", {"jobAdmissionPolicy.allowImages": True}, "additional properties 'allowImages' not allowed"
    ),
    BadValues(
        "scraper pods without their namespaces",
        {"jobNetworkPolicy.metricsScrapers.podLabels": {"app": "prometheus"}},
        "jobNetworkPolicy/metricsScrapers/namespaceLabels",
    ),
    BadValues(
        "bad label key",
        {"jobNetworkPolicy.metricsScrapers.namespaceLabels": {"a b": "c"}},
        "invalid propertyName 'a b'",
    ),
]


@pytest.mark.parametrize("case", BAD_VALUES, ids=lambda c: c.name)
def test_bad_security_values_are_rejected_with_the_field(case: BadValues) -> None:
    proc = template(case.values, check=False)
    assert proc.returncode != 0, f"accepted bad values {case.values}"
    assert case.message in proc.stderr, proc.stderr


def _env(values: dict[str, Any]) -> dict[str, str]:
    (deployment,) = by_kind(render(values), "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def test_scraper_values_reach_the_job_network_policy() -> None:
    """values -> FINETUNE_* variables -> Settings -> the peers of every job's NetworkPolicy."""
    env = _env(
        {
            "jobNetworkPolicy.metricsScrapers.namespaceLabels": {"kubernetes.io/metadata.name": "monitoring"},
            "jobNetworkPolicy.metricsScrapers.podLabels": {"app.kubernetes.io/name": "prometheus"},
        }
    )
    settings = load_settings([], {**env, "POD_NAMESPACE": "finetune-system"})
    policy = builders.build_network_policy(names.JobIdentity("j", "team-a", "uid"), settings=settings)
    readers = policy["spec"]["ingress"][1]["from"]
    assert readers[0]["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "finetune-system"}}
    assert readers[1] == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
    }


def test_no_scrapers_by_default() -> None:
    env = _env({})
    assert not any(k.startswith("FINETUNE_METRICS_SCRAPER") for k in env)
    settings = load_settings([], {**env, "POD_NAMESPACE": "finetune-system"})
    assert settings.metrics_scraper_namespace_labels == {} and settings.operator_namespace == "finetune-system"
