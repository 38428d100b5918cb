"""The per-job NetworkPolicy with real pods and real connections: the case table of tests/fixtures/netpol.py.

Our test node does not enforce NetworkPolicy (no enforcing CNI, no kube-router/Calico/Cilium agent). This test
finds that out for itself with a canary (a pod under a deny-all policy that a pod of another namespace tries to
reach) and then:
- where NetworkPolicy is enforced, checks every row of the table: who reaches which port of the job's pods;
- where it is not, checks only that its own harness works (every peer reached every port: listeners, pod IPs,
  namespaces) and skips, saying the policy itself was not exercised.

So on today's node this test proves nothing about the policy; it is ready to run unchanged on a node that
enforces (the real node may bring one).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from typing import Any

import pytest
from finetune_operator import builders, names
from finetune_operator.settings import Settings
from kubernetes import client as k8s

from devcluster.kube import call_json
from devcluster.testing import container_state, wait_for, wait_phase
from devcluster.testing import pod_manifest as _pod_manifest
from tests.devcluster.cluster import ProcessCluster as DevCluster
from tests.fixtures import netpol
from tests.fixtures.netpol import ALL_PORTS

pytestmark = [pytest.mark.cluster, pytest.mark.node]

LISTEN = (
    "import socket, threading, time\n"
    "def serve(port):\n"
    "    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "    s.bind(('', port)); s.listen(64)\n"
    "    while True: s.accept()[0].close()\n"
    "for p in {ports}: threading.Thread(target=serve, args=(p,), daemon=True).start()\n"
    "time.sleep(3600)\n"
)
CONNECT = (
    "import json, socket\n"
    "def ok(port):\n"
    "    try:\n"
    "        socket.create_connection(('{ip}', port), 2).close(); return True\n"
    "    except OSError:\n"
    "        return False\n"
    "print(json.dumps({{p: ok(p) for p in {ports}}}))\n"
)


def _create(cluster: DevCluster, namespace: str, body: dict[str, Any]) -> None:
    with cluster.api() as api:
        if body["kind"] == "NetworkPolicy":
            call_json(k8s.NetworkingV1Api(api).create_namespaced_network_policy, namespace, body)
        else:
            call_json(k8s.CoreV1Api(api).create_namespaced_pod, namespace, body)


def _listener(cluster: DevCluster, namespace: str, name: str, labels: dict[str, str]) -> str:
    """A pod listening on every port of ALL_PORTS; returns its IP once it accepts connections."""
    pod = _pod_manifest(name, ["python", "-c", LISTEN.format(ports=list(ALL_PORTS))], labels=labels)
    pod["spec"]["containers"][0]["readinessProbe"] = {"tcpSocket": {"port": netpol.METRICS}, "periodSeconds": 1}
    _create(cluster, namespace, pod)
    with cluster.api() as api:

        def ready_ip() -> str | None:
            got = call_json(k8s.CoreV1Api(api).read_namespaced_pod, name, namespace)
            conditions = (got.get("status") or {}).get("conditions") or []
            if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
                return str(got["status"]["podIP"])
            return None

        return wait_for(ready_ip, timeout=60, what=f"listener {namespace}/{name} ready")


def _start_client(cluster: DevCluster, *, namespace: str, labels: dict[str, str], ip: str) -> tuple[str, str]:
    """A pod in `namespace` with `labels` that tries every port of `ip` once and prints what it reached."""
    name = f"client-{secrets.token_hex(3)}"
    command = ["python", "-c", CONNECT.format(ip=ip, ports=list(ALL_PORTS))]
    _create(cluster, namespace, _pod_manifest(name, command, labels=labels))
    return namespace, name


def _reached_ports(cluster: DevCluster, client: tuple[str, str]) -> frozenset[int]:
    namespace, name = client
    with cluster.api() as api:
        done = wait_phase(api, namespace, name, ("Succeeded", "Failed"), timeout=120)
    assert done["status"]["phase"] == "Succeeded", container_state(done)
    result = json.loads(cluster.pod_logs(namespace, name).strip().splitlines()[-1])
    return frozenset(int(p) for p, ok in result.items() if ok)


def _enforced(cluster: DevCluster, *, namespace: str, other: str) -> bool:
    """Canary: a deny-all policy on a listener; a pod of another namespace tries to reach it."""
    labels = {"netpol-canary": "true"}
    ip = _listener(cluster, namespace, "canary", labels)
    _create(
        cluster,
        namespace,
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "canary-deny-all"},
            "spec": {"podSelector": {"matchLabels": labels}, "policyTypes": ["Ingress"]},
        },
    )
    return not _reached_ports(cluster, _start_client(cluster, namespace=other, labels={}, ip=ip))


def test_job_network_policy_on_real_pods(cluster: DevCluster, namespace_factory: Callable[[], str]) -> None:
    job_ns, operator_ns, monitoring_ns, other_ns = (namespace_factory() for _ in range(4))
    where = {
        netpol.JOB_NAMESPACE: job_ns,
        netpol.OPERATOR_NAMESPACE: operator_ns,
        netpol.MONITORING_NAMESPACE: monitoring_ns,
        "team-b": other_ns,
    }
    enforced = _enforced(cluster, namespace=job_ns, other=other_ns)

    ident = names.JobIdentity(name=netpol.JOB, namespace=job_ns, uid="00000000-0000-0000-0000-000000000000")
    settings = Settings(
        **{
            **netpol.SETTINGS_WITH_SCRAPERS,
            "operator_namespace": operator_ns,
            "metrics_scraper_namespace_labels": {netpol.NAMESPACE_NAME_LABEL: monitoring_ns},
        }
    )
    policy = builders.build_network_policy(ident, settings=settings)
    policy["metadata"].pop("ownerReferences")  # no FineTuneJob owns it here
    _create(cluster, job_ns, policy)
    ip = _listener(cluster, job_ns, "job-head", names.pod_labels(ident, role=names.ROLE_HEAD))

    clients = {  # all at once: they only connect, so their order does not matter
        c.peer.name: _start_client(cluster, namespace=where[c.peer.namespace], labels=dict(c.peer.labels), ip=ip)
        for c in netpol.REACH_CASES
    }
    reached = {peer: _reached_ports(cluster, client) for peer, client in clients.items()}
    if not enforced:
        assert all(ports == frozenset(ALL_PORTS) for ports in reached.values()), reached
        pytest.skip(
            "this node does not enforce NetworkPolicy (a deny-all canary was reachable): the harness works "
            "(every peer reached every port), the policy itself was not exercised"
        )
    wrong = {c.peer.name: sorted(reached[c.peer.name]) for c in netpol.REACH_CASES if reached[c.peer.name] != c.allowed}
    assert not wrong, f"peers reaching other ports than the table allows: {wrong}"
