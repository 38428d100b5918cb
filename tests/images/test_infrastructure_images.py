"""The dev cluster's infrastructure images start and answer, as the non-root user their upstream images use.

Each runs under podman + runc with a read-only root filesystem and its own network namespace (no published
ports); the checks run the host's Python inside that namespace. Running them under the real kubelet belongs to
the node's tests.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from devcluster.images import Image
from tests.images.conftest import open_tree
from tests.images.podman import (
    Containers,
    in_netns,
    inspect,
    logs,
    main_pid,
    podman,
    process_ids,
    read_only_args,
    run_once,
    wait_http,
)

pytestmark = [pytest.mark.images]

# A DNS query for an A record, answered with the first address found (stdlib only).
DNS_QUERY = textwrap.dedent(
    """
    import socket, struct, sys
    name = sys.argv[1]
    question = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\\0" + struct.pack(">HH", 1, 1)
    query = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + question
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    s.sendto(query, ("127.0.0.1", 53))
    reply = s.recv(512)
    answers = struct.unpack(">H", reply[6:8])[0]
    assert answers, f"no answer (rcode {reply[3] & 15})"
    print(socket.inet_ntoa(reply[-4:]))
    """
)


def test_pause_holds_the_sandbox_as_65535_and_stops_cleanly(
    built: Callable[[str], Image], containers: Containers
) -> None:
    image = built("pause")
    assert run_once(image.ref, "-v").strip() == "finetune-pause 1.0"
    cid = containers.start(image.ref, options=read_only_args())
    assert process_ids(main_pid(cid)) == (65535, 65535)
    podman("stop", "--time", "20", cid)
    state = inspect(cid)["State"]
    assert isinstance(state, dict)
    # 0, not 137: pause exits on SIGTERM by itself instead of waiting for the runtime's SIGKILL.
    assert state["ExitCode"] == 0, logs(cid)


def test_coredns_serves_port_53_as_non_root(
    built: Callable[[str], Image], containers: Containers, tmp_path: Path
) -> None:
    image = built("coredns")
    corefile = tmp_path / "conf" / "Corefile"
    corefile.parent.mkdir()
    corefile.write_text(
        ".:53 {\n  hosts {\n    10.96.7.7 hello.finetune.test\n  }\n  health :8080\n  ready :8181\n  errors\n}\n"
    )
    open_tree(corefile.parent)
    # As in a pod on our node: every capability dropped, and the unprivileged-port sysctl containerd's CRI sets
    # (enable_unprivileged_ports), which is what lets a non-root process bind :53.
    options = [
        *read_only_args(),
        "--network",
        "none",
        "--cap-drop",
        "ALL",
        "--sysctl",
        "net.ipv4.ip_unprivileged_port_start=0",
        "-v",
        f"{corefile.parent}:/etc/coredns:ro",
    ]
    cid = containers.start(image.ref, "-conf", "/etc/coredns/Corefile", options=options)
    pid = main_pid(cid)
    assert wait_http(pid, "http://127.0.0.1:8181/ready", cid=cid) == "OK"
    # Port 53 as UID 65532 with no capability at all.
    assert process_ids(pid) == (65532, 65532)
    answer = in_netns(pid, DNS_QUERY.replace("sys.argv[1]", '"hello.finetune.test"'))
    assert answer.returncode == 0, answer.stderr + logs(cid)
    assert answer.stdout.strip() == "10.96.7.7"


def test_minio_is_live_as_non_root_with_a_read_only_root(
    built: Callable[[str], Image], containers: Containers, tmp_path: Path
) -> None:
    image = built("minio")
    options = [
        *read_only_args(scratch=tmp_path, writable=["/data", "/tmp"]),
        "--network",
        "none",
        "--user",
        "1000:1000",
    ]
    env = ["-e", "MINIO_ROOT_USER=finetune", "-e", "MINIO_ROOT_PASSWORD=finetune-secret"]
    cid = containers.start(image.ref, "server", "/data", "--address", "127.0.0.1:9000", options=[*options, *env])
    pid = main_pid(cid)
    wait_http(pid, "http://127.0.0.1:9000/minio/health/live", cid=cid)
    assert process_ids(pid) == (1000, 1000)


def test_prometheus_is_ready_as_nobody_with_kubernetes_discovery_configured(
    built: Callable[[str], Image], containers: Containers, tmp_path: Path
) -> None:
    """Kubernetes service discovery is how the in-cluster Prometheus finds the operator and trainer pods."""
    image = built("prometheus")
    config = tmp_path / "conf" / "prometheus.yml"
    config.parent.mkdir()
    sd = {"role": "pod", "api_server": "https://127.0.0.1:6443", "tls_config": {"insecure_skip_verify": True}}
    scrape = [{"job_name": "pods", "kubernetes_sd_configs": [sd]}]
    config.write_text(json.dumps({"global": {"scrape_interval": "5s"}, "scrape_configs": scrape}))
    open_tree(config.parent)
    options = [
        *read_only_args(scratch=tmp_path, writable=["/prometheus"]),
        "--network",
        "none",
        "-v",
        f"{config.parent}:/config:ro",
    ]
    cid = containers.start(image.ref, "--config.file=/config/prometheus.yml", "--storage.tsdb.path=/prometheus",
                           options=options)  # fmt: skip
    pid = main_pid(cid)
    wait_http(pid, "http://127.0.0.1:9090/-/ready", cid=cid)
    assert process_ids(pid) == (65534, 65534)
    jobs = json.loads(wait_http(pid, "http://127.0.0.1:9090/api/v1/targets?state=any", cid=cid))
    assert jobs["status"] == "success"
    assert "kubernetes_sd_configs" in wait_http(pid, "http://127.0.0.1:9090/api/v1/status/config", cid=cid)
