"""The control plane is real: CRD validation with CEL, garbage collection, RBAC."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
from kubernetes import client as k8s

from devcluster import DevCluster
from devcluster.controlplane import api_client
from devcluster.kube import call_json
from devcluster.testing import get_pod, pod_manifest, wait_for, wait_phase

pytestmark = pytest.mark.cluster

CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.devcluster.test"},
    "spec": {
        "group": "devcluster.test",
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "properties": {"min": {"type": "integer"}, "max": {"type": "integer"}},
                                "x-kubernetes-validations": [
                                    {"rule": "self.min <= self.max", "message": "min must not exceed max"}
                                ],
                            }
                        },
                    }
                },
            }
        ],
    },
}


CRD_NAME = "widgets.devcluster.test"


def test_crd_with_cel_rule_rejects_invalid_object(cluster: DevCluster, namespace: str) -> None:
    with cluster.api() as api:
        ext = k8s.ApiextensionsV1Api(api)
        try:
            call_json(ext.create_custom_resource_definition, CRD)
        except k8s.ApiException as e:
            assert e.status == 409, e.body
        wait_for(
            lambda: any(
                c.get("type") == "Established" and c.get("status") == "True"
                for c in (call_json(ext.read_custom_resource_definition, CRD_NAME).get("status") or {}).get(
                    "conditions"
                )
                or []
            ),
            timeout=30,
            what="CRD Established",
        )
        objs = k8s.CustomObjectsApi(api)

        def create(name: str, lo: int, hi: int) -> dict[str, object]:
            body = {
                "apiVersion": "devcluster.test/v1",
                "kind": "Widget",
                "metadata": {"name": name},
                "spec": {"min": lo, "max": hi},
            }
            return call_json(objs.create_namespaced_custom_object, "devcluster.test", "v1", namespace, "widgets", body)

        def create_ok() -> dict[str, object] | None:
            try:
                return create("good", 1, 2)
            except k8s.ApiException as e:  # the new resource may take a moment to be served
                if e.status == 404:
                    return None
                raise

        assert wait_for(create_ok, timeout=30, what="valid Widget accepted")["spec"] == {"min": 1, "max": 2}
        with pytest.raises(k8s.ApiException) as err:
            create("bad", 5, 2)
        assert err.value.status == 422
        assert "min must not exceed max" in str(err.value.body)


@pytest.fixture(scope="module")
def kwok_node(cluster: DevCluster) -> Iterator[str]:
    """A simulated node for the pods these tests only need Running (kwok reports them; nothing runs)."""
    name = f"kwok-cp-{secrets.token_hex(3)}"
    cluster.add_kwok_node(name)
    yield name
    cluster.remove_node(name)


def test_garbage_collector_deletes_owned_objects(cluster: DevCluster, namespace: str, kwok_node: str) -> None:
    with cluster.api() as api:
        core = k8s.CoreV1Api(api)
        owner = call_json(
            core.create_namespaced_config_map, namespace, {"metadata": {"name": "owner"}, "data": {"a": "b"}}
        )
        ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner["metadata"]["uid"]}
        call_json(
            core.create_namespaced_config_map, namespace, {"metadata": {"name": "owned", "ownerReferences": [ref]}}
        )
        pod = pod_manifest("owned-pod", ["sleep", "300"])
        pod["metadata"]["ownerReferences"] = [ref]
        pod["spec"]["nodeName"] = kwok_node
        call_json(core.create_namespaced_pod, namespace, pod)
        wait_phase(api, namespace, "owned-pod", ("Running",))
        core.delete_namespaced_config_map("owner", namespace, _preload_content=False)

        def gone() -> bool:
            try:
                core.read_namespaced_config_map("owned", namespace, _preload_content=False)
                return False
            except k8s.ApiException as e:
                return bool(e.status == 404)

        wait_for(gone, timeout=60, what="owned ConfigMap garbage-collected")
        # The pod is deleted by the GC, stopped by its node and then removed for good.
        wait_for(lambda: get_pod(api, namespace, "owned-pod") is None, timeout=60, what="owned Pod removed")


def test_serviceaccount_kubeconfig_has_exactly_its_rbac(cluster: DevCluster, namespace: str) -> None:
    with cluster.api() as api:
        core = k8s.CoreV1Api(api)
        rbac = k8s.RbacAuthorizationV1Api(api)
        call_json(core.create_namespaced_service_account, namespace, {"metadata": {"name": "reader"}})
        call_json(
            rbac.create_namespaced_role,
            namespace,
            {
                "metadata": {"name": "cm-reader"},
                "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}],
            },
        )
        call_json(
            rbac.create_namespaced_role_binding,
            namespace,
            {
                "metadata": {"name": "reader"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "cm-reader"},
                "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
            },
        )
        call_json(core.create_namespaced_config_map, namespace, {"metadata": {"name": "visible"}})
    kubeconfig = cluster.mint_kubeconfig(namespace, "reader")
    with api_client(kubeconfig) as sa_api:
        sa_core = k8s.CoreV1Api(sa_api)
        names = [i["metadata"]["name"] for i in call_json(sa_core.list_namespaced_config_map, namespace)["items"]]
        assert "visible" in names
        with pytest.raises(k8s.ApiException) as err:
            call_json(sa_core.create_namespaced_config_map, namespace, {"metadata": {"name": "nope"}})
        assert err.value.status == 403
        with pytest.raises(k8s.ApiException) as err:
            call_json(sa_core.list_namespaced_secret, namespace)
        assert err.value.status == 403
    who = cluster.kubectl("auth", "whoami", "-o", "jsonpath={.status.userInfo.username}", kubeconfig=kubeconfig)
    assert who.stdout == f"system:serviceaccount:{namespace}:reader"
    denied = cluster.kubectl("get", "pods", "-n", namespace, kubeconfig=kubeconfig, check=False)
    assert denied.returncode != 0 and "forbidden" in denied.stderr
