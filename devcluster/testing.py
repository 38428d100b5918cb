"""Small helpers for tests that talk to the dev cluster: polling with a deadline and pod shortcuts.

Every wait has a deadline and says what it waited for, so a hung control plane fails a test with a clear
message instead of eating the suite's timeout.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from kubernetes import client as k8s

from devcluster.kube import call_json

T = TypeVar("T")


def wait_for(fn: Callable[[], T | None], *, timeout: float, what: str, interval: float = 0.2) -> T:
    """Poll `fn` until it returns something truthy; raise TimeoutError naming `what` (and the last value)."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = fn()
        if last:
            return last
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")
        time.sleep(interval)


def pod_manifest(
    name: str,
    command: list[str],
    *,
    restart_policy: str = "Never",
    labels: Mapping[str, str] | None = None,
    **container: Any,
) -> dict[str, Any]:
    """A one-container pod running `command` (real-node tests pass their `image`; kwok nodes ignore it)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": dict(labels or {})},
        "spec": {
            "restartPolicy": restart_policy,
            "terminationGracePeriodSeconds": 5,
            "containers": [{"name": "main", "image": "python:3.11", "command": command, **container}],
        },
    }


def get_pod(api: k8s.ApiClient, namespace: str, name: str) -> dict[str, Any] | None:
    """The pod as JSON, or None when it does not exist."""
    try:
        return call_json(k8s.CoreV1Api(api).read_namespaced_pod, name, namespace)
    except k8s.ApiException as e:
        if e.status == 404:
            return None
        raise


def wait_phase(
    api: k8s.ApiClient, namespace: str, name: str, phases: tuple[str, ...], *, timeout: float = 60
) -> dict[str, Any]:
    """Wait until the pod's phase is one of `phases`; return the pod."""

    def check() -> dict[str, Any] | None:
        pod = get_pod(api, namespace, name)
        return pod if pod and (pod.get("status") or {}).get("phase") in phases else None

    return wait_for(check, timeout=timeout, what=f"pod {namespace}/{name} phase in {phases}")


def container_state(pod: Mapping[str, Any], container: str = "main") -> dict[str, Any]:
    """state{} of a container status ({} when not reported yet)."""
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == container:
            return {k: v for k, v in (cs.get("state") or {}).items() if v}
    return {}


def wait_crd_established(api: k8s.ApiClient, name: str, *, timeout: float = 60) -> None:
    """Wait until the CustomResourceDefinition `name` has condition Established=True.

    Used instead of `kubectl wait --for=condition=Established` right after applying a CRD: that can fail at
    once with "accessor error: <nil>" when it reads the CRD before the API server has set any condition.
    """

    def established() -> bool:
        try:
            crd = call_json(k8s.ApiextensionsV1Api(api).read_custom_resource_definition, name)
        except k8s.ApiException as e:
            if e.status == 404:
                return False
            raise
        conditions = (crd.get("status") or {}).get("conditions") or []
        return any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions)

    wait_for(established, timeout=timeout, what=f"CRD {name} Established")
