"""The chart's ValidatingAdmissionPolicy against the real API server, applied by a namespace user with kubectl.

Why against the API server: the policy is CEL evaluated by kube-apiserver's ValidatingAdmissionPolicy plugin
(on by default since Kubernetes 1.30; devcluster/controlplane.py neither disables admission plugins nor
API groups, and the denials below prove it is active). Only the API server type-checks the expressions against
the CRD's schema, evaluates optionals, decides which request a rule sees and words the denial.

Isolation: the policy and binding are cluster-scoped and the session's cluster is shared, so each install gets
a unique release name, its binding selects only this test's namespace, and both are deleted afterwards. Every
job is created with `suspend: true`, so an operator that happens to watch the cluster starts no pods for it.
"""

from __future__ import annotations

import copy
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from devcluster import DevCluster
from devcluster.testing import wait_for
from tests.e2e.operator_harness import install_crd
from tests.fixtures.helm import by_kind, render

pytestmark = pytest.mark.cluster

DEFAULT_IMAGE = "registry.local/finetune/trainer:0.1.0"
VALUES: dict[str, Any] = {
    "defaults.trainerImage": DEFAULT_IMAGE,
    "defaults.storage.credentialsSecret": "s3-creds",
    "defaults.storage.endpoint": "http://minio.minio.svc:9000",
    "jobAdmissionPolicy.allowedImagePrefixes": ["registry.example/ml/"],
    "jobAdmissionPolicy.allowPVCModels": False,
    "jobAdmissionPolicy.allowTolerations": False,
    "jobAdmissionPolicy.allowNodeSelection": False,
    "jobAdmissionPolicy.allowedPriorityClasses": ["batch-low"],
    "jobAdmissionPolicy.allowedCredentialsSecrets": ["team-s3"],
    "jobAdmissionPolicy.allowedStorageEndpoints": ["https://s3.example.internal"],
}
BASE_SPEC: dict[str, Any] = {
    "model": {"uri": "hf://org/model"},
    "dataset": {"train": "s3://data/train.csv"},
    "suspend": True,
}
# Allowed to the namespace user: everything a job owner does with FineTuneJobs, nothing else.
USER_ROLE = {
    "apiVersion": "rbac.authorization.k8s.io/v1",
    "kind": "Role",
    "metadata": {"name": "ml-user"},
    "rules": [
        {
            "apiGroups": ["finetune.dev"],
            "resources": ["finetunejobs"],
            "verbs": ["get", "list", "create", "update", "patch", "delete"],
        }
    ],
}


@dataclass(frozen=True)
class Guarded:
    """A namespace under the policy, and a kubeconfig of a user who may only manage FineTuneJobs there."""

    namespace: str
    policy: str
    user: Path


def _job(name: str, spec: dict[str, Any]) -> str:
    return json.dumps(
        {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": spec}
    )


def _merged(patch: dict[str, Any]) -> dict[str, Any]:
    spec = copy.deepcopy(BASE_SPEC)
    for key, value in patch.items():
        node = spec
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return spec


def _user_namespace(cluster: DevCluster, namespace: str) -> Path:
    cluster.kubectl("create", "namespace", namespace)
    cluster.kubectl("-n", namespace, "create", "serviceaccount", "ml-user")
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(USER_ROLE))
    cluster.kubectl(
        "-n", namespace, "create", "rolebinding", "ml-user", "--role=ml-user", f"--serviceaccount={namespace}:ml-user"
    )
    return cluster.mint_kubeconfig(namespace, "ml-user")


