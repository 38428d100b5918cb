"""A thin, typed-enough wrapper over kubernetes_asyncio's ApiClient speaking plain dicts.

Why: the pure layers produce and consume manifests as dicts in wire form; converting to and from generated model
classes would add a second representation. Idempotency lives here: a 409 on create and a 404 on delete are
success ("already there" / "already gone"), everything else raises ApiError with the server's message.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import aiohttp
from kubernetes_asyncio import client as k8s

from finetune_operator import names

Body = dict[str, Any]

_CORE_KINDS = {"Pod": "pods", "Service": "services", "ConfigMap": "configmaps", "Event": "events"}
# The kinds of a job's children, in creation order (pods last); cleanup deletes them in reverse.
CHILD_KINDS = ("ConfigMap", "NetworkPolicy", "Service", "Pod")
_GROUP_KINDS = {
    "NetworkPolicy": ("networking.k8s.io/v1", "networkpolicies"),
    "Lease": ("coordination.k8s.io/v1", "leases"),
    names.KIND: (names.GROUP_VERSION, names.PLURAL),
    # Kueue (labelled jobs, settings.kueue_enabled); ResourceFlavor and the priority classes are cluster-scoped.
    "Workload": ("kueue.x-k8s.io/v1beta2", "workloads"),
    "ResourceFlavor": ("kueue.x-k8s.io/v1beta2", "resourceflavors"),
    "WorkloadPriorityClass": ("kueue.x-k8s.io/v1beta2", "workloadpriorityclasses"),
    "PriorityClass": ("scheduling.k8s.io/v1", "priorityclasses"),
}


class ApiError(Exception):
    """A Kubernetes API call failed; status 0 means the server could not be reached."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


def collection_path(kind: str, namespace: str | None) -> str:
    if kind in _CORE_KINDS:
        prefix, plural = "/api/v1", _CORE_KINDS[kind]
    else:
        api_version, plural = _GROUP_KINDS[kind]
        prefix = f"/apis/{api_version}"
    return f"{prefix}/namespaces/{namespace}/{plural}" if namespace else f"{prefix}/{plural}"


def _message(error: k8s.ApiException) -> str:
    try:
        body = json.loads(error.body or "{}")
        return str(body.get("message") or error.reason)
    except (TypeError, ValueError):
        return str(error.reason)


class Kube:
    def __init__(self, api: k8s.ApiClient, *, on_request: Callable[[str], None] | None = None) -> None:
        self.api = api
        self.on_request = on_request  # counts requests by method (operator metrics; write amplification benches)

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: Sequence[tuple[str, str]] = (),
        content_type: str = "application/json",
    ) -> Body:
        if self.on_request is not None:
            self.on_request(method)
        try:
            result = await self.api.call_api(
                path,
                method,
                query_params=list(query),
                header_params={"Accept": "application/json", "Content-Type": content_type},
                body=body,
                response_types_map={200: "object", 201: "object", 202: "object"},
                auth_settings=["BearerToken"],
                _return_http_data_only=True,
            )
        except k8s.ApiException as e:
            raise ApiError(int(e.status or 0), _message(e)) from e
        except (TimeoutError, aiohttp.ClientError) as e:
            raise ApiError(0, f"API server unreachable: {e}") from e
        return dict(result or {})

    # ---- generic ----
    async def create(self, manifest: Mapping[str, Any]) -> bool:
        """Create; False when it already exists (409), which callers treat as success."""
        path = collection_path(manifest["kind"], manifest["metadata"]["namespace"])
        try:
            await self.request("POST", path, body=dict(manifest))
        except ApiError as e:
            if e.status == 409:
                return False
            raise
        return True

    async def delete(self, kind: str, *, namespace: str, name: str, uid: str | None = None) -> bool:
        """Delete (background propagation); False when already gone (404) or replaced (409 on the uid precondition)."""
        body: Body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            await self.request("DELETE", f"{collection_path(kind, namespace)}/{name}", body=body)
        except ApiError as e:
            if e.status in {404, 409}:
                return False
            raise
        return True

    async def get(self, kind: str, *, namespace: str, name: str) -> Body | None:
        try:
            return await self.request("GET", f"{collection_path(kind, namespace)}/{name}")
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    async def pod_log_tail(self, *, namespace: str, name: str, lines: int) -> list[str]:
        """The last lines of a pod's (first container's) log; empty when it cannot be read (best effort)."""
        query = [("tailLines", str(lines)), ("limitBytes", "65536")]
        path = f"{collection_path('Pod', namespace)}/{name}/log"
        if self.on_request is not None:
            self.on_request("GET")
        try:
            text = await self.api.call_api(
                path,
                "GET",
                query_params=query,
                header_params={"Accept": "text/plain"},
                response_types_map={200: "str"},
                auth_settings=["BearerToken"],
                _return_http_data_only=True,
            )
        except (k8s.ApiException, TimeoutError, aiohttp.ClientError, ValueError):
            return []
        return str(text or "").splitlines()[-lines:]

    async def list(self, kind: str, *, namespace: str | None, selector: str | None = None) -> list[Body]:
        query = [("labelSelector", selector)] if selector else []
        result = await self.request("GET", collection_path(kind, namespace), query=query)
        items: list[Body] = result.get("items") or []
        return items

    # ---- FineTuneJob ----
    async def patch_job_status(self, *, namespace: str, name: str, resource_version: str, status: Body) -> Body:
        """Merge-patch the status subresource; 409 when the job changed since it was read (optimistic lock)."""
        body = {"metadata": {"resourceVersion": resource_version}, "status": status}
        return await self.request(
            "PATCH",
            f"{collection_path(names.KIND, namespace)}/{name}/status",
            body=body,
            content_type="application/merge-patch+json",
        )

    async def merge_patch(
        self, kind: str, *, namespace: str, name: str, body: Mapping[str, Any], subresource: str | None = None
    ) -> Body:
        """JSON merge patch (of a subresource such as status); a resourceVersion in the body makes it conditional."""
        path = f"{collection_path(kind, namespace)}/{name}" + (f"/{subresource}" if subresource else "")
        return await self.request("PATCH", path, body=dict(body), content_type="application/merge-patch+json")

    async def replace(self, manifest: Mapping[str, Any]) -> Body:
        meta = manifest["metadata"]
        return await self.request(
            "PUT", f"{collection_path(manifest['kind'], meta['namespace'])}/{meta['name']}", body=dict(manifest)
        )
