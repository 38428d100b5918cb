"""The tools hack/build-binaries.sh builds behave like their upstream releases: they report the pinned version,
and helm renders for the Kubernetes version it was built against (not v1.20, its fallback without ldflags)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from devcluster.binaries import locate, versions
from tests.fixtures.helm import helm


@dataclass
class VersionCase:
    name: str
    argv: list[str]
    expected: str


def _cases() -> list[VersionCase]:
    b, v = locate(), versions()
    k8s = v["KUBERNETES_VERSION"]
    return [
        VersionCase("kubelet", [str(b.node.kubelet), "--version"], f"Kubernetes {k8s}"),
        VersionCase("kube-proxy", [str(b.node.kube_proxy), "--version"], f"Kubernetes {k8s}"),
        VersionCase("kube-scheduler", [str(b.kube_scheduler), "--version"], f"Kubernetes {k8s}"),
        VersionCase(
            "containerd",
            [str(b.node.containerd), "--version"],
            f"containerd github.com/containerd/containerd/v2 {v['CONTAINERD_VERSION']}",
        ),
        VersionCase("crictl", [str(b.node.crictl), "--version"], f"crictl version {v['CRICTL_VERSION']}"),
        VersionCase("coredns", [str(b.node.coredns), "-version"], f"CoreDNS-{v['COREDNS_VERSION'].lstrip('v')}"),
        VersionCase("kwok", [str(b.kwok), "--version"], f"kwok version {v['KWOK_VERSION']}"),
        VersionCase(
            "helm",
            [str(b.helm), "version", "--template", "{{.Version}} {{.GitTreeState}}"],
            f"{v['HELM_VERSION']} clean",
        ),
    ]


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c.name)
def test_tool_reports_its_release_version(case: VersionCase) -> None:
    out = subprocess.run(case.argv, capture_output=True, text=True, timeout=30, check=True)
    assert (out.stdout + out.stderr).strip().startswith(case.expected), out.stdout + out.stderr


def test_helm_renders_for_the_kubernetes_version_it_was_built_against(tmp_path: Path) -> None:
    chart = tmp_path / "probe"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: probe\nversion: 0.1.0\n")
    template = "data: {kube: {{ .Capabilities.KubeVersion.Version | quote }}}\n"
    (chart / "templates" / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: probe}\n" + template
    )
    rendered = helm("template", "probe", str(chart)).stdout
    minor = ".".join(versions()["KUBERNETES_VERSION"].split(".")[:2])  # v1.34
    assert f'kube: "{minor}.0"' in rendered, rendered
