"""Run images with podman the way this machine allows, and look inside their network namespaces from the host.

podman's default runtime here (crun 1.8) rejects the hybrid cgroup layout, so containers run under runc; runc
cannot raise rlimits above what this process may (no CAP_SYS_RESOURCE), so they are lowered explicitly. Checks
against a container's ports run the host's Python inside the container's network namespace (nsenter), so the
containers need no published ports and never collide with anything else on the machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

RUN = [
    "podman", "run", "--runtime", "runc", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
]  # fmt: skip


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def run_once(image: str, *args: str, options: Sequence[str] = (), timeout: float = 300) -> str:
    """Run a container to completion (removed afterwards); returns its stdout, raises with stderr on failure."""
    argv = [*RUN, "--rm", *options, image, *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"{image} {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()[-3000:]}")
    return proc.stdout


def read_only_args(*, scratch: Path | None = None, writable: Sequence[str] = (), shm: str = "") -> list[str]:
    """A read-only root with exactly the given writable directories: empty, world-writable host directories under
    `scratch`, as a pod's emptyDirs are (podman's --tmpfs takes the image directory's owner and mode instead)."""
    args = ["--read-only", "--read-only-tmpfs=false"]
    for path in writable:
        assert scratch is not None, "writable directories need a scratch directory to live in"
        host = scratch / "emptydirs" / path.strip("/").replace("/", "_")
        host.mkdir(parents=True)
        host.chmod(0o1777)
        args += ["-v", f"{host}:{path}"]
    if shm:
        args += ["--shm-size", shm]
    return args


@dataclass
class Containers:
    """Containers started by one test; all removed at the end (only these, by id)."""

    started: list[str] = field(default_factory=list)

    def start(self, image: str, *args: str, options: Sequence[str] = ()) -> str:
        proc = subprocess.run([*RUN, "--detach", *options, image, *args], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise AssertionError(f"podman run {image} failed: {proc.stderr.strip()}")
        cid = proc.stdout.strip().splitlines()[-1]
        self.started.append(cid)
        return cid

    def remove_all(self) -> None:
        for cid in self.started:
            podman("rm", "--force", "--time", "5", cid, check=False)


def inspect(cid: str) -> dict[str, object]:
    data: list[dict[str, object]] = json.loads(podman("inspect", cid).stdout)
    return data[0]


def main_pid(cid: str) -> int:
    state = inspect(cid)["State"]
    assert isinstance(state, dict)
    pid = int(state["Pid"])
    assert pid > 0, f"container {cid[:12]} is not running: {state}"
    return pid


def process_ids(pid: int) -> tuple[int, int]:
    """Real uid and gid of a process, from /proc."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(status["Uid"].split()[0]), int(status["Gid"].split()[0])


def logs(cid: str) -> str:
    proc = podman("logs", cid, check=False)
    return proc.stdout + proc.stderr


def in_netns(pid: int, code: str, *, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run Python `code` in the network namespace of process `pid` (and nothing else of the container)."""
    return subprocess.run(
        ["nsenter", f"--net=/proc/{pid}/ns/net", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def wait_http(pid: int, url: str, *, cid: str, timeout: float = 60) -> str:
    """GET `url` inside the container's network namespace until it answers 200; returns the body."""
    code = (
        "import sys, urllib.request\n"
        f"with urllib.request.urlopen({url!r}, timeout=3) as r:\n"
        "    sys.stdout.write(r.read().decode())\n"
    )
    deadline = time.monotonic() + timeout
    while True:
        proc = in_netns(pid, code)
        if proc.returncode == 0:
            return proc.stdout
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} never answered 200 within {timeout:.0f}s: {proc.stderr[-500:]}\n{logs(cid)}")
        time.sleep(0.5)
