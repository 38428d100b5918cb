"""The Helm chart against the real control plane: server-side validation, CRD upgrade, RBAC minimality.

Why against a real API server: schema validation of every rendered object (Deployment, RBAC, PDB, CRD with CEL
rules) only happens there, and whether `helm upgrade` really changes a CRD, or whether a ServiceAccount really
cannot read Secrets, can only be observed there.

Isolation: CRDs and ClusterRoles are cluster-scoped and the session's cluster is shared with the operator's
tests. Releases therefore get unique names, and the install/upgrade test renames the CRD's group in a temporary
copy of the chart (`<random>.chart-test.finetune.dev`), so it exercises exactly the chart's mechanism (CRD as a
template, kept on uninstall) without ever owning or changing the real finetunejobs.finetune.dev.
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s

from devcluster import DevCluster
from devcluster.controlplane import api_client
from tests.fixtures.helm import CHART_DIR, CRD_FILE, helm, set_args

pytestmark = pytest.mark.cluster


def _release() -> str:
    return f"fto-{secrets.token_hex(3)}"


def _create_namespace(cluster: DevCluster, name: str) -> None:
    cluster.kubectl("create", "namespace", name)


def _delete_namespace(cluster: DevCluster, name: str) -> None:
    cluster.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)


@pytest.fixture
def extra_namespaces(cluster: DevCluster, namespace: str) -> Iterator[list[str]]:
    """Two more namespaces (watched / not watched in namespaced mode), deleted afterwards."""
    names = [f"{namespace[:50]}-w{i}" for i in (1, 2)]
    for name in names:
        _create_namespace(cluster, name)
    yield names
    for name in names:
        _delete_namespace(cluster, name)


def _uninstall(cluster: DevCluster, release: str, namespace: str) -> None:
    helm("uninstall", release, "--namespace", namespace, "--wait", kubeconfig=cluster.kubeconfig, check=False)


SERVER_SIDE_CASES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "ha-with-dashboards": {"replicaCount": 2, "dashboards.enabled": True, "logging.format": "text"},
    "no-crd": {"crds.install": False, "defaults.storage.endpoint": "http://minio.minio.svc:9000"},
}


@pytest.mark.parametrize("values", SERVER_SIDE_CASES.values(), ids=SERVER_SIDE_CASES.keys())
def test_rendered_chart_is_accepted_by_the_api_server(
    cluster: DevCluster, namespace: str, values: dict[str, Any]
) -> None:
    """`helm template | kubectl apply --dry-run=server`: every object passes the API server's validation."""
    rendered = helm(
        "template",
        _release(),
        str(CHART_DIR),
        "--namespace",
        namespace,
        *set_args(values),
    ).stdout
    out = cluster.kubectl(
        "apply",
        "--server-side",
        "--dry-run=server",
        "--force-conflicts",
        "--field-manager=chart-test",
        "-f",
        "-",
        input=rendered,
    ).stdout
    kinds = {line.split("/")[0].split(".")[0] for line in out.splitlines()}
    assert {"deployment", "serviceaccount", "clusterrole", "clusterrolebinding", "role", "rolebinding"} <= kinds, out
    assert ("customresourcedefinition" in kinds) == values.get("crds.install", True), out


def test_namespaced_mode_is_accepted_by_the_api_server(
    cluster: DevCluster, namespace: str, extra_namespaces: list[str]
) -> None:
    rendered = helm(
        "template",
        _release(),
        str(CHART_DIR),
        "--namespace",
        namespace,
        *set_args({"watch.namespaces": extra_namespaces, "crds.install": False}),
    ).stdout
    out = cluster.kubectl("apply", "--server-side", "--dry-run=server", "-f", "-", input=rendered).stdout
    assert "clusterrole" not in out, out
    assert out.count("rolebinding.rbac.authorization.k8s.io/") == len(extra_namespaces) + 1, out


def _chart_copy_with_test_group(tmp_path: Path, group: str) -> tuple[Path, str]:
    """A copy of the chart whose CRD serves `group` instead of finetune.dev (see the module docstring)."""
    chart = tmp_path / "finetune-operator"
    shutil.copytree(CHART_DIR, chart)
    crd_path = chart / "files" / "crds" / CRD_FILE
    crd = yaml.safe_load(crd_path.read_text())
    crd["spec"]["group"] = group
    crd["metadata"]["name"] = f"{crd['spec']['names']['plural']}.{group}"
    crd_path.write_text(yaml.safe_dump(crd, sort_keys=False))
    return chart, crd["metadata"]["name"]


