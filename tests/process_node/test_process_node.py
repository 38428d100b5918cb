"""The process node runs pods as real local processes and reports them like a kubelet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from kubernetes import client as k8s

from devcluster import network
from devcluster.binaries import REPO_ROOT, locate
from devcluster.kube import call_json
from devcluster.testing import container_state, get_pod, pod_manifest, wait_for, wait_phase
from tests.devcluster.cluster import ProcessCluster as DevCluster
from tests.devcluster.node import NodeSpec

pytestmark = [pytest.mark.cluster, pytest.mark.node]


def create(cluster: DevCluster, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
    """Create any core object from a manifest dict (pods, services, secrets, config maps)."""
    with cluster.api() as api:
        core = k8s.CoreV1Api(api)
        kind = {"Pod": "pod", "Service": "service", "Secret": "secret", "ConfigMap": "config_map"}[
            body.get("kind", "Pod")
        ]
        fn: Callable[..., Any] = getattr(core, f"create_namespaced_{kind}")
        return call_json(fn, namespace, body)


def test_exit_codes_phases_and_logs(cluster: DevCluster, namespace: str) -> None:
    create(cluster, namespace, pod_manifest("fails", ["python", "-c", "import sys; print('bye'); sys.exit(3)"]))
    create(cluster, namespace, pod_manifest("works", ["python", "-c", "print('hello from a pod')"]))
    with cluster.api() as api:
        failed = wait_phase(api, namespace, "fails", ("Failed", "Succeeded"))
        ok = wait_phase(api, namespace, "works", ("Failed", "Succeeded"))
    assert failed["status"]["phase"] == "Failed"
    term = container_state(failed)["terminated"]
    assert (term["exitCode"], term["reason"]) == (3, "Error")
    assert ok["status"]["phase"] == "Succeeded"
    assert container_state(ok)["terminated"]["reason"] == "Completed"
    assert ok["status"]["podIP"].startswith(cluster.gateway_ip.rsplit(".", 2)[0])
    assert cluster.pod_logs(namespace, "works") == "hello from a pod\n"
    # kubectl logs goes API server -> node log endpoint over TLS, like a real kubelet.
    assert cluster.kubectl("logs", "-n", namespace, "fails").stdout == "bye\n"


def test_services_resolve_to_pods_across_namespaces(cluster: DevCluster, namespace_factory: Callable[[], str]) -> None:
    server = (
        "import http.server,os\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        " def do_GET(self):\n"
        "  b=os.environ['ANSWER'].encode()\n"
        "  self.send_response(200); self.end_headers(); self.wfile.write(b)\n"
        "http.server.HTTPServer(('',8080),H).serve_forever()"
    )
    namespaces = [namespace_factory(), namespace_factory()]
    for i, ns in enumerate(namespaces):
        pod = pod_manifest(
            "web", ["python", "-c", server], labels={"app": "web"}, env=[{"name": "ANSWER", "value": f"answer-{i}"}]
        )
        pod["spec"]["containers"][0]["readinessProbe"] = {"tcpSocket": {"port": 8080}, "periodSeconds": 1}
        create(cluster, ns, pod)
        create(
            cluster,
            ns,
            {
                "kind": "Service",
                "metadata": {"name": "web"},
                "spec": {"selector": {"app": "web"}, "ports": [{"port": 8080}]},
            },
        )
    with cluster.api() as api:
        for ns in namespaces:

            def ready(ns: str = ns) -> bool:
                conds = ((get_pod(api, ns, "web") or {}).get("status") or {}).get("conditions") or []
                return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)

            wait_for(ready, timeout=60, what=f"web in {ns} Ready")
    client = (
        "import urllib.request,sys\n"
        "for h in sys.argv[1:]:\n"
        " print(h, urllib.request.urlopen(f'http://{h}:8080/', timeout=5).read().decode())"
    )
    hosts = [f"web.{ns}.svc.cluster.local" for ns in namespaces] + ["web"]
    create(cluster, namespaces[0], pod_manifest("client", ["python", "-c", client, *hosts]))
    with cluster.api() as api:
        pod = wait_phase(api, namespaces[0], "client", ("Succeeded", "Failed"))
    logs = cluster.pod_logs(namespaces[0], "client")
    assert pod["status"]["phase"] == "Succeeded", logs
    assert logs.splitlines() == [
        f"web.{namespaces[0]}.svc.cluster.local answer-0",
        f"web.{namespaces[1]}.svc.cluster.local answer-1",
        "web answer-0",  # the short name resolves in the client's own namespace
    ]


def test_unschedulable_pod_reports_scheduler_message(cluster: DevCluster, namespace: str) -> None:
    pod = pod_manifest(
        "gpu", ["sleep", "1"], resources={"requests": {"nvidia.com/gpu": "1"}, "limits": {"nvidia.com/gpu": "1"}}
    )
    create(cluster, namespace, pod)
    with cluster.api() as api:
        nodes = len(call_json(k8s.CoreV1Api(api).list_node)["items"])

        def condition() -> dict[str, Any] | None:
            for c in ((get_pod(api, namespace, "gpu") or {}).get("status") or {}).get("conditions") or []:
                if c["type"] == "PodScheduled" and c["status"] == "False":
                    return dict(c)
            return None

        cond = wait_for(condition, timeout=30, what="PodScheduled=False")
    assert cond["reason"] == "Unschedulable"
    assert cond["message"].startswith(f"0/{nodes} nodes are available: {nodes} Insufficient nvidia.com/gpu.")
    assert (get_pod(cluster.api(), namespace, "gpu") or {})["spec"].get("nodeName") is None


def test_env_value_from_and_volumes(cluster: DevCluster, namespace: str) -> None:
    create(cluster, namespace, {"kind": "Secret", "metadata": {"name": "creds"}, "stringData": {"key": "s3cr3t"}})
    create(
        cluster,
        namespace,
        {"kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"mode": "fast", "app.yaml": "a: 1\n"}},
    )
    script = (
        "import os,json,pathlib\n"
        "out={k:os.environ.get(k) for k in ['SECRET','MODE','MISSING','POD','NS','IP','NODE','CPU','PFX_mode']}\n"
        "out['cfg']=pathlib.Path('/etc/devcluster-test/app/config.yaml').read_text()\n"
        "out['sec']=pathlib.Path('/etc/devcluster-test/secret/key').read_text()\n"
        "pathlib.Path('/scratch/x').write_text('shared'); out['scratch']=pathlib.Path('/scratch/x').read_text()\n"
        "out['shm']=pathlib.Path('/dev/shm/fast').is_dir()\n"
        "out['token']=pathlib.Path('/var/run/secrets/kubernetes.io/serviceaccount/token').read_text().count('.')\n"
        "out['cwd']=os.getcwd()\n"
        "print(json.dumps(out))"
    )
    pod = pod_manifest(
        "envpod",
        ["python", "-c", script],
        workingDir="/scratch",
        env=[
            {"name": "SECRET", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "key"}}},
            {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "mode"}}},
            {"name": "MISSING", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k", "optional": True}}},
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            {"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
        ],
        envFrom=[{"prefix": "PFX_", "configMapRef": {"name": "cfg"}}],
        resources={"limits": {"cpu": "2", "memory": "1Gi"}},
        volumeMounts=[
            {"name": "cfg", "mountPath": "/etc/devcluster-test/app"},
            {"name": "sec", "mountPath": "/etc/devcluster-test/secret", "readOnly": True},
            {"name": "scratch", "mountPath": "/scratch"},
            {"name": "shm", "mountPath": "/dev/shm/fast"},
        ],
    )
    pod["spec"]["volumes"] = [
        {"name": "cfg", "configMap": {"name": "cfg", "items": [{"key": "app.yaml", "path": "config.yaml"}]}},
        {"name": "sec", "secret": {"secretName": "creds"}},
        {"name": "scratch", "emptyDir": {}},
        {"name": "shm", "emptyDir": {"medium": "Memory"}},
    ]
    create(cluster, namespace, pod)
    with cluster.api() as api:
        done = wait_phase(api, namespace, "envpod", ("Succeeded", "Failed"))
    logs = cluster.pod_logs(namespace, "envpod")
    assert done["status"]["phase"] == "Succeeded", logs
    out = json.loads(logs.strip().splitlines()[-1])
    assert out == {
        "SECRET": "s3cr3t",
        "MODE": "fast",
        "MISSING": None,
        "POD": "envpod",
        "NS": namespace,
        "IP": done["status"]["podIP"],
        "NODE": done["spec"]["nodeName"],
        "CPU": "2",
        "PFX_mode": "fast",
        "cfg": "a: 1\n",
        "sec": "s3cr3t",
        "scratch": "shared",
        "shm": True,
        "token": 2,  # a JWT from the TokenRequest API (the kube-api-access projected volume)
        "cwd": "/scratch",
    }


def test_deletion_sends_sigterm_then_removes_pod(cluster: DevCluster, namespace: str) -> None:
    script = (
        "import signal,sys,time\n"
        "def bye(*_):\n print('got SIGTERM', flush=True); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, bye)\nprint('ready', flush=True)\ntime.sleep(600)"
    )
    create(cluster, namespace, pod_manifest("graceful", ["python", "-c", script]))
    with cluster.api() as api:
        wait_phase(api, namespace, "graceful", ("Running",))
        wait_for(lambda: "ready" in cluster.pod_logs(namespace, "graceful"), timeout=30, what="process up")
        t0 = time.monotonic()
        k8s.CoreV1Api(api).delete_namespaced_pod("graceful", namespace, grace_period_seconds=30, _preload_content=False)
        wait_for(lambda: get_pod(api, namespace, "graceful") is None, timeout=30, what="pod removed")
        assert time.monotonic() - t0 < 15, "pod exited on SIGTERM, well before the 30 s grace period"
    assert "got SIGTERM" in cluster.pod_logs(namespace, "graceful")


def test_container_exit_kills_what_its_main_process_left_behind(cluster: DevCluster, namespace: str) -> None:
    # A non-interactive sh keeps `&` children in its own process group (no job control), like the daemons
    # `ray start --head` leaves behind after it exits. A container runtime kills them with the container.
    marker = f"bg-{namespace}"
    script = 'sleep 1000 & echo "bg=$!"; exit 0'
    create(cluster, namespace, pod_manifest("leaver", ["sh", "-c", script], env=[{"name": "FT_MARK", "value": marker}]))
    with cluster.api() as api:
        done = wait_phase(api, namespace, "leaver", ("Succeeded", "Failed"))
    assert done["status"]["phase"] == "Succeeded"
    assert container_state(done)["terminated"]["exitCode"] == 0
    log = cluster.pod_logs(namespace, "leaver")
    assert log.startswith("bg="), log
    bg_pid = int(log.split("=", 1)[1].strip())

    def leftovers() -> list[int]:
        found = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if p.info["cmdline"] != ["sleep", "1000"] or p.status() == psutil.STATUS_ZOMBIE:
                    continue
                if p.pid == bg_pid or p.environ().get("FT_MARK") == marker:
                    found.append(p.pid)
            except psutil.Error:
                continue
        return found

    wait_for(lambda: not leftovers(), timeout=10, what=f"no `sleep 1000` left by the pod (pid {bg_pid})")


def test_termination_messages(cluster: DevCluster, namespace: str) -> None:
    writes_file = (
        "import json,sys\nopen('/dev/termination-log','w').write(json.dumps({'reason':'OutOfData'}))\nsys.exit(2)"
    )
    pod = pod_manifest("term", ["python", "-c", writes_file])
    pod["spec"]["containers"].append(
        {
            "name": "fallback",
            "image": "x",
            "command": ["python", "-c", "import sys; print('noise'); print('{\"reason\": \"Boom\"}'); sys.exit(1)"],
            "terminationMessagePolicy": "FallbackToLogsOnError",
        }
    )
    create(cluster, namespace, pod)
    with cluster.api() as api:
        done = wait_phase(api, namespace, "term", ("Failed", "Succeeded"))
    assert done["status"]["phase"] == "Failed"
    main = container_state(done, "main")["terminated"]
    fallback = container_state(done, "fallback")["terminated"]
    assert (main["exitCode"], json.loads(main["message"])) == (2, {"reason": "OutOfData"})
    assert fallback["exitCode"] == 1
    assert fallback["message"].strip().splitlines()[-1] == '{"reason": "Boom"}'


def test_restart_on_failure_counts_restarts(cluster: DevCluster, namespace: str) -> None:
    script = (
        "import os,sys\np='/restart-state/marker'\nif os.path.exists(p): sys.exit(0)\nopen(p,'w').close(); sys.exit(1)"
    )
    pod = pod_manifest(
        "flaky",
        ["python", "-c", script],
        restart_policy="OnFailure",
        volumeMounts=[{"name": "w", "mountPath": "/restart-state"}],
    )
    pod["spec"]["volumes"] = [{"name": "w", "emptyDir": {}}]
    create(cluster, namespace, pod)
    with cluster.api() as api:
        done = wait_phase(api, namespace, "flaky", ("Succeeded", "Failed"), timeout=60)
    status = done["status"]["containerStatuses"][0]
    assert done["status"]["phase"] == "Succeeded"
    assert status["restartCount"] == 1
    assert status["lastState"]["terminated"]["exitCode"] == 1


def test_unpullable_image_reports_pull_errors(cluster: DevCluster, namespace: str) -> None:
    pod = pod_manifest("nopull", ["true"])
    pod["spec"]["containers"][0]["image"] = "unpullable.invalid/trainer:v1"
    create(cluster, namespace, pod)
    with cluster.api() as api:

        def waiting_reason() -> str | None:
            w = container_state(get_pod(api, namespace, "nopull") or {}).get("waiting") or {}
            return w.get("reason") if w.get("reason") in ("ErrImagePull", "ImagePullBackOff") else None

        assert wait_for(waiting_reason, timeout=30, what="image pull error")
        assert (get_pod(api, namespace, "nopull") or {})["status"]["phase"] == "Pending"


def test_simulated_node_reports_without_processes(cluster: DevCluster, namespace: str) -> None:
    taint = {"key": "devcluster.finetune.dev/simulated", "value": "true", "effect": "NoSchedule"}
    name = f"sim-{namespace[-6:]}"
    cluster.add_node(
        NodeSpec(name=name, cpu="64", memory="256Gi", gpus=8, labels={"pool": name}, taints=(taint,), simulate=True)
    )
    try:
        for i in range(3):
            pod = pod_manifest(
                f"sim{i}",
                ["this-command-does-not-exist"],
                resources={"limits": {"nvidia.com/gpu": "2"}},
            )
            pod["spec"]["nodeSelector"] = {"pool": name}
            pod["spec"]["tolerations"] = [{"key": taint["key"], "operator": "Exists"}]
            create(cluster, namespace, pod)
        with cluster.api() as api:
            for i in range(3):
                running = wait_phase(api, namespace, f"sim{i}", ("Running",))
                assert running["spec"]["nodeName"] == name
                assert container_state(running)["running"]
            cluster.simulate_exit(namespace, "sim0", exit_code=0)
            cluster.simulate_exit(namespace, "sim1", exit_code=1, message='{"reason": "NaNLoss"}')
            ok = wait_phase(api, namespace, "sim0", ("Succeeded", "Failed"))
            bad = wait_phase(api, namespace, "sim1", ("Succeeded", "Failed"))
            assert ok["status"]["phase"] == "Succeeded"
            assert bad["status"]["phase"] == "Failed"
            term = container_state(bad)["terminated"]
            assert (term["exitCode"], term["message"]) == (1, '{"reason": "NaNLoss"}')
            assert (get_pod(api, namespace, "sim2") or {})["status"]["phase"] == "Running"
    finally:
        cluster.remove_node(name)


def test_lost_node_kills_processes_and_goes_not_ready(cluster: DevCluster, namespace: str) -> None:
    name = f"lossy-{namespace[-6:]}"
    taint = {"key": "devcluster.finetune.dev/lossy", "value": "true", "effect": "NoSchedule"}
    cluster.add_node(NodeSpec(name=name, cpu="2", memory="2Gi", labels={"pool": name}, taints=(taint,)))
    try:
        pod = pod_manifest("victim", ["python", "-c", "import time; print('up', flush=True); time.sleep(600)"])
        pod["spec"]["nodeSelector"] = {"pool": name}
        pod["spec"]["tolerations"] = [{"key": taint["key"], "operator": "Exists"}]
        create(cluster, namespace, pod)
        with cluster.api() as api:
            wait_phase(api, namespace, "victim", ("Running",))
            wait_for(lambda: "up" in cluster.pod_logs(namespace, "victim"), timeout=30, what="process up")
            pidfiles = list((cluster.node_state_dir / "pids").glob("*-main.pid"))
            pids = {json.loads(p.read_text())["pid"] for p in pidfiles}
            pod_uid = (get_pod(api, namespace, "victim") or {})["metadata"]["uid"]
            victim_pid = json.loads((cluster.node_state_dir / "pids" / f"{pod_uid}-main.pid").read_text())["pid"]
            assert victim_pid in pids and psutil.pid_exists(victim_pid)
            cluster.lose_node(name)
            wait_for(lambda: not psutil.pid_exists(victim_pid), timeout=10, what="pod process killed")
            node = call_json(k8s.CoreV1Api(api).read_node, name)
            ready = next(c for c in node["status"]["conditions"] if c["type"] == "Ready")
            assert ready["status"] == "Unknown"
            # The pod keeps its last reported status, as with an unreachable kubelet.
            assert (get_pod(api, namespace, "victim") or {})["status"]["phase"] == "Running"
    finally:
        cluster.remove_node(name)


def test_init_containers_run_first_and_conditions_follow(cluster: DevCluster, namespace: str) -> None:
    pod = pod_manifest(
        "init",
        ["python", "-c", "print(open('/shared/f').read().strip())"],
        volumeMounts=[{"name": "s", "mountPath": "/shared"}],
    )
    pod["spec"]["initContainers"] = [
        {
            "name": "prepare",
            "image": "x",
            "command": ["sh", "-c", "echo prepared > /shared/f"],
            "volumeMounts": [{"name": "s", "mountPath": "/shared"}],
        }
    ]
    pod["spec"]["volumes"] = [{"name": "s", "emptyDir": {}}]
    create(cluster, namespace, pod)
    with cluster.api() as api:
        done = wait_phase(api, namespace, "init", ("Succeeded", "Failed"))
    assert done["status"]["phase"] == "Succeeded", cluster.pod_logs(namespace, "init")
    assert done["status"]["initContainerStatuses"][0]["state"]["terminated"]["reason"] == "Completed"
    assert cluster.pod_logs(namespace, "init", "main") == "prepared\n"
    conds = {c["type"]: c for c in done["status"]["conditions"]}
    assert conds["Initialized"]["status"] == "True" and not conds["Initialized"].get("reason")
    assert conds["Ready"]["status"] == "False" and conds["Ready"]["reason"] == "PodCompleted"


def test_pods_reach_the_api_server_with_their_service_account(cluster: DevCluster, namespace: str) -> None:
    script = (
        "from kubernetes import client, config\n"
        "config.load_incluster_config()\n"
        "api = client.ApiClient()\n"
        "print(client.VersionApi(api).get_code().git_version)\n"
        "try:\n"
        "    client.CoreV1Api(api).list_namespaced_secret('default')\n"
        "    print('allowed')\n"
        "except client.ApiException as e:\n"
        "    print(e.status)\n"
    )
    create(cluster, namespace, pod_manifest("incluster", ["python", "-c", script]))
    with cluster.api() as api:
        done = wait_phase(api, namespace, "incluster", ("Succeeded", "Failed"))
    logs = cluster.pod_logs(namespace, "incluster")
    assert done["status"]["phase"] == "Succeeded", logs
    # Verified TLS to the real API server (service-account ca.crt), authenticated as the pod's SA: not admin.
    server = json.loads(cluster.kubectl("version", "-o", "json").stdout)["serverVersion"]["gitVersion"]
    assert logs.split() == [server, "403"]


def test_down_leaves_no_process_behind(tmp_path: Path) -> None:
    """`python -m tests.devcluster up` then `down` (separate processes): nothing of that cluster survives."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    state = tmp_path / "c"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    cli = [sys.executable, "-m", "tests.devcluster"]
    subprocess.run(
        [*cli, "up", "--state-dir", str(state)], check=True, cwd=REPO_ROOT, env=env, timeout=180, capture_output=True
    )
    info = json.loads((state / "cluster.json").read_text())
    net = network.NetConfig(int(info["net_index"]))
    kubectl = [str(locate().kubectl), f"--kubeconfig={info['kubeconfig']}"]
    subprocess.run(
        [*kubectl, "run", "sleeper", "--image=x", "--restart=Never", "--command", "--", "sleep", "600"],
        check=True,
        capture_output=True,
    )
    pidfiles = state / "node" / "pids"
    wait_for(lambda: list(pidfiles.glob("*-sleeper.pid")), timeout=30, what="pod process started")
    pod_pids = [json.loads(p.read_text())["pid"] for p in pidfiles.glob("*.pid")]
    assert pod_pids and all(psutil.pid_exists(p) for p in pod_pids)
    assert any(ns.startswith(net.netns_prefix) for ns in network.ip("netns", "list").stdout.split())

    subprocess.run(
        [*cli, "down", "--state-dir", str(state)], check=True, cwd=REPO_ROOT, env=env, timeout=120, capture_output=True
    )

    leftovers = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if p.info["status"] != psutil.STATUS_ZOMBIE and (str(state) in cmd or p.info["pid"] in pod_pids):
            leftovers.append(f"{p.info['pid']}: {cmd[:120]}")
    assert leftovers == []
    assert not [ns for ns in network.ip("netns", "list").stdout.split() if ns.startswith(net.netns_prefix)]
    assert not network.bridge_exists(net.bridge)