def _install_policy(cluster: DevCluster, *, release: str, namespace: str, values: dict[str, Any]) -> str:
    """Render the chart with `values`, apply only its policy and binding (bound to `namespace`), wait until active."""
    objects = render(
        {**values, "jobAdmissionPolicy.namespaceLabels": {"kubernetes.io/metadata.name": namespace}}, release=release
    )
    (policy,) = by_kind(objects, "ValidatingAdmissionPolicy")
    (binding,) = by_kind(objects, "ValidatingAdmissionPolicyBinding")
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([policy, binding]))
    name = str(policy["metadata"]["name"])

    def type_checked() -> dict[str, Any] | None:
        live = json.loads(cluster.kubectl("get", "validatingadmissionpolicy", name, "-o", "json").stdout)
        status = live.get("status") or {}
        return status if status.get("observedGeneration") == live["metadata"]["generation"] else None

    status = wait_for(type_checked, timeout=60, what=f"type checking of {name}")
    # The API server type-checks every expression against the CRD's schema: a misspelt field shows up here.
    assert not (status.get("typeChecking") or {}).get("expressionWarnings"), status
    return name


def _remove_policy(cluster: DevCluster, name: str) -> None:
    for kind in ("validatingadmissionpolicybinding", "validatingadmissionpolicy"):
        cluster.kubectl("delete", kind, name, "--ignore-not-found", check=False)


def _denied_message(policy: str, message: str) -> str:
    return f"ValidatingAdmissionPolicy '{policy}' with binding '{policy}' denied request: {message}"


@pytest.fixture(scope="module")
def guarded(cluster: DevCluster) -> Iterator[Guarded]:
    """A namespace with a job created before the policy (now disallowed fields), then the policy installed."""
    install_crd(cluster)
    namespace, release = f"vap-{secrets.token_hex(3)}", f"vap-{secrets.token_hex(3)}"
    user = _user_namespace(cluster, namespace)
    legacy = _merged(
        {"image": "docker.io/legacy/trainer:1", "resources.tolerations": [{"key": "old", "operator": "Exists"}]}
    )
    cluster.kubectl("-n", namespace, "create", "-f", "-", input=_job("legacy", legacy))
    policy = ""
    try:
        policy = _install_policy(cluster, release=release, namespace=namespace, values=VALUES)
        probe = _job("probe", _merged({"image": "docker.io/evil/x:1"}))

        def active() -> bool:
            # The plugin learns of new policies through an informer: wait until it denies a known-bad job.
            out = cluster.kubectl("-n", namespace, "create", "--dry-run=server", "-f", "-", input=probe, check=False)
            return out.returncode != 0 and "denied request" in out.stderr

        wait_for(active, timeout=60, what=f"policy {policy} enforced")
        yield Guarded(namespace=namespace, policy=policy, user=user)
    finally:
        if policy:
            _remove_policy(cluster, policy)
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", "--ignore-not-found", check=False)


@dataclass(frozen=True)
class Case:
    name: str
    patch: dict[str, Any]  # dotted spec paths -> values, applied to BASE_SPEC
    denied: str | None = None  # the exact message of the denial; None = allowed