def _add_printer_column(chart: Path) -> dict[str, Any]:
    crd_path = chart / "files" / "crds" / CRD_FILE
    crd = yaml.safe_load(crd_path.read_text())
    column = {"name": "UpgradeProbe", "type": "string", "jsonPath": ".metadata.uid", "priority": 1}
    crd["spec"]["versions"][0].setdefault("additionalPrinterColumns", []).append(column)
    crd_path.write_text(yaml.safe_dump(crd, sort_keys=False))
    return column


def test_helm_upgrade_upgrades_the_crd_and_uninstall_keeps_it(
    cluster: DevCluster, namespace: str, tmp_path: Path
) -> None:
    group = f"{secrets.token_hex(4)}.chart-test.finetune.dev"
    chart, crd_name = _chart_copy_with_test_group(tmp_path, group)
    release = _release()
    common = ["--namespace", namespace, "--wait", "--timeout", "2m", "--set", "replicaCount=0"]
    try:
        installed = helm("install", release, str(chart), *common, kubeconfig=cluster.kubeconfig)
        notes = installed.stdout.split("NOTES:", 1)[-1]
        for hint in ("rollout status", "create secret generic", "wait --for=condition=Succeeded", "troubleshooting"):
            assert hint in notes, f"NOTES.txt lacks {hint!r}:\n{notes}"
        before = yaml.safe_load(cluster.kubectl("get", "crd", crd_name, "-o", "yaml").stdout)
        assert before["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        columns = [c["name"] for c in before["spec"]["versions"][0].get("additionalPrinterColumns", [])]
        assert "UpgradeProbe" not in columns

        column = _add_printer_column(chart)
        helm("upgrade", release, str(chart), *common, kubeconfig=cluster.kubeconfig)
        after = yaml.safe_load(cluster.kubectl("get", "crd", crd_name, "-o", "yaml").stdout)
        added = [c for c in after["spec"]["versions"][0]["additionalPrinterColumns"] if c["name"] == "UpgradeProbe"]
        assert added == [column], after["spec"]["versions"][0]["additionalPrinterColumns"]
        assert int(after["metadata"]["generation"]) > int(before["metadata"]["generation"])

        _uninstall(cluster, release, namespace)
        kept = cluster.kubectl("get", "crd", crd_name, "-o", "name", check=False)
        assert kept.returncode == 0, "helm uninstall deleted the CRD (and would have deleted every FineTuneJob)"
    finally:
        _uninstall(cluster, release, namespace)
        cluster.kubectl("delete", "crd", crd_name, "--ignore-not-found", "--wait=false", check=False)


@dataclass(frozen=True)
class Access:
    """One access question asked as the chart's ServiceAccount (SelfSubjectAccessReview), and the expected answer.

    A SelfSubjectAccessReview names group, resource and subresource exactly and needs no discovery, so the answer
    does not depend on whether the CRD happens to be installed in the shared test cluster.
    """

    verb: str
    resource: str  # "pods", "pods/exec", "finetunejobs.finetune.dev/status", ...
    namespace: str  # "<release>", "<watched>", "<other>" or "*" (all namespaces)
    allowed: bool
    name: str = ""


def _ask(kubeconfig: Path, access: Access, namespaces: dict[str, str]) -> bool:
    resource, _, subresource = access.resource.partition("/")
    plural, _, group = resource.partition(".")
    attributes = k8s.V1ResourceAttributes(
        verb=access.verb,
        group=group,
        resource=plural,
        subresource=subresource or None,
        name=access.name or None,
        namespace=None if access.namespace == "*" else namespaces[access.namespace],
    )
    review = k8s.V1SelfSubjectAccessReview(spec=k8s.V1SelfSubjectAccessReviewSpec(resource_attributes=attributes))
    with api_client(kubeconfig) as api:
        result = k8s.AuthorizationV1Api(api).create_self_subject_access_review(review)
    assert result.status is not None, "SelfSubjectAccessReview without a status"
    return bool(result.status.allowed)


CLUSTER_MODE = [
    Access("watch", "finetunejobs.finetune.dev", "*", True),
    Access("patch", "finetunejobs.finetune.dev/status", "<watched>", True),
    Access("create", "pods", "<watched>", True),
    Access("delete", "pods", "<other>", True),
    Access("create", "networkpolicies.networking.k8s.io", "<watched>", True),
    Access("create", "events", "<watched>", True),
    Access("update", "finetunejobs.finetune.dev/finalizers", "<watched>", True),
    # Ownership checks before touching a same-named object; the log tail of a pod that failed without a report.
    Access("get", "configmaps", "<watched>", True),
    Access("list", "services", "<watched>", True),
    Access("get", "pods/log", "<watched>", True),
    # Never needed, so never granted:
    Access("get", "secrets", "<watched>", False),
    Access("list", "secrets", "*", False),
    Access("create", "finetunejobs.finetune.dev", "<watched>", False),
    Access("update", "finetunejobs.finetune.dev", "<watched>", False),
    Access("create", "pods/exec", "<watched>", False),
    Access("create", "pods/portforward", "<watched>", False),
    Access("patch", "pods", "<watched>", False),
    Access("patch", "finetunejobs.finetune.dev", "<watched>", False),
    Access("update", "configmaps", "<watched>", False),
    Access("patch", "services", "<watched>", False),
    Access("create", "deployments.apps", "<watched>", False),
    Access("create", "roles.rbac.authorization.k8s.io", "<watched>", False),
    Access("create", "clusterrolebindings.rbac.authorization.k8s.io", "*", False),
    Access("delete", "namespaces", "*", False),
    Access("patch", "customresourcedefinitions.apiextensions.k8s.io", "*", False),
    Access("update", "leases.coordination.k8s.io", "<other>", False),
    Access("update", "leases.coordination.k8s.io", "<release>", False, name="someone-elses-lease"),
]


def _install_for_rbac(cluster: DevCluster, release: str, namespace: str, values: dict[str, Any]) -> Path:
    helm(
        "install",
        release,
        str(CHART_DIR),
        "--namespace",
        namespace,
        "--wait",
        "--timeout",
        "2m",
        *set_args({"replicaCount": 0, "crds.install": False, **values}),
        kubeconfig=cluster.kubeconfig,
    )
    return cluster.mint_kubeconfig(namespace, f"{release}-finetune-operator")


def test_cluster_mode_rbac_is_sufficient_and_minimal(
    cluster: DevCluster, namespace: str, extra_namespaces: list[str]
) -> None:
    release = _release()
    namespaces = {"<release>": namespace, "<watched>": extra_namespaces[0], "<other>": extra_namespaces[1]}
    try:
        kubeconfig = _install_for_rbac(cluster, release, namespace, {})
        wrong = [a for a in CLUSTER_MODE if _ask(kubeconfig, a, namespaces) != a.allowed]
        assert not wrong, f"unexpected answers: {wrong}"
        lease = Access("update", "leases.coordination.k8s.io", "<release>", True, name=f"{release}-finetune-operator")
        assert _ask(kubeconfig, lease, namespaces)
        # A real request, not only the authorizer's opinion: reading a Secret is Forbidden.
        cluster.kubectl(
            "-n",
            extra_namespaces[0],
            "create",
            "secret",
            "generic",
            "s3-creds",
            "--from-literal=AWS_SECRET_ACCESS_KEY=x",
        )
        denied = cluster.kubectl(
            "-n", extra_namespaces[0], "get", "secret", "s3-creds", kubeconfig=kubeconfig, check=False
        )
        assert denied.returncode != 0 and "forbidden" in denied.stderr.lower(), denied.stderr
    finally:
        _uninstall(cluster, release, namespace)


NAMESPACED_MODE = [
    Access("list", "finetunejobs.finetune.dev", "<watched>", True),
    Access("create", "pods", "<watched>", True),
    Access("list", "pods", "<other>", False),
    Access("list", "pods", "*", False),
    Access("watch", "finetunejobs.finetune.dev", "<other>", False),
    Access("create", "configmaps", "<other>", False),
    Access("get", "secrets", "<watched>", False),
    Access("list", "finetunejobs.finetune.dev", "*", False),
]


def test_namespaced_mode_cannot_touch_other_namespaces(
    cluster: DevCluster, namespace: str, extra_namespaces: list[str]
) -> None:
    release = _release()
    watched, other = extra_namespaces
    namespaces = {"<release>": namespace, "<watched>": watched, "<other>": other}
    try:
        kubeconfig = _install_for_rbac(cluster, release, namespace, {"watch.namespaces": [watched]})
        assert cluster.kubectl("get", "clusterrole", f"{release}-finetune-operator", check=False).returncode != 0
        wrong = [a for a in NAMESPACED_MODE if _ask(kubeconfig, a, namespaces) != a.allowed]
        assert not wrong, f"unexpected answers: {wrong}"
        denied = cluster.kubectl("-n", other, "get", "pods", kubeconfig=kubeconfig, check=False)
        assert denied.returncode != 0 and "forbidden" in denied.stderr.lower(), denied.stderr
        assert cluster.kubectl("-n", watched, "get", "pods", kubeconfig=kubeconfig).returncode == 0
    finally:
        _uninstall(cluster, release, namespace)
