"""Run the real operator against the dev cluster under a ServiceAccount with exactly its documented RBAC.

Why in-process (a thread with its own event loop) rather than a subprocess: start-up is ~1 s instead of ~3 s and a
failing test shows the operator's log in the same report. The operator is the same `run_operator` that
`finetune operator` runs; it only talks to the API server through the minted ServiceAccount kubeconfig, so any
missing permission fails these tests. Jobs are pinned to a *simulated* node -- a kwok node: nothing runs, kwok
reports the pods Running and `cluster.end_pod` ends them with an exit code and termination message as a kubelet
would -- and only there is the progress source the simulated one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import secrets
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_operator import names, rbac
from finetune_operator.app import run_operator
from finetune_operator.settings import Settings
from kubernetes import client as k8s

from devcluster import DevCluster
from devcluster.controlplane import free_port
from devcluster.kube import call_json
from devcluster.testing import wait_for

CRD = Path(__file__).resolve().parents[2] / "crds" / "finetune.dev_finetunejobs.yaml"
SIM_LABEL = "finetune.dev/test-simulated"


@dataclasses.dataclass
class OperatorHandle:
    settings: Settings
    thread: threading.Thread
    stop: threading.Event
    result: list[int]

    def reconciles(self) -> float:
        """How many reconciles this operator has finished (its own metrics endpoint; 0 while it is unreachable)."""
        url = f"http://127.0.0.1:{self.settings.metrics_port}/metrics"
        try:
            text = urllib.request.urlopen(url, timeout=2).read().decode()
        except OSError:
            return 0.0
        match = re.search(r"^finetune_reconcile_duration_seconds_count (\S+)$", text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    def stop_and_wait(self, timeout: float = 30) -> int | None:
        self.stop.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "operator did not stop within 30 s"
        return self.result[0] if self.result else None


def install_crd(cluster: DevCluster) -> None:
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=operator-e2e", "-f", str(CRD))

    def established() -> bool:
        # `kubectl wait` errors out (instead of waiting) while the new CRD has no conditions yet: poll instead.
        out = cluster.kubectl(
            "get",
            "crd",
            "finetunejobs.finetune.dev",
            "-o",
            "jsonpath={.status.conditions[?(@.type=='Established')].status}",
            check=False,  # fails while the new CRD has no conditions at all
        )
        return out.returncode == 0 and out.stdout.strip() == "True"

    wait_for(established, timeout=60, what="FineTuneJob CRD Established")


def add_simulated_node(
    cluster: DevCluster,
    *,
    cpu: str = "64",
    memory: str = "256Gi",
    pods: int = 500,
    labels: dict[str, str] | None = None,
    taints: tuple[dict[str, str], ...] = (),
) -> Iterator[str]:
    """A kwok node labelled SIM_LABEL (jobs select it); removed afterwards."""
    name = f"sim-{secrets.token_hex(3)}"
    cluster.add_kwok_node(
        name, cpu=cpu, memory=memory, pods=pods, labels={SIM_LABEL: "true", **(labels or {})}, taints=taints
    )
    try:
        yield name
    finally:
        cluster.remove_node(name)


def grant_documented_rbac(cluster: DevCluster, namespace: str) -> Path:
    """Namespaced mode: the job rules as a Role + the lease Role, bound to a fresh ServiceAccount."""
    job_role = rbac.job_role(namespace)
    lease_role = rbac.lease_role(namespace)
    docs = [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": rbac.SERVICE_ACCOUNT, "namespace": namespace},
        },
        job_role,
        rbac.binding(role=job_role, namespace=namespace),
        lease_role,
        rbac.binding(role=lease_role, namespace=namespace),
    ]
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
    return cluster.mint_kubeconfig(namespace, rbac.SERVICE_ACCOUNT)


def start_operator(settings: Settings) -> OperatorHandle:
    stop = threading.Event()
    result: list[int] = []

    def main() -> None:
        result.append(asyncio.run(run_operator(settings, stop=stop)))

    thread = threading.Thread(target=main, name=f"operator-{settings.identity}", daemon=True)
    thread.start()
    return OperatorHandle(settings=settings, thread=thread, stop=stop, result=result)


def operator_settings(namespace: str, kubeconfig: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "namespaces": (namespace,),
        "kubeconfig": str(kubeconfig),
        "lease_namespace": namespace,
        "identity": f"op-{secrets.token_hex(2)}",
        "output_base_uri": "s3://models/",
        "metrics_port": free_port(),
        "health_port": free_port(),
        "bind_address": "127.0.0.1",
        "resync_seconds": 1.0,
        "lease_duration_seconds": 4.0,
        "lease_renew_seconds": 1.0,
        "metrics_source": "simulated",
        "log_format": "text",
    }
    return Settings.model_validate({**values, **overrides})


def job_manifest(name: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": {"uri": "hf://org/model"},
        "dataset": {"train": "s3://data/train.csv"},
        "resources": {"workers": 2, "nodeSelector": {SIM_LABEL: "true"}},
        "progressDeadlineSeconds": 600,
    }
    for key, value in spec.items():
        if isinstance(value, dict) and isinstance(body.get(key), dict):
            body[key] = {**body[key], **value}
        else:
            body[key] = value
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": body}


class Jobs:
    """Tiny client for jobs and their pods in one namespace (admin credentials: this is the test's view)."""

    def __init__(self, cluster: DevCluster, namespace: str) -> None:
        self.cluster = cluster
        self.namespace = namespace

    def create(self, manifest: dict[str, Any]) -> None:
        self.cluster.kubectl("create", "-n", self.namespace, "-f", "-", input=json.dumps(manifest))

    def patch(self, name: str, spec: dict[str, Any]) -> None:
        self.cluster.kubectl(
            "patch", "-n", self.namespace, "ftj", name, "--type=merge", "-p", json.dumps({"spec": spec})
        )

    def get(self, name: str) -> dict[str, Any] | None:
        with self.cluster.api() as api:
            try:
                return call_json(
                    k8s.CustomObjectsApi(api).get_namespaced_custom_object,
                    "finetune.dev",
                    "v1alpha1",
                    self.namespace,
                    "finetunejobs",
                    name,
                )
            except k8s.ApiException as e:
                if e.status == 404:
                    return None
                raise

    def status(self, name: str) -> dict[str, Any]:
        job = self.get(name)
        return (job or {}).get("status") or {}

    def pods(self, name: str) -> dict[str, dict[str, Any]]:
        with self.cluster.api() as api:
            items = call_json(
                k8s.CoreV1Api(api).list_namespaced_pod, self.namespace, label_selector=names.job_selector(name)
            )["items"]
        return {p["metadata"]["name"]: p for p in items}

    def wait_phase(self, name: str, phase: str, *, timeout: float = 60) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            status = self.status(name)
            if status.get("phase") == phase:
                return status
            if phase not in {"Failed"} and status.get("phase") == "Failed":
                raise AssertionError(f"{name} Failed: {status.get('reason')}: {status.get('message')}")
            return None

        return wait_for(check, timeout=timeout, what=f"{self.namespace}/{name} phase {phase}", interval=0.3)

    def wait_running_pods(self, name: str, count: int, *, attempt: int, timeout: float = 30) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            pods = {
                n: p
                for n, p in self.pods(name).items()
                if p["metadata"]["labels"].get("finetune.dev/attempt") == str(attempt)
                and p.get("status", {}).get("phase") == "Running"
                and not p["metadata"].get("deletionTimestamp")
            }
            return pods if len(pods) == count else None

        return wait_for(check, timeout=timeout, what=f"{count} running pods of {name} attempt {attempt}")

    def wait_no_pods(self, name: str, *, timeout: float = 30) -> None:
        wait_for(lambda: not self.pods(name), timeout=timeout, what=f"pods of {name} gone")

    def events(self, name: str) -> list[tuple[str, str]]:
        with self.cluster.api() as api:
            items = call_json(
                k8s.CoreV1Api(api).list_namespaced_event,
                self.namespace,
                field_selector=f"involvedObject.name={name},involvedObject.kind=FineTuneJob",
            )["items"]
        return [(e["reason"], e.get("message", "")) for e in items]

    def reporters(self, name: str) -> set[str]:
        """Which operator replicas (reportingInstance) posted events about a job."""
        with self.cluster.api() as api:
            items = call_json(
                k8s.CoreV1Api(api).list_namespaced_event,
                self.namespace,
                field_selector=f"involvedObject.name={name},involvedObject.kind=FineTuneJob",
            )["items"]
        return {str(e.get("reportingInstance")) for e in items}


def wait_until(predicate: Any, *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.3)