IMAGES = "registry.local/finetune/trainer:, registry.local/finetune/trainer@, registry.example/ml/"
CASES = [
    Case("default image", {}),
    Case("another tag of the default repository", {"image": "registry.local/finetune/trainer:0.1.0-cuda"}),
    Case("the default repository by digest", {"image": "registry.local/finetune/trainer@sha256:" + "a" * 64}),
    Case("an allowed prefix", {"image": "registry.example/ml/trainer-extra:2"}),
    Case(
        "any other image",
        {"image": "docker.io/evil/miner:1"},
        'spec.image "docker.io/evil/miner:1" is not allowed: leave it unset (the operator\'s default trainer image) '
        f"or use an image starting with one of: {IMAGES} (chart value jobAdmissionPolicy.allowedImagePrefixes)",
    ),
    Case(
        "a look-alike repository name",
        {"image": "registry.local/finetune/trainer-evil:1"},
        'spec.image "registry.local/finetune/trainer-evil:1" is not allowed: leave it unset (the operator\'s default '
        f"trainer image) or use an image starting with one of: {IMAGES} (chart value "
        "jobAdmissionPolicy.allowedImagePrefixes)",
    ),
    Case(
        "several rules broken: the first is reported",
        {"image": "docker.io/evil/miner:1", "model.uri": "pvc://team-data/models/base"},
        'spec.image "docker.io/evil/miner:1" is not allowed: leave it unset (the operator\'s default trainer image) '
        f"or use an image starting with one of: {IMAGES} (chart value jobAdmissionPolicy.allowedImagePrefixes)",
    ),
    Case("an s3:// model", {"model.uri": "s3://models/base/"}),
    Case(
        "a pvc:// model",
        {"model.uri": "pvc://team-data/models/base"},
        'spec.model.uri "pvc://team-data/models/base" is not allowed: pvc:// model URIs are disabled (chart value '
        "jobAdmissionPolicy.allowPVCModels is false); use hf://, s3:// or file://",
    ),
    Case(
        "custom tolerations",
        {
            "resources.tolerations": [
                {"key": "dedicated", "operator": "Equal", "value": "infra", "effect": "NoSchedule"}
            ]
        },
        "spec.resources.tolerations is not allowed: custom tolerations are disabled (chart value "
        "jobAdmissionPolicy.allowTolerations is false); GPU jobs get the nvidia.com/gpu toleration from the operator "
        "without asking",
    ),
    Case("GPU workers without tolerations", {"resources.gpusPerWorker": 1}),
    Case(
        "a node selector",
        {"resources.nodeSelector": {"node-role.kubernetes.io/control-plane": ""}},
        "spec.resources.nodeSelector is not allowed: choosing nodes is disabled (chart value "
        "jobAdmissionPolicy.allowNodeSelection is false)",
    ),
    Case(
        "node affinity",
        {
            "resources.affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["x"]}]}
                        ]
                    }
                }
            }
        },
        "spec.resources.affinity.nodeAffinity is not allowed: choosing nodes is disabled (chart value "
        "jobAdmissionPolicy.allowNodeSelection is false); podAffinity and podAntiAffinity are allowed",
    ),
    Case(
        "pod anti-affinity",
        {
            "resources.affinity": {
                "podAntiAffinity": {
                    "preferredDuringSchedulingIgnoredDuringExecution": [
                        {
                            "weight": 1,
                            "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname", "labelSelector": {}},
                        }
                    ]
                }
            }
        },
    ),
    Case("an allowed priority class", {"resources.priorityClassName": "batch-low"}),
    Case(
        "another priority class",
        {"resources.priorityClassName": "system-cluster-critical"},
        'spec.resources.priorityClassName "system-cluster-critical" is not allowed: leave it unset or use one of: '
        "batch-low (chart value jobAdmissionPolicy.allowedPriorityClasses)",
    ),
    Case("an allowed Secret", {"storage.credentialsSecret": "team-s3"}),
    Case("the operator's default Secret, named", {"storage.credentialsSecret": "s3-creds"}),
    Case(
        "another team's Secret",
        {"storage.credentialsSecret": "prod-admin-creds"},
        'spec.storage.credentialsSecret "prod-admin-creds" is not allowed: leave it unset or use one of: team-s3, '
        "s3-creds (chart value jobAdmissionPolicy.allowedCredentialsSecrets)",
    ),
    Case("an allowed endpoint", {"storage.endpoint": "https://s3.example.internal"}),
    Case(
        "another endpoint",
        {"storage.endpoint": "https://collector.example.com"},
        'spec.storage.endpoint "https://collector.example.com" is not allowed: leave it unset or use one of: '
        "https://s3.example.internal, http://minio.minio.svc:9000 (chart value "
        "jobAdmissionPolicy.allowedStorageEndpoints)",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_namespace_user_creates_jobs(cluster: DevCluster, guarded: Guarded, case: Case) -> None:
    name = f"job-{secrets.token_hex(3)}"
    out = cluster.kubectl(
        "-n",
        guarded.namespace,
        "create",
        "-f",
        "-",
        input=_job(name, _merged(case.patch)),
        kubeconfig=guarded.user,
        check=False,
    )
    if case.denied is None:
        assert out.returncode == 0, out.stderr
        return
    assert out.returncode != 0, f"created although the policy forbids it: {case.patch}"
    assert _denied_message(guarded.policy, case.denied) in out.stderr, out.stderr
    absent = cluster.kubectl("-n", guarded.namespace, "get", "finetunejob", name, check=False)
    assert absent.returncode != 0 and "NotFound" in absent.stderr


def _patch(cluster: DevCluster, guarded: Guarded, name: str, spec: dict[str, Any]) -> Any:
    return cluster.kubectl(
        "-n",
        guarded.namespace,
        "patch",
        "finetunejob",
        name,
        "--type=merge",
        "-p",
        json.dumps({"spec": spec}),
        kubeconfig=guarded.user,
        check=False,
    )


def test_jobs_admitted_before_the_policy_stay_manageable(cluster: DevCluster, guarded: Guarded) -> None:
    """On update only changed fields are checked: tightening the policy never strands an existing job."""
    kept = _patch(cluster, guarded, "legacy", {"ttlSecondsAfterFinished": 600})
    assert kept.returncode == 0, kept.stderr
    changed = _patch(cluster, guarded, "legacy", {"image": "docker.io/legacy/trainer:2"})
    assert changed.returncode != 0
    assert 'spec.image "docker.io/legacy/trainer:2" is not allowed' in changed.stderr, changed.stderr
    deleted = cluster.kubectl(
        "-n", guarded.namespace, "delete", "finetunejob", "legacy", kubeconfig=guarded.user, check=False
    )
    assert deleted.returncode == 0, deleted.stderr


def test_updating_an_allowed_job_to_a_forbidden_value_is_denied(cluster: DevCluster, guarded: Guarded) -> None:
    name = f"job-{secrets.token_hex(3)}"
    cluster.kubectl("-n", guarded.namespace, "create", "-f", "-", input=_job(name, BASE_SPEC), kubeconfig=guarded.user)
    out = _patch(cluster, guarded, name, {"resources": {"priorityClassName": "system-node-critical"}})
    assert out.returncode != 0
    assert 'spec.resources.priorityClassName "system-node-critical" is not allowed' in out.stderr, out.stderr


def test_other_namespaces_are_not_bound(cluster: DevCluster, guarded: Guarded, namespace: str) -> None:
    """The binding selects only its namespace here; in a real install it selects every (watched) namespace."""
    out = cluster.kubectl(
        "-n",
        namespace,
        "create",
        "--dry-run=server",
        "-f",
        "-",
        input=_job("free", _merged({"image": "docker.io/evil/miner:1"})),
        check=False,
    )
    assert out.returncode == 0, out.stderr


def test_warn_mode_admits_and_warns(cluster: DevCluster) -> None:
    """validationActions [Warn]: the way to try rules on a live cluster before denying."""
    install_crd(cluster)
    namespace, release = f"vapw-{secrets.token_hex(3)}", f"vapw-{secrets.token_hex(3)}"
    user = _user_namespace(cluster, namespace)
    policy = ""
    try:
        policy = _install_policy(
            cluster,
            release=release,
            namespace=namespace,
            values={**VALUES, "jobAdmissionPolicy.validationActions": ["Warn"]},
        )
        bad = _merged({"image": "docker.io/evil/miner:1"})

        def warned() -> Any:
            out = cluster.kubectl(
                "-n",
                namespace,
                "create",
                "--dry-run=server",
                "-f",
                "-",
                input=_job("w", bad),
                kubeconfig=user,
                check=False,
            )
            return out if "Warning: Validation failed" in out.stderr else None

        out = wait_for(warned, timeout=60, what=f"policy {policy} warning")
        assert out.returncode == 0, out.stderr
        assert 'spec.image "docker.io/evil/miner:1" is not allowed' in out.stderr, out.stderr
    finally:
        if policy:
            _remove_policy(cluster, policy)
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", "--ignore-not-found", check=False)
